"""``attnlab profile``: params, FLOPs, latency, throughput and peak memory of a model (attnlab/measure.py measures;
its docstring gives the conventions)."""
import argparse
import os

import torch

from .errors import AttnlabError, yaml_problem
from .host import set_threads
from .measure import profile_model

def add_arguments(p):
    p.add_argument("--model", default="resnet50", help="backbone name (see attnlab.list_models())")
    p.add_argument("--attention", default="none", help="attention module name (see attnlab.attention.names())")
    p.add_argument("--attention-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="options of the attention module, e.g. reduction=8 bias=false")
    p.add_argument("--blocks", default=None,
                   help="where attention goes: 'all', stage indices '2,3', bit strings '100-1011-010011-011', "
                        "or a YAML dict '{2: [0, 1]}'")
    p.add_argument("--share", action=argparse.BooleanOptionalAction, default=None,
                   help="one attention module per stage, shared by its blocks (default: the module's own choice)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's own)")
    p.add_argument("--input-size", type=int, default=None, help="image side; default: the model's own")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64],
                   help="batch sizes to time (default: 1 64)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up passes (default: 3/1 on CPU, 10 on CUDA)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed passes (default on CPU: 20 for batch < 16, 3 above; 50 on CUDA; "
                        "cut short after 10 s, at least 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is steadier on a machine shared with other jobs)")
    p.add_argument("--out", "--json", dest="out", default=None, metavar="PATH",
                   help="where to write the JSON (default: runs/profile/<model>_<attention>.json)")


def parse_kwargs(items) -> dict:
    """['reduction=8', 'bias=false'] -> {'reduction': 8, 'bias': False} (values parsed as YAML scalars)."""
    import yaml
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AttnlabError(f"attention option '{item}' is not KEY=VALUE, e.g. reduction=8")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def parse_blocks(text):
    """The --blocks string: YAML for dicts/lists ('{2: [0, 1]}'), otherwise handed to the model as is."""
    if text is None or not text.strip().startswith(("{", "[")):
        return text
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise AttnlabError(f"--blocks '{text}' is not valid YAML: {yaml_problem(err)}") from None


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AttnlabError(f"unknown device '{device}'; valid choices: cpu, cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise AttnlabError(f"unknown device '{device}'; valid choices: cpu, cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AttnlabError("device 'cuda' requested but CUDA is not available here; valid choices: cpu")
    return dev


def format_table(name: str, result: dict) -> str:
    c, h, w = result["input_size"]
    lines = [
        f"{name}  (input {c}x{h}x{w}, {result['device']}, {result['threads']} threads, torch {result['torch']})",
        f"params      {result['params']:,} ({result['params'] / 1e6:.2f} M)",
        f"FLOPs       {result['flops'] / 1e9:.3f} G = {result['macs'] / 1e9:.3f} GMACs at batch 1",
        f"            ({result['flops_convention']})",
        f"{'batch':>6} {'median ms':>11} {'images/s':>10} {'peak MB':>10}  (runs)",
    ]
    for b, lat in result["latency"].items():
        mem = result["peak_memory"][b]
        lines.append(f"{b:>6} {lat['median_ms']:>11.2f} {lat['images_per_s']:>10.1f} {mem['peak_mb']:>10.1f}"
                     f"  (memory pass + {lat['warmup']} warm-up + {lat['repeats']} timed, median)")
    lines.append(f"peak memory: {result['peak_memory_method']}")
    return "\n".join(lines)


def write_json(path: str, data: dict):
    """Atomically (``attnlab.files``), creating the folder."""
    from .files import atomic_write_json
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, data, "profile")


def run(args):
    from .engine.checkpoint import model_from_config
    from .models import default_input_size

    device = check_device(args.device)
    set_threads(args.threads)
    if any(b < 1 for b in args.batch_sizes):
        raise AttnlabError(f"batch sizes must be >= 1, got {args.batch_sizes}")
    if args.input_size is not None and args.input_size < 1:
        raise AttnlabError(f"input size must be >= 1, got {args.input_size}")
    kwargs = parse_kwargs(args.attention_kwargs)
    model = model_from_config({"name": args.model, "num_classes": args.num_classes, "attention": args.attention,
                               "attention_kwargs": kwargs, "blocks": parse_blocks(args.blocks), "share": args.share})
    size = args.input_size or default_input_size(args.model)
    result = profile_model(model, size, device, args.batch_sizes, args.warmup, args.repeats)
    result = {"model": args.model, "attention": args.attention, "attention_kwargs": kwargs, "blocks": args.blocks,
              "share": args.share, **result}
    print(format_table(f"{args.model} + {args.attention}", result))
    # Beside the training runs, not in the repository's results/ (which holds committed, reproducible results).
    path = args.out or os.path.join("runs", "profile", f"{args.model}_{args.attention}.json")
    write_json(path, result)
    print(f"wrote {path}")
    return 0
