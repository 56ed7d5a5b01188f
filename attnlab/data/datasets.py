"""``load_dataset``: find a dataset, pick its subsets and splits, decode it through the cache, compute statistics.

Splits: ``train`` and ``val`` both come from the dataset's training pool (val is a stratified, seeded hold-out for
model selection); ``test`` is the dataset's own test set (Tiny-ImageNet's labelled ``val/`` folder).
"""
from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..errors import AttnlabError, unknown
from ..files import atomic_write_json
from . import cache as _cache
from .boxes import scale_boxes
from .pools import Pool, Source
from .sources import open_source
from .splits import _TEST_SUBSET, per_class_subset, stratified_split, val_count

DATASETS = ("cifar10", "cifar100", "imagefolder", "tiny-imagenet", "wsol")
_ALIASES = {"tiny-imagenet-50": "tiny-imagenet", "tiny_imagenet": "tiny-imagenet", "cifar-10": "cifar10",
            "cifar-100": "cifar100", "image_folder": "imagefolder"}


@dataclass
class Split:
    """One split: ``images`` N x 3 x H x W uint8, ``labels`` N int64, ``boxes`` N x 4 float32 (x0, y0, x1, y1,
    pixels, inclusive) or None, ``files`` the source files relative to the dataset root (empty for pickled CIFAR)."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor | None = None
    files: list[str] = field(default_factory=list)
    box_sets: torch.Tensor | None = None  # N x K x 4, every box of each image (NaN rows pad), WSOL metadata only
    masks: list | None = None  # per image (mask paths, ignore path or None): WSOL metadata with masks only

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.labels, minlength=num_classes).tolist()


@dataclass
class DatasetBundle:
    name: str
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int | tuple[int, int]
    root: Path | None = None
    class_names: list[str] = field(default_factory=list)  # human-readable (Tiny-ImageNet's words.txt)
    kind: ClassVar[str] = ""  # how the splits are held, in the summary (" (streamed)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        return (f"{self.name}{self.kind}: {self.num_classes} classes, {self.image_size} px, train {len(self.train)}, "
                f"val {len(self.val)}, test {len(self.test)}")

    def nonempty(self, name: str, option: str) -> Split:
        """Split ``name``, or a one-line error when it holds no image (e.g. val of a run with data.val_size=0)
        that names the command's ``option`` for the other split."""
        split = getattr(self, name)
        if len(split) == 0:
            why = " (the run held none out of train: data.val_size=0)" if name == "val" and self.name != "wsol" \
                else ""
            raise AttnlabError(f"{self.name} has no {name} images{why}; give {option} "
                               f"{'test' if name == 'val' else 'val'}")
        return split


def list_datasets() -> list[str]:
    return list(DATASETS)


def _size_arg(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif isinstance(image_size, (str, bytes)):
        size = ()  # "32" would otherwise be read as the pair ("3", "2")
    else:
        try:
            size = tuple(int(s) for s in image_size)
        except (TypeError, ValueError):
            size = ()
    if len(size) != 2 or min(size) <= 0:
        raise AttnlabError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std in 0..1, in float64, from per-channel value histograms."""
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(np.ascontiguousarray(images[:, c]).reshape(-1), minlength=256).astype(np.float64)
        n = counts.sum()
        m = (counts * values).sum() / n
        mean.append(float(m))
        std.append(float(np.sqrt((counts * (values - m) ** 2).sum() / n)))
    return tuple(mean), tuple(std)


def _stats(images: np.ndarray, stem: Path | None, index: np.ndarray):
    """Channel stats of the train split, remembered next to the cache entry (keyed by the chosen indices)."""
    if stem is None:
        return channel_stats(images)
    key = hashlib.sha256(np.ascontiguousarray(index, dtype=np.int64).tobytes()).hexdigest()[:20]
    path = stem.with_suffix(".stats.json")
    table = {}
    if path.is_file():
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
    if key in table:
        return tuple(table[key]["mean"]), tuple(table[key]["std"])
    mean, std = channel_stats(images)
    table[key] = {"mean": mean, "std": std}
    try:
        atomic_write_json(path, table, "channel statistics")
    except AttnlabError:
        pass  # statistics are cheap to recompute; a read-only cache is fine
    return mean, std


def _decode_pool(source: Source, pool: Pool, split: str, size, cache_dir):
    """(images uint8 N x 3 x H x W numpy, boxes float32 N x 4 or None, cache stem, box sets N x K x 4 or None)."""
    if pool.arrays is not None:  # pickled CIFAR: already raw pixels
        images = pool.arrays
        if size is not None and tuple(images.shape[2:]) != size:
            t = torch.nn.functional.interpolate(torch.from_numpy(images).float(), size=size, mode="bilinear",
                                                align_corners=False, antialias=True)
            images = t.round_().clamp_(0, 255).to(torch.uint8).numpy()
        return images, pool.boxes, None, None
    tag = f"{source.name}-{split}"
    images, sizes, stem = _cache.cached_images(pool.root, pool.files, size, cache_dir, tag)
    if pool.sizes is not None:  # WSOL metadata states each image's size: the boxes are in that frame
        wrong = np.flatnonzero((np.asarray(sizes) != pool.sizes).any(1))
        if len(wrong):
            i = int(wrong[0])
            raise AttnlabError(f"dataset '{source.name}': image {pool.files[i]} is {sizes[i][1]}x{sizes[i][0]} but "
                               f"image_sizes.txt says {pool.sizes[i][1]}x{pool.sizes[i][0]}")
    boxes, box_sets = pool.boxes, pool.box_sets
    if size is not None:
        boxes = None if boxes is None else scale_boxes(boxes, sizes, size)
        box_sets = None if box_sets is None else scale_boxes(box_sets, sizes, size)
    return images, boxes, stem, box_sets


def _split(name: str, images: np.ndarray, pool: Pool, boxes, index=None, box_sets=None) -> Split:
    if index is not None:
        images = images[index]  # a copy into memory (fancy indexing reads the memory map once)
        labels = pool.labels[index]
        boxes = None if boxes is None else boxes[index]
        box_sets = None if box_sets is None else box_sets[index]
        files = [pool.files[i] for i in index] if pool.files else []
        masks = None if pool.masks is None else [pool.masks[i] for i in index]
    else:
        labels, files, masks = pool.labels, list(pool.files), pool.masks
    if masks is not None and all(m is None for m in masks):
        masks = None  # the train part of a pool whose val images have masks
    tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
    return Split(name, torch.from_numpy(images), torch.from_numpy(np.ascontiguousarray(labels)), tensor(boxes),
                 files, tensor(box_sets), None if masks is None else list(masks))


def dataset_for_config(cfg, data_dir=None, metadata=None) -> DatasetBundle:
    """The dataset a run's config trains on: its ``data`` section with its ``seed`` (so the same val split is held
    out), from a DictConfig or a checkpoint's plain dict; ``data_dir`` replaces the config's folder and
    ``metadata`` its WSOL metadata folder."""
    data = cfg["data"]
    size = data["image_size"] or (224 if data.get("pipeline") == "stream" else None)  # stream's default size
    return load_dataset(data["name"], data_dir=data_dir or data["data_dir"], val_size=data["val_size"],
                        subset=data["subset"], seed=cfg["seed"], cache_dir=data["cache_dir"],
                        image_size=size, test_subset=data.get("test_subset"),
                        metadata=metadata or data.get("metadata"))


DEFAULT_VAL_FRACTION = 0.1  # held out of train when data.val_size is unset; CIFAR-10: the customary 45k/5k split


def select_pools(name: str, data_dir=None, val_size=None, subset=None, seed: int = 0, test_subset=None,
                 download: bool = False, metadata=None):
    """The files a dataset's splits hold, before any decoding: (key, source, train pool, test pool, train indices,
    val indices into the train pool). ``load_dataset`` decodes them; the streaming pipeline reads them per batch.

    A source with a val split of its own (WSOL metadata) has it appended to the train pool, whose indices then
    name it: nothing is drawn out of train."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DATASETS:
        raise unknown("dataset", name, DATASETS)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise AttnlabError(f"seed must be an integer >= 0, got {seed!r}")
    if metadata is not None and key != "wsol":
        raise AttnlabError(f"data.metadata is read by dataset 'wsol' only, not by '{key}'")
    source = open_source(key, data_dir, download=download, metadata=metadata)
    train_pool, test_pool = source.train, source.test
    if subset is not None:
        train_pool = train_pool.select(per_class_subset(train_pool.labels, subset, seed))
    if test_subset is not None:
        test_pool = test_pool.select(per_class_subset(test_pool.labels, test_subset, 0, stream=_TEST_SUBSET,
                                                      option="test_subset"))
    if source.val is not None:
        if val_size is not None:
            raise AttnlabError(f"dataset '{key}' has its own val split (its metadata's val/); leave data.val_size "
                               f"unset (got {val_size})")
        n = len(train_pool)
        return (key, source, Pool.concat(train_pool, source.val), test_pool, np.arange(n, dtype=np.int64),
                np.arange(n, n + len(source.val), dtype=np.int64))
    if val_size is None:
        val_size = DEFAULT_VAL_FRACTION
    train_idx, val_idx = stratified_split(train_pool.labels, val_count(val_size, len(train_pool)), seed)
    return key, source, train_pool, test_pool, train_idx, val_idx


def load_dataset(name: str, data_dir=None, val_size=None, subset=None, seed: int = 0,
                 cache_dir=".cache/attnlab", image_size=None, test_subset=None, download: bool = False,
                 metadata=None) -> DatasetBundle:
    """Load ``name`` as uint8 tensors split into train / val / test.

    - ``data_dir``: the dataset's own folder. Without it: ``$ATTNLAB_DATA/<folder>`` if that variable is set, else
      ``../shared/data/<folder>`` relative to the repository root and to the cwd (folders: ``cifar10-jpeg`` or
      ``cifar-10-batches-py``, ``cifar-100-python``, ``tiny-imagenet-50``).
    - ``val_size``: images held out of train for model selection (int count or float fraction); default 10% of the
      train pool (5,000 for CIFAR-10; 10% of the subset pool when ``subset`` is given). Stratified per class, fixed
      by ``seed``.
    - ``subset``: images per class kept from the train pool (seeded) before the hold-out; ``test_subset``: images
      per class of the test split (fixed choice, independent of ``seed``).
    - ``image_size``: int or (h, w) to resize (bilinear) every image; required when a folder's images differ in size.
    - ``metadata``: dataset ``wsol`` only, the wsolevaluation metadata folder (``wsol_metadata.py``); ``data_dir``
      is then the image root its image ids are relative to, and its val split is used as given.
    - ``cache_dir``: where decoded uint8 arrays are kept (None: decode every time); ``download``: fetch CIFAR through
      torchvision when it is not found (never needed for the offline copies).
    """
    size = _size_arg(image_size)
    key, source, train_pool, test_pool, train_idx, val_idx = select_pools(name, data_dir, val_size, subset, seed,
                                                                          test_subset, download, metadata)
    pool_images, pool_boxes, stem, pool_sets = _decode_pool(source, train_pool, "train", size, cache_dir)
    test_images, test_boxes, _, test_sets = _decode_pool(source, test_pool, "test", size, cache_dir)
    train = _split("train", pool_images, train_pool, pool_boxes, train_idx, pool_sets)
    val = _split("val", pool_images, train_pool, pool_boxes, val_idx, pool_sets)
    test = _split("test", test_images, test_pool, test_boxes, box_sets=test_sets)
    if len(train) == 0:
        raise AttnlabError(f"dataset '{key}': the train split is empty (val_size={val_size} took every image)")
    mean, std = _stats(train.images.numpy(), stem, train_idx)
    h, w = train.images.shape[2:]
    return DatasetBundle(key, train, val, test, list(source.classes), mean, std, h if h == w else (h, w),
                         source.root, list(source.class_names) or list(source.classes))
