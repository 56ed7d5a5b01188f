"""Write results/wsol_tiny_imagenet/report.md from the runs' localize.json files (no number is typed by hand).

    .venv/bin/python benchmarks/wsol_report.py [--runs runs/wsol_tiny_imagenet] [--results DIR] [--readme README.md]

Copies each ``<runs>/<method>-s<seed>/localize.json`` (written by ``attnlab localize``) to ``localize/`` here and
each method's first-seed PNG grids (``show/``, written by ``attnlab show``) to ``pictures/<method>/``, then builds
everything from those committed copies, so the report survives the loss of runs/: the table (mean and std over
seeds) with the two priors, a verdict on TDAM's localization claim, every method against ``none`` with Welch and
paired 95% intervals, the per-seed TDAM - none differences and the commands that reproduce it. ``--readme``
replaces the README's ``<!-- results:wsol_tiny_imagenet:begin -->`` block with the short table, the verdict and
one picture. With no runs yet it writes the skeleton with the commands.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
from pathlib import Path

from attnlab.bench.claims import MIN_SEEDS, Sample, compare, judge_family
from attnlab.bench.readme import check_readme, update_readme
from attnlab.bench.stats import isnan, pooled_sd
from attnlab.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "results" / "wsol_tiny_imagenet"  # where the report and its pictures go
METHODS = ("none", "se", "cbam", "tdam", "ssia")
COMMANDS = """```
attnlab bench --matrix benchmarks/matrices/wsol_tiny_imagenet.yaml
for run in runs/wsol_tiny_imagenet/*-s*/; do
  attnlab localize --checkpoint "$run" && attnlab show --checkpoint "$run"
done
.venv/bin/python benchmarks/wsol_report.py
```"""
# TDAM's poster, ImageNet Top-1 Loc: ResNet-50 57.04 -> TDjoint (T = 2, m = 1) 61.55, the variant and setting the
# matrix trains (the module's defaults); TDtop with m = 3 gains +4.93, the best row (research/tdam.md).
CLAIMED_TOP1_LOC_GAIN = 4.51
COLUMNS = [("test top-1", lambda r: r["top1"]),
           ("MaxBoxAccV2", lambda r: r["max_box_acc_v2"]),
           ("IoU30/50/70", lambda r: r["max_box_acc_v2_iou"]),
           ("MaxBoxAcc (V1)", lambda r: r["max_box_acc"]),
           ("GT-known Loc @tau", lambda r: r["gt_known_loc"]["at_tau"]),
           ("Top-1 Loc @tau", lambda r: r["top1_loc"]["at_tau"]),
           ("Top-5 Loc @tau", lambda r: r["top5_loc"]["at_tau"]),
           ("GT-known Loc oracle", lambda r: r["gt_known_loc"]["oracle"]),
           ("Top-1 Loc oracle", lambda r: r["top1_loc"]["oracle"])]
# the metrics judged against none (and shown in the README)
JUDGED = [c for c in COLUMNS if c[0] in ("test top-1", "MaxBoxAccV2", "GT-known Loc @tau", "Top-1 Loc @tau")]

def collect(runs: Path, here: Path) -> None:
    """Copy each run's localize.json to ``here/localize/<run>.json``, so the report can be rebuilt from committed
    files once runs/ (checkpoints, git-ignored) is gone."""
    for path in sorted(runs.glob("*-s*/localize.json")):
        if re.fullmatch(r"(.+)-s(\d+)", path.parent.name):
            (here / "localize").mkdir(parents=True, exist_ok=True)
            atomic_write_text(here / "localize" / f"{path.parent.name}.json", path.read_text(), "localize copy")


def read_localizations(folder: Path) -> dict:
    """{method: {seed: localize.json dict}} from ``folder/<method>-s<seed>.json``."""
    out = {}
    for path in sorted(folder.glob("*-s*.json")):
        m = re.fullmatch(r"(.+)-s(\d+)", path.stem)
        if m:
            out.setdefault(m.group(1), {})[int(m.group(2))] = json.loads(path.read_text())
    return out


def _methods(results: dict) -> list[str]:
    """The methods with results: the matrix's order first, then any others by name."""
    return [m for m in METHODS if m in results] + sorted(set(results) - set(METHODS))


def _any_run(results: dict) -> dict:
    return next(iter(next(iter(results.values())).values()))


def _cell(values) -> str:
    if isinstance(values[0], dict):  # MaxBoxAccV2 per IoU threshold: means only
        return "/".join(f"{statistics.mean(v[d] for v in values):.1f}" for d in ("30", "50", "70"))
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _row(label: str, seeds, splits: list[dict], columns) -> str:
    """One table row over ``splits`` (one per seed); a metric a split lacks (a prior has no top-1) shows '-'."""
    cells = []
    for _, get in columns:
        try:
            cells.append(_cell([get(t) for t in splits]))
        except KeyError:
            cells.append("-")
    return f"| {label} | {seeds} | " + " | ".join(cells) + " |"


def _full_image_split(f: dict) -> dict:
    """The full-image prior in a split's shape: one box per image, so MaxBoxAcc and GT-known Loc are its IoU-50
    accuracy at every tau."""
    return {"max_box_acc_v2": f["mean"], "max_box_acc_v2_iou": f["iou"], "max_box_acc": f["gt_known_loc"],
            "gt_known_loc": {"at_tau": f["gt_known_loc"], "oracle": f["gt_known_loc"]}}


def table(results: dict, columns=COLUMNS) -> list[str]:
    lines = ["| method | seeds | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for method in _methods(results):
        test = [r["splits"]["test"] for r in results[method].values()]
        lines.append(_row(method, len(test), test, columns))
    pri = _any_run(results)["priors"]["test"]
    lines.append(_row("prior: centre Gaussian", "-", [pri["centre_gaussian"]], columns))
    lines.append(_row("prior: full-image box", "-", [_full_image_split(pri["full_image"])], columns))
    return lines


def differences(results: dict, method: str = "tdam", base: str = "none") -> list[str]:
    if method not in results or base not in results:
        return [f"({method} or {base} has no runs yet.)"]
    seeds = sorted(set(results[method]) & set(results[base]))
    lines = [f"Per seed, {method} minus {base} on test:", "",
             "| seed | " + " | ".join(name for name, _ in JUDGED) + " |", "|---" * (len(JUDGED) + 1) + "|"]
    for s in seeds:
        a, b = results[method][s]["splits"]["test"], results[base][s]["splits"]["test"]
        lines.append(f"| {s} | " + " | ".join(f"{get(a) - get(b):+.2f}" for _, get in JUDGED) + " |")
    return lines


def _test_by_seed(results: dict, method: str, get) -> dict:
    return {s: get(r["splits"]["test"]) for s, r in results.get(method, {}).items()}


def _ci(d: dict) -> str:
    if isnan(d["low"]):
        return f"{d['diff']:+.2f} (no interval)"
    return f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def comparisons(results: dict, base: str = "none") -> list[dict]:
    """Every method against ``base`` on each judged metric (bench/claims.py's comparison: Welch and pooled-SD 95%
    intervals, the MDE, and a verdict Holm-adjusted over the methods compared on that metric)."""
    rows = []
    for name, get in JUDGED:
        summaries = {}
        for method in _methods(results):
            by_seed = _test_by_seed(results, method, get)
            summaries[method] = Sample(len(by_seed), list(by_seed.values()), by_seed)
        pooled = pooled_sd([m.test_values for m in summaries.values()])
        family = [{**compare(summaries[m], summaries[base], pooled), "kind": "better", "method": m, "metric": name}
                  for m in summaries if m != base and base in summaries]
        rows += judge_family(family)
    return rows


def comparison_table(rows: list[dict], base: str = "none") -> list[str]:
    lines = [f"| method | metric | seeds | Δ vs {base}, Welch 95% CI | pooled-SD 95% CI | paired 95% CI | MDE "
             f"| Holm p | better than {base}? |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mde = "—" if isnan(r["mde"]) else f"{r['mde']:.2f}"
        p = "—" if isnan(r["p_holm"]) else f"{r['p_holm']:.3f}"
        lines.append(f"| {r['method']} | {r['metric']} | {r['n']} | {_ci(r['welch'])} | {_ci(r['pooled'])} "
                     f"| {_ci(r['paired'])} | {mde} | {p} | {r['verdict']} |")
    return lines


def tdam_verdict(results: dict, rows: list[dict]) -> list[str]:
    """The plain verdict on TDAM's claim, worded from the numbers: its +4.51 Top-1 Loc over ResNet-50 (ImageNet,
    research/tdam.md) against our tdam - none interval, and every method's MaxBoxAccV2 against the Gaussian prior."""
    by = {(r["method"], r["metric"]): r for r in rows}
    loc, box = by.get(("tdam", "Top-1 Loc @tau")), by.get(("tdam", "MaxBoxAccV2"))
    if loc is None or loc["n"] < MIN_SEEDS:
        return ["Not enough seeds of tdam and none yet for a verdict."]
    w = loc["welch"]
    claim = CLAIMED_TOP1_LOC_GAIN
    within = w["low"] <= claim <= w["high"]
    gauss = _any_run(results)["priors"]["test"]["centre_gaussian"]["max_box_acc_v2"]
    gaps = {m: statistics.mean(_test_by_seed(results, m, lambda t: t["max_box_acc_v2"]).values()) - gauss
            for m in _methods(results)}
    # A claim about localization can only be tested where the CAMs localize better than a map that ignores the
    # image: below the centre-Gaussian prior, differences between methods are not about finding the object.
    untestable = all(g < 0 for g in gaps.values())
    headline = ("untestable here: CAMs score below the prior" if untestable else
                {"holds": "holds at this scale", "reversed": "reversed at this scale"}.get(loc["verdict"],
                                                                                          loc["verdict"]))
    word = {"holds": "TDAM localizes better than the plain network",
            "reversed": "TDAM localizes worse than the plain network"}.get(
        loc["verdict"], "no difference between TDAM and the plain network is detected")
    lines = [f"**TDAM's claim (+{claim:.2f} Top-1 Loc over the plain ResNet-50 on ImageNet): {headline}.** "
             f"Over {loc['n']} seeds, {word} on Top-1 Loc: tdam - none = {_ci(w)} points "
             f"(Welch 95%; MDE {loc['mde']:.2f}, Holm p {loc['p_holm']:.2f}). The paper's +{claim:.2f} is "
             f"{'inside' if within else 'outside'} that interval. "
             f"On MaxBoxAccV2 (GT-known, the box quality alone) tdam - none = {_ci(box['welch'])} "
             f"({box['verdict']}). Top-1 Loc needs the class right too, so it moves with top-1 accuracy: "
             f"tdam - none top-1 = {_ci(by[('tdam', 'test top-1')]['welch'])}.", ""]
    listed = ", ".join(f"{m} {g:+.2f}" for m, g in gaps.items())
    beaten = [m for m, g in gaps.items() if g > 0]
    lines.append(f"**Against the centre-Gaussian prior** (MaxBoxAccV2 {gauss:.2f}, the same map for every image), "
                 f"each method's mean MaxBoxAccV2 differs by: {listed}. "
                 + (f"Above it: {', '.join(beaten)}, by at most {max(gaps.values()):.2f} points." if beaten else
                    "No method's CAM beats it: at 32x32 with an 8x8 last stage and 8 epochs these CAMs find the "
                    "object no better than a fixed central blob, so box metrics here cannot separate the methods."))
    return lines


def copy_pictures(runs: Path, results: dict, here: Path) -> list[str]:
    """Copy each method's first-seed PNG grids (when its run is still here) and link whatever pictures/ holds."""
    lines = []
    for method in _methods(results):
        src = runs / f"{method}-s{min(results[method])}" / "show"
        dest = here / "pictures" / method
        for png in sorted(src.glob("*.png")) if src.is_dir() else []:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(png, dest / png.name)
        lines += [f"![{method} {png.stem}](pictures/{method}/{png.name})" for png in sorted(dest.glob("*.png"))]
    return lines


def report(runs: Path, here: Path | None = None) -> tuple[str, str | None]:
    """(report.md, the README block or None when there are no results); ``here`` (default results/
    wsol_tiny_imagenet) receives the localize copies and pictures the report links."""
    here = here or HERE
    collect(runs, here)
    results = read_localizations(here / "localize")
    head = ["# Weakly-supervised localization on Tiny-ImageNet-50 (ResNet-20, 32x32, CPU)", "",
            "Recipe `configs/tiny_imagenet_resnet20_cpu.yaml`, matrix `benchmarks/matrices/wsol_tiny_imagenet.yaml`;",
            "metrics as defined in `docs/wsol.md` (wsolevaluation's definitions; tau chosen on val = held out of",
            "train, test = Tiny-ImageNet's labelled val, scored once). Each run's `localize.json` is kept in",
            "`localize/`. Reproduce with:", "", COMMANDS, ""]
    if not results:
        shown = runs.relative_to(ROOT) if runs.is_relative_to(ROOT) else runs
        return "\n".join(head + [f"No runs found under `{shown}` yet: run the commands above.", ""]), None
    first = _any_run(results)
    rows = comparisons(results)
    body = [f"Threshold grid step {first['interval']}, images {first['image_size'][0]}x{first['image_size'][1]}, "
            f"CAM method `{first['method']}`. Columns are % on the test split, mean ± std over seeds.", "",
            *table(results), "", "## Verdict", "", *tdam_verdict(results, rows), "",
            "## Every method against none", "",
            "Verdict as in `attnlab report` (bench/claims.py): *holds* or *reversed* when the larger of the Welch "
            "and pooled-SD p-values, Holm-adjusted over the methods on that metric, is below 0.05; otherwise *no "
            "difference of X points or more detected*, X being the minimum detectable effect (80% power, pooled "
            "SD).", "", *comparison_table(rows), "", *differences(results), "",
            "## Pictures (first seed of each method)", "", *copy_pictures(runs, results, here), ""]
    return "\n".join(head + body), readme_block(results, rows, here)


def readme_block(results: dict, rows: list[dict], here: Path) -> str:
    """The README's localization table (the judged metrics), the verdict's first paragraph and one picture."""
    short = table(results, JUDGED)
    short[1] = "|---|---:|" + "---:|" * len(JUDGED)
    lines = ["Generated by `.venv/bin/python benchmarks/wsol_report.py --readme README.md` from "
             "[results/wsol_tiny_imagenet/report.md](results/wsol_tiny_imagenet/report.md) (commands, every "
             "metric, intervals, all pictures). % on the 2,500 test images, mean ± std over seeds.", "",
             *short, "", tdam_verdict(results, rows)[0]]
    picture = here / "pictures" / "tdam" / "cams.png"
    if picture.is_file():
        lines += ["", "TDAM's CAMs on test images (ground-truth box green, the box from the CAM at the val-chosen "
                      "tau red; the report explains every row):", "",
                  "![TDAM CAMs](results/wsol_tiny_imagenet/pictures/tdam/cams.png)"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "wsol_tiny_imagenet"))
    p.add_argument("--results", default=str(HERE), help="folder of report.md, the localize copies and the pictures "
                   "it links (default results/wsol_tiny_imagenet)")
    p.add_argument("--readme", help="also replace README's <!-- results:wsol_tiny_imagenet --> block")
    args = p.parse_args(argv)
    here = Path(args.results)
    if here.exists() and not here.is_dir():
        p.error(f"--results {here} is a file; it names the folder report.md and its copies go to")
    if args.readme and here.resolve() != HERE.resolve():  # its links name the committed folder
        p.error("--readme links results/wsol_tiny_imagenet: give it only with the default --results")
    if args.readme:
        check_readme(args.readme, "wsol_tiny_imagenet")  # before anything is written
    text, block = report(Path(args.runs).resolve(), here)
    here.mkdir(parents=True, exist_ok=True)
    atomic_write_text(here / "report.md", text, "report")
    print(f"wrote {here / 'report.md'}")
    if args.readme and block is not None:
        update_readme(args.readme, block, "wsol_tiny_imagenet")
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
