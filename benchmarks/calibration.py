"""How long is "trained-out" on our JPEG CIFAR-10? The calibration matrix's curve, and fp32 against bf16.

Reads results/cifar10_calibration/runs.jsonl (benchmarks/matrices/cifar10_calibration.yaml: the plain ResNet-20
with the converged recipe at 15, 30, 60 and 90 epochs, and fp32 twins of the 15-, 30- and 60-epoch cells) and writes:

- calibration.json: per schedule, val and test top-1 (mean, std, per seed) and the training time; the longest
  schedule run so far (its mean val top-1 is the ceiling measured so far) and the shortest schedule whose mean val
  top-1 is within ``--tolerance`` points (0.5) of the longest's: the schedule the converged matrix should use.
  The choice reads validation only; test top-1 is reported beside it, never chosen on;
- precision.json: bf16 against fp32 at the same schedule and seeds: accuracy (val and test, with the Welch
  interval) and training speed (images/s, and their ratio where both ran at one thread count on one processor);
  and, under "unpaired", each fp32 cell whose seed has no bf16 cell yet (in no pair, but not hidden either);
- calibration.png: val and test top-1 against epochs;
- calibration.md: both as tables; ``--readme README.md`` also puts them in the README's
  ``<!-- results:cifar10_calibration:begin -->`` block, so its numbers are never copied by hand.

    .venv/bin/python benchmarks/calibration.py [--results results/cifar10_calibration] [--readme README.md]
"""
import argparse
import math
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab.bench.readme import check_readme, update_readme  # noqa: E402
from attnlab.bench.runs import latest_by_cell  # noqa: E402
from attnlab.bench.stats import mean_std, welch_interval  # noqa: E402
from attnlab.errors import AttnlabError  # noqa: E402
from attnlab.files import atomic_write_json, atomic_write_text, save_figure  # noqa: E402
from attnlab.jsonl import read_jsonl  # noqa: E402

SCHEDULE = re.compile(r"^e(\d+)$")  # e30: 30 epochs in the matrix's own precision
TWIN = re.compile(r"^e(\d+)_fp32$")  # e30_fp32: the same in fp32


def _interval(a: list, b: list) -> dict:
    """Welch's 95 % interval of mean(a) - mean(b); its fields are null (valid JSON, not NaN) while either side has
    a single seed."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in welch_interval(a, b).items()}


def _stats(values) -> dict:
    mean, std, n = mean_std(values)
    return {"mean": mean, "std": std if n > 1 else None, "n": n, "values": list(values)}


def _hours(runs) -> dict:
    return _stats([r["wall_time_s"] / 3600 for r in runs])


def _group(records) -> dict:
    """{method: [records by seed]} of the finished cells."""
    out = {}
    for r in sorted(records, key=lambda r: (r["method"], r["seed"])):
        if r.get("status") == "ok":
            out.setdefault(r["method"], []).append(r)
    return out


def schedules(by_method: dict) -> list[dict]:
    rows = []
    for method, runs in by_method.items():
        match = SCHEDULE.match(method)
        if not match:
            continue
        rows.append({"method": method, "epochs": int(match.group(1)), "seeds": [r["seed"] for r in runs],
                     "precision": sorted({r.get("precision") or "fp32" for r in runs}),
                     "val_top1": _stats([r["val_top1"] for r in runs]),
                     "test_top1": _stats([r["test_top1"] for r in runs]),
                     "train_hours": _hours(runs),
                     "ran_on": [_ran_on(r) for r in runs]})
    return sorted(rows, key=lambda r: r["epochs"])


def choose(rows: list[dict], tolerance: float) -> dict:
    """The longest schedule run and the shortest within ``tolerance`` of it on mean val top-1."""
    if not rows:
        return {}
    longest = rows[-1]
    ceiling = longest["val_top1"]["mean"]
    chosen = next(r for r in rows if r["val_top1"]["mean"] >= ceiling - tolerance)
    return {"longest_epochs": longest["epochs"], "ceiling_val_top1": ceiling,
            "ceiling_test_top1": longest["test_top1"]["mean"], "tolerance": tolerance,
            "chosen_epochs": chosen["epochs"], "chosen_val_top1": chosen["val_top1"]["mean"],
            "chosen_test_top1": chosen["test_top1"]["mean"],
            "note": "chosen on validation only; provisional while a longer schedule may still be added"}


def precision_pairs(by_method: dict) -> list[dict]:
    """Each fp32 twin against its bf16 schedule, over the seeds both have."""
    out = []
    for method, twins in by_method.items():
        match = TWIN.match(method)
        if not match or f"e{match.group(1)}" not in by_method:
            continue
        seeds = {r["seed"] for r in twins} & {r["seed"] for r in by_method[f"e{match.group(1)}"]}
        bf16 = [r for r in by_method[f"e{match.group(1)}"] if r["seed"] in seeds]
        fp32 = [r for r in twins if r["seed"] in seeds]
        if not seeds:
            continue
        speed = {p: _stats([r["train_images_per_s"] for r in runs]) for p, runs in (("bf16", bf16), ("fp32", fp32))}
        out.append({
            "epochs": int(match.group(1)), "seeds": sorted(seeds),
            "precisions": {"bf16": sorted({r.get("precision") for r in bf16}),
                           "fp32": sorted({r.get("precision") for r in fp32})},
            "val_top1": {"bf16": _stats([r["val_top1"] for r in bf16]), "fp32": _stats([r["val_top1"] for r in fp32]),
                         "bf16_minus_fp32": _interval([r["val_top1"] for r in bf16], [r["val_top1"] for r in fp32])},
            "test_top1": {"bf16": _stats([r["test_top1"] for r in bf16]),
                          "fp32": _stats([r["test_top1"] for r in fp32]),
                          "bf16_minus_fp32": _interval([r["test_top1"] for r in bf16],
                                                       [r["test_top1"] for r in fp32])},
            "train_images_per_s": {**speed, "bf16_over_fp32": _speed_ratio(speed, bf16, fp32)},
            "train_hours": {"bf16": _hours(bf16), "fp32": _hours(fp32)},
            "ran_on": {"bf16": [_ran_on(r) for r in bf16], "fp32": [_ran_on(r) for r in fp32]},
            "threads": sorted({r.get("threads") for r in bf16 + fp32} - {None}),
            "processors": sorted(_processors(bf16 + fp32) - {None}),
            "note": _speed_note(bf16, fp32)})
    return out


def unpaired_twins(by_method: dict) -> list[dict]:
    """The fp32 twin cells whose seed has no cell of the bf16 schedule yet: they are in no pair, so they are listed
    on their own rather than left unseen in runs.jsonl."""
    out = []
    for method, twins in by_method.items():
        match = TWIN.match(method)
        if not match:
            continue
        partner = f"e{match.group(1)}"
        paired = {r["seed"] for r in by_method.get(partner, [])}
        out += [{"method": method, "epochs": int(match.group(1)), "seed": r["seed"],
                 "precision": r.get("precision") or "fp32", "val_top1": r["val_top1"], "test_top1": r["test_top1"],
                 "train_hours": r["wall_time_s"] / 3600, "ran_on": _ran_on(r),
                 "waits_for": f"{partner} seed {r['seed']}"} for r in twins if r["seed"] not in paired]
    return sorted(out, key=lambda u: (u["epochs"], u["seed"]))


def _ran_on(record: dict) -> str:
    """"2 threads, Intel Xeon @ 2.80GHz": where a cell trained, which its hours and images/s depend on."""
    threads = record.get("threads")
    return f"{threads} thread{'s' if threads != 1 else ''}, {_short_processor(_processor(record))}"


def _threads(runs) -> set:
    return {r.get("threads") for r in runs}


def _processor(record: dict):
    return (record.get("host") or {}).get("processor")


def _processors(runs) -> set:
    return {_processor(r) for r in runs}


def _same_setting(bf16: list, fp32: list) -> bool:
    """Whether every cell of both ran at one thread count on one kind of processor (their speeds are then
    comparable; an fp32 twin may have trained on another machine than its bf16 cell)."""
    return (_threads(bf16) == _threads(fp32) and len(_threads(bf16)) == 1
            and _processors(bf16) == _processors(fp32) and len(_processors(bf16)) == 1)


def _speed_ratio(speed: dict, bf16: list, fp32: list):
    """bf16 images/s over fp32's, or None when the two ran at different thread counts or on different processors."""
    return speed["bf16"]["mean"] / speed["fp32"]["mean"] if _same_setting(bf16, fp32) else None


def _speed_note(bf16: list, fp32: list) -> str:
    if not _same_setting(bf16, fp32):
        return (f"training throughput as the engine measured it; no ratio: the bf16 cells ran at "
                f"{sorted(_threads(bf16), key=str)} threads on {sorted(_processors(bf16), key=str)} and the fp32 "
                f"cells at {sorted(_threads(fp32), key=str)} on {sorted(_processors(fp32), key=str)}, so their speeds "
                "are not comparable (results/cpu_bf16.json compares the two steps side by side)")
    return "training throughput as the engine measured it, every cell at the same thread count on the same processor"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("val_top1", "val (5,000 held out of train)"), ("test_top1", "test (10,000)")):
        xs = [r["epochs"] for r in rows]
        for r in rows:
            ax.plot([r["epochs"]] * r[key]["n"], r[key]["values"], ".", color="grey", alpha=0.6)
        ax.plot(xs, [r[key]["mean"] for r in rows], "o-", label=label)
    ax.set_xlabel("epochs (warm-up 2, then linear to zero)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("ResNet-20 on JPEG CIFAR-10: accuracy against schedule length")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, "plot", dpi=110)
    plt.close(fig)


def _short_processor(name) -> str:
    """"Intel(R) Xeon(R) Processor @ 2.80GHz" -> "Intel Xeon @ 2.80GHz"; "?" where a record has none."""
    if not name:
        return "?"
    return " ".join(re.sub(r"\((R|TM)\)|\bProcessor\b|\bCPU\b", " ", name).split())


def _mean_sd(stats: dict) -> str:
    return f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if stats["std"] is not None else "")


def _delta(interval: dict) -> str:
    if interval["low"] is None:
        return f"{interval['diff']:+.2f} (one seed a side: no interval)"
    return f"{interval['diff']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}]"


def _where(hours: list, ran_on: list) -> str:
    """Each seed's hours, thread count and processor: cells of one schedule may have run on different machines."""
    return ", ".join(f"{h:.2f} h ({where})" for h, where in zip(hours, ran_on))


def markdown(rows: list[dict], choice: dict, pairs: list[dict], folder: str = "", unpaired: list[dict] = ()) -> str:
    """The schedule curve, the choice and fp32 against bf16, as the README shows them (``folder``: the results
    folder as the page that shows them links to it)."""
    lines = ["Generated by `python benchmarks/calibration.py --readme README.md` from "
             f"[calibration.json]({folder}calibration.json) and [precision.json]({folder}precision.json). "
             "The plain ResNet-20 with the converged recipe; top-1 in % as mean ± SD over seeds; the schedule is "
             "chosen on val (5,000 images held out of train), test is read beside it.", "",
             "| schedule | precision | seeds | val top-1 | test top-1 | training time per seed |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['epochs']} epochs | {', '.join(r['precision'])} | {r['val_top1']['n']} | "
                     f"{_mean_sd(r['val_top1'])} | {_mean_sd(r['test_top1'])} | "
                     f"{_where(r['train_hours']['values'], r['ran_on'])} |")
    if choice:
        lines += ["", f"Chosen: **{choice['chosen_epochs']} epochs**, the shortest schedule whose mean val top-1 "
                  f"({choice['chosen_val_top1']:.2f}) is within {choice['tolerance']:g} point of the longest run so "
                  f"far ({choice['longest_epochs']} epochs: val {choice['ceiling_val_top1']:.2f}, test "
                  f"{choice['ceiling_test_top1']:.2f})."]
    if pairs:
        lines += ["", "fp32 against bf16 at the same schedule and seeds (Δ = bf16 - fp32, Welch 95 % interval):", "",
                  "| schedule | seeds | val bf16 | val fp32 | Δ val | test bf16 | test fp32 | Δ test | "
                  "bf16 / fp32 images/s (or where each ran) |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for p in sorted(pairs, key=lambda p: p["epochs"]):
            ratio = p["train_images_per_s"]["bf16_over_fp32"]
            speed = f"{ratio:.2f}" if ratio is not None else (
                f"no ratio: bf16 {_where(p['train_hours']['bf16']['values'], p['ran_on']['bf16'])}; "
                f"fp32 {_where(p['train_hours']['fp32']['values'], p['ran_on']['fp32'])}")
            lines.append(f"| {p['epochs']} epochs | {', '.join(map(str, p['seeds']))} | "
                         f"{_mean_sd(p['val_top1']['bf16'])} | {_mean_sd(p['val_top1']['fp32'])} | "
                         f"{_delta(p['val_top1']['bf16_minus_fp32'])} | {_mean_sd(p['test_top1']['bf16'])} | "
                         f"{_mean_sd(p['test_top1']['fp32'])} | {_delta(p['test_top1']['bf16_minus_fp32'])} | "
                         f"{speed} |")
    if unpaired:
        cells = "; ".join(f"{u['method']} seed {u['seed']} ({u['precision']}): val {u['val_top1']:.2f}, test "
                          f"{u['test_top1']:.2f}, {u['train_hours']:.2f} h ({u['ran_on']}), waiting for "
                          f"{u['waits_for']}" for u in unpaired)
        lines += ["", f"Finished but not in the comparison yet (no bf16 cell of the same seed): {cells}."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "results" / "cifar10_calibration"))
    p.add_argument("--tolerance", type=float, default=0.5, help="points of mean val top-1 below the longest")
    p.add_argument("--readme", help="also replace this README's <!-- results:cifar10_calibration --> block")
    a = p.parse_args(argv)
    if not (math.isfinite(a.tolerance) and a.tolerance >= 0):
        p.error(f"--tolerance must be a finite number of points >= 0, got {a.tolerance}")
    results = Path(a.results)
    runs = results / "runs.jsonl"
    if not runs.is_file():
        raise AttnlabError(f"{runs} does not exist: --results names the calibration matrix's results folder")
    by_method = _group(latest_by_cell(read_jsonl(runs)).values())
    rows = schedules(by_method)
    if not rows:  # tables of nothing would replace the committed ones (and the README's block)
        raise AttnlabError(f"{runs} holds no finished calibration cell; nothing was written")
    if a.readme:
        check_readme(a.readme, "cifar10_calibration", fallback=False)  # before any file is rewritten
    command = "python benchmarks/calibration.py"
    choice, pairs, unpaired = choose(rows, a.tolerance), precision_pairs(by_method), unpaired_twins(by_method)
    atomic_write_json(results / "calibration.json", {"command": command, "schedules": rows, "choice": choice},
                      "calibration")
    atomic_write_json(results / "precision.json", {"command": command, "pairs": pairs, "unpaired": unpaired},
                      "precision comparison")
    tables = markdown(rows, choice, pairs, unpaired=unpaired)
    atomic_write_text(results / "calibration.md", f"# Calibration of the converged recipe\n\n{tables}\n", "report")
    if rows:
        plot(rows, results / "calibration.png")
    if a.readme:
        folder = Path(os.path.relpath(results.resolve(), Path(a.readme).resolve().parent)).as_posix()
        update_readme(a.readme, markdown(rows, choice, pairs, f"{folder}/", unpaired), "cifar10_calibration",
                      fallback=False)
        print(f"updated {a.readme}")
    for r in rows:
        print(f"e{r['epochs']}: val {r['val_top1']['mean']:.2f} test {r['test_top1']['mean']:.2f} "
              f"({r['val_top1']['n']} seeds, {r['train_hours']['mean']:.2f} h)")
    print(f"wrote {results / 'calibration.json'}, precision.json and calibration.png")


if __name__ == "__main__":
    try:
        main()
    except AttnlabError as err:
        sys.exit(f"calibration.py: error: {err}")
