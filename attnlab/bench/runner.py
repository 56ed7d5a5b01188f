"""Running a matrix: every unfinished cell through the training engine, K cells at a time, within a time budget.

Each cell trains into ``runs/<matrix>/<method>-s<seed>/`` (the method name slugged: ``ssia+se`` -> ``ssia_se``)
and gets one line in ``results/<matrix>/runs.jsonl``.
A cell whose line is there is skipped, so an interrupted matrix resumes where it stopped, and methods added to a
matrix run alone; a cell that raises is recorded as failed with its one-line error and the matrix goes on.

Workers. With one worker a cell trains in this process. With K > 1 each cell trains in its own process
(``python -m attnlab.bench.worker``), K at once: on a CPU each gets cores / K torch threads; on CUDA the K
processes share the GPU, or take the visible GPUs in turn. This process stays the one writer of runs.jsonl (which
is also locked per line, for two ``attnlab bench`` runs on one matrix). A cell holds a lock file while it trains,
so a second run skips it instead of training it twice. A worker that dies (kill -9, out of memory) leaves no
line: the next run resumes its cell from the run's last epoch checkpoint. A bench killed with -9 cannot stop its
workers: each holds its cell's lock too and stops, with the processes it forked, once it sees the bench gone.

Budget. With ``budget_s`` a cell starts only if its estimated duration fits in the time left: the median wall time
of the same method's finished cells, else the slowest method's median, scaled to the epochs a cell interrupted in
an earlier slice still has to train; with no finished cell at all there is no estimate and the cell starts. The
finished cells may have run on a faster machine (or a less loaded one): once this run's own cells, finished or by
their finished epochs, take longer than those estimates, every estimate is scaled up by that pace (never down).
Cells that do not fit are left for the next slice (``--budget`` again).

Scheduler. With ``cluster`` (``--executor slurm``, or ``submitit-local`` which runs the same jobs here) each cell
is one job of the scheduler instead of a worker process: the job takes the cell's lock, trains it (resuming from its
checkpoint when requeued) and appends its own record to runs.jsonl, so this process only submits, follows and counts.

Who does what: plan.py decides (estimates, pace, what fits, ETA; no processes, no files), pool.py runs the worker
processes (scheduler.py the scheduler's jobs), cell.py checks, trains one cell and makes its record, and this
module is the loop between them.
"""
import json
import os
import signal
import subprocess
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ..engine.run_folder import RunFolder
from ..errors import AttnlabError
from ..files import portable_path, writable_dir
from ..jsonl import append_jsonl, read_jsonl
from ..measure import fmt_duration
from .budget import Estimates, pace_note, planned_device_kind
from .cell import refuse_another_precision, run_cell, stamp
from .plan import Planner, Started
from .pool import HARNESS_DIR, WorkerPool
from .matrix import cell_overrides, cells, fingerprint, same_recipe, same_settings, settings_of
from .runs import cell_lock, check_records, is_done, latest_by_cell, one_line



# ----------------------------------------------------------------------------------------------- one cell
# ----------------------------------------------------------------------------------------------- workers
def default_workers() -> int:
    """2 on a CPU with two or more cores; one per visible GPU on CUDA.

    Measured on the 2-core machine (results/bench_workers_cpu.json, benchmarks/bench_workers.py): two ResNet-20
    cells side by side with 1 thread each trained 1.32x the images per second of the same cells one after another
    with 2 threads (median of 3 rotated rounds), because 2 threads make one cell only ~1.4x faster than 1 thread.
    A single run still does best with every core (383 against 269 images/s), which is torch's default. Larger
    machines were not measured: give --workers there."""
    import torch
    if torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


# ----------------------------------------------------------------------------------------------- the matrix
@dataclass
class Job(Started):
    """A started cell: what the planner keeps of it, and what its worker process needs."""
    index: int = 0
    stack: ExitStack | None = None  # the cell's lock and what else ends with it
    lock: object = None  # the open cell lock file: a worker inherits it, so the cell stays locked while it lives
    gpu: str | None = None  # the CUDA device a worker was given
    proc: subprocess.Popen | None = None
    record_path: Path | None = None
    reader: threading.Thread | None = None
    handle: object = None  # a scheduler's job (submitit's Job)
    recorded: bool = False  # its record is already in runs.jsonl (a scheduler's job appends its own)
    skip: str | None = None  # why a scheduler's job trained nothing: 'busy', 'finished (ok)'
    why: str = ""  # why a scheduler's job left no result


def run_matrix(matrix, *, seeds=None, only=None, dry_run=False, results_root="results", runs_root="runs",
               latency=True, retry_failed=False, workers=1, threads=None, budget_s=None, device=None,
               cluster=None, log=print) -> dict:
    """Run every unfinished cell of ``matrix``; returns counts {'total', 'skipped', 'ok', 'failed', 'deferred',
    'interrupted', 'busy'} (busy: being trained by another process). ``cluster`` (a scheduler.ClusterOptions)
    hands the cells to a scheduler as jobs instead of local worker processes; ``workers`` is then how many of
    them may be submitted at once."""
    results_dir = Path(results_root) / matrix["name"]
    runs_dir = Path(runs_root) / matrix["name"]
    runs_path = results_dir / "runs.jsonl"
    records = check_records(read_jsonl(runs_path), runs_path)
    pending = _pending(matrix, cells(matrix, seeds, only), latest_by_cell(records), runs_path, retry_failed)
    pending = reuse_finished(matrix, pending, runs_path, write=not dry_run)
    n_total = len(pending)
    n_skip = sum(1 for _, prev in pending if prev is not None)
    # With SLURM the submitting machine is not the one that trains: each job checks its precision for itself.
    on_cluster = cluster is not None and cluster.executor == "slurm"
    if dry_run:
        return _dry_run(matrix, pending, runs_dir, runs_path, log, device, [] if on_cluster else records)

    from ..engine.config import load_config
    from ..engine.train import train

    if any(prev is None for _, prev in pending):  # said now, not after the first cell has trained
        writable_dir(results_dir, "results folder")
        writable_dir(runs_dir, "runs folder")
    if not on_cluster:
        refuse_another_precision(matrix, pending, records, runs_dir, runs_path, load_config, device)
    if latency and on_cluster:
        log("latency is not timed with --executor slurm (this machine is not the one that trains); time it on a "
            "compute node with `attnlab bench --latency-only`")
    elif latency:
        from .latency import time_matrix
        time_matrix(matrix, results_dir, only, device, log)

    counts = {"total": n_total, "skipped": n_skip, "ok": 0, "failed": 0, "deferred": 0, "interrupted": 0, "busy": 0}
    for i, (c, prev) in enumerate(pending, 1):
        if prev is not None and prev.get("reused_from"):
            log(f"[{i}/{n_total}] {c['method']} seed {c['seed']}: same settings and seed as a finished cell of "
                f"{prev['reused_from']}; its result is used, skipped")
        elif prev is not None:
            log(f"[{i}/{n_total}] {c['method']} seed {c['seed']}: finished earlier ({prev.get('status')}), skipped")
    queue = [(i, c) for i, (c, prev) in enumerate(pending, 1) if prev is None]
    if threads is None and workers > 1 and (cluster is None or cluster.executor == "submitit-local"):
        threads = threads_per_worker(workers)
    deadline = time.monotonic() + budget_s if budget_s is not None else None
    log(f"matrix {matrix['name']}: {len(queue)} of {n_total} cells to run, --workers {workers}"
        + (f" --executor {cluster.executor}" if cluster is not None else "")
        + (f" x {threads} thread(s)" if threads else "")
        + (f", --budget {fmt_duration(budget_s)}" if budget_s is not None else ""))
    runner = _Runner(matrix, runs_dir, runs_path, n_total, workers, threads, deadline,
                     Estimates(records, planned_device_kind(matrix, device)), counts,
                     log, load_config=load_config, train=train, device=device, retry_failed=retry_failed,
                     cluster=cluster)
    runner.run(queue)
    _summary(matrix, counts, runs_path, log)
    return counts


def _pending(matrix, todo, done, runs_path, retry_failed):
    out = []
    for c in todo:
        prev = done.get((c["method"], c["seed"]))
        if not is_done(prev, matrix, c, retry_failed):
            out.append((c, None))
            continue
        if not same_settings(prev.get("fingerprint"), fingerprint(matrix, c)):
            raise AttnlabError(
                f"{runs_path} holds method '{c['method']}' seed {c['seed']} run with other settings than "
                f"{matrix['path']} now gives; move that file away (or rename the matrix) before re-running")
        if not same_recipe(prev, matrix):
            raise AttnlabError(
                f"{runs_path} holds method '{c['method']}' seed {c['seed']} trained with recipe {matrix['recipe']} "
                f"as it was before an edit (digest {prev['recipe_digest']}, now {matrix['recipe_digest']}); undo "
                "the edit, or give the changed recipe a new file and matrix")
        out.append((c, prev))
    return out


def reuse_finished(matrix, pending, runs_path, write=True):
    """Cells not yet run here whose settings and seed match a finished (ok) cell of a ``reuse:`` matrix take its
    result: the record is appended to this runs.jsonl (when ``write``) with ``reused_from`` naming its file.
    ``pending``: (cell, its record here or None) pairs; returns them with the reused records filled in."""
    if not matrix.get("reuse") or all(prev is not None for _, prev in pending):
        return pending
    found = {}
    for folder in matrix["reuse"]:
        source = Path(folder) / "runs.jsonl"
        for r in check_records(read_jsonl(source), source):  # a bad line there must not be copied here
            key = settings_of(r.get("fingerprint"))
            if r.get("status") == "ok" and key is not None and same_recipe(r, matrix):
                found[(key, r.get("seed"))] = (source, r)
    out = []
    for c, prev in pending:
        hit = found.get((fingerprint(matrix, c), c["seed"])) if prev is None else None
        if hit is not None:
            source, r = hit
            prev = {**r, "matrix": matrix["name"], "matrix_file": portable_path(matrix["path"]), "method": c["method"],
                    "reused_from": r.get("reused_from") or portable_path(source)}  # names its origin
            if write:
                append_jsonl(runs_path, prev)
        out.append((c, prev))
    return out


def _summary(matrix, counts, runs_path, log):
    line = (f"matrix {matrix['name']}: {counts['ok']} ran, {counts['failed']} failed, {counts['skipped']} skipped; "
            f"results in {runs_path}")
    if counts["deferred"]:
        line += f"; {counts['deferred']} left for a later slice (the budget)"
    if counts["interrupted"]:
        line += f"; {counts['interrupted']} interrupted (they resume from their checkpoints on the next run)"
    if counts["busy"]:
        line += f"; {counts['busy']} being trained by another attnlab bench"
    log(line)
    if counts["total"] and counts["skipped"] == counts["total"]:
        log(f"every cell already has a result in {runs_path} (results committed there are reused); to run the "
            f"matrix afresh, give --results-root <an empty folder> or move that file away")


def _dry_run(matrix, pending, runs_dir, runs_path, log, device=None, records=()) -> dict:
    import torch

    from ..engine.checkpoint import model_from_config
    from ..engine.config import load_config, to_dict

    n_total = len(pending)
    n_skip = sum(1 for _, prev in pending if prev is not None)
    log(f"matrix {matrix['name']}: {n_total} cells ({n_skip} finished), recipe {matrix['recipe']}, "
        f"results -> {runs_path}")
    bad, built = 0, set()
    for i, (c, prev) in enumerate(pending, 1):
        if prev is None:
            state = "to run"
        elif prev.get("reused_from"):
            state = f"done in {prev['reused_from']} (same settings and seed: reused)"
        else:
            state = f"done ({prev.get('status')})"
        overrides = cell_overrides(matrix, c, runs_dir, device)
        problem = None
        if prev is None:
            try:
                model = to_dict(load_config(matrix["recipe_path"], overrides=overrides).model)
                key = json.dumps(model, sort_keys=True)
                if key not in built:  # built once per method (module options, placement), on the meta device:
                    with torch.device("meta"):  # shapes only, no memory and no initialisation to wait for
                        model_from_config(model)
                    built.add(key)
            except Exception as err:  # reported per cell: a dry run lists every problem at once
                problem = one_line(err)
        bad += problem is not None
        log(f"[{i}/{n_total}] {c['method']} seed {c['seed']}: {state}; overrides: {' '.join(overrides)}"
            + (f"; CONFIG ERROR: {problem}" if problem else ""))
    if not bad:  # said, not counted: the same plan may be meant for another machine (a GPU slot's dry run)
        try:
            refuse_another_precision(matrix, pending, list(records), runs_dir, runs_path, load_config, device)
        except AttnlabError as err:
            log(f"on this machine the bench would stop before training: {err}")
    return {"total": n_total, "skipped": n_skip, "ok": 0, "failed": 0, "config_errors": bad}


class _Runner:
    """The loop: starts cells while slots are free and the planner says they fit, and records each as it ends."""

    def __init__(self, matrix, runs_dir, runs_path, n_total, workers, threads, deadline, estimates, counts, log,
                 *, load_config, train, device=None, retry_failed=False, cluster=None):
        self.matrix, self.runs_dir, self.runs_path, self.n_total = matrix, runs_dir, runs_path, n_total
        self.retry_failed, self.workers, self.threads, self.device = retry_failed, workers, threads, device
        self.counts, self.log, self.load_config, self.train = counts, log, load_config, train
        self.epochs: dict[str, int] = {}  # run name -> train.epochs, read once
        self.plan = Planner(estimates, deadline, self._epochs, self._epochs_done, workers)
        if cluster is None:
            self.pool = WorkerPool(matrix, runs_dir, workers, threads, device, log)
        else:
            from .scheduler import SchedulerPool
            self.pool = SchedulerPool(matrix, runs_dir, runs_path, workers, threads, device, log, cluster,
                                      retry_failed=retry_failed, check_precision=cluster.executor == "slurm")

    def run(self, queue):
        self.queue = queue
        previous = _raise_on_sigterm()
        try:
            while queue or self.pool.running:
                while queue and len(self.pool.running) < self.workers:
                    # Re-read: this run's finished cells and those another bench on this matrix finished meanwhile.
                    self.plan.estimates = Estimates(read_jsonl(self.runs_path), self.plan.estimates.device_kind)
                    item = self.plan.next_that_fits(queue, self.pool.running)
                    if item is None:
                        break
                    self._start(*item)
                if not self.pool.running:
                    break
                self._collect(*self.pool.wait_one())
            pace = self.plan.pace(self.pool.running)
            for i, c in queue:
                self.log(f"[{i}/{self.n_total}] {c['method']} seed {c['seed']}: not started, it would not finish "
                         f"within the budget (estimate {fmt_duration(self.plan.estimate(c, pace) or 0)}, "
                         f"{self.plan.estimates.basis(c['method'])}{pace_note(pace)})")
            self.counts["deferred"] += len(queue)
        finally:
            self.pool.stop_all()  # on an interruption: the workers stop, then their cells' locks are released
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _epochs_done(self, c) -> int:
        return len(RunFolder(self.runs_dir / c["run_name"]).curve() or [])

    def _epochs(self, c) -> int:
        if c["run_name"] not in self.epochs:
            cfg = self.load_config(self.matrix["recipe_path"], overrides=cell_overrides(self.matrix, c, self.runs_dir))
            self.epochs[c["run_name"]] = int(cfg.train.epochs)
        return self.epochs[c["run_name"]]

    def _start(self, i, c):
        stack = ExitStack()
        name = f"{c['method']} seed {c['seed']}"
        lock = stack.enter_context(cell_lock(self.runs_dir / HARNESS_DIR / "locks" / f"{c['run_name']}.lock"))
        if not lock:
            stack.close()
            self.counts["busy"] += 1
            self.log(f"[{i}/{self.n_total}] {name}: being trained by another attnlab bench, skipped")
            return
        prev = latest_by_cell(read_jsonl(self.runs_path)).get((c["method"], c["seed"]))
        if is_done(prev, self.matrix, c, self.retry_failed):  # another bench ran it
            stack.close()
            self.counts["skipped"] += 1
            self.log(f"[{i}/{self.n_total}] {name}: finished by another attnlab bench ({prev.get('status')}), "
                     "skipped")
            return
        estimate = self.plan.estimate(c, self.plan.pace(self.pool.running))
        job = Job(c, time.time(), self._epochs_done(c), estimate=estimate, index=i, stack=stack, lock=lock)
        self.log(f"[{i}/{self.n_total}] {name}: running{self.plan.eta(self.queue, self.pool.running)}")
        if self.workers == 1 and self.pool.in_process:
            self._finish(job, run_cell(self.matrix, c, self.runs_dir, load_config=self.load_config,
                                       train=self.train, device=self.device))
            return
        self.pool.spawn(job)
        self.pool.running.append(job)

    def _collect(self, job, record):
        name = f"[{job.index}/{self.n_total}] {job.cell['method']} seed {job.cell['seed']}"
        if job.skip == "busy":  # a scheduler's job found the cell's lock taken
            self.counts["busy"] += 1
            self.log(f"{name}: being trained by another attnlab bench, skipped")
            return
        if job.skip:  # a scheduler's job found the cell in runs.jsonl
            self.counts["skipped"] += 1
            self.log(f"{name}: {job.skip.replace('finished', 'finished by another attnlab bench', 1)}, skipped")
            return
        if record is None:
            job.stack.close()
            self.counts["interrupted"] += 1
            self.log(f"{name}: {self.pool.why_ended(job)} after {fmt_duration(time.time() - job.started)}; not "
                     "recorded, the next run resumes it from its last checkpoint")
            return
        self._finish(job, record, stamped=True)
        if job.record_path is not None:
            job.record_path.unlink(missing_ok=True)  # only now: runs.jsonl holds the record

    def _finish(self, job, record, stamped=False):
        c, duration = job.cell, time.time() - job.started
        if not stamped:
            import torch
            stamp(record, torch.get_num_threads(), self.workers)
        if not job.recorded:
            append_jsonl(self.runs_path, record)
        job.stack.close()
        self.counts[record["status"]] += 1
        name = f"[{job.index}/{self.n_total}] {c['method']} seed {c['seed']}"
        if record["status"] == "ok":
            self.plan.done(job, duration)
            self.log(f"{name}: val top-1 {_pct(record['val_top1'])}, test top-1 {_pct(record['test_top1'])} in "
                     f"{fmt_duration(duration)}")
        else:
            self.log(f"{name}: FAILED: {record['error']}")


def _raise_on_sigterm():
    """SIGTERM (a `timeout`, a scheduler) stops the matrix like Ctrl-C, so the workers are stopped too."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, handler)


def _pct(v) -> str:
    import math
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.2f}"
