"""``attnlab report results/<matrix>``: report.md and plots from a benchmark matrix's runs.jsonl.

Per method: mean +- sample std of val and test top-1 over seeds, the difference to the baseline with 95% Welch and
pooled-SD intervals, its minimum detectable effect and Holm-adjusted verdict (bench/claims.py), params, FLOPs,
latency and training throughput; accuracy-vs-latency, accuracy-vs-params and per-epoch
validation curves as PNGs. ``--readme README.md`` replaces the block between ``<!-- results:<matrix>:begin -->``
and ``<!-- results:<matrix>:end -->`` (else, when the README has no such block, the one between
``<!-- results:begin -->`` and ``<!-- results:end -->``) with a compact table generated from the same summary.
"""
import re
from collections import Counter
from pathlib import Path

from ..errors import AttnlabError
from ..files import atomic_write_text, save_figure
from .claims import CLAIMS_NOTE, claims_table, compare, format_ci, format_p, judge_all, judge_family
from .matrix import method_seeds
from .stats import isnan, mean_std, pooled_sd, welch_interval

PLOTS = ("acc_vs_latency.png", "acc_vs_params.png", "val_curves.png", "deltas.png")


# ----------------------------------------------------------------------------------------------- loading
def load_results(results_dir):
    """(records: last line per (method, seed), all lines, latency dict) of a results/<matrix>/ folder."""
    from ..jsonl import read_jsonl
    from .latency import read_latency
    from .runs import latest_by_cell

    results_dir = Path(results_dir)
    runs_path = results_dir / "runs.jsonl"
    if not runs_path.is_file():
        raise AttnlabError(f"no runs.jsonl in {results_dir}: run `attnlab bench --matrix ...` first")
    lines = read_jsonl(runs_path)
    if not lines:
        raise AttnlabError(f"{runs_path} holds no runs yet")
    return list(latest_by_cell(lines).values()), lines, read_latency(results_dir / "latency.json")


def read_curve(record):
    """val top-1 per epoch: the copy runs.jsonl keeps with the record, else (older records) the run dir's
    metrics.csv. The record first: the folder it names may hold another run of that cell by now (a cell merged
    from a GPU slot, retrained here since)."""
    from .runs import read_curve as read_metrics_curve

    curve = record.get("val_curve")
    if curve:
        return [float("nan") if v is None else float(v) for v in curve]
    return read_metrics_curve(record["run_dir"]) if record.get("run_dir") else None


def summarize(results_dir, baseline="none", matrix_file=None):
    """Everything report.md and the README block show, as one dict.

    ``matrix_file``: the matrix (method order, claims, description); default the file its runs recorded, used
    when it still exists there (a generated matrix under a git-ignored runs/ may not).
    """
    from .matrix import load_matrix

    results_dir = Path(results_dir)
    records, lines, latency = load_results(results_dir)
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    recorded_name = next((r["matrix"] for r in records if r.get("matrix")), None)
    matrix_name = recorded_name or results_dir.name
    given = matrix_file is not None
    if given:
        matrix_file = str(matrix_file)
        given_name = load_matrix(matrix_file)["name"]  # a given file must load: its errors are the user's to see
        if recorded_name and given_name != recorded_name:
            raise AttnlabError(f"--matrix {matrix_file} is matrix '{given_name}' but the runs in {results_dir} are "
                               f"matrix '{recorded_name}': give that matrix's file (or none, to use the recorded one)")
    else:
        matrix_file = next((r["matrix_file"] for r in records if r.get("matrix_file")), None)
    matrix = None
    if matrix_file and Path(matrix_file).is_file():
        try:
            matrix = load_matrix(matrix_file)
        except AttnlabError:
            matrix = None

    # Method order: the matrix file's, then any others in the order they were first recorded.
    order = [m["name"] for m in matrix["methods"]] if matrix else []
    for r in lines:
        if r.get("method") not in order:
            order.append(r.get("method"))

    lat_methods = latency.get("methods", {})
    methods = []
    for name in order:
        runs = sorted((r for r in ok if r["method"] == name), key=lambda r: r["seed"])
        fails = [r for r in failed if r["method"] == name]
        if not runs and not fails:
            continue
        val = mean_std([r.get("val_top1") for r in runs])
        test = mean_std([r.get("test_top1") for r in runs])
        test5 = mean_std([r.get("test_top5") for r in runs])
        curves = [c for c in (read_curve(r) for r in runs) if c]
        methods.append({
            "name": name, "n": len(runs), "seeds": [r["seed"] for r in runs], "failed": len(fails),
            "val": val, "test": test, "test5": test5,
            "val_values": [r.get("val_top1") for r in runs], "test_values": [r.get("test_top1") for r in runs],
            "test_by_seed": {r["seed"]: r.get("test_top1") for r in runs if r.get("test_top1") is not None},
            "params": _first(runs, "params"), "flops": _first(runs, "flops"),
            "train_ips": mean_std([r.get("train_images_per_s") for r in runs])[0],
            "wall_time_s": mean_std([r.get("wall_time_s") for r in runs])[0],
            "latency": lat_methods.get(name, {}),
            "curve": _mean_curve(curves),
            "best_epochs": [c.index(max(c)) + 1 for c in curves if not any(isnan(v) for v in c)],
            "val_minus_test": [r["val_top1"] - r["test_top1"] for r in runs
                               if r.get("val_top1") is not None and r.get("test_top1") is not None],
        })

    _refuse_mixed_precision(ok)
    pooled = pooled_sd([m["test_values"] for m in methods])
    base = next((m for m in methods if m["name"] == baseline), None)
    against_base = []
    for m in methods:
        if base is None or m is base or m["n"] == 0:
            m["delta_val"] = m["delta_test"] = m["vs_base"] = None
            continue
        m["delta_val"] = welch_interval(m["val_values"], base["val_values"])
        m["vs_base"] = {**compare(m, base, pooled), "kind": "better"}
        m["delta_test"], m["paired_test"] = m["vs_base"]["welch"], m["vs_base"]["paired"]
        against_base.append(m["vs_base"])
    judge_family(against_base)  # every method against the baseline: one Holm family

    setup = _setup(records, order)
    devices = sorted({str(d) for r in ok for d in (r.get("epochs_by_device") or [r.get("device")]) if d})
    hosts = [r["host"] for r in ok if r.get("host")] or [r["host"] for r in records if r.get("host")]
    return {
        "matrix": matrix_name, "matrix_file": matrix_file, "matrix_given": given, "matrix_spec": matrix,
        "results_dir": str(results_dir),
        "setup": setup, "pooled": pooled, "precisions": sorted({precision_of(r) for r in ok}),
        "baseline": baseline if base is not None else None, "methods": methods, "failed": failed,
        "n_ok": len(ok), "n_failed": len(failed), "devices": devices, "host": hosts[-1] if hosts else {},
        "cpu_kernels": dict(Counter((r.get("host") or {}).get("cpu_kernels", "not recorded") for r in ok)),
        "latency_host": latency.get("host", {}), "latency_note": latency.get("note"),
        "latency_machines": _latency_machines(latency),
        "epochs": _first(ok, "epochs"), "git_commits": sorted({r.get("git_commit") for r in ok if r.get("git_commit")}),
    }


def _latency_machines(latency) -> dict:
    """{'cpu': [machine, ...], 'cuda': [...]}: the machines latency.json's entries say they were timed on."""
    entries = [e for e in latency.get("methods", {}).values() if isinstance(e, dict)]
    return {dev: sorted({e[dev]["machine"] for e in entries if isinstance(e.get(dev), dict) and e[dev].get("machine")})
            for dev in ("cpu", "cuda")}


def _setup(records, order):
    """Recipe, shared and per-method overrides, seeds and threads, as recorded in runs.jsonl."""
    from .matrix import format_value

    with_ov = [r for r in records if isinstance(r.get("overrides"), dict)]
    if not with_ov:
        return None
    shared = {k: v for k, v in with_ov[0]["overrides"].items()
              if all(k in r["overrides"] and r["overrides"][k] == v for r in with_ov)}
    methods = {}
    for name in order:
        runs = [r for r in with_ov if r["method"] == name]
        if runs:
            methods[name] = {k: format_value(v) for k, v in runs[0]["overrides"].items() if k not in shared}
    return {"recipe": with_ov[0].get("recipe"), "shared": {k: format_value(v) for k, v in shared.items()},
            "methods": methods, "seeds": sorted({r["seed"] for r in records}),
            "threads": sorted({r.get("threads") or (r.get("host") or {}).get("torch_threads") for r in records}
                              - {None}),
            "workers": sorted({r.get("workers", 1) for r in records if r.get("status") == "ok"})}


def _first(runs, key):
    for r in runs:
        if r.get(key) is not None:
            return r[key]
    return None


def _mean_curve(curves):
    if not curves:
        return None
    out = []
    for i in range(max(len(c) for c in curves)):
        vals = [c[i] for c in curves if i < len(c) and not isnan(c[i])]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


def precision_of(record: dict) -> str:
    """The precision a cell trained in; records from before it was recorded trained in fp32 on a CPU and in bf16
    autocast on CUDA (the engine's only behaviours then)."""
    if record.get("precision"):
        return record["precision"]
    devices = record.get("epochs_by_device") or {record.get("device") or "": 1}
    return "fp32" if all(str(d).startswith("cpu") for d in devices) else "bf16"


def _refuse_mixed_precision(records) -> None:
    """A report compares methods: cells trained at different precisions are refused, like an edited recipe."""
    by_precision = {}
    for r in records:
        by_precision.setdefault(precision_of(r), []).append(f"{r.get('method')} seed {r.get('seed')}")
    if len(by_precision) > 1:
        parts = "; ".join(f"{p}: {', '.join(cells[:4])}{' ...' if len(cells) > 4 else ''}"
                          for p, cells in sorted(by_precision.items()))
        raise AttnlabError(f"cells trained at different precisions cannot be compared in one report ({parts}); "
                           "give each precision its own matrix")


def _beats(c: dict, baseline: str) -> str:
    """The per-method sentence, by the same rule as a claim's verdict (claims.verdict, kind 'better')."""
    if c["verdict"] == "holds":
        return f"beats {baseline} (Holm p {c['p_holm']:.3f})"
    if c["verdict"] == "reversed":
        return f"worse than {baseline} (Holm p {c['p_holm']:.3f})"
    return c["verdict"]


# ----------------------------------------------------------------------------------------------- formatting
def _f(v, digits=2):
    return "n/a" if v is None or isnan(v) else f"{float(v):.{digits}f}"


def _pm(ms):
    mean, std, n = ms
    if n == 0:
        return "n/a"
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {std:.2f}"


def _signed(v):
    return "n/a" if v is None or isnan(v) else f"{float(v):+.2f}"


def _interval(c, key):
    return "—" if c is None else format_ci(c[key])


def _mde(c):
    return "—" if c is None or isnan(c["mde"]) else f"{c['mde']:.2f}"


def _holm(c):
    return format_p(None if c is None else c.get("p_holm"))


def _pooled(s):
    sd, df = s["pooled"]
    return "no method has 2 seeds yet" if not df else f"SD {sd:.2f} points, {df} degrees of freedom"


def _delta(d):
    if d is None:
        return "—"
    if isnan(d["low"]):
        return f"{_signed(d['diff'])} (no interval)"
    return f"{_signed(d['diff'])} [{_signed(d['low'])}, {_signed(d['high'])}]"


def _count(v, unit=""):
    if v is None:
        return "n/a"
    v = float(v)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suffix}{unit}"
    return f"{v:.0f}{unit}"


def _lat(m, device, bs=None):
    entry = m["latency"].get(device)
    if not entry:
        return None
    batches = entry.get("batch", {})
    if bs is None:
        return batches
    return batches.get(str(bs), {}).get("median_ms")


def _batch_sizes(summary, device):
    sizes = []
    for m in summary["methods"]:
        for bs in (_lat(m, device) or {}):
            if int(bs) not in sizes:
                sizes.append(int(bs))
    return sorted(sizes)


def _lat_cell(m, device, sizes):
    if not sizes or not m["latency"].get(device):
        return "n/a"
    return " / ".join(_f(_lat(m, device, bs)) for bs in sizes)


def hardware_line(summary) -> str:
    h = summary["host"]
    devices = ", ".join(summary["devices"]) or "unknown device"
    parts = [f"trained on {devices}"]
    if h:
        parts.append(f"{h.get('processor', '?')}, {h.get('cpu_count', '?')} logical CPUs "
                     f"({h.get('torch_threads', '?')} torch threads)")
        if h.get("gpu"):
            parts.append(f"GPU {h['gpu']}")
        parts.append(f"{h.get('platform', '?')}, Python {h.get('python', '?')}, torch {h.get('torch', '?')}")
    kernels = summary.get("cpu_kernels") or {}
    if len(kernels) > 1 or set(kernels) - {"not recorded"}:
        parts.append("torch CPU kernels " + ", ".join(f"{k}: {n} run{'s' if n != 1 else ''}"
                                                      for k, n in sorted(kernels.items())))
    return "; ".join(parts)


def reproduce_command(summary) -> str:
    mf = summary["matrix_file"] or f"benchmarks/matrices/{summary['matrix']}.yaml"
    setup = summary["setup"] or {}
    threads, workers = setup.get("threads") or [], setup.get("workers") or []
    opt = f" --workers {workers[0]}" if len(workers) == 1 else ""
    opt += f" --threads {threads[0]}" if len(threads) == 1 else ""
    root = Path(summary["results_dir"]).parent
    opt += f" --results-root {root}" if root.name != "results" else ""  # e.g. results/ean/<matrix>
    given = f" --matrix {mf}" if summary.get("matrix_given") else ""
    return f"attnlab bench --matrix {mf}{opt} && attnlab report {summary['results_dir']}{given}"


def _gpu_used(summary):
    return any(not d.startswith("cpu") for d in summary["devices"])  # the engine names a GPU by its model


def render_markdown(summary) -> str:
    s, base = summary, summary["baseline"]
    cpu_sizes, gpu_sizes = _batch_sizes(s, "cpu"), _batch_sizes(s, "cuda")
    spec = s["matrix_spec"] or {}
    out = [f"# Benchmark `{s['matrix']}`", ""]
    if spec.get("description"):
        out += [" ".join(str(spec["description"]).split()), ""]
    given = f" --matrix {s['matrix_file']}" if s.get("matrix_given") else ""
    out += [f"Generated by `attnlab report {s['results_dir']}{given}` from `{s['results_dir']}/runs.jsonl`: "
            f"{s['n_ok']} finished runs, {s['n_failed']} failed.", "",
            "Reproduce (resumes if interrupted):", "", "```", reproduce_command(s), "```", ""]

    out += ["## Hardware", "", f"- Training: {hardware_line(s)}."]
    lh = s["latency_host"]
    cpu_machines = s.get("latency_machines", {}).get("cpu") or []
    if cpu_sizes:
        where = ("; ".join(cpu_machines) if cpu_machines
                 else f"{lh.get('processor', '?')}, {lh.get('torch_threads', '?')} torch threads")
        several = " (timed on different machines: compare only methods timed on the same one)" if len(
            cpu_machines) > 1 else ""
        out.append(f"- CPU latency: {where}, batch sizes {', '.join(map(str, cpu_sizes))}{several}.")
    if gpu_sizes:
        out.append(f"- GPU latency: {lh.get('gpu', '?')}, batch sizes {', '.join(map(str, gpu_sizes))}.")
    else:
        out.append("- GPU: not measured yet (no GPU latency in latency.json).")
    if not _gpu_used(s):
        out.append("- GPU training numbers: not measured yet (every run of this matrix trained on CPU).")
    out.append("")

    setup = s["setup"]
    if setup:
        out += ["## Setup", "",
                (f"- Recipe: `{setup['recipe']}`" if setup["recipe"] else "- Recipe: none (the engine's defaults)")
                + "; overrides shared by every run: "
                + (", ".join(f"`{k}={v}`" for k, v in setup["shared"].items()) or "none") + ".",
                f"- Seeds: {', '.join(map(str, setup['seeds']))}; epochs: {s['epochs']}; torch CPU threads: "
                f"{', '.join(map(str, setup['threads'])) or '?'}.",
                "- Methods: " + "; ".join(f"`{name}` (" + (", ".join(f"{k}={v}" for k, v in own.items()) or "defaults")
                                          + ")" for name, own in setup["methods"].items()) + ".",
                "- (Read from the runs themselves: it describes what ran even if the matrix file changed since.)", ""]

    cpu_head = f"CPU latency ms (bs {' / '.join(map(str, cpu_sizes))})" if cpu_sizes else "CPU latency ms"
    gpu_head = f"GPU latency ms (bs {' / '.join(map(str, gpu_sizes))})" if gpu_sizes else "GPU latency ms"
    out += ["## Results", "",
            f"| method | n | val top-1 (best) | test top-1 | Δ val vs {base} [95% CI] "
            f"| Δ test vs {base} [Welch 95% CI] "
            "| pooled-SD 95% CI | MDE | Holm p "
            f"| params | FLOPs | {cpu_head} | {gpu_head} | train img/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in s["methods"]:
        out.append(
            f"| {m['name']} | {m['n']}{' (+' + str(m['failed']) + ' failed)' if m['failed'] else ''} "
            f"| {_pm(m['val'])} | {_pm(m['test'])} | {_delta(m['delta_val'])} | {_delta(m['delta_test'])} "
            f"| {_interval(m['vs_base'], 'pooled')} | {_mde(m['vs_base'])} | {_holm(m['vs_base'])} "
            f"| {_count(m['params'])} | {_count(m['flops'])} | {_lat_cell(m, 'cpu', cpu_sizes)} "
            f"| {_lat_cell(m, 'cuda', gpu_sizes) if gpu_sizes else 'not measured yet'} | {_f(m['train_ips'], 0)} |")
    out += ["",
            "Top-1 in percent: mean ± sample standard deviation (ddof 1) over the n seeds; val top-1 is the best "
            "epoch's, test top-1 that of the best-val checkpoint, evaluated once at the end. "
            f"Δ: difference of the method's mean to `{base}`'s mean, with a 95% Welch t interval (unequal variances, "
            "Welch–Satterthwaite degrees of freedom) computed from the two methods' per-seed accuracies, and a 95% "
            f"Student interval from the test SD pooled over every method ({_pooled(s)}). MDE: the true difference "
            "these seeds would detect with 80% power at two-sided 5% (pooled SD). Holm p: the larger of the Welch "
            "and pooled p-values, Holm-adjusted over the methods compared with the baseline. "
            f"Precision: {', '.join(s['precisions']) or 'n/a'}. FLOPs are 2 × MACs of "
            "one image's forward pass. Latency: " +
            (s["latency_note"] if s["latency_note"] else "median of repeated eval-mode forward passes") +
            ". Train img/s: training throughput "
            "as the engine measured it (mean over seeds); noisy when the machine is shared with other work.", ""]

    claim_rows = judge_all(s)
    if claim_rows:
        out += ["## The papers' claims", ""] + claims_table(claim_rows) + ["", CLAIMS_NOTE, ""]

    if base is not None:
        out += [f"## Against the baseline (`{base}`, test top-1)", ""]
        for m in s["methods"]:
            if m.get("delta_test") is None:
                continue
            paired = m.get("paired_test")
            extra = (f" (paired by seed, n={paired['n']}: {_delta(paired)})"
                     if paired and not isnan(paired["low"]) else "")
            out.append(f"- `{m['name']}`: {_delta(m['delta_test'])} points (pooled SD: "
                       f"{_interval(m['vs_base'], 'pooled')}): {_beats(m['vs_base'], base)}.{extra}")
        winners = [m["name"] for m in s["methods"] if m.get("vs_base") and m["vs_base"]["verdict"] == "holds"
                   and m["vs_base"]["direction"] == "ahead"]
        out += ["", (f"Methods that beat the baseline (Holm p < 0.05): {', '.join(winners)}." if winners else
                     f"No method beats `{base}` at Holm-adjusted p < 0.05 in this matrix."), "",
                "A verdict needs both the Welch test (the two methods' own SDs) and the pooled-SD test, Holm-adjusted "
                "over every method compared with the baseline. Each seed also draws the data subset and the "
                "validation hold-out, shared by every method at that seed, so the paired-by-seed interval (t on "
                "the per-seed differences, n - 1 df) is given beside it as another view.", ""]
    else:
        out += ["## Against the baseline", "", "No baseline (`none`) runs finished, so no differences are shown.", ""]

    out += selection_section(s)

    if s["failed"]:
        out += ["## Failed cells", ""]
        for r in sorted(s["failed"], key=lambda r: (str(r.get("method")), r.get("seed", 0))):
            out.append(f"- `{r.get('method')}` seed {r.get('seed')}: {r.get('error', 'unknown error')}")
        out.append("")

    out += ["## Plots", "",
            "![test top-1 vs CPU latency](acc_vs_latency.png)", "",
            "![test top-1 vs parameters](acc_vs_params.png)", "",
            "![validation top-1 per epoch](val_curves.png)", "",
            f"![test top-1 difference to {base} with 95% intervals](deltas.png)", ""]
    return "\n".join(out)


def selection_section(s) -> list[str]:
    """How far val (where the checkpoint is chosen) and test (what is reported) agree, per method and overall:
    a method's lead on val smaller than the cells' own val - test spread says little about its test result."""
    gaps = [g for m in s["methods"] for g in m["val_minus_test"]]
    if len(gaps) < 2:
        return []
    out = ["## Validation against test", "",
           f"| method | n | best-val epoch (of {s['epochs'] or '?'}) | val − test per seed (points) | mean |",
           "|---|---:|---:|---:|---:|"]
    for m in s["methods"]:
        if m["val_minus_test"]:
            epochs = ", ".join(map(str, m["best_epochs"])) or "?"
            out.append(f"| {m['name']} | {m['n']} | {epochs} | {', '.join(_signed(g) for g in m['val_minus_test'])} "
                       f"| {_signed(sum(m['val_minus_test']) / len(m['val_minus_test']))} |")
    mean, std, _ = mean_std(gaps)
    out += ["", f"Over all {len(gaps)} runs, val top-1 (best epoch) minus test top-1 is {_signed(mean)} ± {_f(std)} "
                f"points (from {_signed(min(gaps))} to {_signed(max(gaps))}). Val is a different held-out subset "
                "per seed and test the same images for every run, so a method's difference on val that is smaller "
                "than this spread says little about its difference on test; a best-val epoch at the end of the "
                "schedule means choosing the checkpoint on val adds little optimism of its own.", ""]
    return out


# ----------------------------------------------------------------------------------------------- plots
def write_plots(summary, out_dir) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir = Path(out_dir)
    methods = [m for m in summary["methods"] if m["n"] > 0]
    colors = {m["name"]: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    cpu_sizes = _batch_sizes(summary, "cpu")
    bs = cpu_sizes[0] if cpu_sizes else None
    paths = []

    def scatter(path, xkey, xlabel, title):
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        drawn = 0
        for m in methods:
            x = xkey(m)
            if x is None or isnan(x) or isnan(m["test"][0]):
                continue
            yerr = 0.0 if isnan(m["test"][1]) else m["test"][1]
            ax.errorbar([x], [m["test"][0]], yerr=[yerr], fmt="o", capsize=3, color=colors[m["name"]],
                        label=m["name"])
            ax.annotate(m["name"], (x, m["test"][0]), textcoords="offset points", xytext=(5, 4), fontsize=8)
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test top-1 (%), mean ± std over seeds")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        save_figure(fig, path, "plot", dpi=110)
        plt.close(fig)
        paths.append(path)

    scatter(out_dir / PLOTS[0], lambda m: _lat(m, "cpu", bs) if bs else None,
            f"CPU latency, batch {bs} (ms, median)" if bs else "CPU latency (not measured)",
            f"{summary['matrix']}: accuracy vs CPU latency")
    scatter(out_dir / PLOTS[1], lambda m: m["params"] / 1e6 if m["params"] else None, "parameters (millions)",
            f"{summary['matrix']}: accuracy vs parameters")

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    drawn = 0
    for m in methods:
        if m["curve"]:
            ax.plot(range(1, len(m["curve"]) + 1), m["curve"], marker=".", color=colors[m["name"]],
                    label=f"{m['name']} (n={m['n']})")
            drawn += 1
    if drawn:
        ax.legend(fontsize=8, ncol=2)
    else:
        ax.text(0.5, 0.5, "no metrics.csv found", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%), mean over seeds")
    ax.set_title(f"{summary['matrix']}: validation accuracy per epoch")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_dir / PLOTS[2], "plot", dpi=110)
    plt.close(fig)
    paths.append(out_dir / PLOTS[2])
    paths.append(_plot_deltas(summary, out_dir / PLOTS[3], plt))
    return paths


def _plot_deltas(summary, path, plt):
    """Each method's test top-1 minus the baseline's, with the Welch (thick) and paired (thin) 95% intervals."""
    rows = [m for m in summary["methods"] if m.get("delta_test")]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * max(len(rows), 3) + 1.4))
    for k, m in enumerate(rows):
        y = len(rows) - 1 - k
        d, p = m["delta_test"], m.get("paired_test")
        if not isnan(d["low"]):
            ax.plot([d["low"], d["high"]], [y, y], color="tab:blue", linewidth=4, alpha=0.5,
                    label="Welch 95%" if k == 0 else None)
        if p and not isnan(p["low"]):
            ax.plot([p["low"], p["high"]], [y - 0.18, y - 0.18], color="tab:orange", linewidth=1.5,
                    label="paired 95%" if k == 0 else None)
        ax.plot([d["diff"]], [y], "o", color="black")
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [m["name"] for m in reversed(rows)])
    ax.set_xlabel(f"test top-1 minus {summary['baseline']} (points)")
    ax.set_title(f"{summary['matrix']}: difference to {summary['baseline']} (n = seeds)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    if not rows:
        ax.text(0.5, 0.5, "no baseline runs yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, "plot", dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- README block
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _progress(summary) -> list[str]:
    """'In progress: 4 of 30 cells finished ...' for a matrix still being run (nothing when it is complete)."""
    spec = summary["matrix_spec"]
    if not spec:
        return []
    total = sum(len(method_seeds(spec, m)) for m in spec["methods"])
    if summary["n_ok"] + summary["n_failed"] >= total:
        return []
    missing = [m["name"] for m in spec["methods"]
               if not any(x["name"] == m["name"] and x["n"] for x in summary["methods"])]
    return [f"**In progress: {summary['n_ok']} of {total} cells finished.**"
            + (f" Not run yet: {', '.join(missing)}." if missing else ""), ""]


def readme_block(summary) -> str:
    s, base = summary, summary["baseline"]
    cpu_sizes = _batch_sizes(s, "cpu")
    bs = cpu_sizes[0] if cpu_sizes else None
    seeds = sorted({m["n"] for m in s["methods"] if m["n"]})
    desc = " ".join(str((s["matrix_spec"] or {}).get("description", "")).split())
    first = desc.split(". ")[0].rstrip(".") + ". " if desc else ""
    n_seeds = "/".join(map(str, seeds)) or "0"
    lines = [f"Benchmark `{s['matrix']}`: {first}{n_seeds} seed{'' if n_seeds == '1' else 's'} per method"
             + (f", {s['epochs']} epochs" if s["epochs"] else "") + f"; test top-1 as mean ± std over seeds; Δ to "
             f"`{base}` with 95% intervals from Welch's test (the two methods' own SDs) and from the SD pooled over "
             f"every method ({_pooled(s)}); MDE: the smallest true difference these seeds detect with 80% power; "
             f"Holm p over the rows. Precision: {', '.join(s['precisions']) or 'n/a'}. Hardware: {hardware_line(s)}. "
             f"Generated by `attnlab report {s['results_dir']} --readme README.md` from "
             f"[{s['results_dir']}/report.md]({s['results_dir']}/report.md), which has the setup, plots and "
             f"paired intervals; GPU numbers: {'see the report' if _gpu_used(s) else 'not measured yet'}.", "",
             *_progress(s),
             f"| method | test top-1 | Δ vs {base} [Welch 95% CI] | pooled-SD 95% CI | MDE | Holm p | params | FLOPs "
             f"| CPU ms{f' (bs {bs})' if bs else ''} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in s["methods"]:
        if m["n"] == 0:
            continue
        lines.append(f"| {m['name']} | {_pm(m['test'])} | {_delta(m['delta_test'])} "
                     f"| {_interval(m['vs_base'], 'pooled')} | {_mde(m['vs_base'])} | {_holm(m['vs_base'])} "
                     f"| {_count(m['params'])} | {_count(m['flops'])} | {_f(_lat(m, 'cpu', bs)) if bs else 'n/a'} |")
    if base is not None:
        lines += ["", *_base_verdicts(s, base)]
    claim_rows = judge_all(s)
    if claim_rows:
        lines += ["", "The papers' claims at this scale, Holm-adjusted over the claims:", ""] + claims_table(claim_rows)
    return "\n".join(lines)


def _base_verdicts(s, base) -> list[str]:
    """One line per verdict group of the methods against the baseline (Holm-adjusted)."""
    groups = {}
    for m in s["methods"]:
        c = m.get("vs_base")
        if c is None:
            continue
        key = {"holds": "beats", "reversed": "worse than"}.get(c["verdict"], c["verdict"])
        groups.setdefault(key, []).append(m["name"])
    lines = []
    for key, names in groups.items():
        if key in ("beats", "worse than"):
            lines.append(f"{key.capitalize()} `{base}` at Holm-adjusted p < 0.05: {', '.join(names)}.")
        elif key.startswith("not run yet"):
            lines.append(f"No interval yet (fewer than 2 seeds of it or of `{base}`): {', '.join(names)}.")
        else:
            lines.append(f"Against `{base}`, {key}: {', '.join(names)}.")
    return lines


def markers(matrix_name: str | None = None) -> tuple[str, str]:
    """A README block's markers: ``<!-- results:begin -->`` or, for one matrix, ``<!-- results:NAME:begin -->``."""
    tag = f"results:{matrix_name}" if matrix_name else "results"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


def update_readme(readme_path, block: str, matrix_name: str | None = None) -> None:
    """Replace the matrix's own block (``<!-- results:NAME:begin -->``) if the README has one, else the default."""
    path = Path(readme_path)
    if not path.is_file():
        raise AttnlabError(f"README not found: {path}")
    text = path.read_text()
    for begin, end in ([markers(matrix_name)] if matrix_name else []) + [markers()]:
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            break
    else:
        raise AttnlabError(f"{path} has no '{BEGIN}' ... '{END}' block to replace")
    text = pattern.sub(lambda _: f"{begin}\n{block}\n{end}", text, count=1)
    atomic_write_text(path, text, "README")


# ----------------------------------------------------------------------------------------------- CLI
def write_report(results_dir, baseline="none", readme=None, matrix_file=None) -> dict:
    summary = summarize(results_dir, baseline=baseline, matrix_file=matrix_file)
    out_dir = Path(results_dir)
    atomic_write_text(out_dir / "report.md", render_markdown(summary), "report")
    write_plots(summary, out_dir)
    if readme:
        update_readme(readme, readme_block(summary), summary["matrix"])
    return summary


def add_arguments(p):
    p.add_argument("results_dir", help="a results/<matrix>/ folder holding runs.jsonl (and latency.json)")
    p.add_argument("--baseline", default="none", help="method the others are compared with (default: none)")
    p.add_argument("--matrix", default=None,
                   help="the matrix YAML (method order, claims); default: the file the runs recorded, if it exists")
    p.add_argument("--readme", default=None,
                   help="also replace this README's block for the matrix "
                        "(<!-- results:<matrix>:begin --> ... :end -->), "
                        f"else its default {BEGIN} ... {END} block, with a results table")
    p.add_argument("--merge", action="append", default=[], metavar="RUNS_JSONL",
                   help="first append the cells this runs.jsonl finished and results_dir's has not (e.g. a GPU "
                        "slot's); cells both finished keep results_dir's record; repeatable")


def run(args):
    from .runs import merge_runs
    for source in args.merge:
        n = merge_runs(source, Path(args.results_dir) / "runs.jsonl")
        print(f"merged {source}: {n['added']} cells added, {n['same']} already here, "
              f"{n['kept']} also run here (this folder's record kept)")
    summary = write_report(args.results_dir, baseline=args.baseline, readme=args.readme, matrix_file=args.matrix)
    print(f"wrote {Path(args.results_dir) / 'report.md'} and {', '.join(PLOTS)} "
          f"({summary['n_ok']} runs, {len(summary['methods'])} methods)")
    return 0
