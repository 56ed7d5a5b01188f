"""PxAP, the mask metric of weakly-supervised localization, as clovaai/wsolevaluation's ``MaskEvaluator`` defines
it (``../shared/research/wsol.md`` §1.6; our own code), plus a pixel IoU read off the same histograms.

- Score maps are the same min-max normalised maps as the box metrics use (``metrics.normalize_scoremap``).
- Over the whole split, the values at foreground pixels and at background pixels are counted in two histograms
  whose bin edges are the tau grid (``metrics.thresholds_grid``) followed by 1, 2, 3: the bins [t_i, t_i+1),
  ..., [t_last, 1), [1, 2), [2, 3]. The [1, 2) bin catches the value 1.0, so a pixel at 1.0 passes every tau.
  Ignored pixels (``masks.IGNORE``) are in neither.
- TP(t) = foreground pixels with score >= t and FP(t) = background pixels with score >= t (reverse cumulative
  sums of the histograms, from the highest edge down); precision = TP / (TP + FP), recall = TP / foreground.
- PxAP = 100 * sum_i precision_i * (recall_i - recall_i-1) over the points where TP + FP > 0, the points taken
  from the highest edge down (recall starts at 0: no score reaches the top edge). A perfect map gives 100; a
  constant map (normalised to all zeros) gives 100 x the foreground fraction.

Pixel IoU (attnlab's addition, wsolevaluation has none): IoU(t) = TP / (foreground + FP), the IoU of the pixels
with score >= t and the foreground, pooled over the split (not a mean of per-image IoUs), on the tau grid; given
at its best (oracle) tau and at a tau chosen on another split, like GT-known Loc for boxes.
Memory: two int64 histograms of len(grid) + 2 bins, whatever the split's size.
"""
from __future__ import annotations

import numpy as np

from ..data.masks import BACKGROUND, FOREGROUND
from ..errors import AttnlabError
from .metrics import thresholds_grid


class MaskEvaluator:
    """Accumulates the foreground and background score histograms of a split; :meth:`result` gives the metrics."""

    def __init__(self, thresholds=None):
        self.thresholds = thresholds_grid() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        self.edges = np.append(self.thresholds, [1.0, 2.0, 3.0])
        self.fg = np.zeros(len(self.edges) - 1, np.int64)
        self.bg = np.zeros(len(self.edges) - 1, np.int64)
        self.images = 0

    def add(self, scoremaps, masks) -> None:
        """``scoremaps`` (B, H, W) in [0, 1]; ``masks`` (B, H, W) uint8 from ``masks.gt_mask`` (same frame)."""
        scoremaps, masks = np.asarray(scoremaps), np.asarray(masks)
        if scoremaps.shape != masks.shape:
            raise AttnlabError(f"score maps {scoremaps.shape} and masks {masks.shape} differ in shape")
        if scoremaps.size and (np.isnan(scoremaps).any() or scoremaps.min() < 0 or scoremaps.max() > 1):
            raise AttnlabError("score maps must lie in [0, 1] (min-max normalised) without NaN")
        self.fg += np.histogram(scoremaps[masks == FOREGROUND], bins=self.edges)[0]
        self.bg += np.histogram(scoremaps[masks == BACKGROUND], bins=self.edges)[0]
        self.images += len(masks)

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(TP, FP) at every edge but the last, from the highest edge (2) down to the lowest tau."""
        return self.fg[::-1].cumsum(), self.bg[::-1].cumsum()

    def pxap(self) -> float:
        tp, fp = self.counts()
        positives = int(self.fg.sum())
        if positives == 0:
            raise AttnlabError("PxAP needs foreground pixels; no mask of the split has any")
        kept = tp + fp > 0
        precision = np.divide(tp, tp + fp, out=np.zeros(len(tp)), where=kept)
        recall = tp / positives
        gain = np.diff(recall, prepend=0.0)
        return float(100.0 * (precision * gain)[kept].sum())

    def pixel_iou(self) -> np.ndarray:
        """IoU(t) for every t of the tau grid, in grid order."""
        tp, fp = self.counts()
        n = len(self.thresholds)
        tp, fp = tp[::-1][:n], fp[::-1][:n]  # back to grid order: index i is score >= thresholds[i]
        return tp / np.maximum(self.fg.sum() + fp, 1)  # union = foreground + false positives

    def result(self, tau: float | None = None) -> dict:
        """PxAP, the foreground fraction of the counted pixels, and the pixel IoU at its oracle tau and (when
        ``tau`` is given) at ``tau``, in %."""
        iou = 100.0 * self.pixel_iou()
        best = int(np.argmax(iou))  # ties go to the smallest tau, as for the box metrics
        counted = int(self.fg.sum() + self.bg.sum())
        out = {"images": self.images, "pxap": self.pxap(),
               "foreground_fraction": float(100.0 * self.fg.sum() / max(counted, 1)),
               "pixel_iou": {"oracle": float(iou[best]), "oracle_tau": float(self.thresholds[best])}}
        if tau is not None:
            i = int(np.argmin(np.abs(self.thresholds - tau)))
            out["pixel_iou"]["at_tau"] = float(iou[i])
        return out


def best_tau(evaluator: MaskEvaluator) -> float:
    """The tau with the best pixel IoU on ``evaluator``'s split (the held-out split chooses it)."""
    return float(evaluator.thresholds[int(np.argmax(evaluator.pixel_iou()))])
