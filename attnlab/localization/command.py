"""``attnlab localize --checkpoint RUN``: weakly-supervised localization metrics of a trained classifier.

The CAM of the ground-truth class on the ``val`` split (Tiny-ImageNet: held out of train, boxes from its train
annotations; WSOL metadata: the metadata's fully supervised val) chooses the threshold tau (best GT-known Loc); the
``test`` split (Tiny-ImageNet's official val, or the metadata's test) is then scored once at that tau, and every
metric is also given at its oracle tau (see ``metrics.py``). An image may have several boxes (WSOL metadata): a box
hits when it matches any of them. The centre-Gaussian and full-image-box priors are computed on the same boxes and
printed beside the model. Results go to ``localize.json`` next to the checkpoint (written atomically).

WSOL metadata with masks (OpenImages' layout) is scored by PxAP instead (``pxap.py``), with the pixel IoU at the
tau chosen on the first split and at its oracle tau; the priors are the same centre Gaussian and the full image (a
constant map: PxAP = the foreground fraction). ``metric_family`` in the results says which family applies: box
datasets have no PxAP, mask datasets no box metric.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..errors import AttnlabError, positive_int
from ..files import portable_path
from .cam import METHODS, score_maps
from ..data.boxes import split_box_sets
from ..data.masks import has_masks, split_masks
from .metrics import (BoxEvaluator, centre_gaussian, normalize_scoremaps, prior_baselines, require_cv2,
                      select_threshold, summarize, thresholds_grid)
from .pxap import MaskEvaluator, best_tau

FAMILIES = {"boxes": "boxes: MaxBoxAccV2, MaxBoxAcc, GT-known / Top-1 / Top-5 Loc (PxAP needs masks)",
            "masks": "masks: PxAP and pixel IoU (box metrics need boxes)"}


def open_trained(checkpoint, device="auto", use_ema: bool = True):
    """The trained run (engine's ``open_run``) with its model kept in contiguous memory: CAMs read the hooked
    features in fp32, whatever memory format and autocast the run trained in (as every committed WSOL result)."""
    from ..engine.run_folder import open_run
    return open_run(checkpoint, device, use_ema=use_ema, channels_last=False)


def batches(model, split, bundle, batch_size: int):
    """(start index, normalised images, labels) over ``split`` in order, on the model's device; progress on stderr
    for a split of a thousand images or more (an ImageNet val split takes minutes)."""
    from ..data.cache import Progress
    from ..data.loader import BatchLoader
    device = next(model.parameters()).device
    loader = BatchLoader(split, batch_size=batch_size, shuffle=False, augment=False, mean=bundle.mean,
                         std=bundle.std, device=device, seed=0, drop_last=False)
    progress = Progress(len(split), f"localize {split.name}", verb="scored")
    start = 0
    try:
        for x, y in loader:
            yield start, x, y
            start += len(y)
            progress.update(len(y))
    finally:  # a terminal's bar is closed even when scoring fails
        progress.close()


def split_curves(model, split, bundle, thresholds, batch_size: int = 250, method: str = "cam"):
    """(V2 IoU curves, V1 IoU curves, top-1 hits, top-5 hits) of the ground-truth-class maps of ``split``."""
    boxes = split_box_sets(split, bundle.name)
    size = tuple(split.images.shape[2:])
    ev = BoxEvaluator(thresholds)
    hit1, hit5 = [], []
    for start, x, y in batches(model, split, bundle, batch_size):
        maps, logits = score_maps(model, x, y, method)
        ev.add(normalize_scoremaps(maps, size), boxes[start:start + len(y)])
        _hits(logits, y, hit1, hit5)
    multi, single = ev.curves()
    return multi, single, torch.cat(hit1).numpy(), torch.cat(hit5).numpy()


def _hits(logits, y, hit1: list, hit5: list) -> None:
    """Append the batch's top-1 and top-5 hits."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit1.append((top[:, 0] == y).cpu())
    hit5.append((top == y[:, None]).any(1).cpu())


def split_histograms(model, split, bundle, thresholds, batch_size: int = 250, method: str = "cam"):
    """({"model", "centre_gaussian", "full_image"}: MaskEvaluator, top-1 hits, top-5 hits) of ``split``'s
    ground-truth-class maps and of the two priors, each batch's masks decoded once for all three."""
    size = tuple(split.images.shape[2:])
    gauss = centre_gaussian(size)
    evs = {k: MaskEvaluator(thresholds) for k in ("model", "centre_gaussian", "full_image")}
    hit1, hit5 = [], []
    for start, x, y in batches(model, split, bundle, batch_size):
        maps, logits = score_maps(model, x, y, method)
        masks = split_masks(split, range(start, start + len(y)), bundle.name)
        evs["model"].add(normalize_scoremaps(maps, size), masks)
        evs["centre_gaussian"].add(np.broadcast_to(gauss, masks.shape), masks)
        evs["full_image"].add(np.zeros(masks.shape, np.float32), masks)  # a constant map normalises to zeros
        _hits(logits, y, hit1, hit5)
    return evs, torch.cat(hit1).numpy(), torch.cat(hit5).numpy()


def metric_family(bundle, splits) -> str:
    """'masks' when the evaluated splits carry masks (OpenImages' metadata), else 'boxes'."""
    return "masks" if all(has_masks(getattr(bundle, s)) for s in splits) else "boxes"


def localize(model, bundle, splits=("val", "test"), interval: float = 0.001, batch_size: int = 250,
             method: str = "cam") -> dict:
    """Metrics of the model and of the priors on ``splits`` (the first one chooses tau for the others)."""
    require_cv2()
    for name in splits:
        bundle.nonempty(name, "--splits")
    thresholds = thresholds_grid(interval)
    family = metric_family(bundle, splits)
    out = {"dataset": bundle.name, "metric_family": family, "method": method, "interval": float(interval),
           "image_size": list(bundle.train.images.shape[2:]), "tau_split": splits[0], "splits": {}, "priors": {}}
    if family == "masks":
        return _localize_masks(out, model, bundle, splits, thresholds, batch_size, method)
    tau = prior_tau = None
    for name in splits:
        split = getattr(bundle, name)
        multi, single, hit1, hit5 = split_curves(model, split, bundle, thresholds, batch_size, method)
        if tau is None:
            tau = select_threshold(single, thresholds)[1]
        res = summarize(multi, single, thresholds, hit1, hit5, tau=tau)
        res["top1"], res["top5"] = float(100 * hit1.mean()), float(100 * hit5.mean())
        out["splits"][name] = res
        boxes = split_box_sets(split, bundle.name)
        priors = prior_baselines(boxes, split.images.shape[2:], thresholds, tau=prior_tau)
        prior_tau = priors["centre_gaussian"]["tau"]  # the prior's own tau, chosen on the first split too
        out["priors"][name] = priors
    out["tau"] = tau
    return out


def _localize_masks(out, model, bundle, splits, thresholds, batch_size, method) -> dict:
    """``localize`` on a mask dataset: PxAP, pixel IoU and classification per split, and the priors' PxAP."""
    tau = prior_tau = None
    for name in splits:
        evs, hit1, hit5 = split_histograms(model, getattr(bundle, name), bundle, thresholds, batch_size, method)
        if tau is None:  # the first split chooses both taus: the model's and the Gaussian's own
            tau, prior_tau = best_tau(evs["model"]), best_tau(evs["centre_gaussian"])
        res = evs["model"].result(tau)
        res.update(tau=tau, top1=float(100 * hit1.mean()), top5=float(100 * hit5.mean()))
        out["splits"][name] = res
        out["priors"][name] = {"centre_gaussian": dict(evs["centre_gaussian"].result(prior_tau), tau=prior_tau),
                               "full_image": evs["full_image"].result()}
    out["tau"] = tau
    return out


def _mask_row(label, r):
    top = "".join(f"{r[k]:7.2f}" if k in r else f"{'-':>7}" for k in ("top1", "top5"))
    iou = r["pixel_iou"]
    at = f"{iou['at_tau']:6.2f} ({iou['oracle']:5.2f})" if "at_tau" in iou else f"{iou['oracle']:6.2f} (oracle)"
    return f"{label:<22}{top}  {r['pxap']:6.2f}  {at}  {r['foreground_fraction']:6.2f}"


def format_mask_table(res: dict) -> str:
    lines = [f"metric family: {FAMILIES['masks']}",
             f"tau = {res['tau']:.3f} (chosen on {res['tau_split']}: best pixel IoU); pixel IoU: at tau (oracle tau)",
             f"{'':<22}{'top-1':>7}{'top-5':>7}  {'PxAP':>6}  {'pixel IoU':<14}  {'fg %':>6}"]
    for name, r in res["splits"].items():
        lines.append(_mask_row(f"{name}: model", r))
        p = res["priors"][name]
        lines.append(_mask_row(f"{name}: centre Gaussian", p["centre_gaussian"]))
        lines.append(_mask_row(f"{name}: full image", p["full_image"]))
    return "\n".join(lines)


def _row(label, r):
    iou = r["max_box_acc_v2_iou"]
    loc = lambda key: (f"{r[key]['at_tau']:6.2f} ({r[key]['oracle']:5.2f})" if key in r and "at_tau" in r[key]
                       else f"{r[key]['oracle']:6.2f} (oracle)" if key in r else f"{'-':>14}")
    top1 = f"{r['top1']:6.2f}" if "top1" in r else f"{'-':>6}"
    return (f"{label:<22}{top1}  {r['max_box_acc_v2']:6.2f} ({iou['30']:5.1f}/{iou['50']:5.1f}/{iou['70']:5.1f})"
            f"  {r['max_box_acc']:6.2f}  {loc('gt_known_loc')}  {loc('top1_loc')}  {loc('top5_loc')}")


def format_table(res: dict) -> str:
    if res.get("metric_family") == "masks":
        return format_mask_table(res)
    lines = [f"metric family: {FAMILIES['boxes']}",
             f"tau = {res['tau']:.3f} (chosen on {res['tau_split']}: best GT-known Loc); Loc columns: at tau "
             f"(oracle tau)",
             f"{'':<22}{'top-1':>6}  {'MaxBoxAccV2 (30/50/70)':<27}  {'V1':>6}  {'GT-known Loc':<14}  "
             f"{'Top-1 Loc':<14}  {'Top-5 Loc':<14}"]
    for name, r in res["splits"].items():
        lines.append(_row(f"{name}: model", r))
        p = res["priors"][name]
        lines.append(_row(f"{name}: centre Gaussian", p["centre_gaussian"]))
        f = p["full_image"]
        lines.append(f"{name + ': full-image box':<22}{'-':>6}  {f['mean']:6.2f} ({f['iou']['30']:5.1f}/"
                     f"{f['iou']['50']:5.1f}/{f['iou']['70']:5.1f})  {f['iou']['50']:6.2f}  {f['gt_known_loc']:6.2f}")
    return "\n".join(lines)


def add_arguments(p):
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint file, or a run directory (its checkpoint_best.pt, else checkpoint_last.pt)")
    p.add_argument("--splits", default="val,test",
                   help="comma-separated; the first (default val, held out of train) chooses tau (default: val,test)")
    p.add_argument("--cam", choices=METHODS, default="cam", help="score map: cam (default) or gradcam")
    p.add_argument("--interval", type=float, default=0.001, help="threshold grid step over [0, 1) (default 0.001)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=positive_int, default=250)
    p.add_argument("--data-dir", default=None, help="dataset folder, or WSOL image root (default: the run's)")
    p.add_argument("--metadata", default=None, help="WSOL metadata folder (default: the run's data.metadata)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the run kept an EMA")
    p.add_argument("--out", "--output", dest="output", default=None, metavar="PATH",
                   help="JSON path (default: localize.json next to the checkpoint); --out as in eval, profile, show")


def run(args):
    from ..engine.run_folder import data_dir_hint_as_option, refuse_overwriting_run
    from ..files import atomic_write_json
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    if not splits or any(s not in ("val", "test") for s in splits) or len(set(splits)) != len(splits):
        raise AttnlabError(f"--splits takes val and/or test, comma-separated, got '{args.splits}'")
    if args.batch_size < 1:
        raise AttnlabError(f"--batch-size must be >= 1, got {args.batch_size}")
    require_cv2()
    run = open_trained(args.checkpoint, args.device, not args.no_ema)
    if args.output:
        refuse_overwriting_run(args.output, run.checkpoint, "--out")
    with data_dir_hint_as_option():
        bundle = run.dataset(args.data_dir, args.metadata)
    start = time.perf_counter()
    res = localize(run.model, bundle, splits, args.interval, args.batch_size, args.cam)
    model_cfg = run.config["model"]
    res.update(checkpoint=portable_path(run.checkpoint), epoch=run.ckpt.get("epoch"),
               attention=model_cfg["attention"], model=model_cfg["name"],
               ema=bool(run.ckpt.get("ema")) and not args.no_ema, seconds=round(time.perf_counter() - start, 2))
    dest = Path(args.output) if args.output else run.folder.path / "localize.json"
    atomic_write_json(dest, res, "localization JSON")
    print(format_table(res))
    print(f"-> {dest}")
    return 0

