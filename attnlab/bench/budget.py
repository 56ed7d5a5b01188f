"""The time budget of ``attnlab bench --budget``: durations, and how long a cell is expected to take.

A cell's estimate is the median wall time of its method's finished cells on the same kind of device, else the
slowest method's median (cautious: a new method may wait for the next slice). The runner scales it to the epochs a
resumed cell has left, and up by the pace its own cells keep against these estimates (``_Runner._pace``).
"""
import re
import statistics

from ..errors import AttnlabError


def parse_duration(text) -> float:
    """'150m', '2h', '1h30m', '90s' -> seconds."""
    s = str(text).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", s).strip():
        raise AttnlabError(f"a duration needs a unit, like 150m, 2h, 1h30m or 90s; got '{text}'")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise AttnlabError(f"a duration must be above zero; got '{text}'")
    return seconds


class Estimates:
    """Expected wall time of a method's cell: the median of its finished cells on the same kind of device (CPU or
    GPU: a CPU cell says nothing about a GPU one), else the slowest method's median."""

    def __init__(self, records, device_kind: str = "cpu"):
        self.times: dict[str, list[float]] = {}
        self.device_kind = device_kind
        for r in records:
            if r.get("status") == "ok" and r.get("wall_time_s") and device_kind_of(r.get("device")) == device_kind:
                self.times.setdefault(r["method"], []).append(float(r["wall_time_s"]))

    def __call__(self, method: str) -> float | None:
        source = method if method in self.times else self._slowest()
        return statistics.median(self.times[source]) if source is not None else None

    def _slowest(self) -> str | None:
        """The method with the highest median: the stand-in for a method with no finished cell."""
        return max(self.times, key=lambda m: statistics.median(self.times[m]), default=None)

    def basis(self, method: str) -> str:
        """What the estimate rests on, for the log: 'median of 3 se cells' or 'slowest method's median (cbam):
        no tdam cell finished yet' (the cautious case that keeps a new method waiting)."""
        if method in self.times:
            n = len(self.times[method])
            return f"median of {n} {method} cell{'s' if n != 1 else ''}"
        slowest = self._slowest()
        if slowest is None:
            return f"no finished {self.device_kind} cell to go by"
        return f"slowest method's median ({slowest}): no {method} cell finished yet"


def device_kind_of(device) -> str:
    """'cpu' for the engine's CPU description ('cpu (x86_64, 1 threads)'), 'cuda' for a GPU's name."""
    return "cpu" if device is None or str(device).startswith("cpu") else "cuda"


def planned_device_kind(matrix, device=None) -> str:
    import torch
    wanted = str(device or matrix["overrides"].get("device", "auto"))
    return "cuda" if wanted in ("cuda", "auto") and torch.cuda.is_available() else "cpu"


def pace_note(pace) -> str:
    """', x1.40 for this run's pace' when the estimates were scaled by the pace this run measured."""
    return f", x{pace:.2f} for this run's pace" if pace else ""
