"""Verdicts on the papers' claims listed in a matrix (``claims:``), from the matrix's own test accuracies.

A claim compares a method with a baseline on test top-1 over the seeds both have:

- ``kind: better`` (default): *holds* when the whole 95% Welch interval of (method - baseline) is above 0,
  *reversed* when it is entirely below 0, otherwise *not shown at this scale*.
- ``kind: match`` (e.g. EAN: the searched scheme keeps full sharing's accuracy): *holds* when the whole interval
  lies within +-margin points, *reversed* when it is entirely below -margin, otherwise *not shown at this scale*.

The verdict uses Welch's interval (no assumption that seeds pair up); the paired-by-seed interval is shown beside
it, since each seed draws the same validation hold-out for every method. The latency ratio (method / baseline,
CPU, the smallest batch timed) goes with claims about inference cost.
"""
from .stats import isnan, paired_interval, welch_interval

MIN_SEEDS = 2


def judge(claim: dict, methods: dict) -> dict:
    """One claim's row: ours (diff, Welch and paired intervals, n), latency ratio, verdict."""
    m, b = methods.get(claim["method"]), methods.get(claim["baseline"])
    n = min(m["n"] if m else 0, b["n"] if b else 0)
    row = {**claim, "n": n, "welch": None, "paired": None, "latency_ratio": _latency_ratio(m, b)}
    if n < MIN_SEEDS:
        row["verdict"] = f"not run yet ({n} seed{'s' if n != 1 else ''} of both)"
        return row
    row["welch"] = welch_interval(m["test_values"], b["test_values"])
    row["paired"] = paired_interval(m["test_by_seed"], b["test_by_seed"])
    row["verdict"] = verdict(row["welch"], claim["kind"], claim["margin"])
    return row


def verdict(interval: dict, kind: str = "better", margin: float = 0.0) -> str:
    low, high = interval["low"], interval["high"]
    if isnan(low) or isnan(high):
        return "not shown at this scale"
    if kind == "match":
        if low >= -margin and high <= margin:
            return "holds"
        return "reversed" if high < -margin else "not shown at this scale"
    if low > 0:
        return "holds"
    return "reversed" if high < 0 else "not shown at this scale"


def _latency_ratio(m, b):
    if not m or not b:
        return None
    cm, cb = (m.get("latency") or {}).get("cpu"), (b.get("latency") or {}).get("cpu")
    if not cm or not cb:
        return None
    common = sorted(set(cm.get("batch", {})) & set(cb.get("batch", {})), key=int)
    if not common:
        return None
    bs = common[0]
    return cm["batch"][bs]["median_ms"] / cb["batch"][bs]["median_ms"]


def judge_all(summary) -> list[dict]:
    claims = (summary.get("matrix_spec") or {}).get("claims") or []
    by_name = {m["name"]: m for m in summary["methods"]}
    return [judge(c, by_name) for c in claims]


def _ci(d):
    if d is None or isnan(d["low"]):
        return "—"
    return f"[{d['low']:+.2f}, {d['high']:+.2f}]"


def claims_table(rows) -> list[str]:
    """Markdown lines of the claims table (empty when the matrix lists no claims)."""
    if not rows:
        return []
    out = ["| claim | source | paper's figure | ours: Δ test top-1 (n seeds) | paired 95% CI | Welch 95% CI "
           "| latency ratio | verdict |",
           "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        diff = "—" if r["welch"] is None else f"{r['welch']['diff']:+.2f} ({r['n']})"
        lat = "n/a" if r["latency_ratio"] is None else f"{r['latency_ratio']:.2f}"
        what = r["claim"] + (f" (match within ±{r['margin']:g})" if r["kind"] == "match" else "")
        out.append(f"| {what} | {r['source'] or '—'} | {r['paper'] or '—'} | {diff} | {_ci(r['paired'])} "
                   f"| {_ci(r['welch'])} | {lat} | **{r['verdict']}** |")
    return out
