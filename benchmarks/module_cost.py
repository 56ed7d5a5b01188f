"""What each attention module costs: params, FLOPs and inference latency, relative to the plain backbone.

Every registered attention module (``attnlab.attention.names()``; 'none' is the plain backbone) in its default
placement, plus a per-stage shared variant of every module that can be shared (the non-default sharing for DIA),
on resnet20, resnet56 and resnet164 at 32x32 and resnet50 at 224x224 (fewer repeats there). Ratios are to the
plain backbone measured in the same run.

Latency: eval mode, ``torch.inference_mode()``, batch 1 and a small batch, CPU, ``attnlab.measure.measure_latency``.
Every variant of a backbone is warmed up once; then, round after round, every variant is timed for a pass or two in
a freshly shuffled order, so slow phases of a shared machine hit all variants alike. The reported figure is the
median of all timed passes of a variant, with its interquartile range relative to the median ("spread").
FLOPs: ``attnlab.measure.count_flops`` (2 x MACs, conv/linear/matmul only, batch 1).

    .venv/bin/python benchmarks/module_cost.py                    # writes results/module_cost.{json,md}
    .venv/bin/python benchmarks/module_cost.py --quick --out /tmp/mc  # smoke run

``--table`` instead writes the one-table overview of every registered module (source, defaults, parameters and
FLOPs added, CPU latency at batch 1 on ResNet-20 at 32x32 and ResNet-50 at 224x224, a few round-robin rounds) into
docs/modules.md between its ``module-table`` markers, with the numbers in results/module_cost.table.json
(``--doc`` and ``--out`` write them elsewhere):

    .venv/bin/python benchmarks/module_cost.py --table [--rounds 5]
"""
import argparse
import os
import platform
import random
import statistics
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab import attention  # noqa: E402
from attnlab.models import create_model  # noqa: E402
from attnlab.measure import count_flops, count_params, measure_latency  # noqa: E402
from attnlab.profiler import write_json  # noqa: E402

# backbone -> (input size, batch sizes, rounds, timed passes per round per batch size)
BACKBONES = {
    "resnet20": (32, (1, 16), 15, {1: 3, 16: 1}),
    "resnet56": (32, (1, 16), 15, {1: 2, 16: 1}),
    "resnet164": (32, (1, 16), 11, {1: 2, 16: 1}),
    "resnet50": (224, (1, 8), 9, {1: 2, 8: 1}),
}
QUICK = {"resnet20": (32, (1, 4), 2, {1: 2, 4: 1})}
# Extra configurations worth a row: EAN's ImageNet DIA uses r = 20 (DIANet's CIFAR default r = 4 is heavy there).
EXTRA = {"resnet50": [("dia (r=20, EAN)", "dia", None, {"reduction": 20})]}


def variants(backbone):
    """(label, attention, share, kwargs): the backbone, each module as its paper places it, its other sharing."""
    out = [("none", "none", None, {})]
    for name in attention.names():
        if name == "none":
            continue
        cls = attention.get(name)
        out.append((name, name, None, {}))
        if getattr(cls, "wraps_block", False):
            continue  # re-runs its own block's layers: cannot be shared
        if getattr(cls, "shared_by_default", False):
            out.append((f"{name} (per block)", name, False, {}))
        else:
            out.append((f"{name} (shared)", name, True, {}))
    return out + EXTRA.get(backbone, [])


def bench_backbone(backbone, size, batch_sizes, rounds, passes, device):
    models = {}
    rows = {}
    for label, name, share, kwargs in variants(backbone):
        torch.manual_seed(0)
        model = create_model(backbone, attention=name, attention_kwargs=kwargs, share=share).eval()
        models[label] = model
        rows[label] = {"backbone": backbone, "input_size": size, "attention": name, "variant": label,
                       "attention_kwargs": kwargs,
                       "share": share if share is not None else bool(getattr(attention.get(name),
                                                                             "shared_by_default", False)),
                       "params": count_params(model), "flops": count_flops(model, size, batch_size=1),
                       "attention_modules": len(model.attention_modules()) if name != "none" else 0,
                       "times_ms": {str(b): [] for b in batch_sizes}}
    for b in batch_sizes:
        for model in models.values():
            measure_latency(model, size, b, device, warmup=1, repeats=1)
    rng = random.Random(0)
    for r in range(rounds):
        for b in batch_sizes:
            order = list(models)
            rng.shuffle(order)
            for label in order:
                lat = measure_latency(models[label], size, b, device, warmup=0, repeats=passes[b])
                rows[label]["times_ms"][str(b)].extend(lat["times_ms"])
        print(f"  {backbone}: round {r + 1}/{rounds} done", flush=True)
    base = rows["none"]
    for row in rows.values():
        row["params_ratio"] = row["params"] / base["params"]
        row["flops_ratio"] = row["flops"] / base["flops"]
        row["latency"] = {}
        for b, times in row["times_ms"].items():
            med = statistics.median(times)
            q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (med, med, med)
            row["latency"][b] = {"median_ms": med, "images_per_s": int(b) / (med / 1e3), "n": len(times),
                                 "spread": (q3 - q1) / med, "ratio": med / statistics.median(base["times_ms"][b])}
    return list(rows.values())


def markdown(result) -> str:
    meta = result["meta"]
    lines = [
        "# Attention module cost",
        "",
        f"Generated by `benchmarks/module_cost.py` on {meta['date']} ({meta['cpu']}, {meta['threads']} torch "
        f"thread(s), torch {meta['torch']}) on {meta['cores']} cores with load average {meta['load_start']} at start "
        f"and {meta['load_end']} at end (above the thread count, other work shared the cores): absolute times are "
        "noisy; the "
        "ratios compare variants timed round-robin in the same run. Latency = median of all timed eval-mode passes "
        "(inference mode). FLOPs = 2 x MACs at batch 1 (conv/linear/matmul only: elementwise gates count 0).",
        "",
        "| backbone | attention | params | x base | GFLOPs | x base | ms, batch 1 (spread) | x base "
        "| ms, batch N (spread) | N | x base |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        b1, bn = sorted(row["latency"], key=int)
        l1, ln = row["latency"][b1], row["latency"][bn]
        lines.append(
            f"| {row['backbone']} ({row['input_size']}px) | {row['variant']} | {row['params'] / 1e6:.3f} M | "
            f"{row['params_ratio']:.3f} | {row['flops'] / 1e9:.3f} | {row['flops_ratio']:.3f} | "
            f"{l1['median_ms']:.1f} ({100 * l1['spread']:.0f}%) | {l1['ratio']:.2f} | "
            f"{ln['median_ms']:.1f} ({100 * ln['spread']:.0f}%) | {bn} | {ln['ratio']:.2f} |")
    lines += ["", "Variants: each module in its default placement (TDAM: last two stages, T=2, m=1, TDjoint; "
              "DIA: one unit per stage shared by its blocks, r=4; the others: every block). '(shared)' = one "
              "module per stage shared by all its blocks; 'dia (per block)' = one unit per block. "
              "Spread = interquartile range / median of the timed passes: ratios closer to 1 than the spreads "
              "are within the noise (SE and ECA add almost no work, so their rows show the noise floor).", ""]
    return "\n".join(lines)


# name -> (paper, official code, timm's equivalent as ``timm:<kind>`` or "-")
SOURCES = {
    "none": ("plain backbone", "-", "-"),
    "se": ("Hu et al., CVPR 2018", "hujie-frank/SENet", "timm:se"),
    "cbam": ("Woo et al., ECCV 2018", "Jongchan/attention-module", "timm:cbam"),
    "eca": ("Wang et al., CVPR 2020", "BangguWu/ECANet", "timm:eca"),
    "spe": ("Zhong et al., MMM 2023", "Qrange-group/SPEM", "-"),
    "tdam": ("Jaiswal et al., ECCV 2022", "shantanuj/TDAM_Top_down_attention_module", "-"),
    "dia": ("Huang et al., AAAI 2020", "gbup-group/DIANet", "-"),
    "simam": ("Yang et al., ICML 2021", "ZjjConan/SimAM", "-"),
    "gc": ("Cao et al., ICCVW 2019", "xvjiarui/GCNet", "timm:gca"),
    "coord": ("Hou et al., CVPR 2021", "houqb/CoordAttention", "timm:coord"),
    "gct": ("Yang et al., CVPR 2020", "z-x-yang/GCT", "-"),
    "triplet": ("Misra et al., WACV 2021", "landskape-ai/triplet-attention", "-"),
    "bam": ("Park et al., BMVC 2018", "Jongchan/attention-module", "-"),
    "fca": ("Qin et al., ICCV 2021", "cfzd/FcaNet", "-"),
}
TABLE_BACKBONES = {"resnet20": 32, "resnet50": 224}
BEGIN, END = "<!-- module-table:begin -->", "<!-- module-table:end -->"


def defaults_of(name) -> str:
    import inspect

    params = inspect.signature(attention.get(name).__init__).parameters.values()
    opts = [f"{p.name}={p.default!r}" for p in params
            if p.name not in ("self", "channels") and p.default is not inspect.Parameter.empty]
    return ", ".join(opts) or "-"


def table_rows(rounds, device):
    """Per module: params and FLOPs added to each backbone, batch-1 latency (median of round-robin passes)."""
    rows = {name: {"attention": name, "source": SOURCES.get(name, ("?", "?", "?")), "defaults": defaults_of(name)}
            for name in attention.names()}
    for backbone, size in TABLE_BACKBONES.items():
        models = {}
        for name in rows:
            torch.manual_seed(0)
            models[name] = create_model(backbone, attention=name).eval()
            rows[name][backbone] = {"params": count_params(models[name]),
                                    "flops": count_flops(models[name], size, batch_size=1), "times_ms": []}
        for model in models.values():
            measure_latency(model, size, 1, device, warmup=1, repeats=1)
        rng = random.Random(0)
        for r in range(rounds):
            order = list(models)
            rng.shuffle(order)
            for name in order:
                rows[name][backbone]["times_ms"] += measure_latency(models[name], size, 1, device, warmup=0,
                                                                    repeats=2)["times_ms"]
            print(f"  {backbone}: round {r + 1}/{rounds} done", flush=True)
        base = rows["none"][backbone]
        for row in rows.values():
            cell = row[backbone]
            cell["median_ms"] = statistics.median(cell["times_ms"])
            cell["latency_ratio"] = cell["median_ms"] / statistics.median(base["times_ms"])
            cell["params_added"] = cell["params"] - base["params"]
            cell["flops_added"] = cell["flops"] - base["flops"]
    return list(rows.values())


def table_markdown(result) -> str:
    meta = result["meta"]
    lines = [
        BEGIN,
        "| module | source (paper; official code) | in timm | defaults | params added, R-20 / R-50 "
        "| MFLOPs added, R-20 / R-50 | CPU ms, batch 1, R-20 / R-50 (x none) |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["attention"] != "none", r["attention"])):
        paper, code, timm_kind = row["source"]
        a, b = (row[k] for k in TABLE_BACKBONES)
        code = f"`{code}`" if code != "-" else code
        timm_kind = f"`{timm_kind}`" if timm_kind != "-" else timm_kind
        lines.append(
            f"| `{row['attention']}` | {paper}; {code} | {timm_kind} | {row['defaults']} | "
            f"{a['params_added']:,} / {b['params_added']:,} | "
            f"{a['flops_added'] / 1e6:.3f} / {b['flops_added'] / 1e6:.1f} | "
            f"{a['median_ms']:.1f} ({a['latency_ratio']:.2f}) / {b['median_ms']:.0f} ({b['latency_ratio']:.2f}) |")
    note = textwrap.fill(
        f"Regenerated by `benchmarks/module_cost.py --table` on {meta['date']} (torch {meta['torch']}, "
        f"{meta['threads']} thread, {meta['rounds']} round-robin rounds of 2 passes per model). Each module in its "
        "default placement (TDAM: last two stages; DIA: one unit per stage; the others: every block), 10 classes "
        "for R-20 at 32x32, 1000 for R-50 at 224x224. FLOPs = 2 x MACs of conv/linear/matmul at batch 1 "
        "(elementwise gates count 0). **Latency is indicative only**: few passes, on the machine's "
        f"{meta['cores']} cores with load average {meta['load_start']} at start and {meta['load_end']} at end; "
        "`results/module_cost.md` has the longer measurement of the older modules.", width=116,
        break_on_hyphens=False)
    return "\n".join(lines + ["", note, END])


def write_table(rounds, device, doc=ROOT / "docs" / "modules.md", out=ROOT / "results" / "module_cost.table"):
    text = Path(doc).read_text() if Path(doc).is_file() else ""
    if BEGIN not in text or END not in text:  # said before the minutes of timing, not after
        raise SystemExit(f"module_cost.py: error: {doc} has no {BEGIN} ... {END} markers")
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": device, "rounds": rounds,
            "load_start": [round(v, 1) for v in os.getloadavg()]}
    rows = table_rows(rounds, device)
    meta["load_end"] = [round(v, 1) for v in os.getloadavg()]
    result = {"meta": meta, "rows": rows}
    write_json(str(out) + ".json", result)
    head, rest = text.split(BEGIN, 1)
    Path(doc).write_text(head + table_markdown(result) + rest.split(END, 1)[1])
    print(table_markdown(result))
    print(f"wrote {out}.json and the table in {doc}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output path without extension (default results/module_cost, with "
                    "--table results/module_cost.table)")
    # One thread by default: on a busy 2-core machine two OpenMP threads spin-wait against other jobs and the
    # timings measure mostly that contention (we saw resnet20 at batch 1 take >1 s with 2 threads).
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbones", nargs="*", default=None, choices=list(BACKBONES), help="a subset (default all)")
    ap.add_argument("--quick", action="store_true", help="one tiny configuration (smoke test)")
    ap.add_argument("--table", action="store_true", help="regenerate --doc's table of every module")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "modules.md"), help="with --table: the page whose table is "
                    "replaced (default docs/modules.md)")
    ap.add_argument("--rounds", type=int, default=5, help="round-robin latency rounds for --table (default 5)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick and args.backbones:
        ap.error("--quick times its one tiny configuration: it takes no --backbones")
    if args.table:
        return write_table(args.rounds, args.device, args.doc,
                           args.out or str(ROOT / "results" / "module_cost.table"))
    args.out = args.out or str(ROOT / "results" / "module_cost")
    table = QUICK if args.quick else {k: v for k, v in BACKBONES.items() if not args.backbones or k in args.backbones}
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": args.device,
            "load_start": [round(v, 1) for v in os.getloadavg()],
            "configs": {k: {"input_size": v[0], "batch_sizes": list(v[1]), "rounds": v[2],
                            "passes_per_round": v[3]} for k, v in table.items()}}
    start = time.time()
    rows = []
    for backbone, (size, batch_sizes, rounds, passes) in table.items():
        print(f"{backbone} at {size}x{size}: {len(variants(backbone))} variants", flush=True)
        rows += bench_backbone(backbone, size, batch_sizes, rounds, passes, args.device)
    meta["load_end"] = [round(v, 1) for v in os.getloadavg()]
    meta["wall_s"] = round(time.time() - start, 1)
    result = {"meta": meta, "rows": rows}
    write_json(args.out + ".json", result)
    md = markdown(result)
    tmp = args.out + ".md.tmp"
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, args.out + ".md")
    print(md)
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
