"""Classification metrics read off a confusion matrix: precision, recall, F1 and their
averages (a classification report), the row-normalised matrix, and the most confused
class pairs (fastai's ``most_confused``).

Rows are the true class, columns the predicted one, as :func:`cifarlab.engine.confusion_matrix`
makes them. A ratio whose denominator is zero (a class never predicted, or with no test
images) is reported as 0.0, as scikit-learn's ``zero_division=0`` does, so the JSON holds
numbers only.
"""

from __future__ import annotations

from typing import Any, Sequence


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def classification_report(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> dict[str, Any]:
    """Per-class ``precision``/``recall``/``f1``/``support`` and ``macro``/``weighted`` averages.

    Returns ``{"per_class": {class: {"precision", "recall", "f1", "support"}},
    "macro": {...}, "weighted": {...}}``; ``macro`` averages the classes equally,
    ``weighted`` by their support (true count).
    """
    n = len(classes)
    rows = [sum(int(v) for v in confusion[i]) for i in range(n)]
    cols = [sum(int(confusion[i][j]) for i in range(n)) for j in range(n)]
    per_class = {}
    for i, name in enumerate(classes):
        tp = int(confusion[i][i])
        p, r = _ratio(tp, cols[i]), _ratio(tp, rows[i])
        per_class[name] = {"precision": p, "recall": r, "f1": _ratio(2 * p * r, p + r), "support": rows[i]}
    total = sum(rows)
    averages = {}
    for kind in ("macro", "weighted"):
        weights = [1.0] * n if kind == "macro" else [float(s) for s in rows]
        norm = sum(weights)
        averages[kind] = {
            key: _ratio(sum(w * per_class[c][key] for w, c in zip(weights, classes)), norm)
            for key in ("precision", "recall", "f1")
        }
        averages[kind]["support"] = total
    return {"per_class": per_class, **averages}


def normalise_rows(confusion: Sequence[Sequence[int]]) -> list[list[float]]:
    """The confusion matrix with each row divided by its sum (a row of zeros stays zeros)."""
    out = []
    for row in confusion:
        total = sum(int(v) for v in row)
        out.append([_ratio(int(v), total) for v in row])
    return out


def most_confused(confusion: Sequence[Sequence[int]], classes: Sequence[str], min_count: int = 1) -> list[tuple[str, str, int]]:
    """Off-diagonal ``(actual, predicted, count)`` with ``count >= min_count``, most frequent
    first (ties in class order), as fastai's ``most_confused``."""
    pairs = [
        (classes[i], classes[j], int(confusion[i][j]))
        for i in range(len(classes))
        for j in range(len(classes))
        if i != j and int(confusion[i][j]) >= max(1, min_count)
    ]
    return sorted(pairs, key=lambda t: -t[2])
