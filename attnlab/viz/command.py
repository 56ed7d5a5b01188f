"""``attnlab show --checkpoint RUN``: PNG grids of where a trained network looks.

Written to ``<run>/show/`` (or ``--out``), each atomically:
  * ``cams.png``: per image, the picture with its ground-truth boxes (green, every box of the image, when the
    dataset has boxes; WSOL metadata may give several), the CAM of
    the ground-truth class with the box extracted at tau (red; largest contour, as GT-known Loc), and the CAM of
    the top-1 predicted class;
  * ``spatial_gates.png``: the "spatial" gates (CBAM's, TDAM's searchlight map sigmoid(sum_c S_c X'_c), triplet's
    H-W branch) and the channel mean of the "full" ones (SimAM, BAM), last block of each stage that has one (last
    modulation step), as heat maps;
  * ``channel_gates.png``: the "channel" gates (SE / ECA / SPE / DIA / CBAM / TDAM's searchlight / GCT / FcaNet /
    GC's scale fusion) and the spatial mean of the "full" ones, one panel per stage (last block of the stage): mean
    over the shown images per channel, with the min-max band;
  * ``axis_gates.png``: the "channel-height" and "channel-width" gates (Coordinate Attention's g_h and g_w, triplet's
    H-C and C-W branches), one panel per kind and stage: channels x rows (or columns), mean over the shown images;
  * ``tdam_steps.png``: TDAM's per-step CAMs side by side (step 1 = no feedback), each with its own top-1 class.
On a dataset with masks (WSOL metadata in OpenImages' layout) the image row shows the ground-truth mask as a
translucent overlay (green; ignored pixels grey) and the CAM row outlines it (green) with the pixels whose score
reaches tau (red), titled by their pixel IoU. Works without boxes or masks (CIFAR-10): the overlays are then left
out. tau is read from ``localize.json`` next to the
checkpoint when it exists (the threshold chosen on val), else ``--tau`` (default 0.25).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import files
from ..data.masks import FOREGROUND, IGNORE
from ..errors import AttnlabError, positive_int

DEFAULT_TAU = 0.25


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (attnlab.files) and close it."""
    files.save_figure(fig, path, "picture", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def pick_images(n_split: int, count: int, labels: torch.Tensor) -> list[int]:
    """``count`` indices spread over the split, preferring distinct classes (deterministic)."""
    count = max(1, min(count, n_split))
    order = np.linspace(0, n_split - 1, num=min(n_split, count * 8)).round().astype(int)
    chosen, seen = [], set()
    for i in order:
        c = int(labels[i])
        if c not in seen:
            chosen.append(int(i))
            seen.add(c)
        if len(chosen) == count:
            return chosen
    for i in order:  # fewer classes than images: fill up
        if int(i) not in chosen:
            chosen.append(int(i))
        if len(chosen) == count:
            break
    return chosen


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy()


def _box(ax, box, color):
    from matplotlib.patches import Rectangle
    x0, y0, x1, y1 = [float(v) for v in box]
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor=color, lw=1.8))


def _clean(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def _short(name: str) -> str:
    return name.split(",")[0][:16]


def _boxes(ax, boxes, color):
    """Draw every box of one image (a (k, 4) array, or one (4,) box)."""
    for box in np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
        _box(ax, box, color)


def _mask_overlay(ax, mask):
    """The ground-truth mask over the picture: foreground translucent green, ignored pixels translucent grey."""
    rgba = np.zeros((*mask.shape, 4), np.float32)
    rgba[mask == FOREGROUND] = (0.0, 1.0, 0.0, 0.45)
    rgba[mask == IGNORE] = (0.5, 0.5, 0.5, 0.45)
    ax.imshow(rgba, interpolation="nearest")


def _outline(ax, region, colour):
    """The border of a bool region (nothing to draw when it is empty or the whole frame)."""
    if region.any() and not region.all():
        ax.contour(region.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2)


def _mask_iou(scoremap, mask, tau) -> float:
    """Pixel IoU of ``scoremap >= tau`` with the mask's foreground, ignored pixels left out (as PxAP does)."""
    pred, fg, kept = scoremap >= tau, mask == FOREGROUND, mask != IGNORE
    union = ((pred | fg) & kept).sum()
    return float((pred & fg).sum() / union) if union else 0.0


def _draw_masks(axes, j, mask, gt_map, tau):
    """Column ``j`` of the first two rows for a mask dataset."""
    _mask_overlay(axes[0, j], mask)
    _outline(axes[1, j], mask == FOREGROUND, "lime")
    _outline(axes[1, j], gt_map >= tau, "red")
    axes[1, j].set_title(f"pixel IoU {_mask_iou(gt_map, mask, tau):.2f}", fontsize=8)


def cam_figure(images, labels, class_names, gt_maps, pred_maps, preds, boxes, tau, masks=None):
    """Rows: image (+ GT boxes), GT-class CAM (+ its box at tau), predicted-class CAM; one column per image.

    ``boxes``: None, or per image its ground-truth boxes, a (k, 4) array (all k are drawn; the IoU shown is the
    best over them, as wsolevaluation scores an image with several boxes). ``masks``: None, or (n, H, W) uint8
    ground-truth maps (``data.masks.gt_mask``), drawn instead of boxes."""
    from ..localization.metrics import box_iou, boxes_from_scoremap
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 6.4), squeeze=False)
    for j in range(n):
        img = _hwc(images[j])
        ax = axes[0, j]
        ax.imshow(img)
        ax.set_title(_short(class_names[int(labels[j])]), fontsize=8)
        if boxes is not None:
            _boxes(ax, boxes[j], "lime")
        ax = axes[1, j]
        ax.imshow(img)
        ax.imshow(gt_maps[j], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        if boxes is not None:
            pred_box = boxes_from_scoremap(gt_maps[j], [tau], multi_contour=False)[0][0]
            _boxes(ax, boxes[j], "lime")
            _box(ax, pred_box, "red")
            ax.set_title(f"IoU {box_iou(pred_box, np.asarray(boxes[j]).reshape(-1, 4)).max():.2f}", fontsize=8)
        if masks is not None:
            _draw_masks(axes, j, masks[j], gt_maps[j], tau)
        ax = axes[2, j]
        ax.imshow(img)
        ax.imshow(pred_maps[j], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ok = int(preds[j]) == int(labels[j])
        ax.set_title(("= " if ok else "x ") + _short(class_names[int(preds[j])]), fontsize=8,
                     color="black" if ok else "crimson")
    for ax in axes.flat:
        _clean(ax)
    kind = "box" if boxes is not None else "mask" if masks is not None else None
    axes[0, 0].set_ylabel(f"image, GT {kind}" if kind else "image", fontsize=8)
    axes[1, 0].set_ylabel(f"CAM of GT class\n{kind} at tau={tau:.3f}" if kind else "CAM of GT class", fontsize=8)
    axes[2, 0].set_ylabel("CAM of top-1 class", fontsize=8)
    fig.suptitle(f"Class activation maps (green: ground truth, red: {kind} from the CAM)" if kind
                 else "Class activation maps", fontsize=10)
    return fig


SPATIAL, CHANNEL, AXIS = ("spatial", "full"), ("channel", "full"), ("channel-height", "channel-width")


def last_per_stage(gates, kinds) -> dict:
    """{stage: Gate} for the last block (and last step) of each stage that recorded a gate of one of ``kinds``."""
    out = {}
    for g in gates:
        if g.kind in kinds:
            out[g.block.split(".")[0]] = g  # records come in forward order: the last one wins
    return out


def spatial_map(g) -> torch.Tensor:
    """(images, H, W): a spatial gate, or the mean over channels of a full one."""
    return g.values.mean(1) if g.kind == "full" else g.values


def channel_profile(g) -> torch.Tensor:
    """(images, C): a channel gate, or the mean over positions of a full one."""
    return g.values.mean((2, 3)) if g.kind == "full" else g.values


def _top(values) -> float:
    """The colour / axis top: 1 for gates below 1, else 5% above the largest (GCT's and BAM's reach 1 or more)."""
    largest = max(float(v.max()) for v in values)
    return 1.0 if largest < 1 else 1.05 * largest


def spatial_figure(images, gates, attention):
    plt = _plt()
    per_stage = last_per_stage(gates, SPATIAL)
    stages = list(per_stage)
    maps = {stage: spatial_map(g) for stage, g in per_stage.items()}
    top = _top(maps.values())
    n = len(images)
    fig, axes = plt.subplots(n, 1 + len(stages), figsize=(1.9 * (1 + len(stages)), 1.9 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(_hwc(images[i]))
        for k, stage in enumerate(stages):
            g = per_stage[stage]
            ax = axes[i, 1 + k]
            v = maps[stage][i].numpy()
            im = ax.imshow(v, cmap="magma", vmin=0, vmax=top)
            if i == 0:
                ax.set_title(f"{g.block} ({v.shape[0]}x{v.shape[1]})", fontsize=8)
            ax.set_xlabel(f"{v.min():.2f}..{v.max():.2f}", fontsize=7)
    for ax in axes.flat:
        _clean(ax)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="gate")
    full = " (per-element gates: mean over channels)" if any(g.kind == "full" for g in per_stage.values()) else ""
    fig.suptitle(f"{attention}: spatial gates, last block of each stage{full}", fontsize=10)
    return fig


def channel_figure(gates, attention):
    plt = _plt()
    per_stage = last_per_stage(gates, CHANNEL)
    stages = list(per_stage)
    profiles = {stage: channel_profile(g) for stage, g in per_stage.items()}
    top = _top(profiles.values())
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 2.8), squeeze=False)
    for k, stage in enumerate(stages):
        g = per_stage[stage]
        v = profiles[stage].numpy()  # (images, channels)
        ax = axes[0, k]
        x = np.arange(v.shape[1])
        ax.fill_between(x, v.min(0), v.max(0), color="tab:blue", alpha=0.25, lw=0, label="min-max over images")
        ax.plot(x, v.mean(0), color="tab:blue", lw=1.2, label="mean")
        ax.set_ylim(0, top)
        ax.set_xlabel("channel", fontsize=8)
        mean = ", mean over H x W" if g.kind == "full" else ""
        ax.set_title(f"{g.block} ({v.shape[1]} channels{mean})", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("gate", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{attention}: channel gates, last block of each stage", fontsize=10, y=1.04)
    return fig


def axis_figure(gates, attention):
    """One row per kind (channel-height, channel-width), one panel per stage: channels x positions, mean over the
    shown images."""
    plt = _plt()
    rows = [(kind, last_per_stage(gates, (kind,))) for kind in AXIS]
    rows = [(kind, per_stage) for kind, per_stage in rows if per_stage]
    stages = list(dict.fromkeys(stage for _, per_stage in rows for stage in per_stage))
    top = _top(g.values for _, per_stage in rows for g in per_stage.values())
    fig, axes = plt.subplots(len(rows), len(stages), figsize=(3.2 * len(stages), 3.3 * len(rows)), squeeze=False)
    fig.subplots_adjust(hspace=0.45)
    for r, (kind, per_stage) in enumerate(rows):
        for k, stage in enumerate(stages):
            ax = axes[r, k]
            g = per_stage.get(stage)
            if g is None:
                ax.set_axis_off()
                continue
            v = g.values.mean(0).numpy()  # (channels, positions)
            im = ax.imshow(v, cmap="magma", vmin=0, vmax=top, aspect="auto", interpolation="nearest")
            ax.set_title(f"{g.block} {kind}", fontsize=8)
            ax.set_xlabel("row" if kind == "channel-height" else "column", fontsize=7)
            ax.set_ylabel("channel", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="gate, mean over images")
    fig.suptitle(f"{attention}: channel x row / column gates, last block of each stage", fontsize=10)
    return fig


def steps_figure(images, step_maps, step_preds, labels, class_names):
    plt = _plt()
    n, steps = len(images), len(step_maps)
    fig, axes = plt.subplots(n, 1 + steps, figsize=(1.9 * (1 + steps), 1.9 * n), squeeze=False)
    for i in range(n):
        img = _hwc(images[i])
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(_short(class_names[int(labels[i])]), fontsize=8)
        for t in range(steps):
            ax = axes[i, 1 + t]
            ax.imshow(img)
            ax.imshow(step_maps[t][i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            p = int(step_preds[t][i])
            ax.set_title(f"step {t + 1}: {_short(class_names[p])}", fontsize=7,
                         color="black" if p == int(labels[i]) else "crimson")
    for ax in axes.flat:
        _clean(ax)
    fig.suptitle("TDAM: CAM of each step's top-1 class (step 1 = no feedback)", fontsize=10)
    return fig


def _tau(path: Path, given, method: str):
    """The box threshold: --tau, else the one `attnlab localize` chose for the same kind of map (cam or gradcam),
    else the default; and where it came from."""
    if given is not None:
        return float(given), "--tau"
    loc = path.parent / "localize.json"
    if loc.is_file():
        try:
            saved = json.loads(loc.read_text())
            if saved.get("method", "cam") == method:
                return float(saved["tau"]), str(loc)
            return DEFAULT_TAU, f"default: {loc} chose its tau for --cam {saved.get('method')} maps"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    return DEFAULT_TAU, "default"


def show(model, bundle, split_name: str, out_dir: Path, count: int = 8, tau: float = DEFAULT_TAU,
         method: str = "cam") -> list[Path]:
    """Write the PNG grids for ``count`` images of the split; returns the files written."""
    from ..data.boxes import has_boxes, split_box_sets
    from ..data.masks import has_masks, split_masks
    from ..localization.cam import score_maps, tdam_modules, tdam_step_cams
    from ..localization.metrics import normalize_scoremaps, require_cv2
    from .gates import capture_gates
    require_cv2()
    split = bundle.nonempty(split_name, "--split")
    idx = pick_images(len(split), count, split.labels)
    images = split.images[idx]
    labels = split.labels[idx]
    boxes = None
    if has_boxes(split):
        sets = split_box_sets(split, bundle.name)
        boxes = [sets[i] for i in idx]
    masks = split_masks(split, idx, bundle.name) if has_masks(split) else None
    device = next(model.parameters()).device
    mean = torch.tensor(bundle.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std, device=device).view(1, 3, 1, 1)
    x = (images.to(device).float() / 255 - mean) / std
    size = tuple(images.shape[2:])
    names = bundle.class_names or bundle.classes
    if out_dir.exists() and not out_dir.is_dir():
        raise AttnlabError(f"--out '{out_dir}' is a file; show writes its PNGs into a folder")
    files.writable_dir(out_dir, "show folder")

    with capture_gates(model) as gates:
        gt_maps, logits = score_maps(model, x, labels.to(device), method)
    preds = logits.argmax(1).cpu()
    pred_maps = score_maps(model, x, preds.to(device), method)[0]
    written = [save_figure(cam_figure(images, labels, names, normalize_scoremaps(gt_maps, size),
                                      normalize_scoremaps(pred_maps, size), preds, boxes, tau, masks),
                                  out_dir / "cams.png")]
    attention = getattr(model, "attention", "?")
    if any(g.kind in SPATIAL for g in gates):
        written.append(save_figure(spatial_figure(images, gates, attention), out_dir / "spatial_gates.png"))
    if any(g.kind in CHANNEL for g in gates):
        written.append(save_figure(channel_figure(gates, attention), out_dir / "channel_gates.png"))
    if any(g.kind in AXIS for g in gates):
        written.append(save_figure(axis_figure(gates, attention), out_dir / "axis_gates.png"))
    if tdam_modules(model):
        step_maps, step_logits = tdam_step_cams(model, x)
        written.append(save_figure(steps_figure(images, [normalize_scoremaps(m, size) for m in step_maps],
                                                step_logits.argmax(2).cpu(), labels, names),
                                   out_dir / "tdam_steps.png"))
    return written


def add_arguments(p):
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint file, or a run directory (its checkpoint_best.pt, else checkpoint_last.pt)")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--images", type=positive_int, default=8, help="images per grid, 1 to 64 (default 8)")
    p.add_argument("--tau", type=float, default=None,
                   help="box (or mask) threshold (default: localize.json's, else 0.25)")
    p.add_argument("--cam", choices=("cam", "gradcam"), default="cam")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: show/ next to the checkpoint)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto | cpu | cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the run's)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the run kept an EMA")


def run(args):
    from ..engine.run_folder import data_dir_hint_as_option
    from ..localization.command import open_trained
    from ..localization.metrics import require_cv2
    if not 1 <= args.images <= 64:
        raise AttnlabError(f"--images must be 1..64, got {args.images}")
    if args.tau is not None and not 0 <= args.tau < 1:
        raise AttnlabError(f"--tau must be in [0, 1), got {args.tau}")
    require_cv2()
    run = open_trained(args.checkpoint, args.device, not args.no_ema)
    tau, source = _tau(run.checkpoint, args.tau, args.cam)
    out = Path(args.out) if args.out else run.folder.path / "show"
    with data_dir_hint_as_option():
        bundle = run.dataset(args.data_dir)
    for f in show(run.model, bundle, args.split, out, args.images, tau, args.cam):
        print(f"wrote {f}")
    print(f"tau {tau:.3f} ({source})")
    return 0
