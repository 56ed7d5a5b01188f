"""How far SPE's gate opens during a short run: its biases and gate values before and after training.

SPE's official init (w = 0, b = -1 for both affines) starts every residual branch scaled by sigmoid(-2) *
sigmoid(-1) ~ 0.032. This script trains one cell of a benchmark matrix per method (default: `spe` and `spe_open`
of cpu_proxy_15ep, seed 0) through the training engine in a temporary folder and reports, for each SPE module:
the mean of its two bias vectors (b_rew, b_exc), the mean |w| of its two weight vectors, its mix weight lambda,
and the mean gate value v over the test images (every image, channel and block position), at init and after the
last epoch. It answers "does the gate open in this schedule?" with numbers instead of a guess.

    .venv/bin/python benchmarks/spe_gate.py                 # writes results/cpu_proxy_15ep/spe_gate.json
"""
import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnlab  # noqa: E402
from attnlab.attention.spe import SPE  # noqa: E402
from attnlab.bench.matrix import cell_overrides, cells, load_matrix  # noqa: E402
from attnlab.host import host_info  # noqa: E402
from attnlab.data import BatchLoader, dataset_for_config  # noqa: E402
from attnlab.engine.checkpoint import load_training_checkpoint, model_from_checkpoint, model_from_config  # noqa: E402
from attnlab.engine.config import load_config  # noqa: E402
from attnlab.engine.train import seed_everything, train  # noqa: E402
from attnlab.files import atomic_write_json  # noqa: E402
from attnlab.host import set_threads  # noqa: E402


def spe_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SPE)]


@torch.no_grad()
def gate_stats(model, loader) -> list[dict]:
    """Per SPE module: parameter summaries and the mean gate value over every image the loader gives."""
    model.eval()
    sums = {}

    def hook(module, inputs, _output):
        v = module.gate(inputs[0])
        s = sums.setdefault(module, [0.0, 0])
        s[0] += float(v.sum())
        s[1] += v.numel()

    handles = [m.register_forward_hook(hook) for _, m in spe_modules(model)]
    try:
        for images, _ in loader:
            model(images)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, m in spe_modules(model):
        total, count = sums[m]
        out.append({"module": name,
                    "b_rew": round(float(m.b_rew.mean()), 4), "b_exc": round(float(m.b_exc.mean()), 4),
                    "abs_w_rew": round(float(m.w_rew.abs().mean()), 4),
                    "abs_w_exc": round(float(m.w_exc.abs().mean()), 4),
                    "lambda": round(float(m.mix_weight()), 4), "gate": round(total / count, 4)})
    return out


def summary(blocks: list[dict]) -> dict:
    keys = ("b_rew", "b_exc", "gate")
    return {k: {"mean": round(statistics.fmean(b[k] for b in blocks), 4),
                "min": min(b[k] for b in blocks), "max": max(b[k] for b in blocks)} for k in keys}


def test_loader(cfg):
    bundle = dataset_for_config(cfg)
    return BatchLoader(bundle.test, batch_size=cfg.train.eval_batch_size, shuffle=False, augment=False,
                       mean=bundle.mean, std=bundle.std, device=torch.device("cpu"), seed=0, drop_last=False)


def measure(matrix, cell, runs_root) -> dict:
    cfg = load_config(matrix["recipe_path"], overrides=cell_overrides(matrix, cell, runs_root, device="cpu"))
    loader = test_loader(cfg)
    seed_everything(cfg.seed)  # SPE's own init is constant (w = 0, b = init_bias); the seed fixes the convs
    init = gate_stats(model_from_config(cfg.model), loader)
    if not init:
        raise SystemExit(f"method '{cell['method']}' of {matrix['path']} has no SPE module")
    start = time.perf_counter()
    results = train(cfg)
    ckpt = load_training_checkpoint(Path(runs_root) / cell["run_name"] / "checkpoint_last.pt")
    final = gate_stats(model_from_checkpoint(ckpt, "cpu", use_ema=False), loader)
    return {"method": cell["method"], "seed": cell["seed"], "epochs": int(cfg.train.epochs),
            "best_epoch": results["best_epoch"], "test_top1": round(results["test_top1"], 2),
            "train_seconds": round(time.perf_counter() - start, 1),
            "init": summary(init), "final": summary(final), "final_blocks": final}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matrix", default=str(ROOT / "benchmarks/matrices/cpu_proxy_15ep.yaml"))
    p.add_argument("--methods", nargs="+", default=["spe", "spe_open"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results/cpu_proxy_15ep/spe_gate.json"))
    args = p.parse_args(argv)
    set_threads(args.threads)
    matrix = load_matrix(args.matrix)
    rows = []
    with tempfile.TemporaryDirectory() as runs_root:
        for cell in cells(matrix, seeds=[args.seed], only=args.methods):
            row = measure(matrix, cell, runs_root)
            rows.append(row)
            i, f = row["init"], row["final"]
            print(f"{row['method']} seed {row['seed']}: {row['epochs']} epochs, test top-1 {row['test_top1']}; "
                  f"b_rew {i['b_rew']['mean']:+.3f} -> {f['b_rew']['mean']:+.3f}, "
                  f"b_exc {i['b_exc']['mean']:+.3f} -> {f['b_exc']['mean']:+.3f}, "
                  f"gate {i['gate']['mean']:.3f} -> {f['gate']['mean']:.3f} "
                  f"(blocks {f['gate']['min']:.3f}..{f['gate']['max']:.3f})")
    out = {"what": "SPE biases and mean gate value at init and after training (test images)",
           "command": " ".join(["python benchmarks/spe_gate.py", *(argv if argv is not None else sys.argv[1:])]),
           "matrix": matrix["name"], "attnlab": attnlab.__version__, "host": host_info(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": rows}
    atomic_write_json(args.out, out, "SPE gate results")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
