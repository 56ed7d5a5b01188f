"""How many matrix cells to train at once, and with how many threads: ``attnlab bench --workers`` measured.

Contenders, each training the same cells (ResNet-20 on full CIFAR-10, ``--steps`` steps each, batch 128) through
the real harness (``attnlab bench`` in a subprocess, so process start-up and data loading count as they do in a
matrix):

- ``w1x<cores>t``: one worker with every core's thread, the cells one after another (the old way);
- ``w<cores>x1t``: one worker per core with one thread each, the cells side by side;
- ``single_<t>t``: one cell alone with t threads, for t = 1 .. cores: the best thread count for a single run.

``--rounds`` repeats the comparison with the contenders' order rotated, so a burst of load hits each of them alike.
Per round: the matrix contenders' throughput is (images trained) / (wall time of the whole ``attnlab bench``), and
the ratio to the one-worker contender of the same round; single runs report the engine's own training rate. The
medians over rounds choose the defaults.

    python benchmarks/bench_workers.py                     # -> results/bench_workers_cpu.json
    python benchmarks/bench_workers.py --steps 20 --rounds 1 --out /tmp/w.json    # a quick try
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab.host import host_info  # noqa: E402
from attnlab.jsonl import read_jsonl  # noqa: E402
from attnlab.profiler import write_json  # noqa: E402

BATCH = 128


def matrix_text(name: str, methods: list[str], steps: int, cache_dir: str) -> str:
    lines = "\n".join(f"  - {{name: {m}, overrides: {{model.attention: {m}}}}}" for m in methods)
    return f"""name: {name}
recipe: {ROOT / 'configs' / 'cifar10_resnet20.yaml'}
overrides:
  device: cpu
  train.epochs: 1
  train.warmup_epochs: 0
  debug.max_steps_per_epoch: {steps}
  data.test_subset: 50
  data.cache_dir: {cache_dir}
methods:
{lines}
seeds: [0]
"""


def run_bench(tmp: Path, tag: str, methods, steps, workers, threads, cache_dir) -> dict:
    """One contender: a fresh matrix run in a subprocess; wall time and the cells' own training rates."""
    name = f"{tag}_{int(time.time() * 1000)}"
    path = tmp / f"{name}.yaml"
    path.write_text(matrix_text(name, methods, steps, cache_dir))
    cmd = [sys.executable, "-m", "attnlab", "bench", "--matrix", str(path), "--workers", str(workers),
           "--threads", str(threads), "--no-latency", "--results-root", str(tmp / "results"),
           "--runs-root", str(tmp / "runs")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"bench_workers: {tag} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    records = read_jsonl(tmp / "results" / name / "runs.jsonl")
    images = len(records) * steps * BATCH
    return {"wall_s": round(wall, 2), "images": images, "images_per_s_wall": round(images / wall, 1),
            "cell_train_images_per_s": [r.get("train_images_per_s") for r in records],
            "cell_wall_s": [r.get("wall_time_s") for r in records]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per cell (batch 128)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cells", type=int, default=None, help="cells per matrix contender (default: the core count)")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_workers_cpu.json"))
    args = p.parse_args()
    cores = os.cpu_count() or 1
    n_cells = args.cells or max(2, cores)
    methods = (["none", "se", "eca", "cbam"] * n_cells)[:n_cells]
    methods = [m for k, m in enumerate(methods) if m not in methods[:k]] or ["none"]  # unique names in a matrix
    cache_dir = str(ROOT / ".cache" / "attnlab")
    contenders = {f"w1x{cores}t": (methods, 1, cores), f"w{cores}x1t": (methods, cores, 1)}
    for t in range(1, cores + 1):
        contenders[f"single_{t}t"] = (["none"], 1, t)
    names = list(contenders)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Warm the decode cache first so no contender pays for it.
        run_bench(tmp, "warmup", ["none"], 2, 1, cores, cache_dir)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            row = {"order": order, "loadavg_before": os.getloadavg()[0]}
            for name in order:
                cell_methods, workers, threads = contenders[name]
                row[name] = run_bench(tmp, name, cell_methods, args.steps, workers, threads, cache_dir)
                print(f"round {r + 1} {name}: {row[name]['images_per_s_wall']} images/s (wall), cells "
                      f"{row[name]['cell_train_images_per_s']}", flush=True)
            row["loadavg_after"] = os.getloadavg()[0]
            base = row[f"w1x{cores}t"]["images_per_s_wall"]
            row["ratio_workers_vs_one"] = round(row[f"w{cores}x1t"]["images_per_s_wall"] / base, 3)
            rounds.append(row)

    def med_wall(key):
        return statistics.median(row[key]["images_per_s_wall"] for row in rounds)

    def med_cell(key):
        return statistics.median(statistics.median(row[key]["cell_train_images_per_s"]) for row in rounds)
    singles = {t: med_cell(f"single_{t}t") for t in range(1, cores + 1)}
    ratio = statistics.median(row["ratio_workers_vs_one"] for row in rounds)
    out = {
        "benchmark": "bench_workers", "command": "python benchmarks/bench_workers.py "
                                                 f"--steps {args.steps} --rounds {args.rounds}",
        "cells": methods, "steps_per_cell": args.steps, "batch": BATCH, "model": "resnet20", "data": "cifar10 (45k)",
        "host": host_info(), "rounds": rounds,
        "median_images_per_s_wall": {k: med_wall(k) for k in names if not k.startswith("single")},
        "median_ratio_workers_vs_one": ratio,
        "single_run_train_images_per_s_by_threads": singles,
        "chosen": {"workers": cores if ratio > 1.0 else 1,
                   "single_run_threads": max(singles, key=singles.get)},
        "note": "matrix contenders: images trained / wall time of the whole `attnlab bench` run (start-up, data "
                "loading and evaluation included); single runs: the engine's training-loop rate",
    }
    write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("median_images_per_s_wall", "median_ratio_workers_vs_one",
                                          "single_run_train_images_per_s_by_threads", "chosen")}, indent=2))


if __name__ == "__main__":
    main()
