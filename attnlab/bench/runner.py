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
Cells that do not fit are left for the next slice (``--budget`` again). The estimates themselves: budget.py.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import AttnlabError
from ..files import atomic_write_text, git_commit, portable_path
from ..jsonl import append_jsonl, read_jsonl
from .budget import Estimates, fmt_duration, pace_note, planned_device_kind
from .matrix import cell_overrides, cells, fingerprint, same_digest, same_recipe, same_settings, settings_of
from .runs import cell_lock, host_info, latest_by_cell, one_line, read_curve

HARNESS_DIR = ".bench"  # runs/<matrix>/.bench/{locks,logs,records}: the harness's own bookkeeping


# ----------------------------------------------------------------------------------------------- one cell
def run_cell(matrix, cell, runs_root, *, load_config, train, device=None) -> dict:
    """Train one cell and return its runs.jsonl record (status 'ok' or 'failed')."""
    run_dir = Path(runs_root) / cell["run_name"]
    record = {"matrix": matrix["name"], "matrix_file": portable_path(matrix["path"]), "method": cell["method"],
              "seed": cell["seed"], "run_dir": portable_path(run_dir), "overrides": cell["overrides"],
              "recipe": matrix["recipe"],
              "fingerprint": fingerprint(matrix, cell), "recipe_digest": matrix.get("recipe_digest")}
    start = time.time()
    try:
        cfg = load_config(matrix["recipe_path"], overrides=cell_overrides(matrix, cell, runs_root, device))
        results = train(cfg, resume=prepare_run_dir(run_dir, record["fingerprint"], record["recipe_digest"]))
    except BrokenPipeError:  # our output is gone (`attnlab bench ... | head`): stop; the cell resumes next time
        raise
    except Exception as err:  # one bad cell must not stop the matrix: record it and move on
        record.update(status="failed", error=one_line(err), wall_time_s=round(time.time() - start, 2))
        return record
    results = dict(results or {})
    record.update(
        status="ok",
        val_top1=results.get("best_val_top1"),
        val_top5=results.get("best_val_top5"),
        test_top1=results.get("test_top1"),
        test_top5=results.get("test_top5"),
        params=results.get("params"),
        flops=results.get("flops"),
        train_images_per_s=results.get("train_images_per_s"),
        wall_time_s=results.get("wall_time_s", round(time.time() - start, 2)),
        device=results.get("device"),
        precision=results.get("precision"),
        epochs_by_device=results.get("epochs_by_device"),
        git_commit=results.get("git_commit"),
        epochs=_get(cfg, "train.epochs"),
        val_curve=read_curve(run_dir),
    )
    return record


def stamp(record: dict, threads: int, workers: int) -> dict:
    """What the harness adds to a cell's record: how it ran, on what, by which code, and when."""
    record.update(threads=threads, workers=workers, host=host_info(), harness_commit=git_commit(short=True),
                  finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return record


def prepare_run_dir(run_dir: Path, fp: str, digest: str | None = None):
    """The run dir to resume from (this cell was interrupted mid-training), or None after clearing a stale one.

    The harness owns runs/<matrix>/<cell>/: bench_cell.json records the settings (and the recipe's digest) the run
    was started with, so only a run of the same settings and recipe is continued; anything else there is removed so
    metrics.csv and TensorBoard start clean.
    """
    import shutil
    marker = run_dir / "bench_cell.json"
    if (run_dir / "checkpoint_last.pt").is_file() and marker.is_file():
        try:
            started = json.loads(marker.read_text())
            if same_settings(started.get("fingerprint"), fp) and same_digest(started.get("recipe_digest"), digest):
                return run_dir
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    atomic_write_text(marker, json.dumps({"fingerprint": fp, "recipe_digest": digest}) + "\n", "cell marker")
    return None


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return None
    return node


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
class Job:
    index: int
    cell: dict
    started: float
    stack: ExitStack
    estimate: float | None = None  # of this cell's time to train, when it started (this run's pace included)
    epochs_at_start: int = 0  # epochs its run folder already held (a cell resumed from an earlier slice)
    lock: object = None  # the open cell lock file: a worker inherits it, so the cell stays locked while it lives
    gpu: str | None = None  # the CUDA device a worker was given
    proc: subprocess.Popen | None = None
    record_path: Path | None = None
    reader: threading.Thread | None = None


def run_matrix(matrix, *, seeds=None, only=None, dry_run=False, results_root="results", runs_root="runs",
               latency=True, retry_failed=False, workers=1, threads=None, budget_s=None, device=None,
               log=print) -> dict:
    """Run every unfinished cell of ``matrix``; returns counts {'total', 'skipped', 'ok', 'failed', 'deferred',
    'interrupted', 'busy'} (busy: being trained by another process)."""
    results_dir = Path(results_root) / matrix["name"]
    runs_dir = Path(runs_root) / matrix["name"]
    runs_path = results_dir / "runs.jsonl"
    records = read_jsonl(runs_path)
    pending = _pending(matrix, cells(matrix, seeds, only), latest_by_cell(records), runs_path, retry_failed)
    pending = _reuse(matrix, pending, runs_path, write=not dry_run)
    n_total = len(pending)
    n_skip = sum(1 for _, prev in pending if prev is not None)
    if dry_run:
        return _dry_run(matrix, pending, runs_dir, runs_path, log, device)

    from ..engine.config import load_config
    from ..engine.train import train

    if latency:
        from .latency import measure_latencies
        methods = [m for m in matrix["methods"] if only is None or m["name"] in only]
        measure_latencies(matrix, methods, results_dir / "latency.json", load_config=load_config, device=device,
                          log=log)

    counts = {"total": n_total, "skipped": n_skip, "ok": 0, "failed": 0, "deferred": 0, "interrupted": 0, "busy": 0}
    for i, (c, prev) in enumerate(pending, 1):
        if prev is not None and prev.get("reused_from"):
            log(f"[{i}/{n_total}] {c['method']} seed {c['seed']}: same settings and seed as a finished cell of "
                f"{prev['reused_from']}; its result is used, skipped")
        elif prev is not None:
            log(f"[{i}/{n_total}] {c['method']} seed {c['seed']}: finished earlier ({prev.get('status')}), skipped")
    queue = [(i, c) for i, (c, prev) in enumerate(pending, 1) if prev is None]
    if threads is None and workers > 1:
        threads = threads_per_worker(workers)
    deadline = time.monotonic() + budget_s if budget_s is not None else None
    log(f"matrix {matrix['name']}: {len(queue)} of {n_total} cells to run, --workers {workers}"
        + (f" x {threads} thread(s)" if threads else "")
        + (f", --budget {fmt_duration(budget_s)}" if budget_s is not None else ""))
    runner = _Runner(matrix, runs_dir, runs_path, n_total, workers, threads, deadline,
                     Estimates(records, planned_device_kind(matrix, device)), counts,
                     log, load_config=load_config, train=train, device=device, retry_failed=retry_failed)
    runner.run(queue)
    _summary(matrix, counts, runs_path, log)
    return counts


def _pending(matrix, todo, done, runs_path, retry_failed):
    out = []
    for c in todo:
        prev = done.get((c["method"], c["seed"]))
        if prev is not None and not same_settings(prev.get("fingerprint"), fingerprint(matrix, c)):
            raise AttnlabError(
                f"{runs_path} holds method '{c['method']}' seed {c['seed']} run with other settings than "
                f"{matrix['path']} now gives; move that file away (or rename the matrix) before re-running")
        if prev is not None and not same_recipe(prev, matrix):
            raise AttnlabError(
                f"{runs_path} holds method '{c['method']}' seed {c['seed']} trained with recipe {matrix['recipe']} "
                f"as it was before an edit (digest {prev['recipe_digest']}, now {matrix['recipe_digest']}); undo "
                "the edit, or give the changed recipe a new file and matrix")
        finished = prev is not None and (prev.get("status") == "ok" or not retry_failed)
        out.append((c, prev if finished else None))
    return out


def _reuse(matrix, pending, runs_path, write=True):
    """Cells not yet run here whose settings and seed match a finished (ok) cell of a ``reuse:`` matrix take its
    result: the record is appended to this runs.jsonl (when ``write``) with ``reused_from`` naming its file."""
    if not matrix.get("reuse") or all(prev is not None for _, prev in pending):
        return pending
    found = {}
    for folder in matrix["reuse"]:
        source = Path(folder) / "runs.jsonl"
        for r in read_jsonl(source):
            key = settings_of(r.get("fingerprint"))
            if r.get("status") == "ok" and key is not None and same_recipe(r, matrix):
                found[(key, r.get("seed"))] = (source, r)
    out = []
    for c, prev in pending:
        hit = found.get((fingerprint(matrix, c), c["seed"])) if prev is None else None
        if hit is not None:
            source, r = hit
            prev = {**r, "matrix": matrix["name"], "matrix_file": portable_path(matrix["path"]), "method": c["method"],
                    "reused_from": r.get("reused_from") or str(source)}  # a reused record names its origin
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


def _dry_run(matrix, pending, runs_dir, runs_path, log, device=None) -> dict:
    from ..attention import get
    from ..engine.config import load_config

    n_total = len(pending)
    n_skip = sum(1 for _, prev in pending if prev is not None)
    log(f"matrix {matrix['name']}: {n_total} cells ({n_skip} finished), recipe {matrix['recipe']}, "
        f"results -> {runs_path}")
    bad = 0
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
                get(load_config(matrix["recipe_path"], overrides=overrides).model.attention)
            except Exception as err:  # reported per cell: a dry run lists every problem at once
                problem = one_line(err)
        bad += problem is not None
        log(f"[{i}/{n_total}] {c['method']} seed {c['seed']}: {state}; overrides: {' '.join(overrides)}"
            + (f"; CONFIG ERROR: {problem}" if problem else ""))
    return {"total": n_total, "skipped": n_skip, "ok": 0, "failed": 0, "config_errors": bad}


class _Runner:
    """Starts cells while slots are free and the budget allows, and records each as it ends."""

    def __init__(self, matrix, runs_dir, runs_path, n_total, workers, threads, deadline, estimates, counts, log,
                 *, load_config, train, device=None, retry_failed=False):
        self.matrix, self.runs_dir, self.runs_path, self.n_total = matrix, runs_dir, runs_path, n_total
        self.retry_failed = retry_failed
        self.workers, self.threads, self.deadline, self.est = workers, threads, deadline, estimates
        self.counts, self.log, self.load_config, self.train = counts, log, load_config, train
        self.device = device
        self.running: list[Job] = []
        self.epochs: dict[str, int] = {}  # run name -> train.epochs, read once
        self.finished: list[tuple[Job, float]] = []  # (job, seconds it took) of each cell this run finished
        self.gpus = _visible_gpus() if workers > 1 else []

    # ---- the loop
    def run(self, queue):
        self.queue = queue
        previous = _raise_on_sigterm()
        try:
            while queue or self.running:
                while queue and len(self.running) < self.workers:
                    item = self._next_that_fits(queue)
                    if item is None:
                        break
                    self._start(*item)
                if not self.running:
                    break
                self._wait_one()
            pace = self._pace()
            for i, c in queue:
                self.log(f"[{i}/{self.n_total}] {c['method']} seed {c['seed']}: not started, it would not finish "
                         f"within the budget (estimate {fmt_duration(self._estimate(c, pace) or 0)}, "
                         f"{self.est.basis(c['method'])}{pace_note(pace)})")
            self.counts["deferred"] += len(queue)
        finally:
            self._stop_all()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _next_that_fits(self, queue):
        """Pop the first queued cell whose estimate fits in the budget (None when none does)."""
        # Re-read each time: this run's finished cells and those another bench on this matrix finished meanwhile.
        self.est = Estimates(read_jsonl(self.runs_path), self.est.device_kind)
        pace = self._pace()
        now = time.monotonic()
        for k, (i, c) in enumerate(queue):
            estimate = self._estimate(c, pace)
            if self.deadline is None or (now < self.deadline and (estimate is None or now + estimate <= self.deadline)):
                return queue.pop(k)
        return None

    def _estimate(self, c, pace=None) -> float | None:
        """The method's cell estimate times the fraction of its epochs this cell has still to train (a cell
        stopped in an earlier slice resumes from its last epoch, as its metrics.csv shows), times ``pace``."""
        left = self._time_left(c, self._epochs_done(c))
        return None if left is None else left * (pace or 1.0)

    def _time_left(self, c, done: int) -> float | None:
        """The method's cell estimate for the epochs after the first ``done`` (no pace)."""
        full = self.est(c["method"])
        if full is None or not done:
            return full
        return full * max(0.0, 1.0 - done / self._epochs(c))

    def _epochs_done(self, c) -> int:
        return len(read_curve(self.runs_dir / c["run_name"]) or [])

    def _epochs(self, c) -> int:
        if c["run_name"] not in self.epochs:
            cfg = self.load_config(self.matrix["recipe_path"], overrides=cell_overrides(self.matrix, c, self.runs_dir))
            self.epochs[c["run_name"]] = int(cfg.train.epochs)
        return self.epochs[c["run_name"]]

    def _pace(self) -> float | None:
        """How many times longer than the estimates this run's cells take: the estimates come from finished
        cells, which may have run on a faster or slower machine, or on one less or more loaded. Measured on the
        cells this run finished and on the running ones' finished epochs, each against its method's estimate as
        it is now (which takes in this run's finished cells too, so the pace tends to 1 as they accumulate).
        Cells of a method with no finished cell say nothing. The largest (cautious); None when nothing says or
        when the cells keep to their estimates or beat them (the budget never starts more than the finished cells
        allow, so a slice cannot overrun because its first epochs ran fast)."""
        paces = [took / expected for job, took in self.finished if (expected := self._expected(job))]
        now = time.time()
        for job in self.running:
            done = self._epochs_done(job.cell) - job.epochs_at_start
            expected = self._expected(job)
            if expected and done > 0:
                per_epoch = expected / max(1, self._epochs(job.cell) - job.epochs_at_start)
                paces.append((now - job.started) / done / per_epoch)
        worst = max(paces, default=0.0)
        return worst if worst > 1.0 else None

    def _expected(self, job) -> float | None:
        """Time the epochs ``job`` had left when it started should take by its own method's cells, no pace."""
        if job.cell["method"] not in self.est.times:
            return None
        return self._time_left(job.cell, job.epochs_at_start)

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
        if prev is not None and (prev.get("status") == "ok" or not self.retry_failed):  # another bench ran it
            stack.close()
            self.counts["skipped"] += 1
            self.log(f"[{i}/{self.n_total}] {name}: finished by another attnlab bench ({prev.get('status')}), "
                     "skipped")
            return
        job = Job(i, c, time.time(), stack, estimate=self._estimate(c, self._pace()),
                  epochs_at_start=self._epochs_done(c), lock=lock)
        self.log(f"[{i}/{self.n_total}] {name}: running{self._eta()}")
        if self.workers == 1:
            self._finish(job, run_cell(self.matrix, c, self.runs_dir, load_config=self.load_config,
                                       train=self.train, device=self.device))
            return
        self._spawn(job)
        self.running.append(job)

    def _spawn(self, job):
        c = job.cell
        bench_dir = self.runs_dir / HARNESS_DIR
        (bench_dir / "records").mkdir(parents=True, exist_ok=True)
        (bench_dir / "logs").mkdir(parents=True, exist_ok=True)
        job.record_path = bench_dir / "records" / f"{c['run_name']}.json"
        job.record_path.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        package_root = str(Path(__file__).resolve().parents[2])  # the children import this very attnlab
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        if len(self.gpus) > 1:  # spread over the visible GPUs
            job.gpu = least_busy_gpu(self.gpus, [j.gpu for j in self.running])
            env["CUDA_VISIBLE_DEVICES"] = job.gpu
        cmd = [sys.executable, "-m", "attnlab.bench.worker", "--matrix", self.matrix["path"], "--method",
               c["method"], "--seed", str(c["seed"]), "--runs-root", str(self.runs_dir), "--record",
               str(job.record_path), "--workers", str(self.workers), "--parent-pid", str(os.getpid())]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.device:
            cmd += ["--device", self.device]
        log_path = bench_dir / "logs" / f"{c['run_name']}.log"
        # The worker inherits the cell's lock (pass_fds): if this bench is killed, the cell stays locked until the
        # worker, which stops when it sees its bench gone, has stopped too; a restarted bench never trains it twice.
        # Its own session: stopping the worker's process group stops the decoding processes it forks too.
        job.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1, pass_fds=(job.lock.fileno(),),
                                    start_new_session=True)
        job.reader = threading.Thread(target=self._forward, args=(job.proc, log_path, c["run_name"]), daemon=True)
        job.reader.start()

    def _forward(self, proc, log_path, tag):
        """Copy a worker's output to its log file and, prefixed with its cell, to the progress output."""
        with open(log_path, "a") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                self.log(f"  [{tag}] {line.rstrip()}")

    def _wait_one(self):
        while True:
            for job in self.running:
                if job.proc.poll() is not None:
                    self.running.remove(job)
                    job.reader.join(timeout=10)
                    self._collect(job)
                    return
            time.sleep(0.5)

    def _collect(self, job):
        record = None
        if job.record_path.is_file():
            try:
                record = json.loads(job.record_path.read_text())
            except (OSError, json.JSONDecodeError):
                record = None
        if record is None:
            code = job.proc.returncode
            why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            job.stack.close()
            self.counts["interrupted"] += 1
            self.log(f"[{job.index}/{self.n_total}] {job.cell['method']} seed {job.cell['seed']}: worker {why} after "
                     f"{fmt_duration(time.time() - job.started)}; not recorded, the next run resumes it from its "
                     f"last checkpoint (log: {self.runs_dir / HARNESS_DIR / 'logs' / (job.cell['run_name'] + '.log')})")
            return
        self._finish(job, record, stamped=True)
        job.record_path.unlink(missing_ok=True)

    def _finish(self, job, record, stamped=False):
        c, duration = job.cell, time.time() - job.started
        if not stamped:
            import torch
            stamp(record, torch.get_num_threads(), self.workers)
        append_jsonl(self.runs_path, record)
        job.stack.close()
        self.counts[record["status"]] += 1
        if record["status"] == "ok":
            self.finished.append((job, duration))
        name = f"[{job.index}/{self.n_total}] {c['method']} seed {c['seed']}"
        if record["status"] == "ok":
            self.log(f"{name}: val top-1 {_pct(record['val_top1'])}, test top-1 {_pct(record['test_top1'])} in "
                     f"{fmt_duration(duration)}")
        else:
            self.log(f"{name}: FAILED: {record['error']}")

    def _eta(self) -> str:
        """' (ETA 1h05m, budget left 2h10m)': the queued and running cells' estimated time over the workers."""
        parts = []
        now = time.time()
        pace = self._pace()
        left = [self._estimate(c, pace) for _, c in self.queue]
        left += [max(0.0, (j.estimate or 0.0) - (now - j.started)) for j in self.running]
        if left and all(e is not None for e in left):
            parts.append(f"{len(self.queue)} queued, ETA {fmt_duration(sum(left) / self.workers)}")
        if self.deadline is not None:
            parts.append(f"budget left {fmt_duration(max(0.0, self.deadline - time.monotonic()))}")
        return f" ({', '.join(parts)})" if parts else ""

    def _stop_all(self):
        """On an interruption: stop the workers and what they forked (their cells resume from their checkpoints
        next time)."""
        for job in self.running:
            if job.proc.poll() is None:
                _signal_group(job.proc, signal.SIGTERM)
        for job in self.running:
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(job.proc, signal.SIGKILL)
                job.proc.wait()
            job.stack.close()
        self.running.clear()


def _signal_group(proc, sig) -> None:
    """``sig`` to a worker's process group (it leads one: its own session), else to the worker alone."""
    try:
        os.killpg(proc.pid, sig)
    except (AttributeError, ProcessLookupError, PermissionError):
        proc.send_signal(sig)


def least_busy_gpu(gpus: list[str], in_use: list) -> str:
    """The visible GPU the fewest running workers have (the first of those): a cell's place in the matrix says
    nothing about which GPU is free when it starts."""
    return min(gpus, key=in_use.count)


def _visible_gpus() -> list[str]:
    try:
        import torch
        if not torch.cuda.is_available():
            return []
        listed = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [x.strip() for x in listed.split(",") if x.strip()] if listed else None
        return ids if ids else [str(k) for k in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA: the workers run on the CPU
        return []


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
