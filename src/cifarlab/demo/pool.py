"""The test images the demo shows: the misclassified pool and one example per class.

The pool keeps, for every (actual, predicted) pair of classes, its ``per_pair`` most
confidently misclassified test images. That is enough to answer every filter of the
misclassified tab exactly (no filter, by actual class, by predicted class, or both) for
up to ``per_pair`` images: the top n of any filter's images are among the top n of
their own pairs. It is also small (CIFAR-10 at 94% has ~600 mistakes in all), so an
exported folder can carry it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_EXAMPLES = 10  # example images offered, one per class


@dataclass(frozen=True, eq=False)
class Pool:
    """Misclassified test images, most confident first.

    ``images`` uint8 (N, 3, H, W); ``targets``/``preds`` int64 (N,); ``probs`` float32 (N, C):
    the softmax over all classes (with the run's TTA), so captions can quote any class.
    """

    images: torch.Tensor
    targets: np.ndarray
    preds: np.ndarray
    probs: np.ndarray

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def confidence(self) -> np.ndarray:
        """Probability of the predicted class of each image."""
        return self.probs[np.arange(len(self)), self.preds]

    def select(self, actual: int | None, predicted: int | None, count: int) -> np.ndarray:
        """Pool indices of the ``count`` most confident images matching the filters (None = any)."""
        keep = np.ones(len(self), dtype=bool)
        if actual is not None:
            keep &= self.targets == actual
        if predicted is not None:
            keep &= self.preds == predicted
        return np.flatnonzero(keep)[: max(0, int(count))]


def build_pool(logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor, per_pair: int) -> Pool:
    """The pool (see module docstring) from the split's logits, targets and uint8 images."""
    probs = logits.detach().float().cpu().softmax(1)
    targets = targets.detach().long().cpu()
    conf, preds = probs.max(1)
    wrong = (preds != targets).nonzero().flatten()
    # Most confident first; ties keep split order so the pool is deterministic.
    wrong = wrong[torch.sort(conf[wrong], descending=True, stable=True).indices]
    num_classes = probs.shape[1]
    pair = (targets[wrong] * num_classes + preds[wrong]).tolist()
    seen: dict[int, int] = {}
    kept = []
    for i, p in zip(wrong.tolist(), pair):
        if seen.get(p, 0) < per_pair:
            seen[p] = seen.get(p, 0) + 1
            kept.append(i)
    idx = torch.tensor(kept, dtype=torch.int64)
    return Pool(
        images=images[idx].contiguous(),
        targets=targets[idx].numpy(),
        preds=preds[idx].numpy(),
        probs=probs[idx].numpy().astype(np.float32),
    )


def examples_of(images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> list[tuple[np.ndarray, str]]:
    """The first image of each of the first :data:`MAX_EXAMPLES` classes that have one,
    as (uint8 (H, W, 3), class name) pairs."""
    out = []
    for c, name in enumerate(classes):
        hits = (labels == c).nonzero().flatten()
        if hits.numel():
            out.append((images[int(hits[0])].permute(1, 2, 0).contiguous().numpy(), name))
        if len(out) == MAX_EXAMPLES:
            break
    return out
