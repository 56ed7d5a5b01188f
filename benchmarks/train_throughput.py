"""Training throughput of attnlab's engine against a minimal reference loop, in one run.

Reference: torchvision ``ImageFolder`` over the JPEG files + ``RandomCrop(32, 4)``/``RandomHorizontalFlip``/
``ToTensor``/``Normalize`` + ``DataLoader(num_workers=2)``, fp32 eager, SGD, same model and batch size.
Engine: ``attnlab.engine.train.train`` itself (uint8 dataset in memory, batch augmentation, device-side metrics),
eager channels_last (the CPU default), eager NCHW, and compiled; every "epoch" is cut to ``--steps`` steps
(``debug.max_steps_per_epoch``) and the rate is read from the run's metrics.csv (training loop only; evaluation
excluded).

CPU: resnet20, batch 128. Steady-state rate = median over measured windows/epochs after the first, which holds the
compile warm-up (reported separately as first-epoch time minus a steady epoch's time; round 1 compiles with an
empty inductor cache, as a new machine would, later rounds reuse it). ``--rounds`` repeats the whole comparison,
rotating the contenders' order; ratios are per round (paired), then the median over rounds.
GPU (when CUDA is available): cifar_resnet18, batch 512, the recipe configs/cifar10_resnet18.yaml (bf16,
channels_last, compile) against the same reference loop with more workers; full-epoch times and their ratio.

    python benchmarks/train_throughput.py                   # CPU -> results/train_throughput_cpu.json
    python benchmarks/train_throughput.py --device cuda     # GPU -> results/train_throughput_gpu.json
"""
import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnlab  # noqa: E402,F401  (before torch: it sets the OpenMP wait policy)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnlab import create_model  # noqa: E402
from attnlab.engine.config import load_config  # noqa: E402
from attnlab.engine.train import train  # noqa: E402

MEAN, STD = (0.4913, 0.4821, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar10_folder() -> Path:
    """The CIFAR-10 JPEG folder, found as the engine finds it ($ATTNLAB_DATA, ../shared/data, .data)."""
    from attnlab.data.sources import open_source
    from attnlab.errors import AttnlabError
    try:
        source = open_source("cifar10")
    except AttnlabError as err:
        sys.exit(f"train_throughput: {err}")
    if source.kind != "folder":
        sys.exit(f"train_throughput: the reference loop reads JPEG folders (ImageFolder), found {source.root}")
    return source.root


def reference_rates(data_dir, model_name, batch_size, steps, windows, device, workers, lr=0.1, epoch_images=None):
    """Images/s of ``windows`` consecutive windows of ``steps`` steps (after a warm-up window), or of one full epoch."""
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(str(data_dir / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=True, pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rates, it = [], iter(loader)
    if epoch_images:  # GPU: time whole epochs (the loader restarts each epoch, as in real training)
        for _ in range(windows + 1):
            sync()
            t0, n = time.perf_counter(), 0
            for x, y in loader:
                step(x, y)
                n += len(y)
            sync()
            rates.append(n / (time.perf_counter() - t0))
        return rates[1:], rates[0]
    for w in range(windows + 1):  # window 0 warms up the workers and the allocator
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                x, y = next(it)
            step(x, y)
        sync()
        rates.append(steps * batch_size / (time.perf_counter() - t0))
    return rates[1:], rates[0]


def engine_run(recipe, overrides, tmp):
    """Per-epoch (train seconds, images/s) of one engine run, read from its metrics.csv."""
    cfg = load_config(recipe, [f"out_dir={tmp}", *overrides])
    start = time.perf_counter()
    results = train(cfg)
    wall = time.perf_counter() - start
    with open(Path(tmp) / cfg.name / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["images_per_s"]) for r in rows]
    images = [cfg.train.batch_size * (cfg.debug.max_steps_per_epoch or 0) for _ in rows]
    train_s = [n / r if n else None for n, r in zip(images, rates)]
    return {"rates": rates, "train_s": train_s, "epoch_time_s": [float(r["epoch_time_s"]) for r in rows],
            "wall_s": wall, "test_top1": results["test_top1"]}


def summarise(rates):
    return {"median_images_per_s": statistics.median(rates), "images_per_s": [round(r, 1) for r in rates]}


def host():
    return {"machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def cpu_benchmark(args):
    device = torch.device("cpu")
    b, s = args.batch_size, args.steps
    common = ["device=cpu", "model.name=resnet20", "data.name=cifar10", "data.val_size=500", "data.test_subset=10",
              f"data.cache_dir={ROOT / '.cache' / 'attnlab'}",
              f"train.batch_size={b}", "train.eval_batch_size=500", f"train.epochs={args.epochs}",
              f"debug.max_steps_per_epoch={s}", "train.warmup_epochs=0"]
    # The engine's CPU default is eager channels_last; NCHW and compiled variants show why.
    variants = {"engine_eager": ["train.compile=false", "train.channels_last=true"],
                "engine_eager_nchw": ["train.compile=false", "train.channels_last=false"],
                "engine_compile": ["train.compile=true", "train.channels_last=true"]}
    # A fresh inductor cache, so round 1's warm-up is what a new machine pays (round 2 reuses it).
    out = {"reference": {"rates": [], "per_round": [], "warmup_window": []}} | {k: {"runs": []} for k in variants}
    contenders = ["reference", *variants]
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(prefix="inductor-cold-") as cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold  # removed with the run (4 MB a run was left in /tmp)
        for r in range(args.rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]  # rotate the order
            print(f"round {r + 1}/{args.rounds}: {', '.join(order)}", flush=True)
            for name in order:
                if name == "reference":
                    rates, warm = reference_rates(args.data, "resnet20", b, s, args.windows, device, workers=2)
                    out["reference"]["rates"] += rates
                    out["reference"]["per_round"].append(statistics.median(rates))
                    out["reference"]["warmup_window"].append(warm)
                    print(f"  reference: {[round(x) for x in rates]} images/s", flush=True)
                else:
                    run = engine_run(None, common + variants[name] + [f"name={name}_{r}"], tmp)
                    out[name]["runs"].append(run)
                    print(f"  {name}: {[round(x) for x in run['rates']]} images/s (the first epoch holds any "
                          "compile)", flush=True)
    ref_rounds = out["reference"]["per_round"]
    result = {"benchmark": "train_throughput", "device": "cpu", "host": host(), "model": "resnet20",
              "batch_size": b, "steps_per_window": s, "rounds": args.rounds,
              "statistic": "median images/s over measured windows (reference) or epochs after the first (engine); "
                           "ratio = median over rounds of the per-round ratio of medians (contenders alternate "
                           "within each round, so load drifts hit them alike)",
              "note": args.note, "reference": summarise(out["reference"]["rates"])}
    result["reference"]["per_round_images_per_s"] = [round(x, 1) for x in ref_rounds]
    result["reference"]["first_window_images_per_s"] = [round(x, 1) for x in out["reference"]["warmup_window"]]
    for name in variants:
        runs = out[name]["runs"]
        steady = [x for run in runs for x in run["rates"][1:]]
        entry = summarise(steady)
        per_round = [statistics.median(run["rates"][1:]) for run in runs]
        entry["per_round_images_per_s"] = [round(x, 1) for x in per_round]
        entry["first_epoch_images_per_s"] = [round(run["rates"][0], 1) for run in runs]
        # Warm-up cost: how much longer the first epoch's training took than a steady epoch's.
        entry["warmup_s"] = [round(run["train_s"][0] - statistics.median(run["train_s"][1:]), 2) for run in runs]
        ratios = [v / ref for v, ref in zip(per_round, ref_rounds)]
        entry["ratio_vs_reference_per_round"] = [round(x, 3) for x in ratios]
        entry["ratio_vs_reference"] = statistics.median(ratios)
        result[name] = entry
    return result


def gpu_benchmark(args):
    device = torch.device("cuda")
    recipe = ROOT / "configs" / "cifar10_resnet18.yaml"
    cfg = load_config(recipe)
    b = cfg.train.batch_size
    workers = min(8, os.cpu_count() or 2)
    print(f"reference loop: cifar_resnet18, batch {b}, fp32 eager, {workers} workers, {args.gpu_epochs} epochs",
          flush=True)
    rates, first = reference_rates(args.data, "cifar_resnet18", b, None, args.gpu_epochs, device, workers=workers,
                                   epoch_images=50000)
    ref = summarise(rates) | {"first_epoch_images_per_s": round(first, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        run = engine_run(recipe, ["name=gpu", "device=cuda", f"train.epochs={args.gpu_epochs + 1}"], tmp)
    eng = summarise(run["rates"][1:]) | {"first_epoch_images_per_s": round(run["rates"][0], 1),
                                         "epoch_time_s": run["epoch_time_s"], "wall_s": round(run["wall_s"], 1)}
    train_images = 45000  # the recipe's train split (5k held out for validation)
    ref["epoch_time_s_45k"] = train_images / ref["median_images_per_s"]
    eng["train_epoch_time_s_45k"] = train_images / eng["median_images_per_s"]
    return {"benchmark": "train_throughput", "device": torch.cuda.get_device_name(), "host": host(),
            "model": "cifar_resnet18", "batch_size": b, "recipe": str(recipe.relative_to(ROOT)), "reference": ref,
            "engine": eng, "ratio_vs_reference": eng["median_images_per_s"] / ref["median_images_per_s"],
            "note": args.note}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=25, help="steps per window / per engine epoch (CPU)")
    p.add_argument("--windows", type=int, default=2, help="measured reference windows per round (CPU)")
    p.add_argument("--epochs", type=int, default=3, help="engine epochs per run, the first one is warm-up (CPU)")
    p.add_argument("--rounds", type=int, default=4, help="repetitions of the whole comparison (CPU)")
    p.add_argument("--gpu-epochs", type=int, default=2, help="measured full epochs after a warm-up epoch (GPU)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.data = cifar10_folder()  # found once, and before any work, so missing data fails at once
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("train_throughput: --device cuda but no CUDA device is available")
        result = gpu_benchmark(args)
        default_out = "results/train_throughput_gpu.json"
    else:
        result = cpu_benchmark(args)
        default_out = "results/train_throughput_cpu.json"
    out = Path(args.out or ROOT / default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    keys = [k for k in result if k.startswith("engine")] or []
    print(f"reference: {result['reference']['median_images_per_s']:.0f} images/s")
    for k in keys:
        e = result[k]
        print(f"{k}: {e['median_images_per_s']:.0f} images/s, "
              f"x{e.get('ratio_vs_reference', result.get('ratio_vs_reference', float('nan'))):.2f} vs reference")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
