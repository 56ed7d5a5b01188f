"""Datasets as uint8 tensors (decoded once, cached) and a whole-batch loader that augments on the training device."""
from .datasets import DatasetBundle, Split, channel_stats, dataset_for_config, list_datasets, load_dataset
from .loader import BatchLoader, crop_flip

__all__ = ["load_dataset", "dataset_for_config", "list_datasets", "DatasetBundle", "Split", "channel_stats",
           "BatchLoader", "crop_flip"]
