"""What a dataset on disk is, once its files are listed: a ``Source`` with its ``Pool`` of files per split.

``sources.py`` builds them for the built-in layouts and ``wsol_metadata.py`` for wsolevaluation's metadata; both
import them from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Pool:
    """The files of one on-disk split: ``files`` are relative to ``root``; ``boxes`` is (N, 4) x0,y0,x1,y1 or None."""
    root: Path
    files: list[str]
    labels: np.ndarray
    boxes: np.ndarray | None = None
    # Already-decoded images (torchvision's pickled CIFAR): N x C x H x W uint8, no cache needed.
    arrays: np.ndarray | None = None
    # WSOL metadata: the original (h, w) the metadata states (checked against the decoded images), and every box of
    # each image, (N, K, 4) padded with NaN rows (``boxes`` is then each image's first box).
    sizes: np.ndarray | None = None
    box_sets: np.ndarray | None = None
    # WSOL metadata with masks (OpenImages' layout): per image (mask paths, ignore path or None), None for images
    # without (train); ``masks.py`` decodes them at the evaluated size.
    masks: list | None = None

    def select(self, index: np.ndarray) -> "Pool":
        index = np.asarray(index, dtype=np.int64)
        pick = lambda a: None if a is None else a[index]
        return Pool(self.root, [self.files[i] for i in index] if self.files else [], self.labels[index],
                    pick(self.boxes), pick(self.arrays), pick(self.sizes), pick(self.box_sets),
                    None if self.masks is None else [self.masks[i] for i in index])

    @staticmethod
    def concat(a: "Pool", b: "Pool") -> "Pool":
        """``a`` then ``b`` (same root, image files): a source's own val pool appended to its train pool."""
        n = (len(a), len(b))
        k = max(p.box_sets.shape[1] if p.box_sets is not None else 1 for p in (a, b))

        def sets(p, i):
            out = np.full((n[i], k, 4), np.nan, dtype=np.float32)
            if p.box_sets is not None:
                out[:, :p.box_sets.shape[1]] = p.box_sets
            elif p.boxes is not None:
                out[:, 0] = p.boxes
            return out

        any_boxes = any(p.boxes is not None or p.box_sets is not None for p in (a, b))
        box_sets = np.concatenate([sets(a, 0), sets(b, 1)]) if any_boxes else None
        sizes = np.concatenate([a.sizes, b.sizes]) if a.sizes is not None and b.sizes is not None else None
        any_masks = a.masks is not None or b.masks is not None
        masks = [m for p in (a, b) for m in (p.masks or [None] * len(p))] if any_masks else None
        return Pool(a.root, list(a.files) + list(b.files), np.concatenate([a.labels, b.labels]),
                    None if box_sets is None else box_sets[:, 0].copy(), None, sizes, box_sets, masks)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Source:
    name: str
    root: Path
    classes: list[str]
    train: Pool
    test: Pool
    class_names: list[str] = field(default_factory=list)
    kind: str = "folder"  # folder | pickle | tiny-imagenet | wsol
    val: Pool | None = None  # a val split of its own (WSOL metadata); None: val is held out of train
