"""Reliability suite (issue 11): kill -9 training at random points and inside every file write, resume, and compare
with an uninterrupted run; then feed the bad inputs of issue 11 and count clean errors and changed files.

Every run is a real ``python -m attnlab`` process on a tiny deterministic CPU recipe (resnet20 + EMA, 20 CIFAR-10
images per class, 3 epochs of 3 steps). Kills:

- at a training step (``debug.kill_at_step``), at random steps;
- inside an atomic write (``ATTNLAB_KILL_IN_WRITE=<file>:<n>``: after the temp file is written, before it replaces
  the old one) of config.yaml, every checkpoint_last.pt, every checkpoint_best.pt and results.json;
- from outside with SIGKILL after a random delay (anywhere: imports, data, CSV/TensorBoard writes, evaluation);
- twice: a resumed run killed again.

Recovery is what a user does: ``attnlab train --resume RUN`` when config.yaml exists, else the original command
again. "identical": the final checkpoint_last.pt (weights, EMA, optimizer momentum) equal the uninterrupted run's
bit for bit and results.json equals it except wall times, speeds and the name.

Bad inputs: each must end with exit 2 and one ``attnlab: error:`` line (the finished-run resume: exit 0 and "is
complete"), and change no file in the run, data and destination folders it touches (compared by content).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability.py            # writes results/reliability.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability.py --quick    # fewer kills, smoke run
"""
import argparse
import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab.data.sources import dataset_folder  # noqa: E402
from attnlab.files import atomic_write_json, git_commit  # noqa: E402

EPOCHS, STEPS = 3, 3
TIMING = {"wall_time_s", "train_images_per_s", "train_images_per_s_median_epoch", "name", "git_commit", "device"}
CIFAR = dataset_folder("cifar10")  # found as the engine finds it ($ATTNLAB_DATA, else ../shared/data)


def recipe(out, name):
    return [f"name={name}", f"out_dir={out}", f"data.cache_dir={out}/cache", "data.subset=20", "data.test_subset=10",
            f"train.epochs={EPOCHS}", "train.batch_size=32", "train.eval_batch_size=64", "train.lr=0.1",
            "train.nesterov=true", "train.warmup_epochs=0.5", "train.label_smoothing=0.1", "train.ema.enabled=true",
            "train.ema.decay=0.9", "train.deterministic=true", f"debug.max_steps_per_epoch={STEPS}", "device=cpu"]


def attnlab(argv, env=None, kill_after=None, code=None):
    """Run ``python -m attnlab ARGV`` (or ``python -c CODE ARGV``); SIGKILL it after ``kill_after`` seconds."""
    cmd = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "attnlab", *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
    return proc.returncode, out, err


def recover(out, name, attempts=4):
    """Resume (or restart, when the kill came before config.yaml existed) until the run finishes."""
    run_dir = out / name
    for _ in range(attempts):
        argv = ["train", "--resume", str(run_dir)] if (run_dir / "config.yaml").is_file() else \
            ["train", *recipe(out, name)]
        rc, _, err = attnlab(argv)
        if rc == 0:
            return True, None
        last_err = err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"
    return False, last_err


def final_state(run_dir):
    ck = torch.load(run_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    results = json.loads((run_dir / "results.json").read_text())
    momentum = {str(k): v["momentum_buffer"] for k, v in ck["optimizer"]["state"].items()}
    return {"model": ck["model"], "ema": ck["ema"]["module"], "momentum": momentum}, \
        {k: v for k, v in results.items() if k not in TIMING}


def identical(run_dir, ref):
    try:
        state, results = final_state(run_dir)
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        return False, f"unreadable final files: {err}"
    ref_state, ref_results = ref
    for part in ("model", "ema", "momentum"):
        a, b = state[part], ref_state[part]
        if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
            return False, f"{part} differs"
    if results != ref_results:
        diff = {k: (results.get(k), ref_results.get(k)) for k in ref_results if results.get(k) != ref_results.get(k)}
        return False, f"results.json differs: {diff}"
    return True, None


def kill_cases(rng, ref_seconds, best_writes, quick):
    total_steps = EPOCHS * STEPS
    steps = sorted(rng.sample(range(total_steps), 2)) if quick else list(range(total_steps))
    cases = [{"kind": "step", "kill_at_step": s} for s in steps]
    writes = [("config.yaml", 1), *(("checkpoint_last.pt", n) for n in range(1, EPOCHS + 1)),
              *(("checkpoint_best.pt", n) for n in range(1, best_writes + 1)), ("results.json", 1)]
    cases += [{"kind": "write", "file": f, "nth": n} for f, n in (writes[::3] if quick else writes)]
    # the machine's load varies between runs: delays past ~3/4 of the reference run may come after it has ended
    cases += [{"kind": "time", "after_s": round(rng.uniform(0.3, 0.75 * ref_seconds), 2)}
              for _ in range(2 if quick else 8)]
    for _ in range(1 if quick else 2):
        a = rng.randrange(total_steps - 2)
        cases.append({"kind": "twice", "kill_at_step": a, "then_at_step": rng.randrange(a + 1, total_steps)})
    return cases


def run_kill(case, out, name):
    base = ["train", *recipe(out, name)]
    if case["kind"] == "step":
        rc, _, _ = attnlab(base + [f"debug.kill_at_step={case['kill_at_step']}"])
    elif case["kind"] == "write":
        rc, _, _ = attnlab(base, env={"ATTNLAB_KILL_IN_WRITE": f"{case['file']}:{case['nth']}"})
    elif case["kind"] == "time":
        rc, _, _ = attnlab(base, kill_after=case["after_s"])
    else:
        rc, _, _ = attnlab(base + [f"debug.kill_at_step={case['kill_at_step']}"])
        if rc == -9:
            rc2, _, _ = attnlab(["train", "--resume", str(out / name), f"debug.kill_at_step={case['then_at_step']}"])
            case["second_kill"] = rc2 == -9
    return rc == -9


# ---- bad inputs ---------------------------------------------------------------------------------------------------

def digest(folders):
    """{path: sha256} of every file under ``folders`` (decode caches left out)."""
    out = {}
    for folder in folders:
        folder = Path(folder)
        if folder.is_file():
            out[str(folder)] = hashlib.sha256(folder.read_bytes()).hexdigest()
            continue
        for p in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if p.is_file() and "cache" not in p.relative_to(folder).parts:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def changed(before, after):
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


PATCHED = """
import errno, os, sys
from pathlib import Path
from attnlab import files
from attnlab.cli import main
mode, root = sys.argv[1], Path(sys.argv[2]).resolve()
if mode == "enospc":
    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    files._write_bytes = full
else:  # the OS answers EROFS to creating files under root (we may run as root, where chmod stops nothing)
    real_open = os.open
    def ro_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and Path(os.path.abspath(path)).is_relative_to(root):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)
    os.open = ro_open
main(sys.argv[3:])
"""


class Payload:
    """Unpickling this runs os.system: a dataset file must never get that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_inputs(out, ref_name, ready_name):
    ref, ready = out / ref_name, out / ready_name
    data = out / "data"
    # an empty class folder beside the ten real ones (item 6)
    empty = data / "empty-class"
    for split in ("train", "test"):
        (empty / split).mkdir(parents=True, exist_ok=True)
        for cls in (CIFAR / split).iterdir():
            link = empty / split / cls.name
            if not link.exists():
                link.symlink_to(cls, target_is_directory=True)
    (empty / "train" / "zz_empty").mkdir(exist_ok=True)
    # a CIFAR python batch crafted to run code when unpickled (item 7)
    evil, marker = data / "evil-pickle", data / "PAYLOAD_RAN"
    evil.mkdir(parents=True, exist_ok=True)
    for f in ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        (evil / f).write_bytes(pickle.dumps(Payload(marker)))
    unwritable = Path("/sys")  # the kernel refuses to create files here, even for root

    cases = [
        ("train into an existing run (item 2)", ["train", *recipe(out, ref_name)], None, [ref], 2, None),
        ("resume changing model.attention (item 3)", ["train", "--resume", str(ready), "model.attention=se"], None,
         [ready], 2, None),
        ("resume a finished run (item 4)", ["train", "--resume", str(ref)], None, [ref], 0, "is complete"),
        ("resume a finished run with train.lr (items 3, 4)", ["train", "--resume", str(ref), "train.lr=0.01"], None,
         [ref], 2, None),
        ("empty class folder (item 6)", ["train", *recipe(out, "bad-empty"), f"data.data_dir={empty}"], None,
         [empty, out / "bad-empty"], 2, "zz_empty"),
        ("malicious CIFAR pickle (item 7)", ["train", *recipe(out, "bad-evil"), f"data.data_dir={evil}"], None,
         [evil, out / "bad-evil"], 2, None),
        ("disk full while resuming (item 8)", ["enospc", str(ready), "train", "--resume", str(ready)], PATCHED,
         [ready], 2, "no space left on device"),
        ("read-only output dir (item 9)", ["train", *recipe(unwritable / "attnlab-runs", "x"),
                                           f"data.cache_dir={out}/cache"], None, [], 2, "attnlab-runs/x"),
        ("read-only export destination (item 9)", ["export", "--checkpoint", str(ref), "--onnx",
                                                   str(unwritable / "m.onnx")], None, [], 2, "m.onnx"),
        ("eval beside a read-only checkpoint (item 9)", ["erofs", str(ref), "eval", "--checkpoint", str(ref)],
         PATCHED, [ref], 2, "read-only"),
    ]
    report = []
    for what, argv, code, watched, want_rc, words in cases:
        before = digest(watched)
        rc, stdout, stderr = attnlab(argv, code=code)
        files_changed = changed(before, digest(watched))
        lines = stderr.strip().splitlines()
        if want_rc == 2:
            clean = rc == 2 and len(lines) == 1 and lines[0].startswith("attnlab: error:") and \
                (words is None or words in lines[0])
        else:
            clean = rc == 0 and words in stdout and "Traceback" not in stderr
        if "pickle" in what and marker.exists():
            clean = False
            files_changed.append(str(marker))
        report.append({"input": what, "exit": rc, "clean": clean, "files_changed": files_changed,
                       "message": (lines[-1] if lines else stdout.strip().splitlines()[-1])[:300]})
        print(f"  {'clean' if clean else 'NOT CLEAN':9} exit {rc}  {what}: {report[-1]['message'][:150]}",
              flush=True)
    return report


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--quick", action="store_true", help="fewer kills (smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results" / "reliability.json"))
    args = ap.parse_args()
    if CIFAR is None:  # said now, not after the minutes of kill cases that do not need the folder itself
        ap.error("the offline CIFAR-10 folder was not found: set ATTNLAB_DATA=<folder holding cifar10-jpeg>")
    rng = random.Random(args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="attnlab-reliability-") as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        rc, _, err = attnlab(["train", *recipe(out, "ref")])
        ref_seconds = time.perf_counter() - start
        if rc != 0:
            raise SystemExit(f"the uninterrupted run failed: {err[-2000:]}")
        ref = final_state(out / "ref")
        best_writes = _improvements(out / "ref")  # one checkpoint_best.pt write per improving epoch
        print(f"uninterrupted run: {ref_seconds:.1f} s, {best_writes} best-checkpoint writes", flush=True)

        kills = []
        for i, case in enumerate(kill_cases(rng, ref_seconds, best_writes, args.quick)):
            name = f"kill{i:02d}"
            case["killed"] = run_kill(case, out, name)
            case["stale_temps_after_kill"] = len(list((out / name).glob(".*.tmp"))) if (out / name).is_dir() else 0
            finished, error = recover(out, name)
            case["identical"], case["why_not"] = identical(out / name, ref) if finished else (False, error)
            case["stale_temps_after_resume"] = len(list((out / name).glob(".*.tmp")))
            kills.append(case)
            print(f"  kill {i:2d} {json.dumps({k: v for k, v in case.items() if k != 'why_not'})}"
                  + (f"  ({case['why_not']})" if case["why_not"] else ""), flush=True)

        # a run stopped after epoch 1, for the resume inputs
        attnlab(["train", *recipe(out, "ready"), f"debug.kill_at_step={STEPS}"])
        bad = bad_inputs(out, "ref", "ready")

    killed = [c for c in kills if c["killed"]]
    summary = {
        "kills": len(killed),
        "identical": sum(c["identical"] for c in killed),
        "bad_inputs": len(bad),
        "clean_errors": sum(b["clean"] for b in bad),
        "files_changed_by_bad_inputs": sum(len(b["files_changed"]) for b in bad),
    }
    result = {**summary, "not_killed": len(kills) - len(killed),
              "stale_temps_left_after_resume": sum(c["stale_temps_after_resume"] for c in kills),
              "kill_cases": kills, "bad_input_cases": bad,
              "recipe": recipe("<tmp>", "<name>"), "command": "OMP_NUM_THREADS=1 .venv/bin/python "
              "benchmarks/reliability.py" + (" --quick" if args.quick else ""),
              "seed": args.seed, "uninterrupted_run_s": round(ref_seconds, 2), "wall_s": round(time.time() - t0, 1),
              "torch": torch.__version__, "git_commit": git_commit()}
    atomic_write_json(args.out, result)
    print(json.dumps(summary))
    print(f"wrote {args.out}")


def _improvements(run_dir):
    import csv
    with open(run_dir / "metrics.csv", newline="") as f:
        val = [float(r["val_top1"]) for r in csv.DictReader(f)]
    best, n = float("-inf"), 0
    for v in val:
        if v > best:
            best, n = v, n + 1
    return n


if __name__ == "__main__":
    main()
