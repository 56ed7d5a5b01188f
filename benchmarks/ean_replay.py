"""Replay the searchers against a reward table: rank of each searcher's pick over many seeds and budgets.

    .venv/bin/python benchmarks/ean_replay.py --table results/ean/table_resnet20_se.csv --out results/ean/replay.json
    .venv/bin/python benchmarks/ean_replay.py --synthetic 9 --out results/ean/replay_synthetic_9bit.json

``--synthetic N`` replays on the nearly additive synthetic table of attnlab.search.replay.synthetic_table (the JSON
says ``"synthetic": true``): a check of the searchers, not a result about any network. Budgets count distinct
evaluations (see attnlab/search/searchers.py).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnlab.search.replay import REPLAY_SEARCHERS, read_table, replay_study, synthetic_table, write_json


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--table", help="CSV with scheme and top1 columns (search/table.csv of a search run)")
    src.add_argument("--synthetic", type=int, metavar="N_BITS", help="a synthetic table of N_BITS blocks")
    p.add_argument("--table-seed", type=int, default=0, help="seed of the synthetic table")
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--budgets", default="30,100,300,900")
    p.add_argument("--searchers", default=",".join(REPLAY_SEARCHERS))
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--select", default="best_sampled")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    table = synthetic_table(a.synthetic, a.table_seed) if a.synthetic else read_table(a.table)
    t0 = time.perf_counter()
    last = [0.0]

    def progress(name, budget, seed):
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"{name} budget {budget} seed {seed} ({time.perf_counter() - t0:.0f} s)", flush=True)

    study = replay_study(table, budgets=tuple(int(b) for b in a.budgets.split(",")), seeds=a.seeds,
                         searchers=tuple(a.searchers.split(",")), alpha=a.alpha, select=a.select,
                         synthetic=bool(a.synthetic), progress=progress)
    study["table"] = f"synthetic({a.synthetic} bits, seed {a.table_seed})" if a.synthetic else a.table
    study["command"] = " ".join(["benchmarks/ean_replay.py", *(argv if argv is not None else sys.argv[1:])])
    study["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(a.out, study)
    for s in study["summary"]:
        c = s["chosen"]
        print(f"{s['searcher']:>16} budget {s['budget']:>4}: chosen median rank {c['median_rank']:.0f} "
              f"(IQR {c['q1_rank']:.0f}-{c['q3_rank']:.0f}), P(rank 1) {c['p_rank1']:.2f}, P(top 5) {c['p_top5']:.2f}, "
              f"distinct {s['mean_distinct']:.0f}, queries {s['mean_queries']:.0f}")
    print(f"wrote {a.out} in {study['seconds']} s")


if __name__ == "__main__":
    main()
