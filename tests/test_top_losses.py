"""Top losses (fastai's ``plot_top_losses``) and the images behind the most confused pairs,
on planted logits and on a tiny model whose every logit is known in advance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.explain.select import select_confused, select_examples, select_top_losses

# Planted logits, 3 classes. Losses (cross-entropy of the actual class), highest first:
# 1 (confidently wrong), 4 (wrong), 6 (wrong, unsure), 3 (RIGHT but unsure), then the
# confident right ones 0, 2, 5.
LOGITS = torch.tensor(
    [
        [8.0, 0.0, 0.0],  # 0: actual 0, right, sure
        [8.0, 0.0, 0.0],  # 1: actual 2, wrong, sure
        [0.0, 8.0, 0.0],  # 2: actual 1, right, sure
        [1.2, 1.0, -3.0],  # 3: actual 0, right, unsure
        [0.0, 0.0, 6.0],  # 4: actual 1, wrong
        [0.0, 0.0, 7.0],  # 5: actual 2, right, sure
        [1.0, 1.2, -3.0],  # 6: actual 0, wrong, unsure
    ]
)
TARGETS = torch.tensor([0, 2, 1, 0, 1, 2, 0])


def test_top_losses_known_answer_includes_a_correct_but_unsure_image():
    top = select_top_losses(LOGITS, TARGETS, 4)
    assert top.indices.tolist() == [1, 4, 6, 3]
    assert top.preds.tolist() == [0, 2, 1, 0] and top.targets.tolist() == [2, 1, 0, 0]
    assert bool(top.preds[3] == top.targets[3])  # image 3 is right, and still among the top losses
    expected = F.cross_entropy(LOGITS, TARGETS, reduction="none")
    assert top.losses.tolist() == pytest.approx(expected[[1, 4, 6, 3]].tolist())
    assert top.true_probs.tolist() == pytest.approx(torch.exp(-top.losses).tolist())
    # all of them when more are asked for: 5 (p = e^7 / (e^7 + 2)) is less sure than 0 and 2,
    # whose losses tie and so keep split order; none for n = 0
    assert select_top_losses(LOGITS, TARGETS, 100).indices.tolist() == [1, 4, 6, 3, 5, 0, 2]
    assert len(select_top_losses(LOGITS, TARGETS, 0)) == 0


def test_ties_keep_test_split_order_and_extreme_logits_stay_finite():
    logits = torch.tensor([[0.0, 1.0], [5.0, 0.0], [0.0, 1.0], [0.0, 1.0], [200.0, -200.0]])
    targets = torch.tensor([0, 0, 0, 1, 1])
    top = select_top_losses(logits, targets, 5)
    # image 4's p(actual) underflows to 0 in fp32: log_softmax still gives its loss, 400
    assert top.indices.tolist() == [4, 0, 2, 3, 1]
    assert top.losses[0].item() == pytest.approx(400.0) and torch.isfinite(top.losses).all()
    assert top.losses[1] == top.losses[2]  # the tie (0 and 2) kept split order


def test_other_selections_carry_the_loss_too_and_pairs_pick_their_images():
    mis = select_examples(LOGITS, TARGETS, 10, correct=False)
    assert mis.losses.tolist() == pytest.approx(F.cross_entropy(LOGITS[mis.indices], TARGETS[mis.indices], reduction="none").tolist())
    # actual 0 predicted as 1: image 6 only; actual 2 predicted as 0: image 1
    assert select_confused(LOGITS, TARGETS, 0, 1, 8).indices.tolist() == [6]
    assert select_confused(LOGITS, TARGETS, 2, 0, 8).indices.tolist() == [1]
    assert len(select_confused(LOGITS, TARGETS, 1, 0, 8)) == 0
    # most confident first, capped at n
    logits = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 2.0], [1.0, 0.0]])
    targets = torch.zeros(4, dtype=torch.long)
    assert select_confused(logits, targets, 0, 1, 2).indices.tolist() == [1, 2]


# ------------------------------------------------------------------ a planted model

K = 10.0  # logit of class c = K * (mean of colour channel c), on images in [0, 1]


class ColourNet(nn.Module):
    """1x1 conv (the identity, times K) -> global average pool: the logits of a solid-colour
    image are K times its colour, so every loss is known before the model runs."""

    cam_layer = "conv"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1) * K)
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


# (colour, actual class): the loss order is 1, 4, 6, 3 (right but unsure), then 0, 2, 5.
PLANTED = [
    ((255, 0, 0), 0),
    ((255, 0, 0), 2),
    ((0, 255, 0), 1),
    ((130, 110, 0), 0),
    ((0, 0, 200), 1),
    ((0, 0, 255), 2),
    ((110, 130, 0), 0),
]


def _planted_images() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(len(PLANTED), 3, 8, 8, dtype=torch.uint8)
    for i, (colour, _) in enumerate(PLANTED):
        images[i] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    images[:, :, 2:4, 2:4] //= 2  # a darker patch, so the CAMs are not flat
    return images, torch.tensor([c for _, c in PLANTED])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from cifarlab.explain.galleries import explain_predictions, write_explanation

    model = ColourNet().eval()
    images, targets = _planted_images()
    with torch.no_grad():
        logits = model(images.float() / 255)
    expl = explain_predictions(
        model, images, logits, targets, classes=["red", "green", "blue"], mean=(0, 0, 0), std=(1, 1, 1),
        n_misclassified=2, n_correct=2, n_top_losses=5,
    )
    out = tmp_path_factory.mktemp("planted")
    return expl, write_explanation(expl, out), logits, targets


def test_planted_model_top_losses_gallery(planted):
    expl, _, logits, targets = planted
    g = expl.top_losses
    assert g.kind == "top_losses"
    # the two images with the highest loss are the mistakes, then the unsure ones; image 3 is right
    assert g.selection.indices.tolist()[:4] == [1, 4, 6, 3]
    assert g.selection.indices.tolist()[4] in (0, 2, 5)
    assert g.selection.losses.tolist() == pytest.approx(F.cross_entropy(logits, targets, reduction="none")[g.selection.indices].tolist(), rel=1e-5)
    # image 1 is red (255, with a 2x2 patch of 127 out of 64 pixels) but blue: its red logit is
    # L = K * mean red, the others 0, so its loss is L + log(1 + 2 exp(-L))
    red = K * (255 * 60 + 127 * 4) / (64 * 255)
    assert g.selection.losses[0].item() == pytest.approx(red + math.log(1 + 2 * math.exp(-red)), rel=1e-5)
    # image | CAM predicted | CAM actual: maps differ for the wrong images, coincide for the right ones
    wrong = (g.selection.preds != g.selection.targets).numpy()
    assert wrong.tolist() == [True, True, True, False, False]
    assert np.array_equal(g.cam_pred[~wrong], g.cam_true[~wrong])
    assert not np.array_equal(g.cam_pred[wrong], g.cam_true[wrong])
    assert g.images.shape == (5, 8, 8, 3) and g.cam_pred.shape == (5, 8, 8) and g.cam_pred.dtype == np.float32
    assert (g.cam_pred >= 0).all() and (g.cam_pred <= 1).all()
    assert g.faithfulness.n == 5
    # the caption says actual / predicted / loss / p(actual)
    fig = g.figure(expl.classes)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "actual: blue / predicted: red" in texts
    assert f"loss {g.selection.losses[0].item():.2f} / p(actual) 0.00" in texts
    assert any(t.startswith("Top losses") for t in texts)


def test_planted_model_files(planted):
    expl, paths, _, _ = planted
    assert paths["top_losses"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads(paths["json"].read_text())
    rows = info["top_losses"]
    assert [r["index"] for r in rows[:4]] == [1, 4, 6, 3]
    assert [(r["actual"], r["predicted"]) for r in rows[:4]] == [("blue", "red"), ("green", "blue"), ("red", "green"), ("red", "red")]
    assert [r["loss"] for r in rows] == sorted((r["loss"] for r in rows), reverse=True)
    assert all(r["actual_prob"] == pytest.approx(math.exp(-r["loss"]), rel=1e-5) for r in rows)
    assert set(info["faithfulness"]) == {"misclassified", "correct", "top_losses"}
    with np.load(paths["npz"], allow_pickle=False) as z:
        gallery = z["gallery"]
        assert gallery.dtype == np.dtype("<U13")
        assert gallery.tolist() == ["misclassified"] * 2 + ["correct"] * 2 + ["top_losses"] * 5
        top = gallery == "top_losses"
        assert z["indices"][top].tolist() == [r["index"] for r in rows]
        assert np.array_equal(z["cam_pred"][top], expl.top_losses.cam_pred)
        assert np.array_equal(z["cam_true"][top], expl.top_losses.cam_true)
        assert z["images"].dtype == np.uint8 and z["cam_pred"].dtype == np.float32


def test_no_top_losses_when_asked_for_none():
    from cifarlab.explain.galleries import explain_predictions

    model = ColourNet().eval()
    images, targets = _planted_images()
    with torch.no_grad():
        logits = model(images.float() / 255)
    expl = explain_predictions(
        model, images, logits, targets, classes=["red", "green", "blue"], mean=(0, 0, 0), std=(1, 1, 1),
        n_misclassified=1, n_correct=0, n_top_losses=0,
    )
    assert len(expl.top_losses.selection) == 0 and expl.to_dict()["top_losses"] == []
    assert expl.misclassified.selection.indices.tolist() == [1]


def test_pair_names_are_unique_and_safe_as_ids_and_file_names():
    from cifarlab.report.pairs import pair_name

    names = {pair_name(a, p, x, y) for a, p, x, y in [(0, 1, "a b", "c"), (2, 1, "a-b", "c"), (3, 4, "x/y)", "ü")]}
    assert len(names) == 3
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for n in names)
    assert pair_name(3, 5, "cat", "dog") == "confused-3-5-cat-dog"


def test_explain_and_report_take_top_losses():
    from cifarlab.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["explain", "--checkpoint", "x.pt"]).top_losses == 10
    assert parser.parse_args(["explain", "--checkpoint", "x.pt", "--top-losses", "0"]).top_losses == 0
    assert parser.parse_args(["report", "run"]).top_losses == 10
    assert parser.parse_args(["report", "run", "--top-losses", "3"]).top_losses == 3
    assert parser.parse_args(["evaluate", "--checkpoint", "x.pt"]).min_count == 1


def test_pair_figures_draw_one_strip_per_pair_from_the_logits():
    from cifarlab.report.pairs import pair_figures, pair_name

    images, _ = _planted_images()
    rows = [
        {"actual": "blue", "predicted": "red", "actual_id": 2, "predicted_id": 0, "count": 1, "figure": pair_name(2, 0, "blue", "red")},
        {"actual": "red", "predicted": "green", "actual_id": 0, "predicted_id": 1, "count": 1, "figure": pair_name(0, 1, "red", "green")},
    ]
    figs = pair_figures(rows, LOGITS, TARGETS, images)
    assert [f.name for f in figs] == ["confused-2-0-blue-red", "confused-0-1-red-green"]
    assert all(f.png[:8] == b"\x89PNG\r\n\x1a\n" for f in figs) and "blue predicted as red" in figs[0].alt
