"""What a run builds from its config before the first step: data, model, loaders.

``train``, ``lr-find``, ``evaluate`` and the benchmarks all start here, so a model is
always built, initialised from data and fed exactly the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from cifarlab import distributed
from cifarlab.config import TrainConfig
from cifarlab.errors import CifarlabError
from cifarlab.runtime import Runtime

# The whitening stem of the fast nets is fitted on this many training images: enough
# for a stable 12x12 patch covariance, small enough to cost well under a second.
WHITEN_IMAGES = 5000


@dataclass
class RunContext:
    """Everything a training run builds from its config, shared by train, lr-find, explain."""

    cfg: TrainConfig
    runtime: Runtime
    dataset: Any  # cifarlab.data.Dataset
    model: nn.Module
    train_loader: Any  # cifarlab.data.DeviceLoader
    test_loader: Any


def load_data(cfg: TrainConfig, progress: bool = False):
    """The dataset the config names, with --holdout, then --limit-train/--limit-test applied.

    With ``holdout`` the returned ``test`` split is the held-out part of train
    (``eval_split == "holdout"``); the real test split is not used.
    """
    from cifarlab.data import load_dataset

    ds = load_dataset(
        cfg.dataset,
        cfg.data if cfg.dataset != "synthetic" else None,
        num_classes=cfg.num_classes,
        synthetic_train=cfg.synthetic_train,
        synthetic_test=cfg.synthetic_test,
        seed=0,  # synthetic data is fixed across runs so seeds vary only training
        progress=progress,
        skip_bad=cfg.skip_bad,
    )
    if cfg.holdout:
        rest, held = ds.train.hold_out(cfg.holdout)
        ds = replace(ds, train=rest, test=held, eval_split="holdout")
    if cfg.limit_train or cfg.limit_test:
        ds = replace(ds, train=ds.train.take(cfg.limit_train), test=ds.test.take(cfg.limit_test))
    return ds


def build_context(
    cfg: TrainConfig, *, progress: bool = False, dataset=None, dist: distributed.DistInfo | None = None
) -> RunContext:
    """Resolve device/precision, load data, build and data-initialise the model, make loaders.

    With ``dist`` (a multi-process run, see :mod:`cifarlab.distributed`) the device is
    ``cuda:LOCAL_RANK`` on GPUs, ``batch_size`` stays the *global* batch (each rank takes
    batch_size / world_size, so a preset trains the same on any number of processes),
    the train loader yields this rank's shard and the test loader a disjoint strided
    slice of the test split, so summed metrics cover every test image exactly once.
    """
    from cifarlab.data import AugmentSpec, ResizeSchedule

    dist = dist or distributed.DistInfo()
    runtime = Runtime.resolve(cfg, local_rank=dist.local_rank if dist.enabled else None)
    augment = AugmentSpec.parse(cfg.augment)  # validate before touching data
    resize = ResizeSchedule.parse(cfg.progressive_resize)
    check_model_name(cfg.model, whiten_eps=cfg.whiten_eps)
    if cfg.batch_size % dist.world_size:
        raise CifarlabError(
            f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over "
            f"{dist.world_size} processes; use a multiple of {dist.world_size}"
        )
    ds = dataset if dataset is not None else _load_data_in_turn(cfg, progress, dist)
    resize.check_images(*ds.train.images.shape[-2:])
    torch.manual_seed(cfg.seed)  # model init is part of the run's reproducibility
    model = make_model(cfg, num_classes=len(ds.classes))
    init_from_data(model, ds, cfg.seed)
    model = runtime.prepare(model)
    train_loader, test_loader = make_loaders(cfg, ds, runtime, dist, augment, resize)
    return RunContext(cfg, runtime, ds, model, train_loader, test_loader)


def make_loaders(cfg: TrainConfig, ds, runtime: Runtime, dist: distributed.DistInfo, augment, resize):
    """The training loader (this rank's shard, ``augment``ed, sized per the ``resize``
    schedule) and the test loader (this rank's slice)."""
    from cifarlab.data import DeviceLoader, Split

    common = dict(device=runtime.device, mean=ds.mean, std=ds.std, channels_last=runtime.channels_last)
    train_loader = DeviceLoader(
        ds.train,
        cfg.batch_size // dist.world_size,
        shuffle=True,
        augment=augment,
        seed=cfg.seed,
        # A last batch of a handful of images gives noisy BatchNorm statistics and a
        # wasted step; drop it when there is more than one batch.
        drop_last=len(ds.train) > cfg.batch_size,
        rank=dist.rank,
        world_size=dist.world_size,
        epoch_sizes=resize.epoch_sizes(cfg.epochs),
        **common,
    )
    test = ds.test
    if dist.enabled:  # no wrap-around padding here: every test image counted once
        test = Split(test.images[dist.rank :: dist.world_size], test.labels[dist.rank :: dist.world_size])
    test_loader = DeviceLoader(test, cfg.eval_batch_size, shuffle=False, **common)
    return train_loader, test_loader


def _load_data_in_turn(cfg: TrainConfig, progress: bool, dist: distributed.DistInfo):
    """Load the dataset; under DDP rank 0 first (it downloads, decodes and fills the
    cache), then the others, which read the cache. If rank 0 fails, the others fail the
    same way right after it instead of waiting at the barrier."""
    if not dist.enabled:
        return load_data(cfg, progress=progress)
    if not dist.is_main:
        distributed.barrier()
    try:
        return load_data(cfg, progress=progress and dist.is_main)
    finally:
        if dist.is_main:
            distributed.barrier()


def check_model_name(name: str, whiten_eps: float | None = None) -> None:
    """Reject an unknown model, or a whitening option it has no stem for, before any data is read."""
    from cifarlab.models.registry import MODELS, list_models

    if name not in list_models():
        raise CifarlabError(f"unknown model '{name}'; available: {', '.join(list_models())}")
    if whiten_eps is not None and "whiten_eps" not in MODELS[name].defaults:
        stems = ", ".join(m for m in list_models() if "whiten_eps" in MODELS[m].defaults)
        raise CifarlabError(
            f"config key 'whiten_eps' applies only to models with a whitening stem ({stems}); "
            f"model '{name}' has none"
        )


def make_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The config's model, freshly initialised (on the CPU)."""
    from cifarlab.models import create_model

    extra = {} if cfg.whiten_eps is None else {"whiten_eps": cfg.whiten_eps}
    return create_model(cfg.model, num_classes=num_classes, norm=cfg.norm, dropout=cfg.dropout, **extra)


def init_from_data(model: nn.Module, ds, seed: int) -> None:
    """Data-dependent init (the fast nets' patch-whitening stem), on a fixed image subset."""
    init = getattr(model, "init_from_data", None)
    if init is None:
        return
    init(stem_fit_batch(ds, seed))


def stem_fit_batch(ds, seed: int, images: int = WHITEN_IMAGES) -> torch.Tensor:
    """The batch a run fits its whitening stem on: ``images`` training images drawn with
    ``seed``, normalised like training, as a float (N, C, H, W) tensor on the CPU."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.train), generator=g)[:images]
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(ds.std).view(1, 3, 1, 1) * 255
    return (ds.train.images[idx].float() - mean) / std
