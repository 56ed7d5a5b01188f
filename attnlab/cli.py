"""The ``attnlab`` command. Each subcommand lives in its own module with ``add_arguments(p)`` and ``run(args)``;
adding one is one line in COMMANDS.

Bad input (an AttnlabError) prints one line, ``attnlab: error: ...``, and exits with code 2.
"""
import argparse
import importlib
import os
import sys

from . import __version__
from .errors import AttnlabError

COMMANDS = {
    "list": ("attnlab.listing", "list the models, attention modules, datasets and training objectives"),
    "train": ("attnlab.engine.train",
              "train a model from a YAML recipe with key=value overrides (files go to runs/<name>/)"),
    "eval": ("attnlab.engine.evaluate", "evaluate a checkpoint on the val or test split"),
    "profile": ("attnlab.profiler", "params, FLOPs, latency, throughput and peak memory of a model"),
    "export": ("attnlab.export", "export a checkpoint's model to ONNX (inference graph only)"),
    "bench": ("attnlab.bench.cli", "run a benchmark matrix (methods x seeds) through the training engine"),
    "report": ("attnlab.bench.report", "write report.md and plots for a benchmark matrix's results"),
    "search": ("attnlab.search.pipeline", "EAN connection search: supernet -> search -> retrain (resumable)"),
    "localize": ("attnlab.localization.command", "weakly-supervised localization (CAM box) metrics of a checkpoint"),
    "show": ("attnlab.viz.command", "PNG grids of CAMs, boxes and attention gates of a checkpoint"),
}

DESCRIPTION = """Attention modules for convolutional networks (SE, CBAM, ECA, SPE, TDAM, DIA, SSIA):
train them in ResNets, evaluate, profile, export and compare them side by side."""

EXAMPLES = """examples:
  attnlab list attention                                  modules and their options
  attnlab train --config configs/quick.yaml name=quick_eca model.attention=eca
                                                          a run's files go to runs/quick_eca/
  attnlab train --resume runs/quick_eca                   continue an interrupted run
  attnlab eval --checkpoint runs/quick_eca --split test
  attnlab profile --model resnet50 --attention se         params, FLOPs, latency, memory
  torchrun --nproc_per_node 2 -m attnlab train --config configs/quick.yaml name=quick_ddp
                                                          data-parallel (train.batch_size is the global batch)

Run 'attnlab COMMAND --help' for a command's options; the README has the rest."""


def _fill_missing_help(parser):
    """An option a command left without help still says what it takes (its choices) and its default."""
    for action in parser._actions:
        if action.help is not None or isinstance(action, argparse._HelpAction):
            continue
        parts = [f"one of {', '.join(map(str, action.choices))}"] if action.choices else []
        if action.default not in (None, argparse.SUPPRESS, False, []):
            parts.append(f"default: {action.default}")
        action.help = "; ".join(parts) or " "


def build_parser(modules):
    parser = argparse.ArgumentParser(prog="attnlab", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"attnlab {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        modules[name].add_arguments(p)
        _fill_missing_help(p)
    return parser


def main(argv=None):
    modules = {name: importlib.import_module(module) for name, (module, _) in COMMANDS.items()}
    parser = build_parser(modules)
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse takes one run of key=value words; more of them between the options are overrides too
        takes_overrides = isinstance(getattr(args, "overrides", None), list)
        if takes_overrides and all("=" in w and not w.startswith("-") for w in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result = modules[args.command].run(args)
    except AttnlabError as err:
        print(f"attnlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("attnlab: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`attnlab bench --dry-run | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    sys.exit(result if isinstance(result, int) else 0)
