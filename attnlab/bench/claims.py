"""Comparisons and verdicts: a method against a baseline on test top-1, and the papers' claims a matrix lists.

Every comparison of a method with a baseline over the seeds both have shows (``compare``):

- the difference of the means, with a 95% Welch interval from the two methods' own SDs and a 95% Student interval
  from the matrix's pooled SD (every method's seeds pooled: an SD resting on 3 values can be far too small or
  large), and the paired-by-seed interval;
- the minimum detectable effect (MDE): the true difference this comparison would detect with 80% power at
  two-sided 5%, from the pooled SD and the two seed counts (stats.mde);
- a p-value: the larger of Welch's and the pooled test's, so a verdict needs both.

The comparisons of one table form a family: their p-values are Holm-adjusted (``judge_family``) before a verdict.

- ``kind: better`` (default): *holds* when the adjusted p < 0.05 and the method is ahead, *reversed* when
  adjusted p < 0.05 and it is behind, otherwise *no difference of X points or more detected* (X = the MDE), or
  *inconclusive* when the observed difference is at least the MDE but not significant after adjustment.
- ``kind: match`` (e.g. EAN: the searched scheme keeps full sharing's accuracy within a margin): *holds* when
  the equivalence test (two one-sided tests against +-margin) has adjusted p < 0.05, *reversed* when the test that
  the method is worse by more than the margin has, otherwise *equivalence within +-margin not shown*.
- ``latency: lower`` on a claim adds its inference-time part: the CPU latency ratio (method / baseline, smallest
  batch timed) with a 95% interval over the timing rounds; *lower* only when the whole interval is below 1.
"""
from dataclasses import dataclass

from .stats import (holm, isnan, mde, p_above, p_below, p_two_sided, paired_interval, pooled_interval,
                    ratio_interval, welch_interval)

MIN_SEEDS = 2
ALPHA = 0.05


@dataclass
class Sample:
    """What ``compare`` reads of a method: its seed count and test values (summary.MethodSummary has the same)."""
    n: int
    test_values: list
    test_by_seed: dict


def compare(m: Sample, b: Sample, pooled: tuple) -> dict:
    """The statistics of method ``m`` against ``b`` (module docstring): each a :class:`Sample` or a
    summary.MethodSummary; ``pooled`` = (sd, df)."""
    sd, df = pooled
    welch = welch_interval(m.test_values, b.test_values)
    pool = pooled_interval(m.test_values, b.test_values, sd, df)
    return {"n": min(m.n, b.n), "n_method": m.n, "n_baseline": b.n, "diff": welch["diff"],
            "welch": welch, "pooled": pool, "paired": paired_interval(m.test_by_seed, b.test_by_seed),
            "mde": mde(sd, m.n, b.n, df), "pooled_sd": sd, "pooled_df": df}


def _p_better(c: dict) -> tuple[float, str]:
    """(p, which way) of a 'better' comparison: the larger of Welch's and the pooled two-sided p."""
    p = max(p_two_sided(c["welch"]), p_two_sided(c["pooled"]))
    return p, "ahead" if c["diff"] > 0 else "behind"


def _p_match(c: dict, margin: float) -> tuple[float, str]:
    """(p, which way) of a 'match' comparison: the equivalence test or the worse-than-margin test, whichever is
    smaller (each the larger over Welch and pooled)."""
    intervals = (c["welch"], c["pooled"])
    p_equiv = max(max(p_above(iv, -margin), p_below(iv, margin)) for iv in intervals)
    p_worse = max(p_below(iv, -margin) for iv in intervals)
    if isnan(p_equiv) or isnan(p_worse):
        return float("nan"), "equivalent"
    return (p_equiv, "equivalent") if p_equiv <= p_worse else (p_worse, "worse")


def judge_family(comparisons: list[dict]) -> list[dict]:
    """Holm-adjust the family's p-values and add ``p``, ``p_holm`` and ``verdict`` to each comparison (in place).

    Each item is a ``compare`` dict plus ``kind`` and ``margin``; an item without enough seeds has ``p`` nan and a
    'not run yet' verdict, and stays out of the family.
    """
    for c in comparisons:
        if c.get("n", 0) < MIN_SEEDS:
            c["p"], c["direction"] = float("nan"), None
            continue
        c["p"], c["direction"] = (_p_match(c, c["margin"]) if c.get("kind") == "match" else _p_better(c))
    for c, adjusted in zip(comparisons, holm([c["p"] for c in comparisons])):
        c["p_holm"] = adjusted
        c["verdict"] = verdict(c)
    return comparisons


def verdict(c: dict) -> str:
    """The words for one judged comparison (module docstring)."""
    if c.get("n", 0) < MIN_SEEDS:
        return f"not run yet (needs {MIN_SEEDS} seeds of both, has {c.get('n', 0)})"
    detect = f"no difference of {c['mde']:.1f} points or more detected" if not isnan(c["mde"]) else \
        "no difference detected (no pooled SD)"
    significant = not isnan(c["p_holm"]) and c["p_holm"] < ALPHA
    if c.get("kind") == "match":
        if significant:
            return "holds" if c["direction"] == "equivalent" else "reversed"
        return f"equivalence within ±{c['margin']:g} not shown (Holm p = {c['p_holm']:.2f})"
    if significant:
        return "holds" if c["direction"] == "ahead" else "reversed"
    if not isnan(c["mde"]) and abs(c["diff"]) >= c["mde"]:  # a large observed gap that the family's tests reject
        return f"inconclusive: |Δ| is above the MDE of {c['mde']:.1f} points but Holm p = {c['p_holm']:.2f}"
    return detect


def against_baseline(c: dict, baseline: str) -> str:
    """The sentence for one method judged against the baseline (a ``judge_family`` item of kind 'better')."""
    if c["verdict"] == "holds":
        return f"beats {baseline} (Holm p {c['p_holm']:.3f})"
    if c["verdict"] == "reversed":
        return f"worse than {baseline} (Holm p {c['p_holm']:.3f})"
    return c["verdict"]


def verdict_groups(methods: list, baseline: str) -> list[str]:
    """One line per verdict over the methods compared with the baseline (summary.MethodSummary, each holding its
    judged ``vs_base``)."""
    groups = {}
    for m in methods:
        key = {"holds": "beats", "reversed": "worse than"}.get(m.vs_base["verdict"], m.vs_base["verdict"])
        groups.setdefault(key, []).append(m.name)
    lines = []
    for key, names in groups.items():
        if key in ("beats", "worse than"):
            lines.append(f"{key.capitalize()} `{baseline}` at Holm-adjusted p < 0.05: {', '.join(names)}.")
        elif key.startswith("not run yet"):
            lines.append(f"No interval yet (fewer than 2 seeds of it or of `{baseline}`): {', '.join(names)}.")
        else:
            lines.append(f"Against `{baseline}`, {key}: {', '.join(names)}.")
    return lines


def latency_ratio(m: dict | None, b: dict | None) -> dict | None:
    """Method / baseline CPU latency at the smallest batch both have (``m``, ``b``: their latency.json entries):
    the geometric mean over timing rounds of the per-round median ratio (paired by round) with its 95% interval;
    for entries timed before rounds were kept, the ratio of the overall medians and no interval."""
    if not m or not b:
        return None
    cm, cb = m.get("cpu"), b.get("cpu")
    if not cm or not cb:
        return None
    common = sorted(set(cm.get("batch", {})) & set(cb.get("batch", {})), key=int)
    if not common:
        return None
    em, eb = cm["batch"][common[0]], cb["batch"][common[0]]
    out = ratio_interval(em.get("round_medians_ms") or [], eb.get("round_medians_ms") or [])
    if out["n"] < 2:  # no rounds kept: the ratio of the medians over every call, without an interval
        out["ratio"] = em["median_ms"] / eb["median_ms"]
    out["batch"] = int(common[0])
    return out


def latency_verdict(r: dict | None) -> str:
    if r is None:
        return "not timed"
    if isnan(r["low"]):
        return "no interval (timed before per-round medians were kept: time it again)"
    if r["high"] < 1:
        return "lower"
    return "higher" if r["low"] > 1 else "no difference shown"


def judge_all(summary) -> list[dict]:
    """The matrix's claims (``summary``: a summary.MatrixSummary), judged as one Holm family."""
    claims = (summary.matrix_spec or {}).get("claims") or []
    by_name = {m.name: m for m in summary.methods}
    rows = []
    for claim in claims:
        m, b = by_name.get(claim["method"]), by_name.get(claim["baseline"])
        row = {**claim, "n": 0, "welch": None}
        if m and b:
            row.update(compare(m, b, summary.pooled))
        row["latency"] = latency_ratio(m and m.latency, b and b.latency)
        rows.append(row)
    return judge_family(rows)


def format_ci(d) -> str:
    """'[-0.50, +0.23]', or '—' without an interval (one home for the tables of report.py and this module)."""
    if d is None or isnan(d["low"]):
        return "—"
    return f"[{d['low']:+.2f}, {d['high']:+.2f}]"


def _lat(r):
    if r is None:
        return "n/a"
    if isnan(r["low"]):
        return f"{r['ratio']:.2f}"
    return f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"


def format_p(v) -> str:
    return "—" if v is None or isnan(v) else (f"{v:.3f}" if v >= 0.001 else "<0.001")


def claim_verdict(r: dict) -> str:
    """The accuracy verdict, and for a claim about inference time (``latency: lower``) the latency part too."""
    if r.get("latency_claim") != "lower":
        return r["verdict"]
    return f"{r['verdict']}; latency: {latency_verdict(r['latency'])}"


def claims_table(rows) -> list[str]:
    """Markdown lines of the claims table (empty when the matrix lists no claims)."""
    if not rows:
        return []
    out = ["| claim | source | paper's figure | ours: Δ test top-1 (n, n) | Welch 95% CI (own SDs) "
           "| pooled-SD 95% CI | MDE | Holm p | latency ratio [95% CI] | verdict |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        diff = "—" if r["welch"] is None else f"{r['diff']:+.2f} ({r['n_method']}, {r['n_baseline']})"
        what = r["claim"] + (f" (match within ±{r['margin']:g})" if r["kind"] == "match" else "")
        mde_cell = "—" if r["welch"] is None or isnan(r["mde"]) else f"{r['mde']:.2f}"
        out.append(f"| {what} | {r['source'] or '—'} | {r['paper'] or '—'} | {diff} | {format_ci(r['welch'])} "
                   f"| {format_ci(r.get('pooled'))} | {mde_cell} | {format_p(r.get('p_holm'))} | {_lat(r['latency'])} "
                   f"| **{claim_verdict(r)}** |")
    return out


CLAIMS_NOTE = ("Ours: difference of mean test top-1 (points), method minus baseline, with each one's seed count. "
               "Intervals at 95%: Welch's from the two methods' own SDs, Student's from the SD pooled over every "
               "method of the matrix. MDE: the true difference these seeds would detect with 80% power at two-sided "
               "5% (pooled SD). Holm p: the larger of the Welch and pooled p-values, Holm-adjusted over this table. "
               "Verdict: *holds* or *reversed* when Holm p < 0.05, else *no difference of X points or more "
               "detected* (X = the MDE; smaller true differences may exist). For a match claim the test is "
               "equivalence within ± the margin. Latency ratio: method over baseline, CPU, smallest batch timed, "
               "with a 95% interval over the timing rounds; a latency verdict needs that interval to exclude 1. "
               "The paper's figure is from its own setting (usually ImageNet or a long CIFAR schedule), so it says "
               "which way the claim points, not what this matrix should reach.")
