"""Pick the test images worth looking at, from logits collected over the test split."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selection:
    """Chosen test images, most confident first. All tensors are 1-d, CPU, same length.

    ``indices`` index the test split; ``probs`` is the softmax probability of the
    predicted class, ``true_probs`` that of the actual class.
    """

    indices: torch.Tensor
    preds: torch.Tensor
    targets: torch.Tensor
    probs: torch.Tensor
    true_probs: torch.Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())


def select_examples(logits: torch.Tensor, targets: torch.Tensor, n: int, *, correct: bool) -> Selection:
    """The ``n`` most confidently misclassified (``correct=False``) or correct test images.

    Confidence is the softmax probability of the predicted class; ties keep test-split
    order, so the choice is deterministic. Fewer than ``n`` come back when the split
    has fewer such images.
    """
    logits = logits.detach().float().cpu()
    targets = targets.detach().long().cpu()
    probs_all = logits.softmax(1)
    conf, preds = probs_all.max(1)
    mask = (preds == targets) if correct else (preds != targets)
    candidates = mask.nonzero().flatten()
    order = torch.sort(conf[candidates], descending=True, stable=True).indices[: max(0, int(n))]
    idx = candidates[order]
    return Selection(
        indices=idx,
        preds=preds[idx],
        targets=targets[idx],
        probs=conf[idx],
        true_probs=probs_all[idx, targets[idx]],
    )
