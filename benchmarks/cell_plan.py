"""How should this machine run a matrix? Workers, threads and precision from a one-minute measurement.

Runs and checkpoints do not survive from one working period to the next, so every cell has to finish on the
machine that starts it. This times a few training steps of each method of ``--matrix`` (its recipe and
overrides: model, batch size, ``train.amp``) in the precision the engine would pick here, at one thread and at
every core, and prints and saves:

- the precision (bf16 where the recipe asks for it and the CPU has native bf16, else fp32), and whether the cells
  compile (``train.compile``: the timed steps then run the compiled model, after warm-up steps that compile it);
- workers x threads: two one-thread cells at once when that beats one cell on every core in images/s (on a 2-core
  CPU it nearly always does), and the expected wall time of each method's cell in that setting:
  epochs x (train images / rate + eval images / (3 x rate)) x ``--overhead`` (1.0 by default: on a 2-core Zen 4
  the calibration's `none` cells measured 89-95 s an epoch at one thread beside another cell, against 98 s from
  this estimate, so data loading hides in the cautious eval term);
- which cells would not finish within ``--limit`` (2.5 hours) that way, and whether they would with the machine to
  themselves (all threads, one worker): the bench commands for both groups.

No plan where bench would refuse to train: when this machine would train a cell in another precision than the
matrix's finished cells configured like it (a bf16 matrix on a CPU without native bf16), it says so in one line
and measures and writes nothing.

The engine's training steps on random tensors (``attnlab.engine.step_timer``: the model with the cell's objectives
and their training-only modules, so an SSIA design that runs the network twice is timed as such; the data pipeline
is left out). Pause other jobs first (kill -STOP): it times the machine.

    .venv/bin/python benchmarks/cell_plan.py --matrix benchmarks/matrices/cifar10_resnet20_converged.yaml \
        --compare-eager
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnlab  # noqa: E402,F401  (before torch: it sets the OpenMP wait policy)
import torch  # noqa: E402

from attnlab.bench.cell import refuse_another_precision  # noqa: E402
from attnlab.bench.matrix import cells, load_matrix, method_overrides, method_seeds  # noqa: E402
from attnlab.bench.runs import latest_by_cell  # noqa: E402
from attnlab.engine.config import load_config  # noqa: E402
from attnlab.engine.precision import resolve_precision  # noqa: E402
from attnlab.data.datasets import DEFAULT_VAL_FRACTION  # noqa: E402
from attnlab.data.splits import val_count  # noqa: E402
from attnlab.engine.step_timer import synthetic_step  # noqa: E402
from attnlab.errors import AttnlabError  # noqa: E402
from attnlab.files import atomic_write_json  # noqa: E402
from attnlab.host import cpu_threads, host_info  # noqa: E402
from attnlab.jsonl import read_jsonl  # noqa: E402

CPU = torch.device("cpu")
# The data sets the matrices train on: (classes, training images before the val hold-out, test images).
SIZES = {"cifar10": (10, 50_000, 10_000), "cifar100": (100, 50_000, 10_000)}


def epoch_images(data, method: str) -> tuple[int, int]:
    """(train, val + test) images of one epoch of a cell, as the engine draws them: ``data.subset`` and
    ``test_subset`` per class, ``val_size`` (default a tenth) held out of train."""
    if data.name not in SIZES:
        raise AttnlabError(f"method {method} trains on {data.name}: cell_plan knows the sizes of "
                           f"{', '.join(SIZES)} only")
    classes, pool, test = SIZES[data.name]
    pool = min(pool, data.subset * classes) if data.subset else pool
    test = min(test, data.test_subset * classes) if data.test_subset else test
    val = val_count(DEFAULT_VAL_FRACTION if data.val_size is None else data.val_size, pool)
    return pool - val, val + test


def step_rate(cfg, precision: str, threads: int, steps: int) -> float:
    """Training images/s of the config's cell (its model, objectives and their training-only modules; compiled when
    ``train.compile``): ``steps`` timed after 2 warm-up steps (which hold the compilation)."""
    with cpu_threads(threads):
        step = synthetic_step(cfg, precision)
        for i in range(2 + steps):
            if i == 2:
                start = time.perf_counter()
            step()
        return steps * cfg.train.batch_size / (time.perf_counter() - start)


def plan(matrix: dict, steps: int, overhead: float, limit_h: float, compare_eager: bool = False) -> dict:
    cores = torch.get_num_threads()
    methods, notices = {}, set()
    for m in matrix["methods"]:
        cfg = load_config(matrix["recipe_path"], method_overrides(matrix, m))
        precision, notice = resolve_precision(CPU, cfg.train.amp)
        if notice:
            notices.add(notice)
        one, every = step_rate(cfg, precision, 1, steps), step_rate(cfg, precision, cores, steps)
        eager = {}
        if compare_eager and cfg.train.compile:  # the same steps uncompiled, timed right after (same load)
            cfg.train.compile = False
            rate = step_rate(cfg, precision, 1, steps)
            cfg.train.compile = True
            eager = {"eager_images_per_s_1_thread": round(rate, 1), "compile_speedup_1_thread": round(one / rate, 3)}
        train_images, eval_images = epoch_images(cfg.data, m["name"])
        methods[m["name"]] = {"precision": precision, "compile": bool(cfg.train.compile), "epochs": cfg.train.epochs,
                              "cells": len(method_seeds(matrix, m)),
                              "images_per_s_1_thread": round(one, 1), f"images_per_s_{cores}_threads": round(every, 1),
                              **eager,
                              "_hours": {t: cfg.train.epochs * (train_images / r + eval_images / (3 * r)) * overhead
                                         / 3600 for t, r in ((1, one), (cores, every))}}
        speedup = f" (x{eager['compile_speedup_1_thread']:.2f} over eager)" if eager else ""
        print(f"{m['name']}: {precision}{', compiled' if cfg.train.compile else ''}, {one:.0f} images/s at 1 "
              f"thread{speedup}, {every:.0f} at {cores}", flush=True)
    # Several one-thread cells at once against one cell on every core: total images/s of the whole machine.
    parallel = sum(cores * v["images_per_s_1_thread"] for v in methods.values())
    alone = sum(v[f"images_per_s_{cores}_threads"] for v in methods.values())
    workers, threads = (cores, 1) if parallel >= alone else (1, cores)
    for v in methods.values():
        hours = v.pop("_hours")
        v["expected_cell_hours"] = round(hours[threads], 2)
        # A cell too slow for one thread may still fit with the machine to itself.
        v["setting"] = ("shared" if hours[threads] <= limit_h else
                        "alone" if hours[cores] <= limit_h else "too long")
        if v["setting"] != "shared":
            v["expected_cell_hours_alone"] = round(hours[cores], 2)
    return {"benchmark": "cell_plan", "matrix": matrix["name"], "host": host_info(), "steps": steps,
            "overhead": overhead, "limit_hours": limit_h, "workers": workers, "threads": threads,
            "notices": sorted(notices), "methods": methods, "commands": _commands(matrix, methods, workers,
                                                                                  threads, cores, limit_h)}


def _commands(matrix, methods, workers, threads, cores, limit_h) -> list[str]:
    """One bench command for the cells that share the machine, one for those that need it to themselves."""
    base = f"attnlab bench --matrix {matrix['path']}"
    budget = f"--budget {int(limit_h * 60)}m"
    shared = [k for k, v in methods.items() if v["setting"] == "shared"]
    alone = [k for k, v in methods.items() if v["setting"] == "alone"]
    out = []
    if shared:
        out.append(f"{base} --only {','.join(shared)} --workers {workers} --threads {threads} {budget}")
    if alone:
        out.append(f"{base} --only {','.join(alone)} --workers 1 --threads {cores} {budget}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--matrix", required=True)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per method and thread count")
    p.add_argument("--overhead", type=float, default=1.0, help="factor for data loading and augmentation")
    p.add_argument("--limit", type=float, default=2.5, help="hours a cell may take on this machine")
    p.add_argument("--compare-eager", action="store_true",
                   help="for a matrix that compiles, also time its steps uncompiled at one thread (the speed-up)")
    p.add_argument("--results", help="the matrix's results folder, whose runs.jsonl holds the finished cells "
                   "(default results/<matrix>)")
    p.add_argument("--out", help="JSON path (default <results>/cell_plan.json)")
    a = p.parse_args(argv)
    for name, value, ok in (("--steps", a.steps, a.steps >= 1), ("--overhead", a.overhead, a.overhead > 0),
                            ("--limit", a.limit, a.limit > 0)):
        if not ok:
            p.error(f"{name} must be {'>= 1' if name == '--steps' else '> 0'}, got {value}")
    matrix = load_matrix(a.matrix)
    results = Path(a.results) if a.results else ROOT / "results" / matrix["name"]
    records = read_jsonl(results / "runs.jsonl")
    finished = latest_by_cell(records)
    pending = [(c, finished.get((c["method"], c["seed"]))) for c in cells(matrix)]
    try:
        refuse_another_precision(matrix, pending, records, Path("runs") / matrix["name"], results / "runs.jsonl",
                                 load_config)
    except AttnlabError as err:
        raise SystemExit(f"cell_plan: no plan for this machine: {err}") from None
    out = plan(matrix, a.steps, a.overhead, a.limit, a.compare_eager)
    path = Path(a.out) if a.out else results / "cell_plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, out, "cell plan")
    for notice in out["notices"]:
        print(notice)
    print(f"{out['workers']} worker(s) x {out['threads']} thread(s): "
          + ", ".join(f"{k} {v['expected_cell_hours']:.2f} h{_alone(v)}" for k, v in out["methods"].items()))
    print("run:\n  " + "\n  ".join(out["commands"]) + f"\nwrote {path}")


def _alone(v) -> str:
    if v["setting"] == "shared":
        return ""
    return f" ({v['setting']}; {v['expected_cell_hours_alone']:.2f} h with the machine to itself)"


if __name__ == "__main__":
    try:
        main()
    except AttnlabError as err:
        sys.exit(f"cell_plan.py: error: {err}")
