"""EAN proof runs on ResNet-20 / CIFAR-10 (issue 12), in resumable phases. Each phase skips what is already done.

    .venv/bin/python benchmarks/ean_resnet20.py PHASE [PHASE ...] [--tiny] [--runs runs] [--results results/ean]

Phases, in order (docs/ean.md lists the CPU time of each):
  supernet    `attnlab search --config configs/search/ean_resnet20_se.yaml --phases supernet,search`: the shared-SE
              supernet (15 epochs), then all 512 schemes evaluated (search/table.csv) and the REINFORCE search
              (EAN preset) on that cache
  recal       the 512-scheme table again with SPOS-style BN recalibration (20 batches of 128), search-recal20/
  replay      every searcher replayed against each table, 100 seeds, budgets 30/100/300/900 distinct evaluations
              -> results/ean/replay.json (+ replay_recal20.json); the tables are copied to results/ean/
  search      when a search folder has no result.json (runs/ was lost with the live search's folder), the same
              search (EAN preset, seed 0, best_sampled) re-run on the committed table with `attnlab search
              --table`: the live search read every scheme from the evaluation cache that built the table, so the
              lookups give it the same rewards
  standalone  8 schemes spread over the supernet's reward range trained as standalone models (short recipe, one
              seed; the middle one with 3 seeds for the seed SD) -> Kendall tau with their supernet accuracy
  retrain     the searched scheme vs controls, 3 seeds, the 20-epoch recipe of the cifar10_resnet20 evidence
              matrix: none, per-block se, shared se on all blocks, ean-se (searched), and 3 random schemes with
              the searched scheme's number of connections; latency round-robin by `attnlab bench`
  report      results/ean/summary.json and plots (reward histogram with each searcher's pick, controller curve,
              connection probability per block)
  save        copy the supernet run's small files (its 2.2 MB checkpoint_last.pt included) and each search folder
              but its table (evaluation cache, plan, search log, result) to results/ean/resnet20_se/, the tables to
              results/ean/table_resnet20_se*.csv. Runs after supernet, recal and search; run it by hand after
              killing a phase, so its evaluation cache is kept.
runs/ does not survive between sessions, so every phase first restores into runs/ what results/ean/ holds and
runs/ lacks (never overwriting a file runs/ has): a later session resumes a partial recal table from its committed
cache, and the standalone, retrain and report phases read the committed tables and results.
--tiny runs every phase at toy size (a CIFAR-10 subset, 1 epoch, few seeds) to check the machinery; its numbers
mean nothing. The standalone and retrain phases go through `attnlab bench` matrices written under
<results>/matrices/ (committed with their results; the retrain's lists EAN's claims, judged by the report phase
through `attnlab report`).
"""
import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab.bench.stats import ratio_interval  # noqa: E402
from attnlab.files import atomic_write_bytes, save_figure  # noqa: E402
from attnlab.jsonl import read_jsonl  # noqa: E402
from attnlab.search.replay import read_table, replay_study, write_json  # noqa: E402

CONFIG = ROOT / "configs" / "search" / "ean_resnet20_se.yaml"
RECIPE = "configs/cifar10_resnet20.yaml"
PHASES = ("supernet", "recal", "replay", "search", "standalone", "retrain", "report", "save")
SAVED = {"supernet": ("checkpoint_last.pt", "config.yaml", "metrics.csv", "results.json"),
         "search": None, "search-recal20": None}  # None: every file of the folder but its table.csv
TABLES = {"search": "table_resnet20_se.csv", "search-recal20": "table_resnet20_se_recal20.csv"}
REPLAYS = {"search": "replay.json", "search-recal20": "replay_recal20.json"}  # the replay study of each table
NAME = "ean_resnet20_se"
TINY = ["data.subset=30", "data.val_size=60", "data.test_subset=10", "train.epochs=1", "train.batch_size=32",
        "train.eval_batch_size=100", "train.warmup_epochs=0", "search.options={steps: 5}"]


def attnlab(*args):
    cmd = [sys.executable, "-m", "attnlab", *map(str, args)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def search_root(a) -> Path:
    return Path(a.runs) / NAME


def common(a):
    return [f"out_dir={a.runs}", f"name={NAME}"] + (TINY if a.tiny else [])


def evidence_root(a) -> Path:
    return Path(a.results) / "resnet20_se"


def _copy(src: Path, dst: Path, overwrite: bool) -> int:
    """Copy one file atomically (1) unless src is missing or, without ``overwrite``, dst exists (0)."""
    if not src.is_file() or (dst.is_file() and not overwrite):
        return 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dst, src.read_bytes(), f"copy of {src}")
    return 1


def _kept_files(folder: Path, names):
    """The files of ``folder`` that `save` keeps: ``names`` (None: all but table.csv), no hidden files."""
    if not folder.is_dir():
        return []
    return [f.name for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")
            and (f.name in names if names is not None else f.name != "table.csv")]


def _pairs(a, listed_in: str):
    """(file under runs/, its copy under results/) for what `save` keeps, listed from the "runs" or "kept" side."""
    run, kept = search_root(a), evidence_root(a)
    pairs = [(run / sub / "table.csv", Path(a.results) / name) for sub, name in TABLES.items()]
    for sub, names in SAVED.items():
        for name in _kept_files((run if listed_in == "runs" else kept) / sub, names):
            pairs.append((run / sub / name, kept / sub / name))
    return pairs


def phase_save(a):
    n = sum(_copy(live, kept, overwrite=True) for live, kept in _pairs(a, "runs"))
    print(f"save: {n} files -> {a.results}", flush=True)


def restore(a):
    n = sum(_copy(kept, live, overwrite=False) for live, kept in _pairs(a, "kept"))
    if n:
        print(f"restore: {n} files from {a.results} -> {search_root(a)}", flush=True)


def search_overrides(a, sub):
    """The overrides that make search folder ``sub``: the plain search or the recalibrated table's."""
    return [] if sub == "search" else [f"search.dir={sub}", f"search.recal_batches={2 if a.tiny else 20}"]


def phase_supernet(a):
    attnlab("search", "--config", CONFIG, "--phases", "supernet,search", *common(a))
    phase_save(a)


def phase_recal(a):
    attnlab("search", "--config", CONFIG, "--phases", "search", *common(a), *search_overrides(a, "search-recal20"))
    phase_save(a)


def phase_replay(a):
    results = Path(a.results)
    for sub, name in TABLES.items():
        table_path = search_root(a) / sub / "table.csv"
        out = results / REPLAYS[sub]
        if not table_path.is_file():
            print(f"replay: no {table_path}; skipped", flush=True)
            continue
        _copy(table_path, results / name, overwrite=True)
        if out.is_file():
            print(f"replay: {out} exists; skipped", flush=True)
            continue
        study = replay_study(read_table(table_path), budgets=(30, 100) if a.tiny else (30, 100, 300, 900),
                             seeds=3 if a.tiny else 100, synthetic=False)
        study["table"] = str(table_path)
        write_json(out, study)
        print(f"replay: wrote {out}", flush=True)


def phase_search(a):
    for sub, name in TABLES.items():
        table = Path(a.results) / name
        if (search_root(a) / sub / "result.json").is_file() or not table.is_file():
            continue
        attnlab("search", "--config", CONFIG, "--phases", "search", "--table", table, *common(a),
                *search_overrides(a, sub))
    phase_save(a)


def table_with_rewards(a, sub="search"):
    table = read_table(search_root(a) / sub / "table.csv")
    return sorted(table.items(), key=lambda kv: -kv[1]["reward"])


def blocks(bits) -> str:
    text = "".join(map(str, bits))
    return f"{text[0:3]}-{text[3:6]}-{text[6:9]}"


def spread_schemes(ranked, k=8):
    """k schemes at evenly spaced ranks of the supernet reward, best and worst included."""
    idx = sorted({round(i * (len(ranked) - 1) / (k - 1)) for i in range(k)})
    return [ranked[i][0] for i in idx]


def matrix_path(a, name) -> Path:
    return Path(a.results) / "matrices" / f"{name}.yaml"


def write_matrix(a, name, methods, seeds, overrides, latency=False, reuse=(), claims=()) -> Path:
    """The matrix file of a bench phase, kept with the results it defines (committed; its claims `attnlab report`
    judges). An existing file may differ only in its claims (added or reworded after cells ran)."""
    path = matrix_path(a, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"name: {name}", f"recipe: {RECIPE}", "overrides:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in overrides.items()]
    lines.append("methods:")
    for mname, over in methods:
        lines.append(f"  - {{name: {json.dumps(mname)}, overrides: {json.dumps(over)}}}")
    lines.append(f"seeds: {json.dumps(seeds)}")
    if latency:
        lines.append("latency: {batch_sizes: [1, 32], warmup: 5, repeats: 100, rounds: 10}")
    if reuse:
        lines.append(f"reuse: {json.dumps(list(reuse))}")
    if claims:  # last, so that the check below can leave it out
        lines.append("claims:")
        lines += [f"  - {json.dumps(c)}" for c in claims]
    text = "\n".join(lines) + "\n"
    if path.is_file() and _without_claims(path.read_text()) != _without_claims(text):
        raise SystemExit(f"{path} exists with other content (a changed table or scheme?); move it away first")
    path.write_text(text)
    return path


def _without_claims(text: str) -> str:
    return text.split("\nclaims:")[0].rstrip("\n")


def tiny_overrides(a):
    if not a.tiny:
        return {}
    return {"data.subset": 30, "data.val_size": 60, "data.test_subset": 10, "train.epochs": 1,
            "train.batch_size": 32, "train.eval_batch_size": 100, "train.warmup_epochs": 0}


def bench(a, matrix, latency):
    attnlab("bench", "--matrix", matrix, "--results-root", a.results, "--runs-root", a.runs,
            *([] if latency else ["--no-latency"]), *(["--budget", a.budget] if getattr(a, "budget", None) else []))


def phase_standalone(a):
    ranked = table_with_rewards(a)
    schemes = spread_schemes(ranked)
    mid = schemes[len(schemes) // 2]
    methods = [(f"s{''.join(map(str, b))}", {"model.attention": "se", "model.share": True,
                                            "model.blocks": blocks(b)}) for b in schemes]
    over = {"device": "cpu", "model.name": "resnet20", "data.subset": 1000, "train.epochs": 10,
            **tiny_overrides(a)}
    m1 = write_matrix(a, "ean_standalone", methods, [0], over)
    bench(a, m1, latency=False)
    m2 = write_matrix(a, "ean_standalone_sd", [m for m in methods if m[0] == f"s{''.join(map(str, mid))}"],
                      [1, 2], over)
    bench(a, m2, latency=False)


def random_same_k(k, n=9, count=3, exclude=(), seed=12):
    """``count`` distinct random schemes with exactly k connections, none in ``exclude`` (fixed seed)."""
    rng = random.Random(seed)
    pool = [b for b in _all(n) if sum(b) == k and "".join(map(str, b)) not in exclude]
    rng.shuffle(pool)
    return pool[:count]


def _all(n):
    import itertools
    return list(itertools.product((0, 1), repeat=n))


def phase_retrain(a):
    res = json.loads((search_root(a) / "search" / "result.json").read_text())
    chosen = tuple(int(c) for c in res["chosen"])
    shared = {"model.attention": "se", "model.share": True}
    methods = [("none", {"model.attention": "none"}), ("se", {"model.attention": "se"}),
               ("se-shared-full", {**shared, "model.blocks": "all"}),
               ("ean-se", {**shared, "model.blocks": blocks(chosen)})]
    if 0 < sum(chosen) < 9:
        for i, b in enumerate(random_same_k(sum(chosen), exclude={res["chosen"]})):
            methods.append((f"random{sum(chosen)}-{i}", {**shared, "model.blocks": blocks(b)}))
    over = {"device": "cpu", "model.name": "resnet20", "data.name": "cifar10", "train.epochs": 20,
            **tiny_overrides(a)}
    # none and se are cells of the evidence matrix (same recipe, overrides and seeds): taken from its runs.jsonl
    # when finished there rather than trained twice.
    evidence = "results/cifar10_resnet20"  # attnlab runs with the repository root as its working directory
    reuse = [evidence] if not a.tiny and (ROOT / evidence).is_dir() else []
    bench(a, write_matrix(a, "ean_retrain", methods, [0] if a.tiny else [0, 1, 2], over, latency=True,
                          reuse=reuse, claims=retrain_claims(methods)), latency=True)


EAN_FIGURE = "ImageNet ResNet-50, EAN README figure (ean_spenet.md 1.6)"


def retrain_claims(methods):
    """EAN's claims as `attnlab report` judges them (match: the Welch 95% interval within +-0.5 points), and the
    control no EAN paper runs: the searched scheme against random schemes with its number of connections."""
    claims = [
        {"claim": "EAN's searched scheme keeps full sharing's accuracy, at less inference time", "source": EAN_FIGURE,
         "method": "ean-se", "baseline": "se-shared-full", "kind": "match", "margin": 0.5, "latency": "lower",
         "paper": "+0.06 (77.40 vs 77.34); inference-time increase ~10% vs ~26%"},
        {"claim": "EAN's searched scheme keeps per-block SE's accuracy, at less inference time", "source": EAN_FIGURE,
         "method": "ean-se", "baseline": "se", "kind": "match", "margin": 0.5, "latency": "lower",
         "paper": "+0.39 (77.40 vs 77.01)"},
        {"claim": "One SE shared per stage keeps per-block SE's accuracy", "source": EAN_FIGURE,
         "method": "se-shared-full", "baseline": "se", "kind": "match", "margin": 0.5,
         "paper": "+0.33 (77.34 vs 77.01)"}]
    for name, _ in methods:
        if name.startswith("random"):
            claims.append({"claim": f"The searched scheme beats a random scheme with as many connections ({name})",
                           "source": "attnlab control (no EAN paper runs it)", "method": "ean-se",
                           "baseline": name, "paper": "not in the paper"})
    return claims


def kendall_tau(x, y) -> float:
    """Kendall's tau-b of two equal-length sequences (ties counted as neither concordant nor discordant)."""
    n, conc, disc, tx, ty = len(x), 0, 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + tx) * (conc + disc + ty)) ** 0.5
    return (conc - disc) / denom if denom else float("nan")


def phase_report(a):
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    summary = {"tiny": a.tiny}
    ranked = table_with_rewards(a)
    res = json.loads((search_root(a) / "search" / "result.json").read_text())
    summary["search"] = {k: res[k] for k in ("searcher", "select", "chosen", "chosen_blocks", "candidates",
                                             "distinct_evaluations", "queries", "derive_evaluations",
                                             "reward_definition", "bn_recalibration", "evaluation_split")}
    rank = {"".join(map(str, b)): i + 1 for i, (b, _) in enumerate(ranked)}
    summary["search"]["candidate_ranks"] = {k: rank[v["scheme"]] for k, v in res["candidates"].items()}
    summary["table"] = {"schemes": len(ranked), "best": "".join(map(str, ranked[0][0])),
                        "best_reward": ranked[0][1]["reward"], "worst_reward": ranked[-1][1]["reward"],
                        "top1_all": next(r["top1"] for b, r in ranked if sum(b) == 9),
                        "top1_none": next(r["top1"] for b, r in ranked if sum(b) == 0)}
    recal_path = search_root(a) / "search-recal20" / "table.csv"
    if recal_path.is_file():  # the effect of per-scheme BN recalibration on the table
        recal = read_table(recal_path)
        keys = [b for b, _ in ranked]
        plain_top1, recal_top1 = [dict(ranked)[b]["top1"] for b in keys], [recal[b]["top1"] for b in keys]
        summary["bn_recalibration"] = {
            "kendall_tau_top1_plain_vs_recal": kendall_tau(plain_top1, recal_top1),
            "mean_top1_plain": statistics.fmean(plain_top1), "mean_top1_recal": statistics.fmean(recal_top1),
            "best_plain": summary["table"]["best"],
            "best_recal": "".join(map(str, max(recal, key=lambda b: recal[b]["reward"])))}
    stand = [r for r in read_jsonl(results / "ean_standalone" / "runs.jsonl") if r.get("status") == "ok"]
    if stand:
        table = dict(ranked)
        pairs = [(table[tuple(int(c) for c in r["method"][1:])]["top1"], r["test_top1"]) for r in stand]
        sd_runs = read_jsonl(results / "ean_standalone_sd" / "runs.jsonl")
        sd_methods = {r["method"] for r in sd_runs}
        sd = [r["test_top1"] for r in sd_runs + [r for r in stand if r["method"] in sd_methods]
              if r.get("status") == "ok"]
        summary["standalone"] = {"schemes": len(pairs), "kendall_tau_supernet_vs_standalone_test":
                                 kendall_tau([p[0] for p in pairs], [p[1] for p in pairs]),
                                 "pairs": pairs, "seed_sd_one_scheme": statistics.stdev(sd) if len(sd) > 1 else None}
        if recal_path.is_file():  # does recalibration make the supernet's ranking closer to the standalone one?
            schemes = [tuple(int(c) for c in r["method"][1:]) for r in stand]
            summary["standalone"]["kendall_tau_recal_supernet_vs_standalone_test"] = kendall_tau(
                [recal[b]["top1"] for b in schemes], [p[1] for p in pairs])
    retrain = [r for r in read_jsonl(results / "ean_retrain" / "runs.jsonl") if r.get("status") == "ok"]
    if retrain:
        by = {}
        for r in retrain:
            by.setdefault(r["method"], []).append(r["test_top1"])
        summary["retrain"] = {m: {"test_top1_mean": statistics.fmean(v),
                                  "test_top1_std": statistics.stdev(v) if len(v) > 1 else None, "seeds": len(v)}
                              for m, v in by.items()}
        lat_path = results / "ean_retrain" / "latency.json"
        if lat_path.is_file():  # inference latency ratio to the plain backbone, per batch size (round-robin)
            summary["latency_ratio_to_none_cpu"] = latency_ratios(json.loads(lat_path.read_text())["methods"])
            summary["latency_file"] = str(lat_path)
    write_json(results / "summary.json", summary)
    plots(a, ranked, res, results)
    if retrain and matrix_path(a, "ean_retrain").is_file():  # report.md with the claims' verdicts and plots
        attnlab("report", results / "ean_retrain", "--matrix", matrix_path(a, "ean_retrain"))
    print(f"report: wrote {results / 'summary.json'}", flush=True)


def latency_ratios(methods: dict) -> dict:
    """Each method's CPU latency over ``none``'s per batch size, as report.md states it: the geometric mean over
    timing rounds of the per-round ratio, with its 95% interval (``ratio``, ``low``, ``high``, ``n`` rounds)."""
    base = methods.get("none", {}).get("cpu", {}).get("batch", {})
    out = {}
    for m, v in methods.items():
        timed = v.get("cpu", {}).get("batch", {})
        out[m] = {}
        for bs in (bs for bs in base if bs in timed):
            r = ratio_interval(timed[bs].get("round_medians_ms") or [], base[bs].get("round_medians_ms") or [])
            if r["n"] == 0:  # timed before rounds were kept: the ratio of the medians, without an interval
                r["ratio"] = timed[bs]["median_ms"] / base[bs]["median_ms"]
            out[m][bs] = r
    return out


def plots(a, ranked, res, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rewards = [r["reward"] for _, r in ranked]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(rewards, bins=40, color="0.7")
    styles = {"mode": ("C0", "--"), "best_sampled": ("C1", "-"), "best_of_n": ("C2", ":")}
    for name, cand in res["candidates"].items():
        color, ls = styles[name]
        ax.axvline(cand["reward"], color=color, linestyle=ls, label=f"this search ({res['searcher']}): {name}")
    replay = results / REPLAYS["search"]
    if replay.is_file():  # each searcher's median pick (chosen rank) at the largest budget of the replay study
        study = json.loads(replay.read_text())
        budget = max(study["budgets"])
        top = ax.get_ylim()[1]
        picks = [s for s in study["summary"] if s["budget"] == budget]
        for i, s in enumerate(picks):
            x = rewards[max(0, int(s["chosen"]["median_rank"]) - 1)]
            ax.plot([x], [top * (0.92 - 0.07 * i)], marker="v", color=f"C{3 + i}", linestyle="none",
                    label=f"replay {s['searcher']}: median pick, {budget} evals")
    ax.set_xlabel("reward = supernet val top-1 + 2 x fraction not connected")
    ax.set_ylabel("schemes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, results / "reward_histogram.png", dpi=120)
    plt.close(fig)
    curve = res.get("info", {}).get("curve") or []
    if curve:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot([c["mean_reward"] for c in curve], label="mean reward of the step")
        ax1.plot([c["baseline"] for c in curve], label="baseline (incl. RND bonus)")
        ax1.set_xlabel("controller step")
        ax1.legend(fontsize=7)
        probs = [c["p"] for c in curve]
        for b in range(len(probs[0])):
            ax2.plot([p[b] for p in probs], label=f"block {b}")
        ax2.set_xlabel("controller step")
        ax2.set_ylabel("P(connect)")
        ax2.legend(fontsize=6, ncol=3)
        fig.tight_layout()
        save_figure(fig, results / "controller.png", dpi=120)
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phases", nargs="+", choices=PHASES + ("all",))
    p.add_argument("--tiny", action="store_true", help="toy sizes, to check the machinery (numbers mean nothing)")
    p.add_argument("--runs", default=None, help="runs root (default: runs; runs/ean_tiny with --tiny)")
    p.add_argument("--results", default=None,
                   help="results folder (default: results/ean; runs/ean_tiny/results with --tiny, so a toy run "
                        "never overwrites the committed evidence)")
    p.add_argument("--budget", default=None,
                   help="passed to `attnlab bench` by standalone and retrain (e.g. 2h): start no cell that cannot "
                        "finish in time; the rest waits for the next run")
    a = p.parse_args(argv)
    a.runs = a.runs or ("runs/ean_tiny" if a.tiny else "runs")
    a.results = a.results or ("runs/ean_tiny/results" if a.tiny else "results/ean")
    phases = PHASES if "all" in a.phases else [ph for ph in PHASES if ph in a.phases]
    for ph in phases:
        print(f"== {ph}", flush=True)
        restore(a)
        globals()[f"phase_{ph}"](a)


if __name__ == "__main__":
    main()
