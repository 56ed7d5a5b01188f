"""``results/<matrix>/runs.jsonl`` and a cell's run folder: what the runner and the report read and write.

runs.jsonl holds one JSON line per finished cell, read and appended through :mod:`attnlab.jsonl` (locked appends,
so several writers never interleave; a torn line is skipped, and its cell counts as not run and runs again).
"""
import csv
import fcntl
import os
import platform
from contextlib import contextmanager
from pathlib import Path


def latest_by_cell(records) -> dict:
    """{(method, seed): the last line recorded for that cell}."""
    out = {}
    for r in records:
        out[(r.get("method"), r.get("seed"))] = r
    return out


@contextmanager
def cell_lock(path):
    """Hold an exclusive lock on ``path`` while a cell runs; yields False (holding nothing) when another process
    has it. The kernel drops the lock when its holder dies, so a killed run never leaves its cell locked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        f.close()


def read_curve(run_dir) -> list[float] | None:
    """val_top1 per epoch from a run's metrics.csv (None when there is none)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return None
    curve = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                curve.append(float(row["val_top1"]))
            except (KeyError, TypeError, ValueError):
                curve.append(float("nan"))
    return curve


def host_info() -> dict:
    import torch

    from ..profiler import cpu_model
    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__
