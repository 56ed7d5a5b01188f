"""Per-block latency table of a shared-attention supernet for the search reward's optional latency term.

    .venv/bin/python benchmarks/ean_latency.py --model resnet20 --attention se --batch-size 1 \
        --out results/ean/latency_table_resnet20_se_cpu_bs1.json

T(m) = base + sum_b m_b x delta_b: ``base`` is the no-block mask, ``delta_b`` the single-block mask's time minus
base. All masks (none, all, each single block, and ``--check`` random masks for validating the additive model) are
timed round-robin in ``--rounds`` passes so load drifts hit every mask alike; each time is the median over rounds
of the per-round medians. The JSON holds the table (``base_ms``, ``delta_ms``: the format
``attnlab.search.reward.LatencyTable`` reads) plus the additive model's R^2 and largest relative error on the
random masks. A 2-core shared CPU is noisy: read ``max_rel_error`` before trusting the table.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnlab.files import atomic_write_json
from attnlab.models import create_model
from attnlab.models.connections import bits_to_blocks, set_connections
from attnlab.measure import measure_latency


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--attention", default="se")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20, help="timed passes per mask per round")
    p.add_argument("--check", type=int, default=20, help="random masks to validate the additive model")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = create_model(a.model, attention=a.attention, share=True, blocks="all").eval()
    depths, n = model.depths, sum(model.depths)
    g = torch.Generator().manual_seed(0)
    singles = [tuple(int(i == b) for i in range(n)) for b in range(n)]
    checks = [tuple(int(v) for v in (torch.rand(n, generator=g) < 0.5).tolist()) for _ in range(a.check)]
    masks = [(0,) * n, (1,) * n, *singles, *checks]
    per_round = {m: [] for m in masks}
    t0 = time.perf_counter()
    for r in range(a.rounds):
        for m in masks:
            set_connections(model, bits_to_blocks(m, depths))
            res = measure_latency(model, 32, a.batch_size, warmup=3 if r == 0 else 1, repeats=a.repeats)
            per_round[m].append(res["median_ms"])
    t = {m: statistics.median(v) for m, v in per_round.items()}
    base = t[(0,) * n]
    delta = [t[s] - base for s in singles]
    pred = {m: base + sum(d for b, d in zip(m, delta) if b) for m in checks + [(1,) * n]}
    obs = [t[m] for m in pred]
    mean = statistics.fmean(obs)
    ss_res = sum((t[m] - pred[m]) ** 2 for m in pred)
    ss_tot = sum((o - mean) ** 2 for o in obs)
    out = {"base_ms": base, "delta_ms": delta, "meta": {
        "model": a.model, "attention": a.attention, "share": True, "batch_size": a.batch_size, "rounds": a.rounds,
        "repeats": a.repeats, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "all_ms": t[(1,) * n], "all_predicted_ms": pred[(1,) * n],
        "r2_random_masks": 1 - ss_res / ss_tot if ss_tot else None,
        "max_rel_error": max(abs(t[m] - pred[m]) / t[m] for m in pred),
        "seconds": round(time.perf_counter() - t0, 1), "command": "benchmarks/ean_latency.py " + " ".join(
            argv if argv is not None else sys.argv[1:])}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, out, "latency table")
    print(f"base {base:.3f} ms, all {t[(1,) * n]:.3f} ms (additive {pred[(1,) * n]:.3f}), deltas "
          f"{', '.join(f'{d:.3f}' for d in delta)}; R^2 {out['meta']['r2_random_masks']}, max rel error "
          f"{out['meta']['max_rel_error']:.3f} -> {a.out}")


if __name__ == "__main__":
    main()
