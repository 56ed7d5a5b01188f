"""The worker processes of a bench with K > 1 workers: each cell trains in ``python -m attnlab.bench.worker``.

A worker gets its cell's settings on the command line, inherits the cell's lock (so a restarted bench never trains
the cell twice while the worker lives), runs in its own session (stopping its process group stops the decoding
processes it forks), watches its bench and stops when it is gone, and writes its record to a file this process
collects. Its output goes to runs/<matrix>/.bench/logs/<cell>.log and, prefixed with the cell, to the progress
output. On CUDA the workers spread over the visible GPUs, each new one on the least busy.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HARNESS_DIR = ".bench"  # runs/<matrix>/.bench/{locks,logs,records}: the harness's own bookkeeping


class WorkerPool:
    in_process = True  # with one worker the runner trains the cell in its own process instead

    def __init__(self, matrix, runs_dir, workers: int, threads, device, log):
        self.matrix, self.runs_dir, self.workers, self.threads, self.device, self.log = (
            matrix, runs_dir, workers, threads, device, log)
        self.running: list = []  # the jobs whose worker runs
        self.gpus = _visible_gpus() if workers > 1 else []

    def spawn(self, job):
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

    def wait_one(self):
        """Block until a worker ends; returns its job (no longer running) and its record, or None when it left none
        (killed, out of memory): its cell resumes from its last checkpoint next time."""
        while True:
            for job in self.running:
                if job.proc.poll() is not None:
                    self.running.remove(job)
                    job.reader.join(timeout=10)
                    return job, self._collect(job)
            time.sleep(0.5)

    def _collect(self, job):
        record = None
        if job.record_path.is_file():
            try:
                record = json.loads(job.record_path.read_text())
            except (OSError, json.JSONDecodeError):
                record = None
        return record  # the runner deletes the file once the record is in runs.jsonl

    def why_ended(self, job) -> str:
        """'worker killed by signal 9' / 'worker exited with code 1', and where its log is."""
        code = job.proc.returncode
        why = f"worker killed by signal {-code}" if code < 0 else f"worker exited with code {code}"
        return f"{why} (log: {self.runs_dir / HARNESS_DIR / 'logs' / (job.cell['run_name'] + '.log')})"

    def stop_all(self):
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
