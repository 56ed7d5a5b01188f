"""Issue 31's SSIA screen: each design's training cost, and the screen table ranked on validation top-1 only.

    .venv/bin/python benchmarks/ssia_screen.py cost    # results/ssia_screen/cost.json (times the machine)
    .venv/bin/python benchmarks/ssia_screen.py table   # results/ssia_screen/screen.json and screen.md
    .venv/bin/python benchmarks/ssia_screen.py table --merge FILES/ssia_screen_runs.jsonl   # after a GPU slot

``cost`` builds every method of the screen matrix (benchmarks/matrices/ssia_screen.yaml: its recipe, overrides,
batch size and precision) with its objectives and their training-only modules, and times the engine's training
step (``attnlab.engine.train.training_loss``, backward, the recipe's SGD step) on random tensors, interleaved with
the plain network's step (A B, then B A, ...) in the same process, so machine load hits both alike. The ratio is
median(design step) / median(plain step) over ``--rounds`` fresh model pairs; an A/A row (plain against plain)
shows the noise floor. Objective terms are timed switched on (the step is past any warm-up). Steps run uncompiled
unless ``--compile`` (the cells compile; compiling costs about 45 s per model here). Pause other jobs first.
``--only a,b`` times those methods (and the A/A row) and adds their rows to an existing cost.json, refusing
before it times anything when that file was measured with other settings or on another kind of machine.

``table`` reads the screen's runs.jsonl (with the converged matrix's ``none`` when the screen reuses it) and never
its test top-1: the screen ranks on validation, and test is read once, for the chosen design, in the converged
matrix. Each row: design, weight, warm-up, validation top-1 and its difference to ``none``, the step-time ratio from
``cost``, and the cells' own images/s against ``none``'s (only between cells on the same device and thread count;
they ran at other times, on a machine shared with other work: a rough check only). One seed per design: the
smallest difference it could detect (80 % power, two-sided 95 %) is stated from a pooled validation SD of a
multi-seed matrix. (The bench's own log prints every cell's test top-1, as for any matrix; the screen is decided
from this table.)
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnlab  # noqa: E402,F401  (before torch: it sets the OpenMP wait policy)
import torch  # noqa: E402

from attnlab.bench.matrix import cells, load_matrix, method_overrides, method_seeds  # noqa: E402
from attnlab.bench.runner import reuse_finished  # noqa: E402
from attnlab.bench.runs import latest_by_cell, merge_runs  # noqa: E402
from attnlab.bench.stats import isnan, mde, pooled_sd  # noqa: E402
from attnlab.engine.config import load_config  # noqa: E402
from attnlab.engine.precision import resolve_precision  # noqa: E402
from attnlab.engine.step_timer import synthetic_step  # noqa: E402
from attnlab.files import atomic_write_json, atomic_write_text, portable_path  # noqa: E402
from attnlab.host import cpu_threads, host_info  # noqa: E402
from attnlab.jsonl import read_jsonl  # noqa: E402
from attnlab.objectives import objective_defaults  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from ssia_overhead import interleaved  # noqa: E402  (A B, then B A: the same alternation as the maps benchmark)

CPU = torch.device("cpu")
MATRIX = ROOT / "benchmarks" / "matrices" / "ssia_screen.yaml"
OUT = ROOT / "results" / "ssia_screen"
# Multi-seed matrices whose pooled validation SD sizes what one seed per design can detect (the first with one).
SD_SOURCES = (ROOT / "results" / "cifar10_resnet20_converged" / "runs.jsonl",
              ROOT / "results" / "cifar10_resnet20" / "runs.jsonl")


# ---- cost ------------------------------------------------------------------------------------------------------

def cost(matrix: dict, baseline: str, steps: int, warmup: int, rounds: int, threads: int, compile_: bool,
         command: str = "ssia_screen.py cost") -> dict:
    by_name = {m["name"]: m for m in matrix["methods"]}
    if baseline not in by_name:
        raise SystemExit(f"ssia_screen cost: the matrix has no method '{baseline}' to compare against")

    def step_of(name: str, seed: int):
        """(one training step of the method's cell, the precision it runs in)."""
        cfg = load_config(matrix["recipe_path"], method_overrides(matrix, by_name[name]))
        cfg.train.compile = compile_
        precision, _ = resolve_precision(CPU, cfg.train.amp)
        return synthetic_step(cfg, precision, seed=seed), precision

    rows = {}
    with cpu_threads(threads):
        for name in [baseline, *(n for n in by_name if n != baseline)]:  # the baseline's row is the A/A control
            plain_ms, design_ms = [], []
            for r in range(rounds):
                plain, _ = step_of(baseline, r)
                design, precision = step_of(name, r)
                ta, tb = interleaved(plain, design, steps, warmup)
                plain_ms += [1000 * t for t in ta]
                design_ms += [1000 * t for t in tb]
            p, d = statistics.median(plain_ms), statistics.median(design_ms)
            rows[name] = {"step_ratio": round(d / p, 3), "plain_step_ms": round(p, 1), "step_ms": round(d, 1),
                          "precision": precision}
            print(f"{name}: x{d / p:.3f} ({d:.0f} ms against {p:.0f} ms)", flush=True)
    return {**cost_header(matrix, baseline, steps, warmup, rounds, threads, compile_), "command": command,
            "note": f"the '{baseline}' row times the plain step against itself (A/A): the noise floor",
            "methods": rows}


def cost_header(matrix: dict, baseline: str, steps: int, warmup: int, rounds: int, threads: int,
                compile_: bool) -> dict:
    """The fields of cost.json that say how its rows were measured (what ``cost_settings`` compares)."""
    return {"benchmark": "ssia_screen_cost", "matrix": portable_path(matrix["path"]), "baseline": baseline,
            "host": host_info(), "threads": threads, "compiled": compile_, "steps": steps, "warmup": warmup,
            "rounds": rounds}


# Settings a row's ratio depends on: rows measured under other settings do not go into one cost.json.
COST_SETTINGS = ("matrix", "baseline", "threads", "compiled", "steps", "warmup", "rounds")
HOST_KEYS = ("processor", "cpu_count", "cpu_kernels", "torch")  # the same kind of machine and torch


def cost_settings(result: dict) -> dict:
    """What a cost.json's rows were measured under (``COST_SETTINGS`` and the host's ``HOST_KEYS``)."""
    host = result.get("host") or {}
    return {**{k: result.get(k) for k in COST_SETTINGS}, **{f"host {k}": host.get(k) for k in HOST_KEYS}}


def refuse_other_settings(path: Path, settings: dict) -> None:
    """Stop, naming the first difference, when the cost.json at ``path`` was measured under other settings: its
    rows and this run's would not compare. Called before measuring, so no time is spent on rows that cannot go in."""
    if not path.is_file():
        return
    theirs = cost_settings(json.loads(path.read_text()))
    for key, value in settings.items():
        if theirs[key] != value:
            raise SystemExit(f"ssia_screen cost: {path} was measured with {key} {theirs[key]!r}, this run would "
                             f"measure with {value!r}; use the same settings, or give --out another folder")


def merged_cost(path: Path, new: dict) -> dict:
    """``new``'s rows added to the cost.json at ``path``, whose settings ``refuse_other_settings`` checked before
    ``new`` was measured (each row is its own interleaved ratio, so rows measured at different times stand side by
    side); the command of every run that wrote rows is kept."""
    if not path.is_file():
        return new
    old = json.loads(path.read_text())
    commands = old.get("commands") or [old["command"]]
    merged = {**{k: v for k, v in new.items() if k != "command"}, "commands": [*commands, new["command"]]}
    merged["methods"] = {**old["methods"], **new["methods"]}
    return merged


# ---- table -----------------------------------------------------------------------------------------------------

def design_of(method: dict) -> dict:
    """The SSIA options a screen method trains with (the objective's defaults under its overrides)."""
    ov = method["overrides"]
    if not ov.get("ssia.enabled"):
        smoothing = ov.get("train.label_smoothing")
        return {"design": "none" if smoothing is None else f"label smoothing {smoothing}",
                "weight": None, "warmup_epochs": None, "shuffled": False}
    options = {**objective_defaults()["ssia"], **{k[len("ssia."):]: v for k, v in ov.items() if k.startswith("ssia.")}}
    return {"design": options["design"], "weight": options["weight"], "warmup_epochs": options["warmup_epochs"],
            "shuffled": bool(options["shuffle_target"])}


def val_sd(sources=None) -> dict:
    """Pooled SD of validation top-1 over the methods of the first matrix in ``sources`` that has a method with two
    seeds or more (default ``SD_SOURCES``): {'sd', 'df', 'source'}."""
    for path in SD_SOURCES if sources is None else sources:
        groups = {}
        for r in latest_by_cell(read_jsonl(path)).values():
            if r.get("status") == "ok":
                groups.setdefault(r["method"], []).append(r["val_top1"])
        groups = [g for g in groups.values() if len(g) > 1]
        if groups:
            sd, df = pooled_sd(groups)
            return {"sd": sd, "df": df, "source": str(path.relative_to(ROOT))}
    return {"sd": float("nan"), "df": 0, "source": None}


def table(matrix: dict, folder: Path, baseline: str, cost_json: dict | None, sd: dict) -> dict:
    """The screen's rows (``folder``/runs.jsonl), ranked on validation top-1."""
    runs_path = folder / "runs.jsonl"
    own = latest_by_cell(read_jsonl(runs_path))
    # The cells this file lacks take a finished cell of the same settings and seed from a reuse: matrix (the
    # converged matrix's none), exactly as the bench would.
    pending = [(c, own.get((c["method"], c["seed"]))) for c in cells(matrix)]
    done = {(c["method"], c["seed"]): r for c, r in reuse_finished(matrix, pending, runs_path, write=False)
            if r is not None and r.get("status") == "ok"}
    ratios = (cost_json or {}).get("methods", {})
    rows = []
    for m in matrix["methods"]:
        for seed in method_seeds(matrix, m):
            r, base = done.get((m["name"], seed)), done.get((baseline, seed))
            rows.append({"method": m["name"], **design_of(m), "seed": seed,
                         "val_top1": r["val_top1"] if r else None,
                         "val_vs_none": round(r["val_top1"] - base["val_top1"], 2) if r and base else None,
                         "step_ratio": ratios.get(m["name"], {}).get("step_ratio"),
                         "cell_speed_ratio": _speed_ratio(r, base), "device": r.get("device") if r else None,
                         "precision": r.get("precision") if r else None})
    ranked = sorted((x for x in rows if x["val_top1"] is not None), key=lambda x: -x["val_top1"])
    for rank, x in enumerate(ranked, 1):
        x["rank"] = rank
    detectable = mde(sd["sd"], 1, 1, sd["df"])
    return {"benchmark": "ssia_screen_table", "matrix": portable_path(matrix["path"]), "baseline": baseline,
            "ranked_on": "validation top-1 (test is not read here)", "cells_done": len(ranked),
            "cells": len(rows), "val_sd": {**sd, "sd": None if isnan(sd["sd"]) else round(sd["sd"], 3)},
            "mde_one_seed_each": None if isnan(detectable) else round(detectable, 2),
            "cost_file": "cost.json" if cost_json else None,
            "rows": sorted(rows, key=lambda x: (x.get("rank") or 10 ** 6))}


def _speed_ratio(r, base):
    """``base``'s training images/s over ``r``'s, only between cells on the same device and thread count."""
    if not r or not base or not r.get("train_images_per_s"):
        return None
    if (r.get("device"), r.get("threads")) != (base.get("device"), base.get("threads")):
        return None
    return round(base["train_images_per_s"] / r["train_images_per_s"], 2)


def markdown(t: dict) -> str:
    def cell(v, fmt="{}"):
        return "–" if v is None else fmt.format(v)
    sd = t["val_sd"]
    lines = [f"# SSIA screen ({t['cells_done']} of {t['cells']} cells)", "",
             f"Ranked on {t['ranked_on']}; one seed per design. `step ×` is the step-time ratio against the plain "
             "network timed in the same run (`ssia_screen.py cost`); `cell ×` is `none`'s images/s over the "
             "cell's, from cells that ran at other times on a shared machine (rough).", ""]
    if t["mde_one_seed_each"] is not None:
        lines += [f"With one seed each, a difference in validation top-1 is detectable (80 % power, two-sided 95 %) "
                  f"from about **{t['mde_one_seed_each']:.1f} points** (pooled validation SD {sd['sd']:.2f}, "
                  f"df {sd['df']}, from {sd['source']}). Smaller differences are a ranking for the 5-seed runs, "
                  "not a result.", ""]
    lines += ["| rank | method | design | weight | warm-up | val top-1 | vs none | step × | cell × |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in t["rows"]:
        design = r["design"] + (", shuffled target" if r["shuffled"] else "")
        lines.append(f"| {cell(r.get('rank'))} | {r['method']} | {design} | {cell(r['weight'])} | "
                     f"{cell(r['warmup_epochs'])} | {cell(r['val_top1'], '{:.2f}')} | "
                     f"{cell(r['val_vs_none'], '{:+.2f}')} | {cell(r['step_ratio'], '{:.2f}')} | "
                     f"{cell(r['cell_speed_ratio'], '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job", choices=("cost", "table"))
    p.add_argument("--matrix", default=str(MATRIX))
    p.add_argument("--baseline", default="none", help="the plain network's method in the matrix")
    p.add_argument("--steps", type=int, default=10, help="cost: timed steps of each arm per round")
    p.add_argument("--warmup", type=int, default=2, help="cost: untimed step pairs first")
    p.add_argument("--rounds", type=int, default=2, help="cost: fresh model pairs per method")
    p.add_argument("--threads", type=int, default=1, help="cost: torch threads (the cells run at 1)")
    p.add_argument("--compile", action="store_true", help="cost: compile both arms, as the cells do")
    p.add_argument("--only", help="cost: comma-separated methods (default: all)")
    p.add_argument("--out", default=str(OUT), help="the screen's results folder: its runs.jsonl, and cost.json, "
                                                   "screen.json and screen.md are written there")
    p.add_argument("--merge", action="append", default=[], metavar="RUNS_JSONL",
                   help="table: first append the cells this runs.jsonl finished and the folder's has not (a GPU "
                        "slot's file, as `attnlab report --merge` does, without a report that would show test)")
    a = p.parse_args(argv)
    matrix = load_matrix(a.matrix)
    names = [m["name"] for m in matrix["methods"]]
    if a.baseline not in names:  # checked first: a typo blanked every comparison of the table it rewrote
        p.error(f"--baseline {a.baseline}: the matrix has no such method (it has {', '.join(names)})")
    unknown = sorted(set(a.only.split(",")) - set(names)) if a.only else []
    if unknown:
        p.error(f"--only: the matrix has no method {', '.join(unknown)} (it has {', '.join(names)})")
    out = Path(a.out)
    if a.job == "table" and not (out / "runs.jsonl").is_file() and not a.merge:
        p.error(f"{out / 'runs.jsonl'} does not exist: --out names the screen's results folder")
    out.mkdir(parents=True, exist_ok=True)
    if a.job == "cost":
        if a.only:
            keep = set(a.only.split(",")) | {a.baseline}
            matrix["methods"] = [m for m in matrix["methods"] if m["name"] in keep]
        args = sys.argv[1:] if argv is None else list(argv)
        command = " ".join(["ssia_screen.py", *args])
        settings = (matrix, a.baseline, a.steps, a.warmup, a.rounds, a.threads, a.compile)
        if a.only:  # before timing anything: rows measured otherwise could not join the file's
            refuse_other_settings(out / "cost.json", cost_settings(cost_header(*settings)))
        result = cost(*settings, command)
        if a.only:  # add these rows to what is measured already, rather than lose the other methods' rows
            result = merged_cost(out / "cost.json", result)
        atomic_write_json(out / "cost.json", result, "ssia screen cost")
        print(f"wrote {out / 'cost.json'}")
        return
    for source in a.merge:
        n = merge_runs(source, out / "runs.jsonl")
        print(f"merged {source}: {n['added']} cells added, {n['same']} already here, {n['kept']} kept as they were")
    cost_path = out / "cost.json"
    cost_json = json.loads(cost_path.read_text()) if cost_path.is_file() else None
    t = table(matrix, out, a.baseline, cost_json, val_sd())
    atomic_write_json(out / "screen.json", t, "ssia screen table")
    atomic_write_text(out / "screen.md", markdown(t))
    print(markdown(t), end="")
    print(f"wrote {out / 'screen.json'} and {out / 'screen.md'}")


if __name__ == "__main__":
    main()
