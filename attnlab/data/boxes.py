"""Bounding boxes of a split, for weakly-supervised localization.

Tiny-ImageNet carries one box per image, in ``val/val_annotations.txt`` (our test split) and in
``train/<wnid>/<wnid>_boxes.txt`` (our train and val splits, val being the seeded hold-out of train used to choose
the CAM threshold); WSOL metadata (``wsol_metadata.py``) one or more per image of its val and test splits.
``sources.py`` reads them; this module scales them to the evaluated frame, checks them and says clearly when a
dataset has none. Boxes are (x0, y0, x1, y1) in pixels of the split's images, inclusive (a box covering the whole
64 x 64 image is (0, 0, 63, 63)); when the images were resized, :func:`scale_boxes` took them to the new frame.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import AttnlabError


def scale_boxes(boxes: np.ndarray, sizes: np.ndarray, size) -> np.ndarray:
    """Boxes of images of original ``sizes`` (N, 2) (h, w) in the frame of images resized to ``size`` (h, w).

    ``boxes`` is (N, 4) or (N, K, 4) (several boxes per image, NaN rows stay NaN). Inclusive pixel boxes cover
    [x0, x1 + 1) in continuous coordinates; that interval is scaled, and :func:`snap_to_pixels` later snaps it
    outward. The one place boxes follow a resize, for every dataset.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    shape = (-1,) + (1,) * (boxes.ndim - 2)
    sy = (size[0] / np.asarray(sizes)[:, 0].astype(np.float32)).reshape(shape)
    sx = (size[1] / np.asarray(sizes)[:, 1].astype(np.float32)).reshape(shape)
    return np.stack([boxes[..., 0] * sx, boxes[..., 1] * sy, (boxes[..., 2] + 1) * sx - 1,
                     (boxes[..., 3] + 1) * sy - 1], axis=-1).astype(np.float32)


def split_boxes(split, dataset: str = "dataset") -> torch.Tensor:
    """The (N, 4) float boxes of ``split`` (a :class:`~attnlab.data.datasets.Split`) in whole pixels of its images.

    Raises AttnlabError when the dataset has no boxes, when an image of the split has no annotation, or when a box
    falls outside the image frame.
    """
    boxes = split.boxes
    if boxes is None:
        raise AttnlabError(f"dataset '{dataset}' has no bounding boxes (its {split.name} split has none; only "
                           "tiny-imagenet and wsol have boxes), so localization metrics cannot be computed")
    boxes = boxes.float()
    missing = torch.isnan(boxes).any(1)
    if missing.any():
        first = int(missing.nonzero()[0])
        where = split.files[first] if split.files else f"image {first}"
        raise AttnlabError(f"dataset '{dataset}': {int(missing.sum())} image(s) of the {split.name} split have no "
                           f"bounding box (first: {where})")
    h, w = split.images.shape[2:]
    bad = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > w - 1 + 1e-3) | (boxes[:, 3] > h - 1 + 1e-3) | \
          (boxes[:, 2] < boxes[:, 0] - 1) | (boxes[:, 3] < boxes[:, 1] - 1)  # resized 1-pixel boxes: x1 = x0 - 0.5
    if bad.any():
        first = int(bad.nonzero()[0])
        raise AttnlabError(f"dataset '{dataset}': box {boxes[first].tolist()} of {split.name} image {first} is not "
                           f"inside its {w}x{h} frame")
    return snap_to_pixels(boxes, (h, w))


def split_box_sets(split, dataset: str = "dataset") -> list[np.ndarray]:
    """Every box of each image of ``split``: one (k, 4) float array per image, in whole pixels of its images.

    Datasets with one box per image (Tiny-ImageNet) give k = 1 (the boxes of :func:`split_boxes`); WSOL metadata
    may give several. The same checks as :func:`split_boxes`, on every box.
    """
    first = split_boxes(split, dataset)  # the checks on the first box, and the error for a dataset without boxes
    sets = getattr(split, "box_sets", None)
    if sets is None or sets.shape[1] == 1:
        return [b[None] for b in first.numpy()]
    sets = sets.float()
    h, w = split.images.shape[2:]
    out = []
    for i, s in enumerate(sets):
        s = s[~torch.isnan(s).any(1)]
        bad = (s[:, 0] < 0) | (s[:, 1] < 0) | (s[:, 2] > w - 1 + 1e-3) | (s[:, 3] > h - 1 + 1e-3) | \
              (s[:, 2] < s[:, 0] - 1) | (s[:, 3] < s[:, 1] - 1)
        if bad.any():
            raise AttnlabError(f"dataset '{dataset}': box {s[int(bad.nonzero()[0])].tolist()} of {split.name} "
                               f"image {i} is not inside its {w}x{h} frame")
        out.append(snap_to_pixels(s, (h, w)).numpy())
    return out


def snap_to_pixels(boxes: torch.Tensor, size) -> torch.Tensor:
    """Whole-pixel inclusive boxes: x0, y0 floored, x1, y1 ceiled (never below x0, y0), clipped to the frame.

    Native Tiny-ImageNet boxes are already integers and pass unchanged. Resized ones are not: the data layer scales
    the continuous interval [x0, x1 + 1), so a one-pixel-wide box at x = 63 becomes x0 = 31.5, x1 = 31 at 32 px;
    snapping outward keeps every pixel the box touches (wsolevaluation truncates each coordinate instead).
    """
    h, w = int(size[0]), int(size[1])
    x0 = boxes[:, 0].floor().clamp(0, w - 1)
    y0 = boxes[:, 1].floor().clamp(0, h - 1)
    x1 = torch.maximum(boxes[:, 2].ceil(), x0).clamp(max=w - 1)
    y1 = torch.maximum(boxes[:, 3].ceil(), y0).clamp(max=h - 1)
    return torch.stack([x0, y0, x1, y1], 1)


def has_boxes(split) -> bool:
    return split.boxes is not None and not torch.isnan(split.boxes).any()
