"""Pick the test images worth looking at, from logits collected over the test split."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selection:
    """Chosen test images, in the order they are shown. All tensors are 1-d, CPU, same length.

    ``indices`` index the test split; ``probs`` is the softmax probability of the
    predicted class, ``true_probs`` that of the actual class, ``losses`` the
    cross-entropy of the actual class (``-log true_probs``, from ``log_softmax``).
    """

    indices: torch.Tensor
    preds: torch.Tensor
    targets: torch.Tensor
    probs: torch.Tensor
    true_probs: torch.Tensor
    losses: torch.Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())


def _select(logits: torch.Tensor, targets: torch.Tensor, n: int, mask, key: str) -> Selection:
    """The ``n`` images where ``mask(preds, targets)`` holds, highest ``key`` first
    ("conf": p(predicted), "loss": cross-entropy); ties keep test-split order."""
    logits = logits.detach().float().cpu()
    targets = targets.detach().long().cpu()
    probs_all = logits.softmax(1)
    conf, preds = probs_all.max(1)
    # log_softmax, not log(softmax): a confidently wrong image's p(actual) can underflow to 0.
    losses = -logits.log_softmax(1).gather(1, targets.view(-1, 1)).flatten()
    candidates = mask(preds, targets).nonzero().flatten()
    score = conf if key == "conf" else losses
    order = torch.sort(score[candidates], descending=True, stable=True).indices[: max(0, int(n))]
    idx = candidates[order]
    return Selection(
        indices=idx,
        preds=preds[idx],
        targets=targets[idx],
        probs=conf[idx],
        true_probs=probs_all[idx, targets[idx]],
        losses=losses[idx],
    )


def select_examples(logits: torch.Tensor, targets: torch.Tensor, n: int, *, correct: bool) -> Selection:
    """The ``n`` most confidently misclassified (``correct=False``) or correct test images.

    Confidence is the softmax probability of the predicted class; ties keep test-split
    order, so the choice is deterministic. Fewer than ``n`` come back when the split
    has fewer such images.
    """
    if correct:
        return _select(logits, targets, n, lambda p, t: p == t, "conf")
    return _select(logits, targets, n, lambda p, t: p != t, "conf")


def select_top_losses(logits: torch.Tensor, targets: torch.Tensor, n: int) -> Selection:
    """The ``n`` test images with the highest loss (fastai's ``plot_top_losses``).

    The loss is the cross-entropy of the actual class, so correct but unsure predictions
    rank among the mistakes by how little probability the actual class got. Highest
    first; ties keep test-split order.
    """
    return _select(logits, targets, n, lambda p, t: torch.ones_like(t, dtype=torch.bool), "loss")


def select_confused(logits: torch.Tensor, targets: torch.Tensor, actual: int, predicted: int, n: int) -> Selection:
    """Up to ``n`` test images of class ``actual`` predicted as ``predicted``, most confident first."""
    return _select(logits, targets, n, lambda p, t: (t == actual) & (p == predicted), "conf")
