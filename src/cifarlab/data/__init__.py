"""Datasets for cifarlab: sources (CIFAR-10, image folders, synthetic), a decode cache,
per-channel normalisation, batched on-device augmentation, progressive resizing and a
device-resident, exactly resumable batch loader.
"""

from .augment import AugmentSpec, augment_batch
from .cache import default_cache_dir
from .loader import DeviceLoader
from .normalize import apply_normalization, normalization, normalize
from .resize import ResizeSchedule, resize_batch
from .sources import CIFAR10_MEAN, CIFAR10_STD, KINDS, Dataset, Split, channel_stats, load_dataset

__all__ = [
    "AugmentSpec",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Dataset",
    "DeviceLoader",
    "KINDS",
    "ResizeSchedule",
    "Split",
    "apply_normalization",
    "augment_batch",
    "channel_stats",
    "default_cache_dir",
    "load_dataset",
    "normalization",
    "normalize",
    "resize_batch",
]
