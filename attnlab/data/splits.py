"""Seeded, stratified selection of indices: per-class subsets and the validation hold-out."""
from __future__ import annotations

import numbers

import numpy as np

from ..errors import AttnlabError

# Separate random streams so that changing one option never reshuffles another's choice.
_SUBSET, _VAL, _TEST_SUBSET = 0, 1, 2


def per_class_subset(labels: np.ndarray, per_class: int, seed: int, stream: int = _SUBSET,
                     option: str = "subset") -> np.ndarray:
    """Sorted indices keeping ``per_class`` images of each class (all of a class that has fewer); ``option``
    names the setting in an error.

    The choice is a prefix of one seeded permutation per class, so a smaller subset is contained in a larger one.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, numbers.Integral) or per_class <= 0:
        raise AttnlabError(f"{option} must be a positive number of images per class, got {per_class!r}")
    rng = np.random.default_rng([seed, stream])
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(idx[rng.permutation(len(idx))[:per_class]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def val_count(val_size, n: int) -> int:
    """``val_size`` as a count out of ``n``: an int is a count, a float in [0, 1) a fraction."""
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Number):
        raise AttnlabError(f"val_size must be a count (int) or a fraction (float in [0, 1)), got {val_size!r}")
    if isinstance(val_size, numbers.Integral):
        count = int(val_size)
        if not 0 <= count < n:
            raise AttnlabError(f"val_size={count} must be at least 0 and less than the {n} training images")
        return count
    if not 0.0 <= float(val_size) < 1.0:
        raise AttnlabError(f"val_size={val_size} as a fraction must be in [0, 1)")
    return int(round(float(val_size) * n))


def stratified_split(labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val) with ``count`` val images spread over classes in proportion to their size.

    Per-class quotas are floors of the proportional share, then the largest remainders get one more.
    """
    classes, sizes = np.unique(labels, return_counts=True)
    share = count * sizes / sizes.sum()
    quota = np.floor(share).astype(np.int64)
    extra = count - quota.sum()
    if extra:
        quota[np.argsort(-(share - quota), kind="stable")[:extra]] += 1
    rng = np.random.default_rng([seed, _VAL])
    train, val = [], []
    for c, q in zip(classes, quota):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        val.append(idx[:q])
        train.append(idx[q:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
