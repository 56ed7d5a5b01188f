"""The cells of a bench as jobs of a scheduler: SLURM through submitit, or submitit's local executor.

``attnlab bench --executor slurm`` (or ``submitit-local``) hands each cell to the scheduler as one job instead of a
local worker process; the runner's loop, the planner (skip, budget, pace) and the records are the same. The job:

* takes the cell's lock itself (runs/<matrix>/.bench/locks/<cell>.lock, on the shared file system) for as long as
  it trains, so two benches on one matrix never train a cell twice at once; a job that finds it taken, or finds the
  cell already in runs.jsonl, trains nothing and says so;
* trains the cell through :func:`cell.run_cell`, which resumes it from the run's checkpoint_last.pt when an earlier
  job of it was stopped (preempted, past its time limit, killed, or its node lost);
* appends its record to runs.jsonl itself, through the same locked append as the local runner
  (:func:`attnlab.jsonl.append_jsonl`), so a cell is recorded even when the bench that submitted it is gone;
* is checkpointable in submitit's sense: on the scheduler's warning signal (preemption, time limit) submitit
  requeues the same cell, which resumes from its last epoch checkpoint.

A cell trains on at most one GPU, as it does under the local workers (the bench does not run a cell with DDP).

submitit is imported only when a scheduler is asked for (``pip install 'attnlab[cluster]'``).
"""
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AttnlabError
from .pool import HARNESS_DIR

EXECUTORS = ("local", "submitit-local", "slurm")


@dataclass
class ClusterOptions:
    """How cells become jobs. submitit-local uses ``gpus_per_cell``, ``time_limit_min`` and ``requeues``; the rest
    is for SLURM."""
    executor: str = "submitit-local"  # submitit-local | slurm
    partition: str | None = None
    gpus_per_cell: int = 0  # 0 or 1: a cell trains on one device
    cpus_per_cell: int | None = None
    time_limit_min: int = 24 * 60  # per job; a cell longer than this continues in a requeued job
    mem_gb: int | None = None
    slurm_args: dict = field(default_factory=dict)  # further sbatch options, e.g. {"account": "x", "qos": "y"}
    requeues: int = 10  # how often a cell's job may be requeued at its time limit
    poll_s: float | None = None  # how often the bench looks at its jobs (default: 1 s locally, 15 s on SLURM)


def submitit_module():
    try:
        import submitit
    except ImportError:
        raise AttnlabError("--executor submitit-local/slurm needs submitit: pip install 'attnlab[cluster]' "
                           "(or pip install submitit)") from None
    return submitit


def check_available(executor: str) -> None:
    """A one-line AttnlabError, before anything runs, when ``executor`` cannot be used here."""
    import shutil
    submitit_module()
    if executor == "slurm" and shutil.which("srun") is None:
        raise AttnlabError("--executor slurm: no srun on this machine (submit from a SLURM login node, or use "
                           "--executor submitit-local here)")


class CellJob:
    """What one scheduler job runs: one cell of a matrix. Picklable (paths and names only), and checkpointable:
    submitit calls :meth:`checkpoint` on the scheduler's warning signal and requeues what it returns."""

    def __init__(self, *, matrix_path, method, seed, runs_dir, runs_path, cwd, threads=None, device=None,
                 workers=1, retry_failed=False, executor="submitit-local", check_precision=False):
        self.matrix_path, self.method, self.seed = str(matrix_path), method, seed
        self.runs_dir, self.runs_path, self.cwd = str(runs_dir), str(runs_path), str(cwd)
        self.threads, self.device, self.workers = threads, device, workers
        self.retry_failed, self.executor, self.check_precision = retry_failed, executor, check_precision

    def __call__(self):
        """('ran', record) after training and recording the cell; ('busy', None) when another job or bench holds
        its lock; ('finished', record) when runs.jsonl already has it (another bench finished it)."""
        from ..jsonl import append_jsonl, read_jsonl
        from .runs import cell_lock, is_done, latest_by_cell
        os.chdir(self.cwd)  # the paths are the bench's, as it gave them (records keep them relative)
        matrix, cell = self._cell()
        lock_path = Path(self.runs_dir) / HARNESS_DIR / "locks" / f"{cell['run_name']}.lock"
        with cell_lock(lock_path) as lock:
            if not lock:
                return ("busy", None)
            prev = latest_by_cell(read_jsonl(self.runs_path)).get((self.method, self.seed))
            if is_done(prev, matrix, cell, self.retry_failed):
                return ("finished", prev)
            record = self._train(matrix, cell)
            append_jsonl(self.runs_path, record)  # in runs.jsonl before the lock is released
            return ("ran", record)

    def _cell(self):
        from .matrix import cells, load_matrix
        matrix = load_matrix(self.matrix_path)
        (cell,) = cells(matrix, seeds=[self.seed], only=[self.method])
        return matrix, cell

    def _train(self, matrix, cell) -> dict:
        import torch

        from ..engine.config import load_config
        from ..engine.train import train
        from ..host import set_threads
        from ..jsonl import read_jsonl
        from .cell import refuse_another_precision, run_cell, stamp

        set_threads(self.threads)
        if self.check_precision:  # the bench could not: its machine is not the one that trains
            refuse_another_precision(matrix, [(cell, None)], read_jsonl(self.runs_path), Path(self.runs_dir),
                                     self.runs_path, load_config, self.device)
        record = run_cell(matrix, cell, self.runs_dir, load_config=load_config, train=train, device=self.device)
        record = stamp(record, torch.get_num_threads(), self.workers)
        record["executor"] = self.executor
        job_id = _job_id()
        if job_id:
            record["job_id"] = job_id
        return record

    def checkpoint(self, *args, **kwargs):
        """Requeue this very cell: the new job resumes it from its last epoch checkpoint."""
        return submitit_module().helpers.DelayedSubmission(self, *args, **kwargs)


def _job_id():
    try:
        return submitit_module().JobEnvironment().job_id
    except Exception:  # not inside a submitit job (a test calling the job directly)
        return None


class SchedulerPool:
    """The runner's pool with a scheduler underneath: the same spawn / running / wait_one / why_ended / stop_all as
    :class:`pool.WorkerPool`. A job's output is forwarded, prefixed with its cell, to the progress output."""

    in_process = False  # never trains a cell in the bench's own process, even with one worker

    def __init__(self, matrix, runs_dir, runs_path, workers, threads, device, log, options: ClusterOptions,
                 retry_failed=False, check_precision=False):
        self.matrix, self.runs_dir, self.runs_path, self.workers = matrix, Path(runs_dir), runs_path, workers
        self.threads, self.device, self.log, self.options = threads, device, log, options
        self.retry_failed, self.check_precision = retry_failed, check_precision
        self.running: list = []
        self.folder = self.runs_dir / HARNESS_DIR / "submitit"
        self.executor = make_executor(options, self.folder, threads)
        self.poll_s = options.poll_s if options.poll_s is not None else (
            15.0 if options.executor == "slurm" else 1.0)

    def spawn(self, job):
        c = job.cell
        # The job takes the cell's lock itself (it may run on another machine, after this bench is gone): this
        # bench lets go of it now. Should another bench take it meanwhile, one of the two jobs trains, and the
        # other finds the lock taken or the cell recorded.
        job.stack.close()
        task = CellJob(matrix_path=self.matrix["path"], method=c["method"], seed=c["seed"], runs_dir=self.runs_dir,
                       runs_path=self.runs_path, cwd=Path.cwd(), threads=self.threads, device=self.device,
                       workers=self.workers, retry_failed=self.retry_failed, executor=self.options.executor,
                       check_precision=self.check_precision)
        if self.options.executor == "slurm":
            self.executor.update_parameters(job_name=f"{self.matrix['name']}-{c['run_name']}")
        job.handle = self.executor.submit(task)
        job.forwarded = {}
        self.log(f"  [{c['run_name']}] submitted as {self.options.executor} job {job.handle.job_id} "
                 f"(logs: {self.folder})")

    def wait_one(self):
        """Block until a job ends; returns it and its record (already in runs.jsonl), or None when it left none:
        its cell resumes from its last checkpoint next time (``job.skip`` says when it found the cell taken)."""
        while True:
            for job in self.running:
                self._forward(job)
                if job.handle.done():
                    self.running.remove(job)
                    self._forward(job)
                    return job, self._collect(job)
            time.sleep(self.poll_s)

    def _collect(self, job):
        try:
            kind, record = job.handle.result()
        except Exception as err:  # killed, cancelled, failed: no result; its stderr says why
            job.why = _why_no_result(err, job.handle)
            return None
        if kind == "busy":
            job.skip = "busy"
            return None
        if kind == "finished":
            job.skip = f"finished ({record.get('status')})"
            return None
        job.recorded = True
        return record

    def _forward(self, job):
        """Copy what the job's task 0 wrote since last time, prefixed with its cell, to the progress output."""
        for path in (job.handle.paths.stdout, job.handle.paths.stderr):
            try:
                with open(path, "rb") as f:
                    f.seek(job.forwarded.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # whole lines only; the rest next time
            job.forwarded[path] = job.forwarded.get(path, 0) + end
            for line in data[:end].decode(errors="replace").splitlines():
                if line.strip() and not line.startswith("submitit "):
                    self.log(f"  [{job.cell['run_name']}] {line.rstrip()}")

    def why_ended(self, job) -> str:
        """'job 123 ended without a record (killed, cancelled or lost: SLURM state ...)', and where its log is."""
        return f"job {job.handle.job_id} ended without a record ({job.why}) (log: {job.handle.paths.stderr})"

    def stop_all(self):
        """On an interruption: cancel the submitted jobs (their cells resume from their checkpoints next time)."""
        for job in self.running:
            try:
                job.handle.cancel(check=False)
            except Exception as err:  # the scheduler may already have ended it
                self.log(f"  [{job.cell['run_name']}] could not cancel job {job.handle.job_id}: {err}")
        for job in self.running:
            process = getattr(job.handle, "_process", None)  # the local executor: wait for the job to be gone
            if process is not None:
                try:
                    process.wait(timeout=30)
                except Exception:
                    process.kill()
                    process.wait()
        self.running.clear()


def _why_no_result(err, handle) -> str:
    """One line: the exception a failed job raised, else that it was stopped from outside."""
    submitit = submitit_module()
    if isinstance(err, submitit.core.utils.FailedJobError):
        parts = str(err).split("----------------------\n")  # submitit puts the job's traceback between two rules
        trace = [line.strip() for line in (parts[1] if len(parts) > 2 else "").splitlines() if line.strip()]
        return f"it raised {trace[-1] if trace else 'an error'}"
    state = "" if handle.__class__.__name__ == "LocalJob" else f"; scheduler state {handle.state}"
    return f"killed, cancelled or lost: it left no result{state}"


def make_executor(options: ClusterOptions, folder: Path, threads):
    """A submitit executor writing its pickles and logs to ``folder``."""
    submitit = submitit_module()
    package_root = str(Path(__file__).resolve().parents[2])  # the jobs import this very attnlab
    setup = [f"export PYTHONPATH={package_root}${{PYTHONPATH:+:$PYTHONPATH}}", "export PYTHONUNBUFFERED=1"]
    if options.executor == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=options.requeues)
        executor.update_parameters(timeout_min=options.time_limit_min, gpus_per_node=options.gpus_per_cell,
                                   setup=setup)
    elif options.executor == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.requeues)
        except RuntimeError as err:  # no srun on this machine
            raise AttnlabError(f"--executor slurm: {' '.join(str(err).split())} (submit from a SLURM login node, "
                               "or use --executor submitit-local here)") from None
        params = dict(time=options.time_limit_min, nodes=1, ntasks_per_node=1,
                      cpus_per_task=options.cpus_per_cell or threads or 1, setup=setup)
        if options.gpus_per_cell:
            params["gpus_per_node"] = options.gpus_per_cell
        if options.partition:
            params["partition"] = options.partition
        if options.mem_gb:
            params["mem"] = f"{options.mem_gb}G"
        if options.slurm_args:
            params["additional_parameters"] = dict(options.slurm_args)
        executor.update_parameters(**params)
    else:
        raise AttnlabError(f"unknown executor '{options.executor}' (one of: {', '.join(EXECUTORS)})")
    return executor
