"""Evaluation: ``evaluate(model, loader)`` for the training loop, and ``attnlab eval --checkpoint PATH``.

Accuracies are percentages (0-100). The command rebuilds the model from the checkpoint's own config, evaluates the
EMA weights when the run kept them, prints top-1/top-5 and writes ``eval_<split>.json`` next to the checkpoint.
"""
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import AttnlabError
from ..files import atomic_write_json, portable_path
from .distributed import Dist
from .metrics import Meter, topk_hits
from .precision import autocast


@torch.no_grad()
def evaluate(model, loader, device, precision: str = "fp32", channels_last: bool = False, d: Dist = Dist()) -> dict:
    """Mean cross-entropy and top-1/top-5 (%) over the split, summed on the device, reduced over ranks.

    Under DDP each rank evaluates its strided shard; the loader pads the last positions by wrapping around
    (rank r holds global positions r, r + W, ...), and those duplicates are masked out so every image counts once.
    """
    was_training = model.training
    model.eval()
    meter = Meter(device)
    w, n, b = loader.world_size, loader.n, loader.batch_size
    for i, (x, y) in enumerate(loader):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        hit1, hit5 = topk_hits(logits, y)
        if w > 1:
            valid = (loader.rank + (i * b + torch.arange(len(y), device=y.device)) * w) < n
            loss, hit1, hit5 = loss * valid, hit1 & valid, hit5 & valid
            meter.add("n", valid.sum(), 1)
        else:
            meter.count("n", len(y))
        meter.add("loss", loss.sum(), 1)
        meter.add("top1", hit1.sum(), 100.0)
        meter.add("top5", hit5.sum(), 100.0)
    model.train(was_training)
    return meter.result(d)


def add_arguments(p):
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint file, or a run directory (its checkpoint_best.pt, else checkpoint_last.pt)")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default: the run's)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the run's)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights even if the run kept an EMA")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="where to write the JSON (default: eval_<split>.json beside the checkpoint)")


def run(args):
    from .run_folder import open_run

    run = open_run(args.checkpoint, args.device, use_ema=not args.no_ema)
    loader = getattr(run.loaders(args.batch_size, args.data_dir), args.split)
    if loader is None:
        raise AttnlabError(f"the run has no {args.split} split (data.val_size=0)")
    start = time.perf_counter()
    res = evaluate(run.model, loader, run.device, run.precision, channels_last=run.channels_last)
    out = {"checkpoint": portable_path(run.checkpoint), "split": args.split, "epoch": run.ckpt.get("epoch"),
           "ema": bool(run.ckpt.get("ema")) and not args.no_ema, "top1": res["top1"], "top5": res["top5"],
           "loss": res["loss"], "precision": run.precision,
           "images": int(res["n"]), "seconds": round(time.perf_counter() - start, 3)}
    dest = Path(args.out) if args.out else run.folder.eval_json(args.split)
    try:
        atomic_write_json(dest, out, "evaluation")
    except AttnlabError as err:
        raise AttnlabError(f"{err}; evaluated {args.split} top-1 {out['top1']:.2f}%; write it elsewhere with "
                           "--out PATH") from None
    print(f"{args.split}: top-1 {out['top1']:.2f}%  top-5 {out['top5']:.2f}%  loss {out['loss']:.4f}  "
          f"({out['images']} images, epoch {out['epoch']})  -> {dest}")
    return 0
