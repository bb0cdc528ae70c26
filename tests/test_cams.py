"""CAM methods (pytorch-grad-cam): Grad-CAM matches a hand-computed Grad-CAM; every method
on every registered model family (shape, finite values, class-specific maps); hooks
released, also over 1,000 calls; image selection; the deletion and ROAD checks;
de-normalisation."""

from __future__ import annotations

import functools
import gc
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.config import CAM_METHODS
from cifarlab.errors import CifarlabError
from cifarlab.explain.cams import cam_maps, layer_cams, upsample_and_normalise
from cifarlab.explain.faithfulness import _tie_free, deletion_check, random_mask, road_check, top_fraction_mask
from cifarlab.explain.layers import resolve_layer
from cifarlab.explain.select import select_examples
from cifarlab.models import create_model, list_models


class TinyNet(nn.Module):
    """conv -> relu -> conv(stride 2) -> relu -> avgpool -> linear: a 16x16 map at body.conv2."""

    cam_layer = "body.conv2"

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, 4, 3, padding=1),
                act1=nn.ReLU(),
                conv2=nn.Conv2d(4, 6, 3, stride=2, padding=1),
                act2=nn.ReLU(),
            )
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x):
        return self.head(self.body(x))


def _hand_grad_cam(model: TinyNet, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM from its definition, with a plain forward hook and autograd."""
    captured = {}
    handle = model.body.conv2.register_forward_hook(lambda m, i, o: captured.__setitem__("A", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = captured["A"]  # (B, K, h, w)
    # Samples are independent (no batch statistics in eval mode), so the gradient of the
    # sum of each sample's target logit gives every sample's own dY_c/dA.
    (grads,) = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), a)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # w_k = spatial mean of dY_c/dA_k
    return F.relu((weights * a).sum(1)).detach()  # relu(sum_k w_k A_k)


def _all_hooks_empty(model: nn.Module) -> bool:
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(m, attr):
                return False
    from torch.nn.modules import module as mod

    return not (mod._global_forward_hooks or mod._global_forward_pre_hooks or mod._global_backward_hooks)


def test_gradcam_matches_hand_computed_grad_cam():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(5, 3, 32, 32)
    targets = torch.tensor([0, 1, 2, 1, 0])
    expected = _hand_grad_cam(model, x, targets)
    raw, name = layer_cams(model, x, targets)  # method defaults to Grad-CAM
    assert name == "body.conv2" and raw.shape == (5, 16, 16)
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6)
    # Full pipeline = the same maps, bilinearly upsampled and divided by their max.
    up = F.interpolate(expected.unsqueeze(1), size=(32, 32), mode="bilinear")[:, 0]
    ref = up / up.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    cams, _ = cam_maps(model, x, targets, batch_size=2)  # batching must not change anything
    torch.testing.assert_close(cams, ref, rtol=1e-5, atol=1e-6)


@functools.lru_cache(maxsize=None)
def _registry_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=4)


# Score-CAM runs the model once per channel of the layer (256 for the ResNets' layer3):
# 16x16 inputs keep it to seconds on a CPU; the default layers still give >= 4x4 maps.
_SIZE = 16


@pytest.mark.parametrize("method", CAM_METHODS)
@pytest.mark.parametrize("name", list_models())
def test_every_method_on_every_registered_model(name, method):
    model = _registry_model(name)
    model.train()  # must be switched to eval for the CAM, and restored after
    torch.manual_seed(1)
    x = torch.randn(1, 3, _SIZE, _SIZE)
    model.eval()
    with torch.no_grad():
        logits = model(x)[0]
    model.train()
    pred, actual = int(logits.argmax()), int(logits.argmin())  # actual != predicted: a misclassified image
    images, targets = x.expand(2, -1, -1, -1), torch.tensor([pred, actual])
    raw, layer = layer_cams(model, images, targets, method=method)
    assert layer == model.cam_layer and raw.dim() == 3 and raw.shape[0] == 2 and min(raw.shape[1:]) >= 4
    assert torch.isfinite(raw).all() and raw.min() >= 0
    cams, _ = cam_maps(model, images, targets, method=method)
    assert cams.shape == (2, _SIZE, _SIZE) and cams.dtype == torch.float32
    assert torch.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    for c in cams:
        assert c.max() == 0 or torch.isclose(c.max(), torch.tensor(1.0))
    if method == "eigencam":
        # EigenCAM is the activations' first principal component: the same map for any class.
        torch.testing.assert_close(raw[0], raw[1])
    else:
        assert raw[0].max() > 0 or raw[1].max() > 0, "both maps empty: nothing to compare"
        assert not torch.allclose(raw[0], raw[1]), "the predicted- and actual-class maps must differ"
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert _all_hooks_empty(model)


@pytest.mark.parametrize("method", CAM_METHODS)
def test_hooks_released_even_when_a_call_fails(method):
    model = TinyNet().eval()
    with pytest.raises(CifarlabError, match="out of range"):
        cam_maps(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 7]), method=method)  # class 7 does not exist
    assert _all_hooks_empty(model)


def _live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): the latter trips deprecation shims among gc's objects
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_a_thousand_calls_leave_no_hooks_and_no_growth():
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    torch.manual_seed(0)
    model = TinyNet().eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    for method in CAM_METHODS:  # every method once, then a steady state to measure from
        cam_maps(model, x, t, method=method)
    before = _live_tensors()
    for i in range(1000):
        cam_maps(model, x, t, method=CAM_METHODS[i % len(CAM_METHODS)])
    assert _all_hooks_empty(model)
    assert _live_tensors() <= before
    gc.collect()
    assert not any(type(o) is ActivationsAndGradients for o in gc.get_objects())


def test_works_inside_inference_mode():
    model = TinyNet().eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, 32, 32)
        for method in ("gradcam", "layercam"):
            cams, _ = cam_maps(model, x, torch.tensor([0, 1]), method=method)
            assert cams.shape == (2, 32, 32)


def test_unknown_layer_or_method_is_a_one_line_error():
    model = create_model("fast", num_classes=4)
    with pytest.raises(CifarlabError, match="unknown layer 'nope'.*features.group1.*features.group2"):
        resolve_layer(model, "nope")
    assert resolve_layer(model, "features.group2")[0] == "features.group2"
    with pytest.raises(CifarlabError, match=re.escape("unknown CAM method 'gradcam+'; choose one of: gradcam, gradcam++,")):
        cam_maps(model, torch.randn(1, 3, 32, 32), torch.tensor([0]), method="gradcam+")


def test_normalising_keeps_zero_as_no_evidence():
    maps = torch.zeros(2, 4, 4)
    maps[1, 1, 2] = 3.0
    out = upsample_and_normalise(maps, (8, 8))
    assert out.shape == (2, 8, 8) and out[0].max() == 0 and out[1].max() == 1 and out[1].min() == 0


def test_select_returns_most_confident_misclassified_and_correct():
    torch.manual_seed(0)
    logits = torch.randn(200, 5) * 3
    targets = torch.randint(0, 5, (200,))
    probs, preds = logits.softmax(1).max(1)
    mis = select_examples(logits, targets, 20, correct=False)
    assert len(mis) == 20
    assert (preds[mis.indices] != targets[mis.indices]).all()
    assert (mis.preds != mis.targets).all()
    assert torch.all(mis.probs[:-1] >= mis.probs[1:])
    wrong = (preds != targets).nonzero().flatten()
    assert mis.probs[0] == probs[wrong].max() and mis.probs[-1] >= probs[wrong].sort(descending=True).values[19]
    torch.testing.assert_close(mis.true_probs, logits.softmax(1)[mis.indices, targets[mis.indices]])
    cor = select_examples(logits, targets, 10, correct=True)
    assert (preds[cor.indices] == targets[cor.indices]).all() and torch.all(cor.probs[:-1] >= cor.probs[1:])
    # asking for more than exist returns all of them
    assert len(select_examples(logits, targets, 10_000, correct=False)) == len(wrong)


def test_masks_cover_exactly_the_fraction():
    cams = torch.rand(4, 32, 32)
    m = top_fraction_mask(cams, 0.2)
    k = round(0.2 * 1024)
    assert (m.flatten(1).sum(1) == k).all()
    for i in range(4):
        assert cams[i][m[i]].min() >= cams[i][~m[i]].max()
    r = random_mask((4, 32, 32), 0.2)
    assert (r.flatten(1).sum(1) == k).all() and torch.equal(r, random_mask((4, 32, 32), 0.2))


def test_random_mask_is_blobs_like_a_cam_mask_not_scattered_pixels():
    # Scattered pixels would give ~20% of mask pixels a masked right-hand neighbour.
    r = random_mask((16, 32, 32), 0.2)
    neighbours = (r[:, :, :-1] & r[:, :, 1:]).sum() / r[:, :, :-1].sum()
    assert neighbours > 0.6
    assert not torch.equal(r[0], r[1])  # a different blob pattern per image


class _CornerModel(nn.Module):
    """Class 0's logit is the mean of the top-left 10x10 corner; class 1's is its negative."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        s = x[:, :, :10, :10].mean((1, 2, 3)) * 5 + self.dummy
        return torch.stack([s, -s], 1)


def test_deletion_check_separates_a_faithful_map_from_random():
    x = torch.rand(6, 3, 32, 32)  # positive everywhere: class 0 predicted
    cams = torch.zeros(6, 32, 32)
    cams[:, :10, :10] = 1.0  # the true evidence
    faithful = deletion_check(_CornerModel(), x, cams, torch.zeros(6, dtype=torch.long))
    assert faithful.cam_drop > faithful.random_drop + 0.2 and faithful.cam_wins == 1.0
    wrong = torch.zeros(6, 32, 32)
    wrong[:, 20:, 20:] = 1.0  # highlights pixels the model ignores
    unfaithful = deletion_check(_CornerModel(), x, wrong, torch.zeros(6, dtype=torch.long))
    assert abs(unfaithful.cam_drop) < 1e-6 and unfaithful.cam_drop < unfaithful.random_drop


def test_denormalise_inverts_the_loader_normalisation():
    from cifarlab.data import DeviceLoader, Split
    from cifarlab.explain.overlay import denormalise

    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    loader = DeviceLoader(Split(images, torch.zeros(5, dtype=torch.long)), 5, device="cpu", mean=mean, std=std, shuffle=False)
    (x, _), = list(loader)
    back = denormalise(x, mean, std)
    assert back.dtype.name == "uint8" and back.shape == (5, 32, 32, 3)
    assert (torch.from_numpy(back).permute(0, 3, 1, 2) == images).all()


class _PatternModel(nn.Module):
    """Class 0's logit is the correlation of the top-left 8x8 corner with a checkerboard:
    evidence that ROAD's neighbour imputation destroys (a cell's neighbours have the other sign)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pattern", (torch.arange(8).view(-1, 1) + torch.arange(8)).remainder(2) * 2.0 - 1.0)

    def forward(self, x):
        s = (x[:, :, :8, :8] * self.pattern).mean((1, 2, 3)) * 2
        return torch.stack([s, -s], 1)


def test_road_tells_a_faithful_map_from_a_misleading_one():
    torch.manual_seed(0)
    model = _PatternModel()
    x = torch.randn(4, 3, 16, 16) * 0.1
    x[:, :, :8, :8] = model.pattern  # class 0, p ~ 0.98
    classes = torch.zeros(4, dtype=torch.long)
    faithful = torch.zeros(4, 16, 16)
    faithful[:, :8, :8] = torch.rand(4, 8, 8) + 0.5  # the evidence, and no other pixel
    state = torch.get_rng_state()
    good = road_check(model, x, faithful, classes, removed=(0.2, 0.6))
    assert torch.equal(state, torch.get_rng_state())  # the imputation's noise leaves the global RNG alone
    assert good.n == 4 and good.removed == (0.2, 0.6) and len(good.morf_drop) == len(good.lerf_drop) == 2
    # Removing the top of a faithful map hurts; removing its bottom (all outside the corner) does not.
    assert good.morf_drop[0] > 0.3 and abs(good.lerf_drop[0]) < 1e-6 and good.morf_mean > good.lerf_mean
    misleading = 1.0 - faithful  # highest where the model does not look
    bad = road_check(model, x, misleading, classes, removed=(0.2, 0.6))
    assert abs(bad.morf_drop[0]) < 1e-6 and bad.lerf_drop[0] > 0.3
    assert road_check(model, x, faithful, classes, removed=(0.2, 0.6)) == good  # reproducible
    d = good.to_dict()
    assert d["morf_mean"] == good.morf_mean and d["removed"] == (0.2, 0.6)


def test_tie_free_ranks_keep_the_order_and_make_shares_exact():
    cams = torch.zeros(2, 8, 8)
    cams[0, :2, :2] = 1.0  # 4 non-zero pixels, 60 tied zeros
    cams[1] = torch.arange(64.0).view(8, 8)
    ranks = _tie_free(cams, seed=0)
    assert ranks.shape == (2, 8, 8) and ranks.dtype == np.float32
    for r, c in zip(ranks, cams.numpy()):
        assert len(np.unique(r)) == 64 and r.min() == 0 and r.max() == 1
        assert (r[c > 0].min() > r[c == 0].max()) if (c == 0).any() else np.array_equal(np.argsort(r, None), np.argsort(c, None))
    # the library's percentile threshold now keeps exactly that share of the pixels
    assert (ranks[0] < np.percentile(ranks[0], 80)).sum() == round(0.8 * 63) + 1


def test_compare_cams_scores_every_method_on_the_same_images(tmp_path):
    import json

    from cifarlab.explain.compare import COMPARE_FILE, compare_cams, write_comparison

    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(3, 3, 16, 16)
    preds = model(x).argmax(1)
    result = compare_cams(model, x, preds, removed=(0.2, 0.8))
    assert [r.method for r in result.rows] == list(CAM_METHODS)
    assert result.layer == "body.conv2" and result.n_images == 3
    for row in result.rows:
        assert row.seconds >= 0 and row.deletion.n == 3 and row.road.n == 3 and len(row.road.morf_drop) == 2
    table = result.table().splitlines()
    assert table[0].split() == ["method", "seconds", "cam_drop", "rnd_drop", "cam_wins", "MoRF", "LeRF"]
    assert [line.split()[0] for line in table[1 : 1 + len(CAM_METHODS)]] == list(CAM_METHODS)
    path = write_comparison(result, tmp_path)
    data = json.loads(path.read_text())
    assert path.name == COMPARE_FILE and data["road_removed"] == [0.2, 0.8] and data["layer"] == "body.conv2"
    assert [m["method"] for m in data["methods"]] == list(CAM_METHODS)
    assert {"title", "seconds", "cam_drop", "random_drop", "cam_wins", "road_morf_drop", "road_lerf_drop",
            "road_morf", "road_lerf"} <= set(data["methods"][0])
