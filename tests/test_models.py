"""Tests for cifarlab.models: the registry contract, the ResNets and the whitened fast nets.

The contract tests are generated from ``list_models()`` x norms, so a newly registered
model is checked automatically. Models are built once per (name, norm) (module-scoped
fixture) and copied by tests that change them, to keep the file fast on a 2-core CPU.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import CifarlabError
from cifarlab.models import NORMS, ModelSpec, create_model, list_models, make_norm
from cifarlab.models.registry import MODELS

GRID = [(name, norm) for name in list_models() for norm in NORMS]


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Batch-2 passes gain nothing from intra-op threads, and on a small shared CPU two
    OpenMP threads contending with other processes made them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=GRID, ids=[f"{n}-{m}" for n, m in GRID])
def built(request):
    """(name, norm, model) built once per grid point; copy before mutating."""
    name, norm = request.param
    torch.manual_seed(0)
    return name, norm, create_model(name, num_classes=10, norm=norm)


# --- the contract, for every registered model and norm -----------------------------


def test_forward_shape_and_finite_grads(built):
    name, norm, model = built
    model = copy.deepcopy(model).train()
    logits = model(_images())
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 7])).backward()
    for key, p in _trainable(model).items():
        assert p.grad is not None, f"{key} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{key} has non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in _trainable(model).values())


def test_forward_is_head_of_features(built):
    _, _, model = built
    model.eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.features(x)))


def test_cam_layer_resolves_and_is_at_least_8x8(built):
    name, _, model = built
    modules = dict(model.named_modules())
    assert isinstance(model.cam_layer, str) and model.cam_layer in modules
    assert model.cam_layer.startswith("features."), "CAM layer must lie inside features"
    seen = []
    handle = modules[model.cam_layer].register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        model.eval()
        with torch.no_grad():
            model(_images())
    finally:
        handle.remove()
    assert len(seen) == 1, "CAM layer must run exactly once per forward"
    assert seen[0].ndim == 4 and min(seen[0].shape[-2:]) >= 8, seen[0].shape
    if name.startswith("resnet"):
        assert model.cam_layer == "features.layer3"


def test_spec_rebuilds_same_architecture(built):
    name, norm, model = built
    spec = json.loads(json.dumps(model.spec))  # what a checkpoint stores and reads back
    assert spec["name"] == name
    assert spec["kwargs"]["num_classes"] == 10 and spec["kwargs"]["norm"] == norm
    assert spec["kwargs"]["dropout"] == 0.0
    with torch.device("meta"):  # shapes only: skips the real (slow) weight init
        rebuilt = create_model(spec["name"], **spec["kwargs"])
    want = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in rebuilt.state_dict().items()}
    assert got == want
    assert set(_trainable(rebuilt)) == set(_trainable(model))
    assert rebuilt.spec == spec


def test_channels_last_matches_contiguous(built):
    _, _, model = built
    model = copy.deepcopy(model).eval()
    x = _images()
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)


def test_bf16_autocast_forward_backward(built):
    _, _, model = built
    model = copy.deepcopy(model).train()
    # Dtype handling does not depend on image size, and CPUs without native bf16 emulate
    # it slowly: 16x16 inputs (every model here is fully convolutional) keep this cheap.
    x = _images()[..., :16, :16]
    with torch.no_grad():
        ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 10)
    # bf16 keeps ~3 significant digits; the logits must still be the same function.
    assert (logits.float() - ref).abs().max() <= 0.1 * ref.abs().max() + 1e-2
    F.cross_entropy(logits.float(), torch.tensor([3, 4])).backward()
    for key, p in _trainable(model).items():
        assert p.grad is not None and p.grad.dtype == p.dtype, key
        assert torch.isfinite(p.grad).all(), key


@pytest.mark.parametrize("name", list_models())
def test_dropout_propagates_into_head(name):
    model = create_model(name, dropout=0.5)
    assert model.spec["kwargs"]["dropout"] == 0.5
    drops = [m for m in model.head.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in drops] == [0.5]
    assert not any(isinstance(m, nn.Dropout) for m in model.features.modules())
    # Behaviour, not just the attribute: the head really drops units in train mode only.
    # Batch norm in train mode is deterministic for a fixed batch, so only dropout differs.
    x = _images(4)
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(x), model(x))
        model.eval()
        torch.testing.assert_close(model(x), model(x))


# --- registry and errors -------------------------------------------------------------


def test_list_models_sorted_and_complete():
    names = list_models()
    assert names == sorted(names)
    assert {"resnet18", "resnet34", "fast", "fast-long"} <= set(names)
    assert all(isinstance(MODELS[n], ModelSpec) for n in names)


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        MODELS["evil"] = MODELS["fast"]  # type: ignore[index]
    with pytest.raises(TypeError):
        MODELS["fast"].defaults["depth"] = 9  # type: ignore[index]


def test_unknown_model_lists_available_names():
    with pytest.raises(CifarlabError) as err:
        create_model("resnet9000")
    assert "resnet9000" in str(err.value)
    for name in list_models():
        assert name in str(err.value)


def test_unknown_norm_is_rejected():
    with pytest.raises(CifarlabError, match="instance"):
        create_model("fast", norm="instance")
    with pytest.raises(CifarlabError):
        make_norm("instance", 64)


@pytest.mark.parametrize("name", ["resnet18", "fast"])
def test_unexpected_kwargs_are_named(name):
    with pytest.raises(CifarlabError) as err:
        create_model(name, widht=[64], bogus=1)
    assert "widht" in str(err.value) and "bogus" in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": True},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"dropout": float("nan")},
        {"widths": []},
        {"widths": [64, "256"]},
        {"widths": 64},
        {"depth": 0},
        {"residual": "yes"},
        {"depth": 1, "residual": True},
        {"norm": "group", "widths": [20, 40, 40]},  # 8 groups do not divide 20
    ],
)
def test_bad_values_raise_cifarlab_error(kwargs):
    with pytest.raises(CifarlabError):
        create_model("fast", **kwargs)


# --- norms ---------------------------------------------------------------------------


def test_make_norm_kinds():
    batch = make_norm("batch", 64)
    assert type(batch) is nn.BatchNorm2d and batch.num_features == 64
    group = make_norm("group", 64)
    assert isinstance(group, nn.GroupNorm) and group.num_groups == 8
    layer = make_norm("layer", 64)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 1
    frozen = make_norm("batch", 16, momentum=0.4, eps=1e-12, learn_scale=False)
    assert frozen.momentum == 0.4 and frozen.eps == 1e-12
    assert not frozen.weight.requires_grad and frozen.bias.requires_grad


@pytest.mark.parametrize("norm", NORMS)
def test_models_use_the_requested_norm(norm):
    want = nn.BatchNorm2d if norm == "batch" else nn.GroupNorm
    for name in ("resnet18", "fast"):
        with torch.device("meta"):
            model = create_model(name, norm=norm)
        norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
        assert norms and all(type(m) is want for m in norms)
        if norm != "batch":
            groups = 8 if norm == "group" else 1
            assert all(m.num_groups == groups for m in norms)


# --- ResNet --------------------------------------------------------------------------


@pytest.mark.parametrize("name, count", [("resnet18", 11_173_962), ("resnet34", 21_282_122)])
def test_resnet_exact_parameter_count(name, count):
    with torch.device("meta"):
        model = create_model(name, num_classes=10, norm="batch")
    assert sum(p.numel() for p in model.parameters()) == count
    assert all(
        m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d)
    ), "convs feed a norm, so they carry no bias"


# --- fast nets -----------------------------------------------------------------------


def _correlated_images(n: int = 64) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are strongly correlated, like photos."""
    base = torch.randn(n, 3, 33, 33, generator=torch.Generator().manual_seed(1))
    x = base[..., :32, :32] + 0.9 * base[..., 1:, :32] + 0.9 * base[..., :32, 1:]
    x = x + 0.8 * base[..., 1:, 1:]
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.8, 1.0, 0.8], [0.6, 0.8, 1.0]])
    return torch.einsum("dc,nchw->ndhw", mix, x) * 0.5 + 0.3


def _stem_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Whitening conv output before its activation, as (positions, channels)."""
    with torch.no_grad():
        out = model.features.whiten(x)
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])


def test_fast_whitening_decorrelates_the_fitting_data():
    model = create_model("fast")
    x = _correlated_images()
    before = torch.cov(_stem_output(model, x)[:, :12].T)
    eye = torch.eye(12)
    assert (before - eye).abs().max() > 0.5, "test data must need whitening"

    model.init_from_data(x, eps=1e-7)
    out = _stem_output(model, x)
    assert out.shape[1] == 24
    cov = torch.cov(out[:, :12].T)
    torch.testing.assert_close(cov, eye, atol=5e-3, rtol=0)
    torch.testing.assert_close(out[:, :12].mean(0), torch.zeros(12), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])  # the +w / -w pairs

    # airbench94's default eps only shrinks the weakest directions: still decorrelated.
    model.init_from_data(x)
    cov = torch.cov(_stem_output(model, x)[:, :12].T)
    off = cov - torch.diag(cov.diag())
    assert off.abs().max() < 5e-3
    assert (cov.diag() <= 1.0 + 1e-3).all() and (cov.diag() > 0.8).all()
    assert cov.diag()[0] > 0.999, "largest-variance direction comes first and is unscaled"


def _rank_deficient_images(kind: str, n: int = 64) -> torch.Tensor:
    """Images spanning few 2x2 patch directions, normalised per channel like training.

    ``"flat"``: one colour each, like tests/test_bad_input.py's image folder (3 of 12
    directions): a red ramp with green = blue = 0, and 4 images of other colours.
    ``"gray"``: R = G = B (4 of 12).
    """
    if kind == "gray":
        return _correlated_images(n)[:, :1].expand(n, 3, 32, 32).contiguous()
    colours = torch.zeros(n, 3, 1, 1)
    colours[:, 0, 0, 0] = torch.arange(n) * 4.0
    colours[:4, :, 0, 0] = torch.tensor([[128.0, 128, 128], [255, 128, 0], [77, 77, 77], [10, 220, 40]])
    x = colours.expand(n, 3, 32, 32)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True, unbiased=False)
    return ((x - mean) / std).contiguous()


@pytest.mark.parametrize("kind, rank", [("flat", 3), ("gray", 4)])
def test_fast_stem_on_rank_deficient_data_has_no_dead_channels(kind, rank):
    # Regression: whitening the directions such data does not span gave channels of pure
    # rounding noise (std ~1e-6), BatchNorm (eps 1e-12) blew up their gradients, and on the
    # flat images the stem bias gradient came out ~1300 instead of ~0.003 (README,
    # Precision on CPUs).
    torch.manual_seed(0)
    model = create_model("fast", num_classes=2)
    x = _rank_deficient_images(kind)
    model.init_from_data(x)
    out = _stem_output(model, x)
    assert out.std(0).min() > 0.05, "every stem channel must carry the data's variance"
    filters = model.features.whiten.weight[:12].flatten(1)
    torch.testing.assert_close(filters[rank:], filters[torch.arange(rank, 12) % rank], rtol=0, atol=0)
    model.train()
    F.cross_entropy(model(x), torch.arange(x.shape[0]) % 2).backward()
    grad = model.features.whiten.bias.grad
    assert torch.isfinite(grad).all() and grad.abs().max() < 0.1, grad.abs().max()


def test_whiten_eps_is_an_architecture_option_that_caps_the_weakest_gain():
    x = _correlated_images()
    default = create_model("fast")
    assert default.spec["kwargs"]["whiten_eps"] == 5e-4  # airbench94's value
    default.init_from_data(x)
    model = create_model("fast", whiten_eps=1e-2)
    assert model.spec["kwargs"]["whiten_eps"] == 1e-2  # recorded, so checkpoints rebuild it
    model.init_from_data(x)
    explicit = create_model("fast")
    explicit.init_from_data(x, eps=1e-2)
    torch.testing.assert_close(model.features.whiten.weight, explicit.features.whiten.weight)
    # Filter i is unit eigenvector i scaled by 1/sqrt(eigenvalue_i + eps): both models must
    # recover the same eigenvalues, and the larger floor cuts the weakest direction's gain
    # (last filter) far more than the strongest one's (first filter).
    gain = model.features.whiten.weight[:12].flatten(1).norm(dim=1).double()
    ref = default.features.whiten.weight[:12].flatten(1).norm(dim=1).double()
    torch.testing.assert_close(gain**-2 - 1e-2, ref**-2 - 5e-4, rtol=1e-3, atol=1e-6)
    assert gain[-1] / ref[-1] < 0.6 and gain[0] / ref[0] > 0.99


@pytest.mark.parametrize("eps", [0, -1e-3, float("nan"), True, "1e-3"])
def test_whiten_eps_rejects_non_positive_or_non_numbers(eps):
    with pytest.raises(CifarlabError, match="whiten_eps"):
        create_model("fast", whiten_eps=eps)


def test_fast_whitening_weights_stay_frozen():
    model = create_model("fast")
    stem = model.features.whiten
    assert stem.kernel_size == (2, 2) and stem.padding == (0, 0)
    model.init_from_data(_correlated_images(8))
    assert not stem.weight.requires_grad
    assert "features.whiten.weight" not in _trainable(model)
    fitted = stem.weight.detach().clone()

    opt = torch.optim.SGD(_trainable(model).values(), lr=0.1)
    F.cross_entropy(model(_images()), torch.tensor([0, 1])).backward()
    assert stem.weight.grad is None
    opt.step()
    torch.testing.assert_close(stem.weight, fitted, rtol=0, atol=0)


def test_fast_init_from_data_on_channels_last_model():
    model = create_model("fast").to(memory_format=torch.channels_last)
    x = _correlated_images(8).to(memory_format=torch.channels_last)
    model.init_from_data(x)
    assert torch.isfinite(model(x)).all()


def test_fast_init_from_data_rejects_non_image_batches():
    model = create_model("fast")
    with pytest.raises(ValueError):
        model.init_from_data(torch.zeros(4, 1, 32, 32))
    with pytest.raises(ValueError):
        model.init_from_data(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))


def test_fast_shapes_params_and_speedrun_batchnorm():
    model = create_model("fast")
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_900_000 <= n_params <= 2_000_000, n_params
    sizes = {}
    hooks = [
        model.features.get_submodule(n).register_forward_hook(
            lambda m, i, out, n=n: sizes.__setitem__(n, tuple(out.shape[1:]))
        )
        for n in ("whiten", "group1", "group2", "group3")
    ]
    model.eval()
    with torch.no_grad():
        model(_images())
    for h in hooks:
        h.remove()
    assert sizes == {
        "whiten": (24, 31, 31),
        "group1": (64, 15, 15),
        "group2": (256, 7, 7),
        "group3": (256, 3, 3),
    }
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6
    for bn in bns:
        assert bn.momentum == pytest.approx(0.4) and bn.eps == 1e-12
        assert not bn.weight.requires_grad and bn.bias.requires_grad
        assert torch.all(bn.weight == 1)
    assert isinstance(model.head.pool, nn.AdaptiveMaxPool2d)
    assert model.head.fc.bias is None
    assert model.head.scale.scale == pytest.approx(1 / 9)
    feats = model.features(_images()).detach()
    torch.testing.assert_close(
        model.head(feats), model.head.fc(feats.amax(dim=(2, 3))) / 9
    )


def test_fast_other_norms_keep_learnable_scale():
    model = create_model("fast", norm="group")
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.weight.requires_grad for m in gns)


def test_fast_convs_start_as_identity_where_shapes_allow():
    model = create_model("fast")
    conv = model.features.group1.conv2  # 64 -> 64: the whole conv is the identity
    x = torch.randn(2, 64, 15, 15)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), x)
    conv = model.features.group1.conv1  # 24 -> 64: first 24 filters copy their input
    x = torch.randn(2, 24, 31, 31)
    with torch.no_grad():
        torch.testing.assert_close(conv(x)[:, :24], x)


def test_fast_long_is_deeper_wider_and_residual():
    model = create_model("fast-long")
    kw = model.spec["kwargs"]
    assert kw["widths"] == [128, 384, 512] and kw["depth"] == 3 and kw["residual"] is True
    assert type(model) is type(create_model("fast"))
    group = model.features.group2
    assert isinstance(group.conv3, nn.Conv2d)
    # With conv3 silenced the residual alone must carry conv2's input through.
    with torch.no_grad():
        group.conv3.weight.zero_()
    seen = {}
    group.act1.register_forward_hook(lambda m, i, out: seen.__setitem__("skip", out))
    group.eval()
    with torch.no_grad():
        out = group(torch.randn(2, 128, 15, 15))
    torch.testing.assert_close(out, F.gelu(seen["skip"]))


def test_fast_custom_arch_round_trips_through_spec():
    model = create_model(
        "fast", widths=(32, 64, 128, 128), depth=1, norm="layer", dropout=0.1, whiten_eps=2e-3
    )
    spec = json.loads(json.dumps(model.spec))
    assert spec == {
        "name": "fast",
        "kwargs": {
            "num_classes": 10,
            "norm": "layer",
            "dropout": 0.1,
            "widths": [32, 64, 128, 128],
            "depth": 1,
            "residual": False,
            "whiten_eps": 2e-3,
        },
    }
    rebuilt = create_model(spec["name"], **spec["kwargs"])
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys and shapes
    model.eval()
    rebuilt.eval()
    x = _images()
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        torch.testing.assert_close(rebuilt(x), model(x))
    assert math.isclose(rebuilt.head.dropout.p, 0.1)
