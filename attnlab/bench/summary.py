"""A benchmark matrix's results as one summary: what report.md, the README block and the plots show.

``summarize(results_dir)`` reads results/<matrix>/runs.jsonl (the last record of each cell) and latency.json, and
gives a :class:`MatrixSummary`: per method (:class:`MethodSummary`) the seeds, val and test top-1, the comparison
with the baseline (bench/claims.py: Welch and pooled-SD intervals, MDE, Holm-adjusted verdicts), params, FLOPs,
latency and the mean validation curve. Cells trained at different precisions are refused: a report compares methods.
The comparisons themselves stay claims.py's dicts (it alone words the verdicts).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AttnlabError, unknown
from .claims import compare, judge_family
from .runs import precision_of
from .stats import isnan, mean_std, pooled_sd, welch_interval


@dataclass
class MethodSummary:
    """One method's finished cells. ``val``, ``test``, ``test5``: (mean, sample std, n) over seeds; ``*_values``:
    per finished seed in seed order (None where a run recorded none); ``latency``: its latency.json entry."""
    name: str
    n: int
    seeds: list[int]
    failed: int
    val: tuple
    test: tuple
    test5: tuple
    val_values: list
    test_values: list
    test_by_seed: dict
    params: int | None
    flops: int | None
    train_ips: float
    wall_time_s: float
    latency: dict
    curve: list[float] | None
    best_epochs: list[int]
    val_minus_test: list[float]
    # Against the baseline (None for the baseline itself, a method without runs, or no baseline run):
    delta_val: dict | None = None    # Welch interval of val top-1
    delta_test: dict | None = None   # Welch interval of test top-1 (vs_base's)
    paired_test: dict | None = None  # paired-by-seed interval of test top-1 (vs_base's)
    vs_base: dict | None = None      # claims.compare + judge_family: intervals, MDE, Holm p, verdict


@dataclass
class Setup:
    """What ran, as recorded in runs.jsonl: recipe, overrides shared by every run and each method's own."""
    recipe: str | None
    shared: dict
    methods: dict
    seeds: list
    threads: list
    workers: list
    runs_roots: list = field(default_factory=list)  # relative --runs-root folders the cells trained under


@dataclass
class MatrixSummary:
    matrix: str
    matrix_file: str | None
    matrix_given: bool
    matrix_spec: dict | None       # the loaded matrix (method order, claims, description), when its file loads
    results_dir: str
    setup: Setup | None
    pooled: tuple                  # (pooled SD of test top-1 over every method, its degrees of freedom)
    precisions: list[str]
    baseline: str | None           # None when the baseline has no run
    methods: list[MethodSummary]
    failed: list[dict]             # the failed cells' records
    n_ok: int
    n_failed: int
    devices: list[str]
    host: dict
    cpu_kernels: dict
    latency_host: dict
    latency_note: str | None
    latency_machines: dict = field(default_factory=dict)
    epochs: int | None = None
    git_commits: list[str] = field(default_factory=list)
    baseline_asked: str = "none"   # the method asked for as the baseline (``baseline`` is None until it has a run)


def load_results(results_dir):
    """(records: last line per (method, seed), all lines, latency dict) of a results/<matrix>/ folder."""
    from ..jsonl import read_jsonl
    from .latency import read_latency
    from .runs import check_records, latest_by_cell

    results_dir = Path(results_dir)
    runs_path = results_dir / "runs.jsonl"
    if not runs_path.is_file():
        if results_dir.is_file():
            raise AttnlabError(f"'{results_dir}' is a file: give the results/<matrix>/ folder that holds runs.jsonl")
        if not results_dir.is_dir():
            raise AttnlabError(f"results folder '{results_dir}' does not exist")
        raise AttnlabError(f"no runs.jsonl in {results_dir}: run `attnlab bench --matrix ...` first")
    lines = check_records(read_jsonl(runs_path), runs_path)
    if not lines:
        raise AttnlabError(f"{runs_path} holds no runs yet")
    return list(latest_by_cell(lines).values()), lines, read_latency(results_dir / "latency.json")


def record_curve(record):
    """val top-1 per epoch: the copy runs.jsonl keeps with the record, else (older records) the run dir's
    metrics.csv. The record first: the folder it names may hold another run of that cell by now (a cell merged
    from a GPU slot, retrained here since)."""
    from ..engine.run_folder import RunFolder

    curve = record.get("val_curve")
    if curve:
        return [float("nan") if v is None else float(v) for v in curve]
    return RunFolder(record["run_dir"]).curve() if record.get("run_dir") else None


def summarize(results_dir, baseline="none", matrix_file=None) -> MatrixSummary:
    """Everything report.md and the README block show.

    ``matrix_file``: the matrix (method order, claims, description); default the file its runs recorded, used
    when it still exists there (a generated matrix under a git-ignored runs/ may not).
    """
    results_dir = Path(results_dir)
    records, lines, latency = load_results(results_dir)
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    recorded_name = next((r["matrix"] for r in records if r.get("matrix")), None)
    given = matrix_file is not None
    matrix_file, matrix = _matrix(records, recorded_name, results_dir, matrix_file)
    order = _method_order(matrix, lines)
    methods = _methods(order, ok, failed, latency.get("methods", {}))
    _refuse_mixed_precision(ok)
    if baseline != "none" and baseline not in order and all(m.name != baseline for m in methods):  # a typo
        raise unknown("baseline method", baseline, [m.name for m in methods])
    pooled = pooled_sd([m.test_values for m in methods])
    base = _against_baseline(methods, baseline, pooled)
    devices = sorted({str(d) for r in ok for d in (r.get("epochs_by_device") or [r.get("device")]) if d})
    hosts = [r["host"] for r in ok if r.get("host")] or [r["host"] for r in records if r.get("host")]
    return MatrixSummary(
        matrix=recorded_name or results_dir.name, matrix_file=matrix_file, matrix_given=given, matrix_spec=matrix,
        results_dir=str(results_dir), setup=_setup(records, order), pooled=pooled,
        precisions=sorted({precision_of(r) for r in ok}), baseline=baseline if base is not None else None,
        baseline_asked=baseline,
        methods=methods, failed=failed, n_ok=len(ok), n_failed=len(failed), devices=devices,
        host=hosts[-1] if hosts else {},
        cpu_kernels=dict(Counter((r.get("host") or {}).get("cpu_kernels", "not recorded") for r in ok)),
        latency_host=latency.get("host", {}), latency_note=latency.get("note"),
        latency_machines=_latency_machines(latency), epochs=_first(ok, "epochs"),
        git_commits=sorted({r.get("git_commit") for r in ok if r.get("git_commit")}))


def _matrix(records, recorded_name, results_dir, matrix_file):
    """(the matrix file used, its loaded matrix or None): the given file, else the one the runs recorded."""
    from .matrix import load_matrix

    if matrix_file is not None:
        matrix_file = str(matrix_file)
        given_name = load_matrix(matrix_file)["name"]  # a given file must load: its errors are the user's to see
        if recorded_name and given_name != recorded_name:
            raise AttnlabError(f"--matrix {matrix_file} is matrix '{given_name}' but the runs in {results_dir} are "
                               f"matrix '{recorded_name}': give that matrix's file (or none, to use the recorded one)")
    else:
        matrix_file = next((r["matrix_file"] for r in records if r.get("matrix_file")), None)
    if not (matrix_file and Path(matrix_file).is_file()):
        return matrix_file, None
    try:
        return matrix_file, load_matrix(matrix_file)
    except AttnlabError:
        return matrix_file, None


def _method_order(matrix, lines) -> list:
    """The matrix file's method order, then any others in the order they were first recorded."""
    order = [m["name"] for m in matrix["methods"]] if matrix else []
    for r in lines:
        if r.get("method") not in order:
            order.append(r.get("method"))
    return order


def _methods(order, ok, failed, lat_methods) -> list[MethodSummary]:
    out = []
    for name in order:
        runs = sorted((r for r in ok if r["method"] == name), key=lambda r: r["seed"])
        fails = [r for r in failed if r["method"] == name]
        if runs or fails:
            out.append(_method(name, runs, len(fails), lat_methods.get(name, {})))
    return out


def _method(name, runs, failed, latency) -> MethodSummary:
    curves = [c for c in (record_curve(r) for r in runs) if c]
    return MethodSummary(
        name=name, n=len(runs), seeds=[r["seed"] for r in runs], failed=failed,
        val=mean_std([r.get("val_top1") for r in runs]), test=mean_std([r.get("test_top1") for r in runs]),
        test5=mean_std([r.get("test_top5") for r in runs]),
        val_values=[r.get("val_top1") for r in runs], test_values=[r.get("test_top1") for r in runs],
        test_by_seed={r["seed"]: r.get("test_top1") for r in runs if r.get("test_top1") is not None},
        params=_first(runs, "params"), flops=_first(runs, "flops"),
        train_ips=mean_std([r.get("train_images_per_s") for r in runs])[0],
        wall_time_s=mean_std([r.get("wall_time_s") for r in runs])[0], latency=latency,
        curve=_mean_curve(curves), best_epochs=[c.index(max(c)) + 1 for c in curves if not any(isnan(v) for v in c)],
        val_minus_test=[r["val_top1"] - r["test_top1"] for r in runs
                        if r.get("val_top1") is not None and r.get("test_top1") is not None])


def _against_baseline(methods, baseline, pooled) -> MethodSummary | None:
    """Compare every method that has runs with the baseline (in place), judged as one Holm family; returns the
    baseline's summary (None when it has none)."""
    base = next((m for m in methods if m.name == baseline), None)
    family = []
    for m in methods:
        if base is None or m is base or m.n == 0:
            continue
        m.delta_val = welch_interval(m.val_values, base.val_values)
        m.vs_base = {**compare(m, base, pooled), "kind": "better"}
        m.delta_test, m.paired_test = m.vs_base["welch"], m.vs_base["paired"]
        family.append(m.vs_base)
    judge_family(family)
    return base


def _latency_machines(latency) -> dict:
    """{'cpu': [machine, ...], 'cuda': [...]}: the machines latency.json's entries say they were timed on."""
    entries = [e for e in latency.get("methods", {}).values() if isinstance(e, dict)]
    return {dev: sorted({e[dev]["machine"] for e in entries if isinstance(e.get(dev), dict) and e[dev].get("machine")})
            for dev in ("cpu", "cuda")}


def _setup(records, order) -> Setup | None:
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
    return Setup(recipe=with_ov[0].get("recipe"), shared={k: format_value(v) for k, v in shared.items()},
                 methods=methods, seeds=sorted({r["seed"] for r in records}),
                 threads=sorted({r.get("threads") or (r.get("host") or {}).get("torch_threads") for r in records}
                                - {None}),
                 workers=sorted({r.get("workers", 1) for r in records if r.get("status") == "ok"}),
                 # runs/<matrix>/<cell> -> runs; an absolute one (another machine's, e.g. a GPU slot's) says nothing
                 runs_roots=sorted({str(Path(r["run_dir"]).parents[1]) for r in records if r.get("status") == "ok"
                                    and len(Path(r.get("run_dir") or "/").parts) >= 3
                                    and not Path(r["run_dir"]).is_absolute()}))


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


def latency_ms(m: MethodSummary, device, bs=None):
    """A method's latency entry for ``device``: {batch: timing} or, with ``bs``, that batch's median ms."""
    entry = m.latency.get(device)
    if not entry:
        return None
    batches = entry.get("batch", {})
    if bs is None:
        return batches
    return batches.get(str(bs), {}).get("median_ms")


def batch_sizes(summary: MatrixSummary, device) -> list[int]:
    """Every batch size latency.json timed on ``device`` for any method of the summary."""
    sizes = []
    for m in summary.methods:
        for bs in (latency_ms(m, device) or {}):
            if int(bs) not in sizes:
                sizes.append(int(bs))
    return sorted(sizes)
