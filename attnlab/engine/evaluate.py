"""Evaluation: ``evaluate(model, loader)`` for the training loop, and ``attnlab eval --checkpoint PATH``.

Accuracies are percentages (0-100). The command rebuilds the model from the checkpoint's own config, evaluates the
EMA weights when the run kept them, prints top-1/top-5 and writes ``eval_<split>.json`` next to the checkpoint.

TDAM's official evaluation (``eval.tdam_any_step: true``, off by default): beside plain top-1, ``top1_any_step``
counts an image correct if the top-1 prediction of ANY of TDAM's T computation steps is its label. A step t is the
network with the last stage's TDAM blocks run for t steps (``time_steps = t``, the earlier stages keep their T, as
the official ``output_over_t``); step T is the plain forward. Where the official code differs
(shantanuj/TDAM_Top_down_attention_module, ``custom_utils.filter_pred_with_iou`` and
``accuracy_over_iou_filtered``; research note ../shared/research/tdam.md section 3): before the "any step" count it
merges steps whose CAM boxes overlap (IoU > 0.5: the more confident step's prediction replaces the other's). That
merge can only turn an any-step hit into a miss, so the number here is an upper bound of the official one (equal
when no two steps' boxes overlap by more than 0.5). The official trainer also keeps the checkpoint with the best
any-step top-1; here model selection stays on plain top-1.
"""
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import AttnlabError, positive_int
from ..files import atomic_write_json, portable_path
from .distributed import Dist
from .metrics import Meter, topk_hits
from .precision import autocast


def any_step_modules(model, option="eval.tdam_any_step", fix="set eval.tdam_any_step=false") -> list:
    """The last stage's TDAM modules that ``tdam_any_step`` varies; a clear error naming the ``option`` that asked
    for them and the ``fix`` when there are none."""
    from ..attention.tdam import stage_tdams
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the steps run eagerly
    if not hasattr(model, "fc") or not hasattr(model, "stages"):
        raise AttnlabError(f"{option} needs an attnlab ResNet, got {type(model).__name__}")
    mods = stage_tdams(model.stages()[-1])
    if not mods:
        raise AttnlabError(f"{option} needs TDAM blocks in the last stage; attention "
                           f"'{getattr(model, 'attention', '?')}' has none ({fix})")
    return mods


def step_hits(model, x, y, last_logits, mods) -> torch.Tensor:
    """Per image: is the top-1 prediction of any step t = 1..T correct (``last_logits`` is step T's output)."""
    from ..attention.tdam import tdam_steps
    hit = last_logits.argmax(1).eq(y)
    eager = getattr(model, "_orig_mod", model)
    for t in range(1, max(m.time_steps for m in mods)):
        with tdam_steps(mods, t):
            hit |= eager(x).argmax(1).eq(y)
    return hit


@torch.no_grad()
def evaluate(model, loader, device, precision: str = "fp32", channels_last: bool = False, d: Dist = Dist(),
             tdam_any_step: bool = False, on_batch=None) -> dict:
    """Mean cross-entropy and top-1/top-5 (%) over the split, summed on the device, reduced over ranks.

    ``tdam_any_step``: also ``top1_any_step``, TDAM's official "any step correct" top-1 (module docstring).
    ``on_batch(images)``: called after each batch (``attnlab eval`` shows its progress with it).

    Under DDP each rank evaluates its strided shard; the loader pads the last positions by wrapping around
    (rank r holds global positions r, r + W, ...), and those duplicates are masked out so every image counts once.
    """
    was_training = model.training
    model.eval()
    meter = Meter(device)
    mods = any_step_modules(model) if tdam_any_step else None
    w, n, b = loader.world_size, loader.n, loader.batch_size
    for i, (x, y) in enumerate(loader):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        hit1, hit5 = topk_hits(logits, y)
        if mods is not None:
            with autocast(device, precision):
                any_hit = step_hits(model, x, y, logits, mods)
        if w > 1:
            valid = (loader.rank + (i * b + torch.arange(len(y), device=y.device)) * w) < n
            loss, hit1, hit5 = loss * valid, hit1 & valid, hit5 & valid
            if mods is not None:
                any_hit = any_hit & valid
            meter.add("n", valid.sum(), 1)
        else:
            meter.count("n", len(y))
        meter.add("loss", loss.sum(), 1)
        meter.add("top1", hit1.sum(), 100.0)
        meter.add("top5", hit5.sum(), 100.0)
        if mods is not None:
            meter.add("top1_any_step", any_hit.sum(), 100.0)
        if on_batch is not None:
            on_batch(len(y))
    model.train(was_training)
    return meter.result(d)


def add_arguments(p):
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint file, or a run directory (its checkpoint_best.pt, else checkpoint_last.pt)")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=positive_int, default=None, help="evaluation batch (default: the run's)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the run's)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights even if the run kept an EMA")
    p.add_argument("--tdam-any-step", action="store_true",
                   help="also TDAM's official 'any step correct' top-1 (default: the run's eval.tdam_any_step)")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="where to write the JSON (default: eval_<split>.json beside the checkpoint)")


def run(args):
    from ..data.cache import Progress
    from .run_folder import data_dir_hint_as_option, open_run, refuse_overwriting_run

    run = open_run(args.checkpoint, args.device, use_ema=not args.no_ema)
    if args.out:
        refuse_overwriting_run(args.out, run.checkpoint, "--out")
    if args.tdam_any_step:  # before the data loads
        any_step_modules(run.model, "--tdam-any-step", "drop --tdam-any-step")
    with data_dir_hint_as_option():
        loader = getattr(run.loaders(args.batch_size, args.data_dir), args.split)
    if loader is None:
        raise AttnlabError(f"the run has no {args.split} split (data.val_size=0)")
    start = time.perf_counter()
    any_step = args.tdam_any_step or bool((run.config.get("eval") or {}).get("tdam_any_step", False))
    progress = Progress(loader.n, f"eval {args.split}", verb="evaluated")  # from 1,000 images on
    try:
        res = evaluate(run.model, loader, run.device, run.precision, channels_last=run.channels_last,
                       tdam_any_step=any_step, on_batch=progress.update)
    finally:
        progress.close()
    out = {"checkpoint": portable_path(run.checkpoint), "split": args.split, "epoch": run.ckpt.get("epoch"),
           "ema": bool(run.ckpt.get("ema")) and not args.no_ema, "top1": res["top1"], "top5": res["top5"],
           "loss": res["loss"], "precision": run.precision,
           "images": int(res["n"]), "seconds": round(time.perf_counter() - start, 3)}
    if any_step:
        out["top1_any_step"] = res["top1_any_step"]
    dest = Path(args.out) if args.out else run.folder.eval_json(args.split)
    try:
        atomic_write_json(dest, out, "evaluation")
    except AttnlabError as err:
        raise AttnlabError(f"{err}; evaluated {args.split} top-1 {out['top1']:.2f}%; write it elsewhere with "
                           "--out PATH") from None
    extra = f"  any-step top-1 {out['top1_any_step']:.2f}%" if any_step else ""
    print(f"{args.split}: top-1 {out['top1']:.2f}%{extra}  top-5 {out['top5']:.2f}%  loss {out['loss']:.4f}  "
          f"({out['images']} images, epoch {out['epoch']})  -> {dest}")
    return 0
