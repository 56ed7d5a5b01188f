"""``results/<matrix>/runs.jsonl``: one JSON line per finished cell, shared by the runner and the report.

Lines are only ever appended, each in one ``write`` under an exclusive ``flock`` and fsynced, so several writers
(the runner's workers, or two ``attnlab bench`` processes on one matrix) never interleave. A crash leaves at most
a torn last line, which :func:`read_runs` skips (its cell then counts as not run and runs again).
"""
import csv
import fcntl
import json
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path


def read_runs(path) -> list[dict]:
    """Every line of a runs.jsonl, skipping (with a warning) a line torn by a process killed mid-write."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"attnlab: warning: {path} line {i + 1} is not valid JSON (a torn write?); ignored",
                  file=sys.stderr)
    return out


def append_line(path, record: dict) -> None:
    """Append one JSON line under an exclusive lock and fsync it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(record, sort_keys=False, default=_json_default)
    with open(path, "a+b") as f:  # appends always go to the end; reading the last byte needs the "+"
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            # A torn previous line (killed mid-write) must not swallow this one: start on a fresh line.
            prefix = b""
            if f.seek(0, os.SEEK_END):
                f.seek(-1, os.SEEK_END)
                prefix = b"" if f.read(1) == b"\n" else b"\n"
            f.write(prefix + data.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


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
