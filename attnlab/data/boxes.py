"""Bounding boxes of a split, for weakly-supervised localization.

Only Tiny-ImageNet carries boxes: one per image, in ``val/val_annotations.txt`` (our test split) and in
``train/<wnid>/<wnid>_boxes.txt`` (our train and val splits, val being the seeded hold-out of train used to choose
the CAM threshold). ``sources.py`` reads them; this module only checks them and says clearly when a dataset has
none. Boxes are (x0, y0, x1, y1) in pixels of the split's images, inclusive (a box covering the whole 64 x 64
image is (0, 0, 63, 63)); when the images were resized the data layer has scaled them to the new frame.
"""
from __future__ import annotations

import torch

from ..errors import AttnlabError


def split_boxes(split, dataset: str = "dataset") -> torch.Tensor:
    """The (N, 4) float boxes of ``split`` (a :class:`~attnlab.data.datasets.Split`) in whole pixels of its images.

    Raises AttnlabError when the dataset has no boxes, when an image of the split has no annotation, or when a box
    falls outside the image frame.
    """
    boxes = split.boxes
    if boxes is None:
        raise AttnlabError(f"dataset '{dataset}' has no bounding boxes (its {split.name} split has none; only "
                           "tiny-imagenet has boxes), so localization metrics cannot be computed")
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
