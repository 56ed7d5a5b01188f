"""Replay: run the searchers against a reward table (lookups instead of supernet evaluations), many seeds each.

A table is a CSV with one row per scheme: ``scheme`` (flat bits, "101110011"), ``top1`` (%), and optionally
``loss``, ``reward``. The reward is recomputed from ``top1`` with the study's alpha (so one table serves several
alphas). The ground-truth rank of a scheme is 1 + the number of schemes with a strictly higher reward.

For every searcher, budget (distinct evaluations) and seed the study records the rank and regret of each of the
three candidates (mode, best_sampled, best_of_n) and of the one the selection rule picks, then summarises per
(searcher, budget): median and quartile ranks, P(rank 1), P(rank <= 5), mean regret, mean distinct evaluations and
queries. ``synthetic_table`` makes the nearly additive table of ean_search.md §1.9 for tests and dry runs; a study
on it is labelled ``"synthetic": true`` in its JSON.
"""
import csv
import io
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from ..errors import AttnlabError
from ..files import atomic_write_text
from .reward import Reward
from .searchers import Oracle, all_schemes, make_searcher, run_search

REPLAY_SEARCHERS = ("random", "greedy", "reinforce", "reinforce-plain")


def read_table(path) -> dict[tuple, dict]:
    path = Path(path)
    if not path.is_file():
        raise AttnlabError(f"reward table '{path}' is a folder, not a CSV file" if path.is_dir() else
                           f"reward table '{path}' does not exist")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise AttnlabError(f"reward table '{path}' is not a CSV text file ({type(err).__name__})") from None
    if not rows or "scheme" not in rows[0] or "top1" not in rows[0]:
        raise AttnlabError(f"reward table '{path}' needs a header with 'scheme' and 'top1' columns")
    table = {}
    for line, row in enumerate(rows, 2):
        try:
            bits = tuple(int(c) for c in row["scheme"].replace("-", ""))
            rec = {k: float(v) for k, v in row.items() if k not in ("scheme", "blocks") and v != ""}
        except (ValueError, TypeError, AttributeError):
            rec, bits = None, ()
        if rec is None or not bits or set(bits) - {0, 1} or not math.isfinite(rec.get("top1", math.nan)):
            raise AttnlabError(f"reward table '{path}' line {line}: a scheme of 0/1 digits and a finite top1 "
                               f"expected, got {dict(row)}")
        if bits in table:
            raise AttnlabError(f"reward table '{path}' line {line}: scheme {row['scheme']} is listed twice")
        table[bits] = rec
    n = {len(b) for b in table}
    if len(n) != 1:
        raise AttnlabError(f"reward table '{path}' mixes schemes of lengths {sorted(n)}")
    return table


def write_table(path, table: dict[tuple, dict], depths=None) -> None:
    """Write rows sorted by scheme; ``blocks`` (the per-stage form) is added when ``depths`` is given."""
    from ..models.connections import bits_to_blocks
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for rec in table.values() for k in rec})
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["scheme"] + (["blocks"] if depths else []) + keys)
    for bits in sorted(table):
        rec = table[bits]
        w.writerow(["".join(map(str, bits))] + ([bits_to_blocks(bits, depths)] if depths else [])
                   + [_fmt(rec.get(k)) for k in keys])
    atomic_write_text(path, buf.getvalue(), "scheme table")


def _fmt(v):
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)


def synthetic_table(n_bits: int, seed: int = 0, stages: int = 3) -> dict[tuple, dict]:
    """A nearly additive accuracy table: 90 + per-block effects N(0, 0.4) + within-stage pair terms N(0, 0.1)
    + noise N(0, 0.1) (the construction of ean_search.md §1.9). SYNTHETIC: for tests and dry runs only."""
    rng = np.random.default_rng(seed)
    main = rng.normal(0, 0.4, n_bits)
    pair = np.triu(rng.normal(0, 0.1, (n_bits, n_bits)), 1)
    stage = np.arange(n_bits) * stages // n_bits
    pair *= stage[:, None] == stage[None, :]
    table = {}
    for bits in all_schemes(n_bits):
        b = np.array(bits, dtype=float)
        table[tuple(bits)] = {"top1": float(90 + main @ b + b @ pair @ b + rng.normal(0, 0.1))}
    return table


def ranks(rewards: dict[tuple, float]) -> dict[tuple, int]:
    values = np.sort(np.array(list(rewards.values())))[::-1]
    return {bits: int(np.searchsorted(-values, -r, side="left")) + 1 for bits, r in rewards.items()}


def replay_study(table: dict[tuple, dict], budgets=(30, 100, 300, 900), seeds: int = 100,
                 searchers=REPLAY_SEARCHERS, alpha: float = 2.0, select: str = "best_sampled",
                 derive_samples: int = 20, synthetic: bool = False, progress=None) -> dict:
    reward = Reward(alpha=alpha)
    n_bits = len(next(iter(table)))
    rewards = {bits: reward(bits, rec["top1"]) for bits, rec in table.items()}
    rank_of = ranks(rewards)
    best = max(rewards.values())
    order = sorted(rewards, key=lambda b: -rewards[b])
    runs, summary = [], []
    for name in searchers:
        for budget in budgets:
            t0 = time.perf_counter()
            cell = []
            for seed in range(seeds):
                oracle = Oracle(lambda bits: {"top1": table[bits]["top1"], "reward": rewards[bits]}, budget=budget)
                out = run_search(make_searcher(name), oracle, n_bits, seed, select, derive_samples)
                rec = {"searcher": name, "budget": budget, "seed": seed, "distinct": out.distinct_evaluations,
                       "queries": out.queries, "derive_evaluations": out.derive_evaluations}
                for cname, cand in out.candidates.items():
                    bits = tuple(int(c) for c in cand["scheme"])
                    rec[f"{cname}_rank"], rec[f"{cname}_regret"] = rank_of[bits], best - rewards[bits]
                rec["chosen_rank"] = rank_of[tuple(int(c) for c in out.chosen)]
                cell.append(rec)
                if progress:
                    progress(name, budget, seed)
            runs.extend(cell)
            summary.append(_summarise(name, budget, cell, time.perf_counter() - t0))
    return {"synthetic": synthetic, "n_bits": n_bits, "schemes": len(table), "alpha": alpha, "select": select,
            "derive_samples": derive_samples, "seeds": seeds, "budgets": list(budgets),
            "budget_unit": "distinct evaluations", "best_scheme": "".join(map(str, order[0])),
            "best_reward": best, "reward_range": [min(rewards.values()), best],
            "summary": summary, "runs": runs}


def _summarise(name, budget, cell, seconds) -> dict:
    out = {"searcher": name, "budget": budget, "runs": len(cell), "seconds": round(seconds, 2),
           "mean_distinct": statistics.fmean(r["distinct"] for r in cell),
           "mean_queries": statistics.fmean(r["queries"] for r in cell)}
    for cname in ("mode", "best_sampled", "best_of_n", "chosen"):
        rk = sorted(r[f"{cname}_rank"] for r in cell)
        q1, med, q3 = (float(np.percentile(rk, q)) for q in (25, 50, 75))
        out[cname] = {"median_rank": med, "q1_rank": q1, "q3_rank": q3, "p_rank1": _share(rk, 1),
                      "p_top5": _share(rk, 5), "worst_rank": rk[-1]}
        if cname != "chosen":
            out[cname]["mean_regret"] = statistics.fmean(r[f"{cname}_regret"] for r in cell)
    return out


def _share(ranks_sorted, k):
    return sum(1 for r in ranks_sorted if r <= k) / len(ranks_sorted)


def write_json(path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, default=_default) + "\n", "search results")


def _default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(type(o).__name__)
