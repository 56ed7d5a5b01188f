"""The ``attnlab`` command. Each subcommand lives in its own module with ``add_arguments(p)`` and ``run(args)``.

Bad input (an AttnlabError) prints one line, ``attnlab: error: ...``, and exits with code 2.
"""
import argparse
import importlib
import sys

from .errors import AttnlabError

COMMANDS = {
    "profile": ("attnlab.profiler", "params, FLOPs, latency, throughput and peak memory of a model"),
    "train": ("attnlab.engine.train", "train a model from a YAML recipe with key=value overrides"),
    "eval": ("attnlab.engine.evaluate", "evaluate a checkpoint on the val or test split"),
    "export": ("attnlab.export", "export a checkpoint's model to ONNX (inference graph only)"),
    "bench": ("attnlab.bench.cli", "run a benchmark matrix (methods x seeds) through the training engine"),
    "report": ("attnlab.bench.report", "write report.md and plots for a benchmark matrix's results"),
    "search": ("attnlab.search.pipeline", "EAN connection search: supernet -> search -> retrain (resumable)"),
}


def build_parser(available):
    parser = argparse.ArgumentParser(prog="attnlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        if name in available:
            p = sub.add_parser(name, help=help_text, description=help_text)
            available[name].add_arguments(p)
    return parser


def main(argv=None):
    available = {}
    for name, (module, _) in COMMANDS.items():
        try:
            available[name] = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real missing dependency, not a command still to be written
                raise
    args = build_parser(available).parse_args(argv)
    try:
        result = available[args.command].run(args)
    except AttnlabError as err:
        print(f"attnlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("attnlab: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
