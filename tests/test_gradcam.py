"""Grad-CAM: matches a hand-computed Grad-CAM, shape/range, hooks released; image
selection; the faithfulness check; de-normalisation."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import CifarlabError
from cifarlab.explain.faithfulness import deletion_check, random_mask, top_fraction_mask
from cifarlab.explain.gradcam import grad_cam, layer_grad_cam, resolve_layer
from cifarlab.explain.select import select_examples


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


def test_matches_hand_computed_grad_cam():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(5, 3, 32, 32)
    targets = torch.tensor([0, 1, 2, 1, 0])
    expected = _hand_grad_cam(model, x, targets)
    raw, name = layer_grad_cam(model, x, targets)
    assert name == "body.conv2" and raw.shape == (5, 16, 16)
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6)
    # Full pipeline = the same maps, bilinearly upsampled and divided by their max.
    up = F.interpolate(expected.unsqueeze(1), size=(32, 32), mode="bilinear")[:, 0]
    ref = up / up.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    cams, _ = grad_cam(model, x, targets, batch_size=2)  # batching must not change anything
    torch.testing.assert_close(cams, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, size", [("fast", 15), ("resnet18", 8)])
def test_default_layer_map_is_at_least_8x8_and_output_in_unit_range(name, size):
    from cifarlab.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=4)
    model.train()  # must be switched to eval for the CAM, and restored after
    x = torch.randn(3, 3, 32, 32)
    t = torch.tensor([0, 1, 3])
    raw, layer = layer_grad_cam(model, x, t)
    assert layer == model.cam_layer and raw.shape == (3, size, size)
    cams, _ = grad_cam(model, x, t)
    assert cams.shape == (3, 32, 32) and cams.dtype == torch.float32
    assert cams.min() >= 0 and cams.max() <= 1
    for c in cams:
        assert c.max() == 0 or torch.isclose(c.max(), torch.tensor(1.0))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert _all_hooks_empty(model)


def test_hooks_released_even_when_attribution_fails():
    model = TinyNet().eval()
    with pytest.raises(Exception):
        grad_cam(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 7]))  # class 7 does not exist
    assert _all_hooks_empty(model)


def test_works_inside_inference_mode():
    model = TinyNet().eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, 32, 32)
        cams, _ = grad_cam(model, x, torch.tensor([0, 1]))
    assert cams.shape == (2, 32, 32)


def test_unknown_layer_names_the_available_conv_layers():
    from cifarlab.models import create_model

    model = create_model("fast", num_classes=4)
    with pytest.raises(CifarlabError, match="unknown layer 'nope'.*features.group1.*features.group2"):
        resolve_layer(model, "nope")
    assert resolve_layer(model, "features.group2")[0] == "features.group2"


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
