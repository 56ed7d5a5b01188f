"""``build_loaders``: the one place a run's data loaders are chosen, from ``data.pipeline``.

- ``cache`` (the default, for small datasets): the dataset decoded once into uint8 tensors (``load_dataset``) and
  ``BatchLoader``, which augments whole batches on the training device (pad-crop and flip).
- ``stream`` (datasets too large to cache): file lists and ``StreamLoader``, which decodes per batch in
  ``data.workers`` DataLoader processes with the ``data.stream`` transforms (``attnlab.data.transforms``).

Both loaders yield ``(images, targets)`` on the device and share ``set_epoch``/``len``; targets are class indices,
or class probabilities when the stream mixes batches (mixup/cutmix).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Loaders:
    bundle: Any  # DatasetBundle (cache) or StreamBundle (stream)
    train: Any
    val: Any  # None without a validation split
    test: Any


def build_loaders(cfg, device, batch_size: int, eval_batch_size: int, rank: int = 0, world_size: int = 1,
                  data_dir=None, sync=None, with_train: bool = True) -> Loaders:
    """The run's bundle and its train (shuffled, augmented, ``batch_size`` per rank), val and test loaders.

    ``cfg`` is a run config (DictConfig or a checkpoint's plain dict); ``data_dir`` replaces its data folder;
    ``sync`` (a barrier) lets rank 0 build the decode cache before the other ranks read it; ``with_train=False``
    builds no train loader (evaluation only).
    """
    args = (cfg, device, batch_size, eval_batch_size, rank, world_size, data_dir, with_train)
    if cfg["data"].get("pipeline", "cache") == "stream":
        return _stream_loaders(*args)
    return _cache_loaders(*args, sync)


def _cache_loaders(cfg, device, batch_size, eval_batch_size, rank, world_size, data_dir, with_train, sync):
    from ..errors import AttnlabError
    from .datasets import dataset_for_config
    from .loader import BatchLoader
    data, seed = cfg["data"], int(cfg["seed"])
    if sync is not None and rank != 0:
        sync()
    bundle = dataset_for_config(cfg, data_dir)
    if sync is not None and rank == 0:
        sync()
    common = dict(mean=bundle.mean, std=bundle.std, device=device, seed=seed, rank=rank, world_size=world_size)
    train = None
    if with_train:
        train = BatchLoader(bundle.train, batch_size, shuffle=True, augment=data["augment"], drop_last=True, **common)
        if len(train) == 0:
            raise AttnlabError(f"train.batch_size={batch_size * world_size} is larger than the {len(bundle.train)} "
                               "training images")
    # No validation split (data.val_size=0): no model selection, the last epoch is "best".
    val = BatchLoader(bundle.val, eval_batch_size, **common) if len(bundle.val) else None
    return Loaders(bundle, train, val, BatchLoader(bundle.test, eval_batch_size, **common))


def _stream_loaders(cfg, device, batch_size, eval_batch_size, rank, world_size, data_dir, with_train) -> Loaders:
    from ..errors import AttnlabError
    from .stream import ImageFiles, StreamLoader, stream_dataset
    from .transforms import BatchMixer, eval_transform, train_transform
    data, seed = cfg["data"], int(cfg["seed"])
    bundle = stream_dataset(data, seed, data_dir)
    s, size = data["stream"], bundle.image_size
    num_classes = cfg["model"].get("num_classes") or bundle.num_classes
    common = dict(device=device, seed=seed, rank=rank, world_size=world_size, workers=int(data["workers"]))
    test_tf = eval_transform(s, size)
    train = None
    if with_train:
        augment = bool(data["augment"])  # false: train on the evaluation view (no random transform, no mixing)
        images = ImageFiles(bundle.train, train_transform(s, size) if augment else test_tf, seed, random=augment)
        mixer = BatchMixer.from_config(s, num_classes) if augment else None
        train = StreamLoader(images, batch_size, shuffle=True, drop_last=True, mixer=mixer, **common)
        if len(train) == 0:
            raise AttnlabError(f"train.batch_size={batch_size * world_size} is larger than the {len(bundle.train)} "
                               "training images")
    val = StreamLoader(ImageFiles(bundle.val, test_tf), eval_batch_size, **common) if len(bundle.val) else None
    return Loaders(bundle, train, val, StreamLoader(ImageFiles(bundle.test, test_tf), eval_batch_size, **common))
