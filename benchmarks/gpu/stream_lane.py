"""The GPU slot's streaming lane: train through the streaming pipeline on a generated folder of 224 px-ish JPEGs and
say whether the loader or the training step is the bottleneck.

Three timings on the same folder, model, batch, precision and memory format:
  * loader alone: one pass of the run's ``StreamLoader`` (decode + augmentation in ``--workers`` processes, copy to
    the device), nothing trained: the most images/s the pipeline can feed;
  * step alone: forward + backward + SGD step on one batch kept on the device, ``--step-repeats`` times (the
    device synchronised before and after): the most images/s the GPU can train;
  * engine: ``attnlab train`` on the folder (data.pipeline=stream) for ``--epochs`` epochs, its
    train_images_per_s (median epoch).
The bottleneck is the slower of the first two; the engine's rate should sit at or below it. Written to --out as
JSON (host and device named by attnlab.host).

    python benchmarks/gpu/stream_lane.py --device cuda --out gpu_out/stream_train.json        # the slot's lane
    python benchmarks/gpu/stream_lane.py --device cpu --images 24 --val-images 4 --image-size 32 --batch-size 8 \
        --epochs 1 --workers 1 --step-repeats 2 --model resnet20 --out /tmp/x.json            # CPU dry run (tests)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from attnlab.host import host_info  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from stream_loader import make_folder as generate_jpegs  # noqa: E402


def make_folder(root: Path, train: int, val: int, classes: int = 10, seed: int = 0) -> Path:
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg: stream_loader.py's generated JPEGs, one random stream."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        generate_jpegs(root / split, n, classes, rng=rng)
    return root


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(loader, device) -> dict:
    loader.set_epoch(0)
    n, t = 0, time.perf_counter()
    for x, y in loader:
        n += len(x)
    sync(device)
    dt = time.perf_counter() - t
    return {"images": n, "seconds": round(dt, 3), "images_per_s": round(n / dt, 1)}


def step_rate(cfg, device, batch: int, size: int, repeats: int, num_classes: int) -> dict:
    from attnlab.engine.optim import build_optimizer
    from attnlab.engine.precision import autocast, resolve_precision
    from attnlab.models import create_model
    from omegaconf import OmegaConf
    m = cfg.model
    model = create_model(m.name, num_classes=num_classes, attention=m.attention,
                         attention_kwargs=OmegaConf.to_container(m.attention_kwargs)).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    if cfg.train.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.train)
    precision, _ = resolve_precision(device, cfg.train.amp)

    def step():
        with autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (cuDNN autotuning, allocator)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    dt = time.perf_counter() - t
    return {"steps": repeats, "seconds": round(dt, 3), "images_per_s": round(repeats * batch / dt, 1),
            "precision": precision}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--attention", default="none")
    p.add_argument("--images", type=int, default=4096, help="training images generated (default 4096)")
    p.add_argument("--val-images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=20, help="engine epochs (default 20: 320 steps of 256)")
    p.add_argument("--workers", type=int, default=14, help="DataLoader workers (default 14 of the 16 cores)")
    p.add_argument("--step-repeats", type=int, default=50)
    p.add_argument("--folder", default=None, help="reuse this generated folder (made when missing)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if min(args.images, args.val_images, args.batch_size, args.epochs, args.step_repeats) < 1 or args.workers < 0:
        p.error("sizes, epochs and repeats must be >= 1 and --workers >= 0")
    if args.images < args.batch_size:
        p.error(f"--images {args.images} is less than one batch of {args.batch_size}")
    from attnlab.data.pipeline import build_loaders
    from attnlab.engine.config import load_config
    from attnlab.engine.distributed import resolve_device
    from attnlab.engine.train import train

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "folder"
        t0 = time.perf_counter()
        if not (folder / "train").is_dir():
            make_folder(folder, args.images, args.val_images)
        made = round(time.perf_counter() - t0, 1)
        print(f"stream lane: folder of {args.images} + {args.val_images} JPEGs ready in {made} s", flush=True)
        over = ["name=stream_lane", f"out_dir={Path(tmp) / 'runs'}", f"device={args.device}", "data.name=imagefolder",
                f"data.data_dir={folder}", "data.pipeline=stream", f"data.image_size={args.image_size}",
                "data.val_size=0", f"data.workers={args.workers}", "data.stream.color_jitter=0.4",
                f"model.name={args.model}", f"model.attention={args.attention}", f"train.epochs={args.epochs}",
                f"train.batch_size={args.batch_size}", f"train.eval_batch_size={args.batch_size}",
                "train.warmup_epochs=0", "train.lr=0.1"]
        cfg = load_config(None, over)
        loaders = build_loaders(cfg, device, args.batch_size, args.batch_size)
        num_classes = loaders.bundle.num_classes
        loader = loader_rate(loaders.train, device)
        print(f"stream lane: loader alone {loader['images_per_s']} images/s", flush=True)
        step = step_rate(cfg, device, args.batch_size, args.image_size, args.step_repeats, num_classes)
        print(f"stream lane: step alone {step['images_per_s']} images/s ({step['precision']})", flush=True)
        res = train(cfg)
    engine = {"epochs": args.epochs, "steps": args.epochs * (args.images // args.batch_size),
              "images_per_s": round(res["train_images_per_s"], 1),
              "images_per_s_median_epoch": round(res["train_images_per_s_median_epoch"] or 0, 1),
              "wall_s": res["wall_time_s"], "precision": res["precision"]}
    slower = "loader" if loader["images_per_s"] < step["images_per_s"] else "step"
    out = {"what": "streaming pipeline on a generated JPEG folder: loader alone vs training step alone vs the engine",
           "model": args.model, "attention": args.attention, "image_size": args.image_size,
           "batch_size": args.batch_size, "workers": args.workers, "train_images": args.images,
           "folder_seconds": made, "loader_alone": loader, "step_alone": step, "engine": engine,
           "bottleneck": slower,
           "engine_over_bottleneck": round(engine["images_per_s_median_epoch"] / min(loader["images_per_s"],
                                                                                      step["images_per_s"]), 3),
           "device": res["device"], "host": host_info()}
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"stream lane: engine {engine['images_per_s_median_epoch']} images/s (median epoch); bottleneck: {slower} "
          f"-> {dest}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
