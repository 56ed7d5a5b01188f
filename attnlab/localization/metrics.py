"""Box metrics of weakly-supervised object localization, defined as clovaai/wsolevaluation defines them.

Conventions (wsolevaluation ``evaluation.py`` / ``util.py``; our own code, checked against its unit-test vectors):
  * score map: the CAM resized to the image with bicubic interpolation (``cv2.INTER_CUBIC``), *then* min-max
    normalised per image; a constant or NaN map becomes all zeros;
  * thresholds: ``np.arange(0, 1, interval)``, i.e. [0, 1) (interval 0.001 as its config, 0.01 as its CLI);
  * box extraction at threshold tau: ``u = uint8(255 * map)`` (truncation), mask ``u > floor(tau * max(u))``
    (``cv2.threshold`` BINARY), ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)`` (holes included); each contour's
    ``boundingRect`` (x, y, w, h) gives the box (x, y, min(x + w, W - 1), min(y + h, H - 1)) -- one pixel past the
    blob, as there; no contour gives the box (0, 0, 0, 0);
  * V1 keeps the contour of largest ``cv2.contourArea`` (polygon area, so a single pixel has area 0); V2 keeps all;
  * IoU of inclusive pixel boxes: width x1 - x0 + 1; an image's IoU at tau is the best over its boxes x GT boxes
    (an image may have several GT boxes, as in wsolevaluation's metadata: matching any one is a hit);
  * MaxBoxAcc(delta) = max over tau of the % of images with IoU >= delta / 100 (each delta its own tau);
    MaxBoxAccV2 = mean of MaxBoxAcc(30, 50, 70) with all contours; MaxBoxAcc (V1) = MaxBoxAcc(50), largest contour.

What wsolevaluation lacks (its issues #14 and #50 ask for it), defined as its maintainers suggest there:
  * GT-known Loc(tau): % of images whose largest-contour box from the ground-truth class's CAM has IoU >= 0.5;
  * Top-1 Loc(tau): the same AND the top-1 prediction is the ground truth (then the predicted class's CAM is the
    ground truth's, so this is also ILSVRC's Top-1 Loc);
  * Top-5 Loc(tau): GT-known AND the ground truth is among the top 5.
Each is reported at a tau chosen on a held-out split (the tau maximising GT-known Loc there, wsolevaluation's
``train-fullsup`` idea) and at its own oracle tau on the evaluated split. MaxBoxAcc is always an oracle (its upper
bound of box accuracy), as in wsolevaluation.

Cost: ``u`` is uint8, so at most 256 distinct integer thresholds exist per map; the evaluator extracts boxes once
per distinct value and copies the result to every tau that maps to it (identical results, ~4x fewer contour calls
on the 0.001 grid).
"""
from __future__ import annotations

import numpy as np

from ..errors import AttnlabError

IOU_LEVELS = (30, 50, 70)


def require_cv2():
    try:
        import cv2
    except ImportError:
        raise AttnlabError("localization needs OpenCV's contour functions: pip install -e '.[wsol]' "
                           "(opencv-python-headless)") from None
    return cv2


def thresholds_grid(interval: float = 0.001) -> np.ndarray:
    if not 0 < float(interval) < 1:
        raise AttnlabError(f"threshold interval must be in (0, 1), got {interval!r}")
    return np.arange(0, 1, float(interval))


def box_iou(a, b) -> np.ndarray:
    """(N, M) IoU of inclusive pixel boxes x0, y0, x1, y1 (a box (0, 0, 0, 0) is one pixel)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def normalize_scoremap(cam, size) -> np.ndarray:
    """The CAM (h, w) resized bicubically to ``size`` = (H, W), then min-max normalised to [0, 1] (float32)."""
    cv2 = require_cv2()
    cam = np.asarray(cam, dtype=np.float32)
    h, w = int(size[0]), int(size[1])
    if cam.shape != (h, w):
        cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_CUBIC)
    if not np.isfinite(cam).all():
        return np.zeros((h, w), np.float32)
    lo, hi = float(cam.min()), float(cam.max())
    if hi <= lo:
        return np.zeros((h, w), np.float32)
    return ((cam - lo) / (hi - lo)).astype(np.float32)


def normalize_scoremaps(cams, size) -> np.ndarray:
    cams = cams.detach().cpu().numpy() if hasattr(cams, "detach") else np.asarray(cams)
    return np.stack([normalize_scoremap(c, size) for c in cams]) if len(cams) else np.zeros((0, *size), np.float32)


def _check_scoremap(scoremap) -> np.ndarray:
    s = np.asarray(scoremap, dtype=np.float64)
    if s.ndim != 2:
        raise AttnlabError(f"a score map must be 2-D, got shape {s.shape}")
    if np.isnan(s).any():
        raise AttnlabError("a score map contains NaN")
    if s.size and (s.min() < 0 or s.max() > 1):
        raise AttnlabError(f"a score map must lie in [0, 1], got [{s.min():.4g}, {s.max():.4g}]")
    return s


def _boxes_at(cv2, u: np.ndarray, level: int):
    """(all boxes (k, 4), largest-contour box (1, 4)) of the mask ``u > level``."""
    h, w = u.shape
    mask = (u > level).astype(np.uint8)
    contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        zero = np.zeros((1, 4))
        return zero, zero
    boxes = np.empty((len(contours), 4))
    for i, c in enumerate(contours):
        x, y, bw, bh = cv2.boundingRect(c)
        boxes[i] = (x, y, min(x + bw, w - 1), min(y + bh, h - 1))
    largest = int(np.argmax([cv2.contourArea(c) for c in contours]))
    return boxes, boxes[largest:largest + 1]


def boxes_from_scoremap(scoremap, thresholds, multi_contour: bool = True) -> list[np.ndarray]:
    """One (k, 4) array of boxes per threshold (V2: every contour; V1: ``multi_contour=False``, the largest)."""
    cv2 = require_cv2()
    u = (_check_scoremap(scoremap) * 255).astype(np.uint8)
    levels = np.floor(np.asarray(thresholds, dtype=np.float64) * float(u.max())).astype(np.int64)
    cache = {}
    out = []
    for level in levels:
        if level not in cache:
            cache[level] = _boxes_at(cv2, u, int(level))
        out.append(cache[level][0 if multi_contour else 1])
    return out


def iou_curves(scoremap, gt_boxes, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(best IoU per threshold with all contours (V2), IoU per threshold of the largest contour (V1))."""
    cv2 = require_cv2()
    u = (_check_scoremap(scoremap) * 255).astype(np.uint8)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    levels = np.floor(np.asarray(thresholds, dtype=np.float64) * float(u.max())).astype(np.int64)
    distinct, inverse = np.unique(levels, return_inverse=True)
    multi, single = np.empty(len(distinct)), np.empty(len(distinct))
    for i, level in enumerate(distinct):
        all_boxes, largest = _boxes_at(cv2, u, int(level))
        multi[i] = box_iou(all_boxes, gt).max()
        single[i] = box_iou(largest, gt).max()
    return multi[inverse], single[inverse]


class BoxEvaluator:
    """Collects per-image IoU curves over the threshold grid; :meth:`curves` returns them, :func:`summarize`
    turns them into metrics. Memory: two float32 values per image and threshold (2,500 images x 1,000: 20 MB)."""

    def __init__(self, thresholds=None):
        self.thresholds = thresholds_grid() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        self._multi, self._single = [], []

    def add(self, scoremaps, gt_boxes) -> None:
        """``scoremaps`` (B, H, W) in [0, 1]; ``gt_boxes`` (B, 4) or a list of (k, 4) arrays, inclusive pixels."""
        if len(scoremaps) != len(gt_boxes):
            raise AttnlabError(f"{len(scoremaps)} score maps but {len(gt_boxes)} box sets")
        for s, g in zip(scoremaps, gt_boxes):
            m, s1 = iou_curves(s, g, self.thresholds)
            self._multi.append(m.astype(np.float32))
            self._single.append(s1.astype(np.float32))

    def __len__(self) -> int:
        return len(self._multi)

    def curves(self) -> tuple[np.ndarray, np.ndarray]:
        """(V2 IoU (N, T), V1 IoU (N, T))."""
        t = len(self.thresholds)
        if not self._multi:
            return np.zeros((0, t), np.float32), np.zeros((0, t), np.float32)
        return np.stack(self._multi), np.stack(self._single)


def max_box_acc(iou: np.ndarray, thresholds, levels=IOU_LEVELS) -> dict:
    """{delta: (MaxBoxAcc %, its tau)} from (N, T) IoU curves; ties go to the smallest tau."""
    if len(iou) == 0:
        raise AttnlabError("no images to evaluate")
    out = {}
    for d in levels:
        acc = 100.0 * (iou >= d / 100).mean(0)
        i = int(np.argmax(acc))
        out[d] = (float(acc[i]), float(thresholds[i]))
    return out


def _at(hits: np.ndarray, tau_index: int | None, thresholds) -> dict:
    acc = 100.0 * hits.mean(0)
    best = int(np.argmax(acc))
    res = {"oracle": float(acc[best]), "oracle_tau": float(thresholds[best])}
    if tau_index is not None:
        res["at_tau"] = float(acc[tau_index])
    return res


def select_threshold(single_iou: np.ndarray, thresholds) -> tuple[int, float]:
    """(index, tau) maximising GT-known Loc (largest contour, IoU >= 0.5) on a held-out split."""
    acc = (single_iou >= 0.5).mean(0)
    i = int(np.argmax(acc))
    return i, float(thresholds[i])


def summarize(multi_iou, single_iou, thresholds, top1_hit=None, top5_hit=None, tau: float | None = None) -> dict:
    """Every metric of this module from the evaluator's curves (and the classifier's hits, when given).

    ``tau``: the threshold chosen on the held-out split (None: only oracle values are reported).
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    tau_index = None if tau is None else int(np.argmin(np.abs(thresholds - tau)))
    v2 = max_box_acc(multi_iou, thresholds)
    v1 = max_box_acc(single_iou, thresholds, levels=(50,))[50]
    out = {"images": int(len(multi_iou)),
           "max_box_acc_v2": float(np.mean([v2[d][0] for d in IOU_LEVELS])),
           "max_box_acc_v2_iou": {str(d): v2[d][0] for d in IOU_LEVELS},
           "max_box_acc_v2_tau": {str(d): v2[d][1] for d in IOU_LEVELS},
           "max_box_acc": v1[0], "max_box_acc_tau": v1[1],
           "tau": None if tau_index is None else float(thresholds[tau_index])}
    gt_known = single_iou >= 0.5
    out["gt_known_loc"] = _at(gt_known, tau_index, thresholds)
    if top1_hit is not None:
        out["top1_loc"] = _at(gt_known & np.asarray(top1_hit, bool)[:, None], tau_index, thresholds)
    if top5_hit is not None:
        out["top5_loc"] = _at(gt_known & np.asarray(top5_hit, bool)[:, None], tau_index, thresholds)
    return out


def centre_gaussian(size, sigma_fraction: float = 0.25) -> np.ndarray:
    """A centred isotropic Gaussian map in [0, 1], sigma = ``sigma_fraction`` x the shorter side."""
    h, w = int(size[0]), int(size[1])
    sigma = sigma_fraction * min(h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    g = np.exp(-(((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * sigma ** 2)))
    return ((g - g.min()) / (g.max() - g.min())).astype(np.float32)


def _box_sets(gt_boxes) -> tuple[np.ndarray, np.ndarray]:
    """(every box (M, 4), index of the first box of each image (N,)) of an (N, 4) array or a list of (k, 4)."""
    if isinstance(gt_boxes, np.ndarray) and gt_boxes.ndim == 2:
        sets = list(gt_boxes.reshape(-1, 1, 4))
    else:
        sets = [np.asarray(g, dtype=np.float64).reshape(-1, 4) for g in gt_boxes]
    if any(len(g) == 0 for g in sets):
        raise AttnlabError("every image needs at least one ground-truth box")
    starts = np.cumsum([0] + [len(g) for g in sets[:-1]]).astype(np.int64)
    flat = np.concatenate(sets) if sets else np.zeros((0, 4))
    return flat.astype(np.float64), starts


def best_iou_per_image(boxes, gt_boxes) -> np.ndarray:
    """(N,) best IoU of ``boxes`` (k, 4) with each image's ground-truth boxes (any box may match, as
    wsolevaluation's BoxEvaluator counts a hit when the estimate matches any ground-truth box)."""
    flat, starts = _box_sets(gt_boxes)
    if len(starts) == 0:
        return np.zeros(0)
    return np.maximum.reduceat(box_iou(boxes, flat).max(0), starts)


def prior_baselines(gt_boxes, size, thresholds, tau: float | None = None) -> dict:
    """The two priors every CAM number must be read against, on the same boxes and thresholds.

    ``gt_boxes``: (N, 4), one box per image, or a list of N (k, 4) arrays (an image's IoU is its best box's).

    ``tau``: the Gaussian's threshold for GT-known Loc, chosen on a held-out split; None chooses it on these boxes.

    ``centre_gaussian``: the same centred Gaussian map for every image, through the full evaluator (MaxBoxAccV2,
    MaxBoxAcc, GT-known Loc). ``full_image``: the box (0, 0, W - 1, H - 1) for every image, % with IoU >= delta.
    """
    h, w = int(size[0]), int(size[1])
    gt = list(gt_boxes.reshape(-1, 1, 4)) if isinstance(gt_boxes, np.ndarray) and gt_boxes.ndim == 2 else gt_boxes
    gauss = centre_gaussian(size)
    multi_boxes = boxes_from_scoremap(gauss, thresholds, multi_contour=True)
    single_boxes = boxes_from_scoremap(gauss, thresholds, multi_contour=False)
    multi = np.stack([best_iou_per_image(b, gt) for b in multi_boxes], axis=1)
    single = np.stack([best_iou_per_image(b, gt) for b in single_boxes], axis=1)
    if tau is None:
        tau = select_threshold(single, thresholds)[1]
    full = best_iou_per_image([[0, 0, w - 1, h - 1]], gt)
    full_acc = {str(d): float(100.0 * (full >= d / 100).mean()) for d in IOU_LEVELS}
    return {"centre_gaussian": summarize(multi, single, thresholds, tau=tau),
            "full_image": {"iou": full_acc, "mean": float(np.mean(list(full_acc.values()))),
                           "gt_known_loc": full_acc["50"]}}
