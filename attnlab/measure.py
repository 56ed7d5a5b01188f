"""Params, FLOPs, latency, throughput and peak memory of a model: the measuring functions behind ``attnlab profile``,
the bench's latency step and the benchmarks; and ``fmt_duration``, how every progress line writes a duration.

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
import statistics
import time
import weakref

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .errors import AttnlabError
from .host import cpu_name

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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AttnlabError(f"batch size must be an integer >= 1, got {batch_size!r}")  # 0 timed empty batches
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


def fmt_duration(seconds: float) -> str:
    """A duration as people read it in a progress line: '1h05m' from an hour on, else '4m07s'."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
