"""Which floating-point precision a run computes in, from ``train.amp`` and the device.

``train.amp``:
- ``auto`` (the default): bf16 autocast on CUDA, fp32 on a CPU, which is what every CPU result before bf16
  support was trained with;
- ``bf16``: bf16 autocast on CUDA, and on a CPU that has native bf16 instructions (AVX512_BF16 or AMX). On a CPU
  without them bf16 is emulated and slower than fp32 (results/cpu_bf16_no_native.json: x0.51-0.60 images/s on a
  2-core Xeon with AVX512 but no AVX512_BF16), so the run says so in one line and computes in fp32;
- ``fp16``: fp16 autocast with a gradient scaler on CUDA; a CPU computes in fp32 (one line says so);
- ``off``: fp32 everywhere.

Autocast leaves weights, optimizer state and the loss in fp32; convolutions and matmuls run in bf16
(results/cpu_bf16.json: x1.4-1.6 images/s for ResNet-20 on a 2-core Zen 4). The resolved precision is recorded in
results.json and in each bench cell, so results trained at different precisions are never compared unawares.
"""
from contextlib import nullcontext
from pathlib import Path

import torch

def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX-BF16, as torch reports them (the CPU's own flags where torch has no such query)."""
    cpu = getattr(torch, "cpu", None)
    for query in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, query, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    return bool({"avx512_bf16", "amx_bf16"} & _cpuinfo_flags())


def _cpuinfo_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(device: torch.device, amp: str) -> tuple[str, str | None]:
    """(precision the run computes in, a one-line notice when ``amp`` asked for something this device can't do)."""
    if amp == "off":
        return "fp32", None
    if device.type == "cuda":
        return ("fp16" if amp == "fp16" else "bf16"), None
    if amp == "auto":
        return "fp32", None
    if amp == "bf16":
        if cpu_has_native_bf16():
            return "bf16", None
        return "fp32", ("train.amp=bf16: this CPU has no native bf16 (AVX512_BF16 or AMX), where bf16 is slower "
                        "than fp32; training in fp32")
    return "fp32", "train.amp=fp16 applies to CUDA only; training on the CPU in fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

