"""Images/s of attnlab's streaming pipeline (data.pipeline=stream) against timm's own loader, in one run.

Both read the same generated folder of JPEGs and produce the same thing: normalised float32 224 px training batches
under ImageNet training augmentation (RandomResizedCrop(224, scale 0.08-1, ratio 3/4-4/3, bilinear), horizontal
flip 0.5, colour jitter 0.4, no erasing), with the same batch size and DataLoader worker count:
  * attnlab: ``StreamLoader(ImageFiles(split, train_transform(stream config, 224), random=True))``, the loader a
    training run builds (torchvision.transforms.v2; every image's random draws seeded from (seed, epoch, index));
  * timm: ``timm.data.ImageDataset`` + ``timm.data.create_loader(is_training=True, ...)``, which builds its transform
    with ``create_transform`` from the same parameters (its CPU path: ``use_prefetcher=False``, so normalisation runs
    in the workers as in attnlab); ``persistent_workers=False`` so both start their workers every pass.
One full pass per repeat, the two interleaved so that both see the same background load; the medians are reported.
Each pass's time includes starting the workers, as an epoch's does. Then ``ms_per_image_one_thread`` says where a
worker's time goes: decoding, each stage of both transforms, and attnlab's per-image seeding.

    .venv/bin/python benchmarks/stream_loader.py                         # writes results/stream_loader.json
    .venv/bin/python benchmarks/stream_loader.py --images 64 --repeats 1 --out /tmp/x.json   # smoke run
    .venv/bin/python benchmarks/stream_loader.py --folder /path/to/imagenet/train --images 2000   # real JPEGs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab.files import atomic_write_json  # noqa: E402
from attnlab.host import host_info  # noqa: E402


def make_folder(root: Path, images: int, classes: int = 8, seed: int = 0, rng=None) -> Path:
    """root/<class>/*.jpg: ``images`` JPEGs of 320x256 to 400x300 (about ImageNet's mean size), smooth noise.
    ``rng``: a numpy Generator to draw from (several folders from one stream), else one seeded with ``seed``."""
    from PIL import Image
    rng = np.random.default_rng(seed) if rng is None else rng
    for i in range(images):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(320, 401)), int(rng.integers(256, 301))
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(d / f"{i:06d}.jpg", quality=90)
    return root


def list_images(folder: Path, limit: int | None):
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                files.append(f"{name}/{f.name}")
                labels.append(c)
    if limit is not None:
        order = np.random.default_rng(0).permutation(len(files))[:limit]
        files, labels = [files[i] for i in order], [labels[i] for i in order]
    return files, labels


def attnlab_loader(folder: Path, files, labels, batch: int, workers: int):
    from attnlab.data.stream import FileSplit, ImageFiles, StreamLoader
    from attnlab.data.transforms import train_transform
    from attnlab.engine.config import load_config
    stream = load_config(None, ["data.stream.color_jitter=0.4"]).data.stream
    split = FileSplit("train", folder, np.array([f.encode() for f in files], dtype=np.bytes_),
                      np.asarray(labels, dtype=np.int64))
    return StreamLoader(ImageFiles(split, train_transform(stream, 224), seed=0, random=True), batch, shuffle=True,
                        drop_last=True, workers=workers)


def timm_loader(folder: Path, files, batch: int, workers: int):
    from timm.data import ImageDataset, create_loader
    ds = ImageDataset(str(folder))
    keep = set(files)
    ds.reader.samples = [s for s in ds.reader.samples if os.path.relpath(s[0], folder) in keep]
    return create_loader(ds, input_size=(3, 224, 224), batch_size=batch, is_training=True, use_prefetcher=False,
                         num_workers=workers, device=torch.device("cpu"), persistent_workers=False,
                         scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.4,
                         interpolation="bilinear", re_prob=0.0, mean=(0.485, 0.456, 0.406),
                         std=(0.229, 0.224, 0.225))


def stage_costs(folder: Path, files, images: int = 200, rounds: int = 3) -> dict:
    """Where a worker's time goes, in the main process at one thread: ms per image of decoding and of each stage of
    the two transforms (the same images, each transform's stages run one by one; the best of ``rounds`` means), and
    of the per-image seeding that makes attnlab's draws a pure function of (seed, epoch, index): torch's
    ``fork_rng`` + ``manual_seed`` against ``attnlab.data.stream.cpu_rng_seeded``."""
    from PIL import Image
    from attnlab.data.stream import cpu_rng_seeded
    ours = attnlab_loader(folder, files, [0] * len(files), 1, 0).dataset.transform
    theirs = timm_loader(folder, files, 1, 0).dataset.transform

    def decode(f):
        with Image.open(folder / f) as im:
            return im.convert("RGB")

    def fork_seed(i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)

    def own_seed(i):
        with cpu_rng_seeded(i):
            pass
    sample = files[:images]
    decoded = [decode(f) for f in sample]
    best = {}

    def keep(name, seconds):
        best[name] = min(best.get(name, float("inf")), 1000 * seconds / len(sample))
    for _ in range(rounds):
        t = time.perf_counter()
        for f in sample:
            decode(f)
        keep("decode", time.perf_counter() - t)
        for who, compose in (("attnlab", ours), ("timm", theirs)):
            spent = {}
            for im in decoded:
                x = im
                for stage in compose.transforms:
                    t = time.perf_counter()
                    x = stage(x)
                    spent[type(stage).__name__] = spent.get(type(stage).__name__, 0.0) + time.perf_counter() - t
            for stage, seconds in spent.items():
                keep(f"{who}: {stage}", seconds)
            keep(f"{who}: all stages", sum(spent.values()))
        for name, fn in (("seeding: fork_rng + manual_seed", fork_seed), ("seeding: cpu_rng_seeded", own_seed)):
            t = time.perf_counter()
            for i in range(len(sample)):
                fn(i)
            keep(name, time.perf_counter() - t)
    return {k: round(v, 3) for k, v in best.items()}


def one_pass(loader, epoch: int) -> tuple[float, int]:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    n, t = 0, time.perf_counter()
    for x, y in loader:
        assert x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32
        n += len(y)
    return time.perf_counter() - t, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=None, help="class folders of JPEGs (default: generate --images in a temp dir)")
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process (default 1)")
    p.add_argument("--out", default=str(ROOT / "results" / "stream_loader.json"))
    args = p.parse_args(argv)
    if args.images < args.batch_size or args.repeats < 1 or args.workers < 0:
        p.error("need --images >= --batch-size, --repeats >= 1 and --workers >= 0")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder:
            folder, generated = Path(args.folder), False
        else:
            t0 = time.perf_counter()
            folder, generated = make_folder(Path(tmp) / "train", args.images), True
            print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
        files, labels = list_images(folder, args.images)
        ours = attnlab_loader(folder, files, labels, args.batch_size, args.workers)
        theirs = timm_loader(folder, files, args.batch_size, args.workers)
        rates = {"attnlab_stream": [], "timm_create_loader": []}
        load = []
        for r in range(args.repeats):
            for name, loader in (("attnlab_stream", ours), ("timm_create_loader", theirs)):
                dt, n = one_pass(loader, r)
                rates[name].append(n / dt)
                print(f"repeat {r + 1}/{args.repeats} {name}: {n} images in {dt:.2f} s, {n / dt:.1f} images/s",
                      flush=True)
            load.append(os.getloadavg()[0])
        stages = stage_costs(folder, files)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {
        "what": "training-batch images/s of one full pass (worker start included), 224 px, RandomResizedCrop + "
                "flip + colour jitter 0.4, normalised float32; medians over interleaved repeats",
        "images": len(files), "generated_folder": generated, "batch_size": args.batch_size,
        "workers": args.workers, "repeats": args.repeats, "main_threads": args.threads,
        "images_per_s": {k: round(v, 1) for k, v in med.items()},
        "ratio_attnlab_over_timm": round(med["attnlab_stream"] / med["timm_create_loader"], 3),
        "per_repeat": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "load_average_1min": [round(x, 2) for x in load],
        "ms_per_image_one_thread": stages,
        "host": host_info(), "timm": __import__("timm").__version__,
        "note": "on a shared CPU the numbers move with the background load (load_average_1min); compare the two "
                "loaders within one run only",
    }
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(dest, out, "loader benchmark")
    print(json.dumps(out["images_per_s"]), f"ratio {out['ratio_attnlab_over_timm']}", f"-> {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
