"""This machine, described one way everywhere: its CPU, the vector kernels torch picks for it, its devices and
torch's CPU threads (the settings and a context that restores them)."""
import os
import platform
from contextlib import contextmanager

import torch

from .errors import AttnlabError


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


def device_name(device: torch.device) -> str:
    """A training device as results name it: the GPU's model, or 'cpu (x86_64, 2 threads)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def timing_machine(device: str) -> str:
    """What a latency depends on besides the model: the GPU, or the CPU with the vector kernels torch picks for it
    (two 'AMD EPYC' machines here, one with AVX2 and one with AVX-512 kernels, time the same model differently),
    the torch threads and release."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()} kernels, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def host_info() -> dict:
    """The facts a result records about the machine that produced it."""
    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__,
            # Machines of one model name differ in speed and float sums by the vector kernels torch picks for them.
            "cpu_kernels": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


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
