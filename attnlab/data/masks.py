"""Ground-truth masks of WSOL metadata in OpenImages' layout, decoded at the evaluated image size.

``wsol_metadata.py`` gives each val / test image its instance mask files and, optionally, one ignore mask file
(``Split.masks``). Here they become one uint8 map per image in the frame of the split's images, as
wsolevaluation builds them (``../shared/research/wsol.md`` §1.6):

- every instance mask is resized nearest-neighbour (``cv2.INTER_NEAREST``) to the image frame and binarised at
  > 0.5 (so any non-zero grey value is foreground); the image's foreground is their union;
- the ignore mask is resized and binarised the same way; its pixels that are not foreground are IGNORE (255) and
  left out of every metric. Ignore pixels that are also foreground stay foreground: the ignore region is defined as
  the ignore mask minus the foreground, so the two never overlap (wsolevaluation checks for an overlap that its own
  subtraction rules out; it never fires, and this is the same handling).

Masks are decoded per batch, never for a whole split at once (OpenImages' 10,000 test masks at 224 px would
hold 0.5 GB). A mask must be a single-channel PNG (8-bit grey or 1-bit); anything else is refused in one line
naming the file, where wsolevaluation's grey-scale read would silently convert a colour image to grey.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import AttnlabError

BACKGROUND, FOREGROUND, IGNORE = 0, 1, 255
GREY_MODES = ("1", "L")  # 8-bit grey and 1-bit PNGs: their values are grey levels as wsolevaluation reads them


def _cv2():
    try:
        import cv2
    except ImportError:
        raise AttnlabError("reading masks needs OpenCV: pip install -e '.[wsol]' (opencv-python-headless)") from None
    return cv2


def read_mask(path: Path, size) -> np.ndarray:
    """The mask file at ``path`` as a bool (H, W) array in a frame of ``size`` = (H, W): nearest-neighbour resize of
    its grey values, then > 0.5."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise AttnlabError(f"mask {path} is a {img.format or 'unknown'} file, not a PNG")
            if img.mode not in GREY_MODES:
                raise AttnlabError(f"mask {path} has mode {img.mode} ({len(img.getbands())} channel(s)); a mask "
                                   "must be a single-channel 8-bit grey or 1-bit PNG")
            grey = np.asarray(img, dtype=np.float32)
    except FileNotFoundError:
        raise AttnlabError(f"mask file {path} does not exist") from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise AttnlabError(f"mask {path} cannot be read as an image: {err}".replace("\n", " ")) from None
    h, w = int(size[0]), int(size[1])
    if grey.shape != (h, w):
        grey = _cv2().resize(grey, (w, h), interpolation=_cv2().INTER_NEAREST)
    return grey > 0.5


def gt_mask(mask_set, size) -> np.ndarray:
    """uint8 (H, W): FOREGROUND where any instance mask is, IGNORE where only the ignore mask is, else BACKGROUND.

    ``mask_set``: (instance mask paths, ignore mask path or None), one entry of ``Split.masks``."""
    paths, ignore = mask_set
    fg = np.zeros((int(size[0]), int(size[1])), bool)
    for p in paths:
        fg |= read_mask(p, size)
    out = fg.astype(np.uint8)
    if ignore is not None:
        out[read_mask(ignore, size) & ~fg] = IGNORE
    return out


def has_masks(split) -> bool:
    masks = getattr(split, "masks", None)
    return masks is not None and len(masks) == len(split) and all(m is not None for m in masks)


def split_masks(split, index, dataset: str = "dataset") -> np.ndarray:
    """uint8 (B, H, W) ground-truth maps (``gt_mask``) of the images ``index`` of ``split`` (a Split), at the size
    of its images."""
    if not has_masks(split):
        raise AttnlabError(f"dataset '{dataset}': its {split.name} split has no masks")
    size = tuple(split.images.shape[2:])
    index = list(index)
    if not index:
        return np.zeros((0, *size), np.uint8)
    return np.stack([gt_mask(split.masks[i], size) for i in index])
