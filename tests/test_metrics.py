"""Known answers of the classification report and most-confused pairs (cifarlab.metrics)."""

from __future__ import annotations

import pytest

from cifarlab.metrics import classification_report, most_confused, normalise_rows

# rows = actual, columns = predicted
CM = [
    [5, 3, 0],  # a: 8 images, 5 right, 3 taken for b
    [2, 3, 1],  # b: 6 images
    [0, 0, 0],  # c: no test images, never predicted by the model except once from b
]
CLASSES = ["a", "b", "c"]


def test_classification_report_known_answers():
    r = classification_report(CM, CLASSES)
    a, b, c = (r["per_class"][k] for k in CLASSES)
    assert a["precision"] == pytest.approx(5 / 7) and a["recall"] == pytest.approx(5 / 8) and a["support"] == 8
    assert a["f1"] == pytest.approx(2 * (5 / 7) * (5 / 8) / (5 / 7 + 5 / 8))
    assert b["precision"] == pytest.approx(3 / 6) and b["recall"] == pytest.approx(3 / 6) and b["f1"] == pytest.approx(0.5)
    # a class with no images and no correct prediction: every ratio is 0, not nan
    assert c == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["macro"]["precision"] == pytest.approx((5 / 7 + 0.5 + 0.0) / 3)
    assert r["macro"]["support"] == 14
    assert r["weighted"]["recall"] == pytest.approx((8 * 5 / 8 + 6 * 0.5) / 14)  # = accuracy
    assert r["weighted"]["recall"] == pytest.approx(8 / 14)


def test_rows_normalised_and_most_confused():
    assert normalise_rows(CM) == [[5 / 8, 3 / 8, 0.0], [2 / 6, 3 / 6, 1 / 6], [0.0, 0.0, 0.0]]
    assert most_confused(CM, CLASSES) == [("a", "b", 3), ("b", "a", 2), ("b", "c", 1)]
    assert most_confused(CM, CLASSES, min_count=2) == [("a", "b", 3), ("b", "a", 2)]
    assert most_confused([[4, 0], [0, 4]], ["x", "y"]) == []
