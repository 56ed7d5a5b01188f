"""Datasets as uint8 tensors (decoded once, cached) and a whole-batch loader that augments on the training device;
or, with ``data.pipeline=stream``, decoded per batch in DataLoader workers (``stream``, ``transforms``)."""
from .datasets import DatasetBundle, Split, channel_stats, dataset_for_config, list_datasets, load_dataset
from .loader import BatchLoader, crop_flip
from .pipeline import build_loaders

__all__ = ["load_dataset", "dataset_for_config", "list_datasets", "DatasetBundle", "Split", "channel_stats",
           "BatchLoader", "crop_flip", "build_loaders"]
