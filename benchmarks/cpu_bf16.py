"""Would bf16 autocast make CPU training faster? fp32 against ``torch.autocast("cpu", torch.bfloat16)`` per method.

The engine autocasts to bf16 on a CPU only where it has native bf16 (``train.amp=bf16``, engine/precision.py):
this measured the gain on a 2-core Zen 4 with AVX512_BF16 (results/cpu_bf16.json) and the loss where bf16 is
emulated, on a 2-core Xeon with AVX512 but no AVX512_BF16 (results/cpu_bf16_no_native.json). Model-only training
steps (ResNet-20, batch 128, channels_last, SGD; no data loading), the same steps for both precisions:

- rate: images/s over ``--steps`` timed steps after 3 warm-up steps, at 1 thread (what each of bench's two workers
  gets) and at every core; ``--rounds`` rounds with the precision order alternating, median per setting, and the
  per-round bf16/fp32 ratio (paired), median over rounds;
- numerics: the loss of ``--train-steps`` full-batch steps on 256 real CIFAR-10 images from one initialisation,
  fp32 and bf16 (a large gap would say bf16 changes training here).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cpu_bf16.py     # -> results/cpu_bf16.json
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cpu_bf16.py --methods none,se --out results/cpu_bf16_no_native.json
Pause background jobs while it runs (kill -STOP), it compares rates.
"""
import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnlab  # noqa: E402,F401  (before torch: it sets the OpenMP wait policy)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnlab import create_model  # noqa: E402
from attnlab.host import host_info  # noqa: E402
from attnlab.files import atomic_write_json  # noqa: E402


def autocast(precision):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(attention, precision, x, y):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, attention=attention).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step():
        with autocast(precision):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)
    return step


def rate(attention, precision, threads, steps, batch=128):
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    step = make_step(attention, precision, x, y)
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def real_batch(n=256):
    """n CIFAR-10 training images (an equal number per class, seed 0) normalised by the train statistics."""
    from attnlab.data import load_dataset
    bundle = load_dataset("cifar10", subset=-(-n // 10), val_size=0, test_subset=1, cache_dir=None)
    x = bundle.train.images[:n].float() / 255
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last), bundle.train.labels[:n]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="none,se,cbam,tdam")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--out", default=str(ROOT / "results" / "cpu_bf16.json"))
    a = p.parse_args()
    methods = a.methods.split(",")
    all_threads = sorted({1, torch.get_num_threads()})
    rates = {m: {t: {"fp32": [], "bf16": []} for t in all_threads} for m in methods}
    for r in range(a.rounds):
        order = ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")
        for m in methods:
            for t in all_threads:
                for precision in order:
                    rates[m][t][precision].append(rate(m, precision, t, a.steps))
                    print(f"round {r + 1} {m} {t} thread(s) {precision}: {rates[m][t][precision][-1]:.0f} images/s",
                          flush=True)
    torch.set_num_threads(all_threads[-1])
    x, y = real_batch()
    numerics = {}
    for m in methods:
        losses = {}
        for prec in ("fp32", "bf16"):
            step = make_step(m, prec, x, y)
            losses[prec] = [step() for _ in range(a.train_steps)]
        numerics[m] = {"first_loss": {k: round(v[0], 4) for k, v in losses.items()},
                       "last_loss": {k: round(v[-1], 4) for k, v in losses.items()}}
        print(f"{m}: loss after {a.train_steps} steps fp32 {losses['fp32'][-1]:.4f}, bf16 {losses['bf16'][-1]:.4f}",
              flush=True)
    out = {"benchmark": "cpu_bf16", "host": host_info(), "model": "resnet20", "batch_size": 128,
           "steps_per_measure": a.steps, "rounds": a.rounds, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "statistic": "median images/s over rounds; ratio = median over rounds of the per-round bf16/fp32 ratio",
           "rates": {}, "numerics": {"images": 256, "steps": a.train_steps, "lr": 0.05, "per_method": numerics}}
    for m in methods:
        for t in all_threads:
            fp, bf = rates[m][t]["fp32"], rates[m][t]["bf16"]
            out["rates"].setdefault(m, {})[f"{t}_threads"] = {
                "fp32_images_per_s": round(statistics.median(fp), 1),
                "bf16_images_per_s": round(statistics.median(bf), 1),
                "bf16_over_fp32": round(statistics.median(b / f for b, f in zip(bf, fp)), 3),
                "fp32_all": [round(v, 1) for v in fp], "bf16_all": [round(v, 1) for v in bf]}
            print(f"{m} {t} thread(s): fp32 {statistics.median(fp):.0f}, bf16 {statistics.median(bf):.0f} images/s, "
                  f"x{out['rates'][m][f'{t}_threads']['bf16_over_fp32']:.2f}")
    atomic_write_json(a.out, out, "benchmark JSON")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
