"""The streaming pipeline (``data.pipeline=stream``): image files decoded per batch in DataLoader worker processes,
for datasets too large for the uint8 cache (ImageNet: ~190 GB decoded at 224 px).

What it holds: the file names (one numpy byte-string array, not a list of Python strings, so forked workers do not
copy it page by page as reference counts change) and the labels, about 60 bytes per image. Decoded images exist
only for the batches in flight (``workers x prefetch`` batches), so memory does not grow with the dataset.

Order and augmentation are pure functions of the run's seed, the epoch and the image's index: the order comes from
``DistributedSampler`` (seeded with ``seed``, ``set_epoch(epoch)``; every rank draws the same permutation and takes
its strided share, padded by wrapping for evaluation), and each image's random transform runs under a CPU RNG
seeded from (seed, epoch, index), whatever worker decodes it. So a resumed run replays an epoch exactly, with any
``data.workers`` and on either device; a run killed mid-epoch restarts that epoch from its first batch (the
checkpoint is written after each epoch). Mixup/cutmix draws are seeded from (seed, epoch, rank, batch).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import AttnlabError
from .datasets import DatasetBundle
from .loader import epoch_seed


@dataclass
class FileSplit:
    """One split of a streamed dataset: image files relative to ``root`` and their labels."""
    name: str
    root: Path
    files: np.ndarray  # bytes (numpy "S" dtype), one per image
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_pool(cls, name: str, pool, index=None) -> "FileSplit":
        files = pool.files if index is None else [pool.files[i] for i in index]
        labels = pool.labels if index is None else pool.labels[index]
        return cls(name, Path(pool.root), np.array([f.encode() for f in files], dtype=np.bytes_).reshape(-1),
                   np.ascontiguousarray(labels, dtype=np.int64))


@dataclass
class StreamBundle(DatasetBundle):
    """A ``DatasetBundle`` whose splits are ``FileSplit`` file lists (decoded per batch); mean/std come from the
    config, not from the images."""
    kind = " (streamed)"


def stream_dataset(data, seed: int, data_dir=None) -> StreamBundle:
    """The splits a ``data`` config section selects (the same subset, hold-out and test subset as the cache)."""
    from .datasets import select_pools
    key, source, train_pool, test_pool, train_idx, val_idx = select_pools(
        data["name"], data_dir or data["data_dir"], data["val_size"], data["subset"], seed, data.get("test_subset"),
        metadata=data.get("metadata"))
    if train_pool.arrays is not None or not train_pool.files:
        raise AttnlabError(f"data.pipeline=stream reads image files, and dataset '{key}' at {source.root} is a "
                           "pickled array: use data.pipeline=cache (or its JPEG copy, e.g. cifar10-jpeg)")
    size = data["image_size"] or 224
    if len(train_idx) == 0:
        raise AttnlabError(f"dataset '{key}': the train split is empty (val_size={data['val_size']} took every image)")
    s = data["stream"]
    return StreamBundle(key, FileSplit.from_pool("train", train_pool, train_idx),
                        FileSplit.from_pool("val", train_pool, val_idx), FileSplit.from_pool("test", test_pool),
                        list(source.classes), tuple(float(m) for m in s["mean"]), tuple(float(v) for v in s["std"]),
                        int(size), source.root, list(source.class_names) or list(source.classes))


class ImageFiles(Dataset):
    """``(image tensor, label)`` per index: the file decoded with PIL (as RGB) and passed through ``transform``;
    with ``random=True`` under a CPU RNG seeded from (seed, epoch, index) (the loader calls ``set_epoch``)."""

    def __init__(self, split: FileSplit, transform, seed: int = 0, random: bool = False):
        self.root, self.files, self.labels = str(split.root), split.files, split.labels
        self.transform, self.seed, self.random = transform, int(seed), bool(random)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_seed = int(epoch), epoch_seed(self.seed, epoch)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int):
        from PIL import Image
        path = os.path.join(self.root, self.files[i].decode())
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (OSError, ValueError) as err:
            raise AttnlabError(f"cannot decode image {path}: {str(err).splitlines()[0]}") from None
        if not self.random:
            return self.transform(im), int(self.labels[i])
        with cpu_rng_seeded((self._epoch_seed + int(i)) % 2 ** 63):
            return self.transform(im), int(self.labels[i])


@contextmanager
def cpu_rng_seeded(seed: int):
    """The process's CPU generator seeded with ``seed`` inside and restored after: the same draws as
    ``torch.random.fork_rng`` + ``torch.manual_seed``, which also visit every other device type and cost about
    0.16 ms against 0.004 here, once per image (docs/data.md)."""
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(state)


class StreamLoader:
    """Yields ``(images, targets)`` on ``device``: float32 N x 3 x S x S normalised images and int64 labels (or, with
    a ``mixer``, class probabilities). The same interface as ``BatchLoader`` (``set_epoch``, ``len``, ``n``,
    ``rank``, ``world_size``, ``batch_size``), so training and ``evaluate`` take either."""

    def __init__(self, dataset: ImageFiles, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 device="cpu", seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0, mixer=None,
                 prefetch: int = 2):
        self.dataset, self.batch_size, self.device = dataset, int(batch_size), torch.device(device)
        self.seed, self.rank, self.world_size, self.epoch, self.mixer = int(seed), int(rank), int(world_size), 0, mixer
        self.n = len(dataset)
        if self.n == 0:
            raise AttnlabError("the streaming loader got an empty split")
        # Training drops the tail that does not divide by the ranks (as BatchLoader); evaluation pads by wrapping.
        self.sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle,
                                          seed=self.seed, drop_last=drop_last)
        extra = dict(prefetch_factor=prefetch) if workers > 0 else {}
        self.loader = DataLoader(dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=int(workers),
                                 pin_memory=self.device.type == "cuda", drop_last=drop_last, **extra)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def resident_bytes(self) -> int:
        """What the loader keeps per dataset (file names and labels), independent of the images' size."""
        return int(self.dataset.files.nbytes + self.dataset.labels.nbytes)

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)  # before the workers start: they are created per epoch, with this value
        batches = iter(self.loader)
        for i in range(len(self.loader)):
            try:
                x, y = next(batches)
            except AttnlabError as err:  # from a worker, its message wrapped in the worker's traceback
                raise AttnlabError(_last_line(str(err))) from None
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.mixer is not None:
                x, y = self.mixer(x, y, batch_seed(self.seed, self.epoch, self.rank, i))
            yield x, y


def _last_line(message: str) -> str:
    """The error's own line out of a DataLoader worker's wrapped traceback."""
    lines = [line for line in message.strip().splitlines() if line.strip()] or [message]
    return lines[-1].split("AttnlabError: ", 1)[-1].strip()


def batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """The mixing draws' seed of one batch (a stream apart from the per-image seeds)."""
    words = [int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(rank), int(batch), 1]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))
