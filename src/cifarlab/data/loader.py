"""A device-resident batch iterator with exactly reproducible, resumable randomness.

The whole split lives on the device as uint8 (CIFAR-10 train is 150 MB), so a batch is
one index_select + convert + normalize + augment, all on the device: no worker
processes, no host-to-device copy per batch, no host sync per batch.

Randomness is a pure function of ``(seed, epoch)`` for the order and of ``(seed,
epoch, batch_index, rank)`` for augmentation, never of how many batches were drawn
before. So resuming mid-epoch is ``set_epoch(e); iter_from(k)``, and every DDP rank
agrees on the permutation without communicating.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from .augment import AugmentSpec, augment_batch
from .dataset import Split
from .normalize import apply_normalization, normalization
from .resize import resize_batch
from .seeding import mix_seed

# Domain tags keep the permutation stream and the augmentation streams apart even if
# (seed, epoch) happens to equal some (seed, epoch, batch, rank) prefix.
_PERM_STREAM = 0x5045524D  # "PERM"
_AUG_STREAM = 0x41554700  # "AUG"
_FLIP_STREAM = 0x464C4950  # "FLIP"


class DeviceLoader:
    """Iterate over ``(x, y)`` batches of a split held on ``device``.

    ``x`` is float32 (B,3,H,W), normalized with ``mean``/``std`` (pixel/255 units),
    augmented by ``augment`` if given, downscaled to ``epoch_sizes[epoch]`` where that is
    given (progressive resizing, see :mod:`.resize`) and optionally channels_last; ``y`` is int64.
    With ``world_size > 1`` each rank gets a strided shard of the same epoch
    permutation, padded by wrap-around (like ``DistributedSampler``) so all ranks run
    the same number of batches.
    """

    images_on_device: torch.Tensor
    labels_on_device: torch.Tensor

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool,
        augment: AugmentSpec | None = None,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        epoch_sizes: Sequence[int | None] = (),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        channels = split.images.shape[1]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"mean/std need {channels} entries with std > 0, got {mean}, {std}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.channels_last = bool(channels_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.epoch_sizes = tuple(epoch_sizes)
        self.num_samples = len(split)
        # Moved once; every batch afterwards is indexed on the device.
        self.images_on_device = split.images.to(self.device)
        self.labels_on_device = split.labels.to(self.device)
        # Folded once here, so that a batch costs one fused multiply-add and no host-to-device copy.
        self._scale, self._shift = normalization(mean, std, self.device)
        # flip:alt: each image's first-epoch flip, a function of the seed and its index only
        # (so resumes and DDP ranks agree); epoch e flips it when first ^ (e odd).
        self._first_flip = None
        if self.augment is not None and self.augment.flip_alternate:
            g = torch.Generator().manual_seed(mix_seed(_FLIP_STREAM, self.seed))
            self._first_flip = (torch.rand(self.num_samples, generator=g) < 0.5).to(self.device)

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank sees per epoch (before batching), including wrap-around padding."""
        return math.ceil(self.num_samples / self.world_size)

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        n = self.samples_per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration reproduces."""
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's sample indices for ``epoch`` (default: the current one), in iteration order, on the device.

        The permutation is drawn on the CPU from a fresh generator seeded by (seed, epoch)
        and then moved: a CPU generator yields the same permutation on every machine
        whatever device it trains on (CUDA generators produce different streams), so
        every DDP rank and every resumed run gets the identical order. For 50k samples
        that costs a few ms and one 400 kB copy per epoch, not per batch.
        """
        n = self.num_samples
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(_PERM_STREAM, self.seed, epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = self.samples_per_rank * self.world_size
            if total > n:  # wrap around, like DistributedSampler(drop_last=False)
                order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
            order = order[self.rank : total : self.world_size]
        if self.drop_last:
            order = order[: len(self) * self.batch_size]
        if self.device.type == "cuda":
            # Pinned + non_blocking: a pageable copy would synchronise the host with the
            # GPU once per epoch; the caching host allocator keeps the pinned buffer alive
            # until the copy has run.
            return order.pin_memory().to(self.device, non_blocking=True)
        return order.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over all batches of the current epoch."""
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches ``start_batch, start_batch+1, ...`` of the current epoch.

        Identical (``torch.equal``) to the tail of a full iteration of the same epoch,
        which makes exact mid-epoch resume trivial.
        """
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        return self._batches(self.epoch, int(start_batch))

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices(epoch)
        size = self.epoch_sizes[epoch] if epoch < len(self.epoch_sizes) else None
        bs = self.batch_size
        for b in range(start, len(self)):
            idx = indices[b * bs : (b + 1) * bs]
            x = apply_normalization(self.images_on_device.index_select(0, idx), self._scale, self._shift)
            if self.augment is not None:
                # A fresh generator per batch: its stream depends only on (seed, epoch,
                # batch, rank). manual_seed on a CUDA generator is host-side bookkeeping.
                g = torch.Generator(device=self.device)
                g.manual_seed(mix_seed(_AUG_STREAM, self.seed, epoch, b, self.rank))
                flips = None
                if self._first_flip is not None:
                    flips = self._first_flip.index_select(0, idx) ^ bool(epoch % 2)
                x = augment_batch(x, self.augment, g, flips=flips)
            if size is not None:
                x = resize_batch(x, size)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels_on_device.index_select(0, idx)
