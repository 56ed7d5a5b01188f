"""attnlab bench --executor: a matrix's cells as scheduler jobs (submitit's local executor stands in for SLURM).

The same tiny matrix runs through the local workers and through submitit's LocalExecutor, which starts each job as
its own process exactly as SLURM's script would (pickled cell, signal handling, requeue); only the allocation
differs. A job that is preempted is requeued and resumes; a job killed outright resumes when the bench resubmits it.
"""
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from attnlab import cli
from attnlab.bench import load_matrix, run_matrix
from attnlab.jsonl import read_jsonl
from matrix_helpers import tiny_matrix_text

submitit = pytest.importorskip("submitit")
from attnlab.bench.scheduler import ClusterOptions, make_executor  # noqa: E402

EPOCHS = 4
# What may differ between two runs of one cell: where and when it ran, and how long it took.
HOW_IT_RAN = {"run_dir", "wall_time_s", "train_images_per_s", "host", "finished_at", "executor", "job_id",
              "harness_commit", "git_commit", "workers", "matrix_file"}


def _counts(**given):
    return {"total": 0, "skipped": 0, "ok": 0, "failed": 0, "deferred": 0, "interrupted": 0, "busy": 0, **given}


def _matrix(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    text = tiny_matrix_text({"none": "none", "se": "se"}).replace("train.epochs: 1", f"train.epochs: {EPOCHS}")
    text = text.replace("data.subset: 8", "data.subset: 32")  # 10 steps an epoch: time to interrupt one
    path = folder / "m.yaml"
    path.write_text(text)
    return load_matrix(path)


def _what_it_computed(record):
    return {k: v for k, v in record.items() if k not in HOW_IT_RAN}


def _weights(run_dir):
    import torch
    return torch.load(Path(run_dir) / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]


def _same_weights(a, b) -> bool:
    import torch
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The matrix through the local workers (2 processes, 1 thread each): the reference."""
    root = tmp_path_factory.mktemp("local")
    matrix = _matrix(root)
    counts = run_matrix(matrix, results_root=root / "res", runs_root=root / "runs", latency=False, workers=2,
                        threads=1, log=lambda line: None)
    assert counts == _counts(total=2, ok=2)
    return {r["method"]: r for r in read_jsonl(root / "res" / "tiny" / "runs.jsonl")}


def test_a_matrix_through_the_scheduler_gives_the_cells_the_local_workers_give(tmp_path, local_run):
    matrix = _matrix(tmp_path)
    out = []
    counts = run_matrix(matrix, results_root=tmp_path / "res", runs_root=tmp_path / "runs", latency=False,
                        workers=2, threads=1, cluster=ClusterOptions(executor="submitit-local"), log=out.append)
    assert counts == _counts(total=2, ok=2)
    lines = read_jsonl(tmp_path / "res" / "tiny" / "runs.jsonl")
    assert sorted(r["method"] for r in lines) == ["none", "se"]  # one line per cell, appended by its job
    for r in lines:
        ref = local_run[r["method"]]
        assert r["executor"] == "submitit-local" and r["job_id"] and r["threads"] == 1
        assert r["status"] == "ok" and len(r["val_curve"]) == EPOCHS
        assert _what_it_computed(r) == _what_it_computed(ref)  # accuracies, losses' curve, params, FLOPs, ...
        assert _same_weights(r["run_dir"], ref["run_dir"])  # bit for bit
    text = "\n".join(out)
    assert "submitted as submitit-local job" in text and f"[none-s0] epoch   {EPOCHS}/{EPOCHS}" in text

    # Again: every cell is in runs.jsonl, so nothing is submitted.
    out.clear()
    counts = run_matrix(matrix, results_root=tmp_path / "res", runs_root=tmp_path / "runs", latency=False,
                        workers=2, threads=1, cluster=ClusterOptions(executor="submitit-local"), log=out.append)
    assert counts == _counts(total=2, skipped=2) and not any("submitted" in line for line in out)
    assert len(read_jsonl(tmp_path / "res" / "tiny" / "runs.jsonl")) == 2


def _job_task(folder: Path) -> int | None:
    """The pid of the process running a job of ``folder`` (submitit's task process, the one training)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and str(folder).encode() in cmd:
            return int(pid)
    return None


def _interrupt_after_epochs(folder: Path, plan: list, done: list):
    """For each (epoch, signal) of ``plan``: once the job has said it finished that epoch (the engine prints the
    line after writing the epoch's checkpoint), send the signal to its process."""
    import time
    for epoch, sig in plan:
        line = f"epoch {epoch:>3}/{EPOCHS}".encode()
        while not any(line in p.read_bytes() for p in folder.glob("*_0_log.out")) or _job_task(folder) is None:
            if "bench ended" in done:
                return
            time.sleep(0.05)
        os.kill(_job_task(folder), sig)
        done.append((epoch, sig))


def test_a_preempted_job_is_requeued_and_a_killed_one_resumes_when_resubmitted(tmp_path, local_run, monkeypatch):
    # submitit gives a job that ended without a result 15 s for the file to appear (a cluster's shared filesystem
    # may lag); here the job ran on this machine, and its own tests wait 0 s too.
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 0)
    matrix = _matrix(tmp_path)
    runs, folder = tmp_path / "runs", tmp_path / "runs" / "tiny" / ".bench" / "submitit"
    run_dir = runs / "tiny" / "none-s0"
    # After epoch 1 the scheduler's warning signal (what SLURM sends before a preemption or the time limit):
    # submitit checkpoints the cell and requeues it, and the requeued job resumes. After epoch 2 a SIGKILL (the
    # node is lost, the job is out of memory): the job ends with no result.
    sent = []
    watcher = threading.Thread(target=_interrupt_after_epochs,
                               args=(folder, [(1, signal.SIGUSR2), (2, signal.SIGKILL)], sent), daemon=True)
    watcher.start()
    out = []
    options = ClusterOptions(executor="submitit-local")
    counts = run_matrix(matrix, only=["none"], results_root=tmp_path / "res", runs_root=runs, latency=False,
                        workers=1, threads=1, cluster=options, log=out.append)
    sent.append("bench ended")
    watcher.join(timeout=30)
    assert sent[:2] == [(1, signal.SIGUSR2), (2, signal.SIGKILL)], out
    assert counts == _counts(total=1, interrupted=1)
    text = "\n".join(out)
    assert "[none-s0] resuming" in text  # the requeued job continued from its checkpoint
    assert "none seed 0: job" in text and "ended without a record (killed, cancelled or lost" in text
    assert "not recorded, the next run resumes it" in text
    assert not (tmp_path / "res" / "tiny" / "runs.jsonl").exists()

    # Submitted again, the cell resumes from its last checkpoint and ends as the uninterrupted cell did.
    out.clear()
    counts = run_matrix(matrix, only=["none"], results_root=tmp_path / "res", runs_root=runs, latency=False,
                        workers=1, threads=1, cluster=options, log=out.append)
    assert counts == _counts(total=1, ok=1)
    assert any("[none-s0] resuming" in line for line in out)
    (record,) = read_jsonl(tmp_path / "res" / "tiny" / "runs.jsonl")
    assert _what_it_computed(record) == _what_it_computed(local_run["none"])
    assert _same_weights(run_dir, local_run["none"]["run_dir"])


def test_a_job_trains_nothing_when_its_cell_is_locked_or_recorded(tmp_path, monkeypatch):
    """The job itself (called here in-process) checks the cell's lock and runs.jsonl: it may start after its bench
    is gone, or another bench may have handed the same cell to another job meanwhile."""
    from attnlab.bench.runs import cell_lock
    from attnlab.bench.scheduler import CellJob
    from attnlab.jsonl import append_jsonl
    matrix = _matrix(tmp_path)
    runs_dir, runs_path = tmp_path / "runs" / "tiny", tmp_path / "res" / "tiny" / "runs.jsonl"
    job = CellJob(matrix_path=matrix["path"], method="none", seed=0, runs_dir=runs_dir, runs_path=runs_path,
                  cwd=Path.cwd(), threads=1)
    with cell_lock(runs_dir / ".bench" / "locks" / "none-s0.lock") as lock:
        assert lock
        assert job() == ("busy", None)
    earlier = {"matrix": "tiny", "method": "none", "seed": 0, "status": "ok", "val_top1": 12.5}
    append_jsonl(runs_path, earlier)
    assert job() == ("finished", earlier)
    assert not (runs_dir / "none-s0").exists() and len(read_jsonl(runs_path)) == 1
    checkpointed = job.checkpoint()  # what submitit requeues on a preemption: this very cell
    assert checkpointed.function is job and not checkpointed.args


def test_a_job_without_a_result_is_said_in_one_line():
    from attnlab.bench.scheduler import _why_no_result

    class SlurmJob:
        state = "NODE_FAIL"
    failed = submitit.core.utils.FailedJobError(
        "Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call "
        "last):\n  File \"x.py\", line 3, in f\n    g()\nattnlab.errors.AttnlabError: runs.jsonl: se seed 0 trained "
        "in bf16\n----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at "
        "paths:\n  - 1_0_log.err\n  - 1_0_log.out")
    assert _why_no_result(failed, SlurmJob()).startswith("it raised attnlab.errors.AttnlabError: runs.jsonl: se")
    lost = submitit.core.utils.UncompletedJobError("Job 1 has not produced any output\nError stream: ...")
    assert _why_no_result(lost, SlurmJob()) == "killed, cancelled or lost: it left no result; scheduler state NODE_FAIL"


def test_slurm_options_become_the_jobs_sbatch_lines(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only looks for srun before it writes a script
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    options = ClusterOptions(executor="slurm", partition="gpu", gpus_per_cell=1, cpus_per_cell=8, time_limit_min=240,
                             mem_gb=32, slurm_args={"account": "proj", "qos": "high"})
    executor = make_executor(options, tmp_path / "jobs", threads=None)
    script = executor._make_submission_file_text("python -m submitit.core._submit jobs", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--time=240", "--mem=32G",
                 "--account=proj", "--qos=high", "--ntasks-per-node=1", "--signal=USR2@"):
        assert f"#SBATCH {line}" in script
    assert "export PYTHONPATH=" in script  # the jobs import the attnlab that submitted them


def test_scheduler_options_are_checked_in_one_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.yaml"
    path.write_text(tiny_matrix_text({"none": "none"}))
    base = ["bench", "--matrix", str(path), "--results-root", str(tmp_path / "res"), "--runs-root",
            str(tmp_path / "runs"), "--no-latency"]
    def error(argv):
        with pytest.raises(SystemExit) as exit_:
            cli.main(base + argv)
        assert exit_.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints its usage above
        assert last.startswith(("attnlab: error: ", "attnlab bench: error: "))
        return last

    assert "must be 0 or 1" in error(["--executor", "slurm", "--gpus-per-cell", "2"])
    assert "must be KEY=VALUE" in error(["--executor", "slurm", "--slurm-arg", "account"])
    assert "--partition need --executor slurm" in error(["--partition", "gpu"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    err = error(["--executor", "slurm"])
    assert "no srun" in err and "--executor submitit-local" in err
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    assert "pip install 'attnlab[cluster]'" in error(["--executor", "submitit-local"])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "res").exists()
