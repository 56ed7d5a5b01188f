"""Params, FLOPs, latency, throughput and peak memory of a model: the ``attnlab profile`` command.

Conventions (printed with every table and stored in the JSON):
  * FLOPs = 2 x MACs, counted by ``torch.utils.flop_counter.FlopCounterMode`` for one forward pass. Only
    convolutions, linear layers and matrix products count; elementwise ops (sigmoid gates, the gate multiply,
    ReLU, BN in eval mode, additions) and pooling count 0. That is why SE and ECA add almost no FLOPs:
    their only counted ops are two 1x1 convs (or one 1-D conv) on a (B, C, 1, 1) tensor.
  * Latency: eval mode under ``torch.inference_mode()``, warm-up runs first (in ``profile_model`` the peak
    memory pass counts as the first), then the MEDIAN of repeated forward passes on a random input (CUDA is
    synchronised around each pass). Throughput = batch / median.
    Default counts stop early once the timed passes took 10 s (at least 3), so a busy machine still finishes.
  * Peak memory, CUDA: ``torch.cuda.max_memory_allocated`` during one forward minus what was allocated
    before it (weights, input), i.e. activations and kernel workspaces.
    Peak memory, CPU: torch has no allocator statistics on CPU, so we track the bytes of every tensor storage
    that an op creates during one forward and sum those still alive; the peak of that sum is the peak
    activation memory. It excludes weights, the input and memory an op uses internally and frees before it
    returns (e.g. oneDNN scratch buffers), so it is a lower bound on the process's RSS growth.
"""
import argparse
import os
import platform
import statistics
import time
import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .errors import AttnlabError

FLOPS_CONVENTION = ("FLOPs = 2 x MACs (torch.utils.flop_counter.FlopCounterMode): conv/linear/matmul only; "
                    "elementwise gates, activations, BN and pooling count 0")
CPU_MEMORY_METHOD = ("CPU: peak bytes of live tensors created by ops during one forward (excludes weights, input "
                     "and ops' internal scratch buffers; a lower bound on RSS growth)")
CUDA_MEMORY_METHOD = ("CUDA: torch.cuda.max_memory_allocated during one forward minus memory allocated before it "
                      "(activations and workspaces; weights and input excluded)")


def input_shape(input_size) -> tuple[int, int, int]:
    """``224`` -> (3, 224, 224); ``(H, W)`` -> (3, H, W); ``(C, H, W)`` unchanged."""
    size = (input_size,) if isinstance(input_size, int) else tuple(input_size)
    if len(size) == 1:
        size = (3, size[0], size[0])
    elif len(size) == 2:
        size = (3, *size)
    if len(size) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise AttnlabError(f"input size must be a positive int, (H, W) or (C, H, W), got {input_size!r}")
    return size


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The CPU's model name ('AMD EPYC ...'), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_name() -> str:
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def count_params(model: nn.Module) -> int:
    """Number of parameters; a module shared by several blocks counts once."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size, batch_size: int = 1) -> int:
    """FLOPs (= 2 x MACs; conv/linear/matmul only) of one eval-mode forward pass of ``batch_size`` images."""
    device = _device_of(model)
    x = torch.randn(batch_size, *input_shape(input_size), device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def default_repeats(device, batch_size: int) -> tuple[int, int]:
    """(warmup, repeats): modest on CPU, where a batch of 64 ResNet-50 images takes seconds."""
    if torch.device(device).type == "cuda":
        return 10, 50
    return (3, 20) if batch_size < 16 else (1, 3)


def measure_latency(model: nn.Module, input_size, batch_size: int, device="cpu", warmup: int | None = None,
                    repeats: int | None = None, max_seconds: float | None = None) -> dict:
    """Median forward latency (ms) and throughput (images/s). Moves ``model`` to ``device``.

    Timing stops early once the timed passes have taken ``max_seconds`` (at least 3 passes), so a slow or busy
    machine still finishes. Without ``repeats`` the default count applies with ``max_seconds`` = 10; an explicit
    ``repeats`` without ``max_seconds`` is exact.
    """
    device = torch.device(device)
    default_warmup, default_reps = default_repeats(device, batch_size)
    warmup = default_warmup if warmup is None else warmup
    if repeats is None:
        repeats, max_seconds = default_reps, 10.0 if max_seconds is None else max_seconds
    if repeats < 1 or warmup < 0:
        raise AttnlabError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    model.to(device)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape(input_size), device=device)
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                _sync(device)
                start = time.perf_counter()
                model(x)
                _sync(device)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
                    if max_seconds is not None and len(times) >= 3 and sum(times) > max_seconds * 1e3:
                        break
    finally:
        model.train(was_training)
    median = statistics.median(times)
    return {"batch_size": batch_size, "median_ms": median, "min_ms": min(times),
            "images_per_s": batch_size / (median / 1e3), "warmup": warmup, "repeats": len(times), "times_ms": times}


class _LiveTensorBytes(TorchDispatchMode):
    """Sum of the storages created by ops while active that are still referenced; records its peak."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage address -> [bytes, number of tracked tensor objects using it]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, t, inputs):
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key in self.live:  # a view or in-place result of a tracked tensor: keep its bytes alive longer
            self.live[key][1] += 1
        elif key in inputs or nbytes == 0:  # a view of a weight or of the input: not a new allocation
            return
        else:
            self.live[key] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]


def measure_peak_memory(model: nn.Module, input_size, batch_size: int, device="cpu") -> dict:
    """Peak memory (bytes) of one eval-mode forward pass; see the module docstring for what each device measures."""
    device = torch.device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape(input_size), device=device)
    try:
        with torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                out = model(x)
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - before
                method = CUDA_MEMORY_METHOD
            else:
                tracker = _LiveTensorBytes()
                with tracker:
                    out = model(x)
                peak, method = tracker.peak, CPU_MEMORY_METHOD
    finally:
        model.train(was_training)
    del out
    return {"batch_size": batch_size, "peak_bytes": int(peak), "peak_mb": peak / 2**20, "method": method}


def profile_model(model: nn.Module, input_size, device="cpu", batch_sizes=(1, 64), warmup: int | None = None,
                  repeats: int | None = None) -> dict:
    """Params, FLOPs (batch 1), and latency/throughput/peak memory per batch size, as one JSON-ready dict."""
    device = torch.device(device)
    model.to(device)
    shape = input_shape(input_size)
    result = {
        "params": count_params(model),
        "flops": count_flops(model, shape, batch_size=1),
        "flops_convention": FLOPS_CONVENTION,
        "input_size": list(shape),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "latency": {},
        "peak_memory": {},
        "peak_memory_method": CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
    }
    result["macs"] = result["flops"] // 2
    for b in batch_sizes:
        mem = measure_peak_memory(model, shape, b, device)
        result["peak_memory"][str(b)] = {"peak_bytes": mem["peak_bytes"], "peak_mb": mem["peak_mb"]}
        # The memory pass ran the model at this batch size: it is the first warm-up pass.
        wu = max(0, default_repeats(device, b)[0] - 1) if warmup is None else warmup
        result["latency"][str(b)] = measure_latency(model, shape, b, device, wu, repeats)
    return result


# ----------------------------------------------------------------------------------------------- CLI

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
        raise AttnlabError(f"--blocks '{text}' is not valid YAML: {str(err).splitlines()[0]}") from None


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


def set_threads(threads):
    """Apply a --threads option (None leaves torch's default); shared by `profile` and `bench`."""
    if threads is not None:
        if threads < 1:
            raise AttnlabError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


@contextmanager
def cpu_threads(threads):
    """torch's CPU threads set to ``threads`` inside (None: left as they are), restored after."""
    before = torch.get_num_threads()
    set_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
