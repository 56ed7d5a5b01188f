"""When may a cell start? Estimates, this run's pace, the budget and the ETA, with no processes and no files.

A cell's estimate is its method's median cell time (budget.Estimates, from the finished cells on this kind of
device, else the slowest method's), times the fraction of its epochs it still has to train (a cell stopped in an
earlier slice resumes from its last epoch), times this run's pace. The pace says how many times longer than the
estimates this run's cells take: the estimates come from finished cells, which may have run on a faster or slower
machine, or a less or more loaded one. It is measured on the cells this run finished and on the running cells'
finished epochs, each against its method's estimate as it is now (which takes in this run's finished cells too, so
the pace tends to 1 as they accumulate); cells of a method with no finished cell say nothing. The largest pace is
used (cautious), and only when above 1: the budget never starts more than the finished cells allow, so a slice
cannot overrun because its first epochs ran fast.

The planner learns a cell's length and progress through two functions the runner gives it: ``epochs_of(cell)``
(train.epochs of its config) and ``epochs_done(cell)`` (epochs its run folder holds).
"""
import time
from dataclasses import dataclass, field

from ..measure import fmt_duration
from .budget import Estimates


@dataclass
class Started:
    """What the planner keeps of a running cell."""
    cell: dict
    started: float  # time.time() when it started
    epochs_at_start: int = 0  # epochs its run folder already held
    estimate: float | None = None  # of its time to train, when it started (this run's pace included)


@dataclass
class Planner:
    estimates: Estimates
    deadline: float | None  # time.monotonic() after which nothing may still run; None: no budget
    epochs_of: object  # cell -> train.epochs
    epochs_done: object  # cell -> epochs its run folder holds
    workers: int = 1
    finished: list = field(default_factory=list)  # (Started, seconds it took) of the cells this run finished

    def estimate(self, cell, pace=None) -> float | None:
        """Time ``cell`` still needs: its method's estimate for the epochs it has left, times ``pace``."""
        left = self._time_left(cell, self.epochs_done(cell))
        return None if left is None else left * (pace or 1.0)

    def _time_left(self, cell, done: int) -> float | None:
        full = self.estimates(cell["method"])
        if full is None or not done:
            return full
        return full * max(0.0, 1.0 - done / self.epochs_of(cell))

    def _expected(self, s: Started) -> float | None:
        """Time the epochs a started cell had left should take by its own method's cells, no pace."""
        if s.cell["method"] not in self.estimates.times:
            return None
        return self._time_left(s.cell, s.epochs_at_start)

    def pace(self, running: list[Started], now: float | None = None) -> float | None:
        """How many times longer than the estimates this run's cells take (module docstring); None when nothing
        says so or the cells keep to their estimates."""
        now = time.time() if now is None else now
        paces = [took / expected for s, took in self.finished if (expected := self._expected(s))]
        for s in running:
            done = self.epochs_done(s.cell) - s.epochs_at_start
            expected = self._expected(s)
            if expected and done > 0:
                per_epoch = expected / max(1, self.epochs_of(s.cell) - s.epochs_at_start)
                paces.append((now - s.started) / done / per_epoch)
        worst = max(paces, default=0.0)
        return worst if worst > 1.0 else None

    def next_that_fits(self, queue: list, running: list[Started]):
        """Pop the first queued (index, cell) whose estimate fits in the budget; None when none does."""
        pace = self.pace(running)
        now = time.monotonic()
        for k, (_, cell) in enumerate(queue):
            estimate = self.estimate(cell, pace)
            if self.deadline is None or (now < self.deadline and (estimate is None or now + estimate <= self.deadline)):
                return queue.pop(k)
        return None

    def done(self, s: Started, seconds: float) -> None:
        self.finished.append((s, seconds))

    def eta(self, queue: list, running: list[Started]) -> str:
        """' (2 queued, ETA 1h05m, budget left 2h10m)': the queued and running cells' estimated time over the
        workers."""
        parts = []
        now = time.time()
        pace = self.pace(running)
        left = [self.estimate(c, pace) for _, c in queue]
        left += [max(0.0, (s.estimate or 0.0) - (now - s.started)) for s in running]
        if left and all(e is not None for e in left):
            parts.append(f"{len(queue)} queued, ETA {fmt_duration(sum(left) / self.workers)}")
        if self.deadline is not None:
            parts.append(f"budget left {fmt_duration(max(0.0, self.deadline - time.monotonic()))}")
        return f" ({', '.join(parts)})" if parts else ""
