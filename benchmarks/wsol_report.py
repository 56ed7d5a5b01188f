"""Write results/wsol_tiny_imagenet/report.md from the runs' localize.json files (no number is typed by hand).

    .venv/bin/python benchmarks/wsol_report.py [--runs runs/wsol_tiny_imagenet]

Reads ``<runs>/<method>-s<seed>/localize.json`` (written by ``attnlab localize``), copies each method's first-seed
PNG grids (``show/``, written by ``attnlab show``) to ``pictures/<method>/``, and writes the table (mean and std
over seeds), the two priors, the per-seed TDAM - none differences, and the commands that reproduce everything.
With no runs yet it writes the skeleton with those commands.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
from pathlib import Path

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
COLUMNS = [("test top-1", lambda r: r["top1"]),
           ("MaxBoxAccV2", lambda r: r["max_box_acc_v2"]),
           ("IoU30/50/70", None),
           ("MaxBoxAcc (V1)", lambda r: r["max_box_acc"]),
           ("GT-known Loc @tau", lambda r: r["gt_known_loc"]["at_tau"]),
           ("Top-1 Loc @tau", lambda r: r["top1_loc"]["at_tau"]),
           ("Top-5 Loc @tau", lambda r: r["top5_loc"]["at_tau"]),
           ("GT-known Loc oracle", lambda r: r["gt_known_loc"]["oracle"]),
           ("Top-1 Loc oracle", lambda r: r["top1_loc"]["oracle"])]


def read_localizations(runs: Path) -> dict:
    """{method: {seed: localize.json dict}}."""
    out = {}
    for path in sorted(runs.glob("*-s*/localize.json")):
        m = re.fullmatch(r"(.+)-s(\d+)", path.parent.name)
        if m:
            out.setdefault(m.group(1), {})[int(m.group(2))] = json.loads(path.read_text())
    return out


def _cell(values) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results: dict) -> list[str]:
    lines = ["| method | seeds | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    order = [m for m in METHODS if m in results] + sorted(m for m in results if m not in METHODS)
    for method in order:
        test = [r["splits"]["test"] for r in results[method].values()]
        cells = []
        for name, get in COLUMNS:
            if get is None:
                cells.append("/".join(f"{statistics.mean(t['max_box_acc_v2_iou'][d] for t in test):.1f}"
                                      for d in ("30", "50", "70")))
            else:
                cells.append(_cell([get(t) for t in test]))
        lines.append(f"| {method} | {len(test)} | " + " | ".join(cells) + " |")
    any_run = next(iter(next(iter(results.values())).values()))
    pri = any_run["priors"]["test"]
    g, f = pri["centre_gaussian"], pri["full_image"]
    blank = ["-"] * len(COLUMNS)
    gauss = blank.copy()
    gauss[1], gauss[2] = f"{g['max_box_acc_v2']:.2f}", "/".join(f"{g['max_box_acc_v2_iou'][d]:.1f}"
                                                                 for d in ("30", "50", "70"))
    gauss[3], gauss[4], gauss[7] = (f"{g['max_box_acc']:.2f}", f"{g['gt_known_loc']['at_tau']:.2f}",
                                    f"{g['gt_known_loc']['oracle']:.2f}")
    full = blank.copy()
    full[1], full[2] = f"{f['mean']:.2f}", "/".join(f"{f['iou'][d]:.1f}" for d in ("30", "50", "70"))
    full[3] = full[4] = full[7] = f"{f['gt_known_loc']:.2f}"
    lines.append("| prior: centre Gaussian | - | " + " | ".join(gauss) + " |")
    lines.append("| prior: full-image box | - | " + " | ".join(full) + " |")
    return lines


def differences(results: dict, method: str = "tdam", base: str = "none") -> list[str]:
    if method not in results or base not in results:
        return [f"({method} or {base} has no runs yet.)"]
    seeds = sorted(set(results[method]) & set(results[base]))
    lines = [f"Per seed, {method} minus {base} on test:", "",
             "| seed | top-1 | MaxBoxAccV2 | GT-known Loc @tau | Top-1 Loc @tau |", "|---|---|---|---|---|"]
    for s in seeds:
        a, b = results[method][s]["splits"]["test"], results[base][s]["splits"]["test"]
        lines.append(f"| {s} | {a['top1'] - b['top1']:+.2f} | {a['max_box_acc_v2'] - b['max_box_acc_v2']:+.2f} | "
                     f"{a['gt_known_loc']['at_tau'] - b['gt_known_loc']['at_tau']:+.2f} | "
                     f"{a['top1_loc']['at_tau'] - b['top1_loc']['at_tau']:+.2f} |")
    return lines


def copy_pictures(runs: Path, results: dict) -> list[str]:
    lines = []
    for method in results:
        seed = min(results[method])
        src = runs / f"{method}-s{seed}" / "show"
        if not src.is_dir():
            continue
        dest = HERE / "pictures" / method
        dest.mkdir(parents=True, exist_ok=True)
        for png in sorted(src.glob("*.png")):
            shutil.copy2(png, dest / png.name)
            lines.append(f"![{method} {png.stem}](pictures/{method}/{png.name})")
    return lines


def report(runs: Path) -> str:
    results = read_localizations(runs)
    head = ["# Weakly-supervised localization on Tiny-ImageNet-50 (ResNet-20, 32x32, CPU)", "",
            "Recipe `configs/tiny_imagenet_resnet20_cpu.yaml`, matrix `benchmarks/matrices/wsol_tiny_imagenet.yaml`;",
            "metrics as defined in `docs/wsol.md` (wsolevaluation's definitions; tau chosen on val = held out of",
            "train, test = Tiny-ImageNet's labelled val, scored once). Reproduce with:", "", COMMANDS, ""]
    if not results:
        shown = runs.relative_to(ROOT) if runs.is_relative_to(ROOT) else runs
        return "\n".join(head + [f"No runs found under `{shown}` yet: run the commands above.", ""])
    first = next(iter(next(iter(results.values())).values()))
    body = [f"Threshold grid step {first['interval']}, images {first['image_size'][0]}x{first['image_size'][1]}, "
            f"CAM method `{first['method']}`. Columns are % on the test split, mean ± std over seeds.", "",
            *table(results), "", *differences(results), "", "## Pictures (first seed of each method)", "",
            *copy_pictures(runs, results), "", "## Verdict", "",
            "(to be written from the table above once the runs are in: does TDAM beat none on Top-1 Loc and "
            "MaxBoxAccV2 by more than the seed spread, and does any CAM beat the centre-Gaussian prior?)", ""]
    return "\n".join(head + body)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "wsol_tiny_imagenet"))
    p.add_argument("--out", default=str(HERE / "report.md"))
    args = p.parse_args(argv)
    text = report(Path(args.runs).resolve())
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
