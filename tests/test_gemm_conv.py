"""The im2col GEMM conv path (cifarlab/gemm_conv.py) computes what F.conv2d computes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.config import config_from_dict
from cifarlab.runtime import prepare_model, resolve_gemm_convs
from cifarlab.errors import CifarlabError
from cifarlab.gemm_conv import MAX_GEMM_TAPS, GemmConv2dFunction, gemm_conv2d, supports_gemm, takes_gemm_path, use_gemm_convs
from cifarlab.models import create_model, list_models

# (in, out, kernel, stride, padding, map side): the shapes the models use on small maps,
# plus odd sizes, valid padding and a 2x2 kernel so the index arithmetic is exercised.
SHAPES = [
    (8, 16, 3, 1, 1, 4),
    (8, 16, 3, 2, 1, 8),
    (8, 16, 1, 2, 0, 8),
    (5, 7, 3, 1, 1, 3),
    (4, 6, 3, 1, 0, 5),
    (4, 6, 2, 2, 0, 5),
    (3, 4, 3, 2, 1, 7),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "in{}-out{}-k{}-s{}-p{}-h{}".format(*s))
def test_gradients_match_autograd_numerically(shape):
    cin, cout, k, s, p, h = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, bias=False).double()
    x = torch.randn(2, cin, h, h, dtype=torch.double, requires_grad=True)

    ref = F.conv2d(x, conv.weight, None, s, p)

    def f(x, w):
        return GemmConv2dFunction.apply(x, w, conv.stride, conv.padding, tuple(ref.shape[-2:]))

    torch.testing.assert_close(f(x, conv.weight), ref)
    assert torch.autograd.gradcheck(f, (x, conv.weight))


@pytest.mark.parametrize("channels_last", [False, True])
def test_module_forward_and_backward_match_native(channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, 1, 1, bias=False)
    ref = copy.deepcopy(conv)
    use_gemm_convs(conv)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 16, 4, 4).contiguous(memory_format=fmt).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = conv(x), ref(x_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    assert conv.weight.grad.dtype == torch.float32


def test_bf16_autocast_follows_conv2d_dtypes():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, 1, 1, bias=False)
    ref = copy.deepcopy(conv)
    use_gemm_convs(conv)
    x = torch.randn(4, 16, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = conv(x), ref(x)
    assert out.dtype == out_ref.dtype == torch.bfloat16
    # Both round bf16 operands' fp32 sums to bf16: they agree to bf16's ~3 digits.
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32  # the master weight keeps its dtype


def test_path_rule_follows_the_measured_threshold():
    w3, w1 = torch.empty(8, 8, 3, 3), torch.empty(8, 8, 1, 1)
    assert takes_gemm_path(w3, (4, 4))  # ResNet18's layer4
    assert takes_gemm_path(w3, (3, 3)) and takes_gemm_path(w3, (2, 2))  # the fast net's last group
    assert not takes_gemm_path(w3, (5, 5)) and not takes_gemm_path(w3, (8, 8))
    assert takes_gemm_path(w1, (8, 8)) and not takes_gemm_path(w1, (16, 16))
    assert 9 * 4 * 4 <= MAX_GEMM_TAPS < 9 * 5 * 5


def test_large_maps_call_the_native_conv(monkeypatch):
    conv = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
    calls = []
    monkeypatch.setattr(GemmConv2dFunction, "apply", lambda *a: calls.append(a))
    gemm_conv2d(conv, torch.randn(1, 4, 16, 16))
    assert calls == []
    gemm_conv2d(conv, torch.randn(1, 4, 4, 4))
    assert len(calls) == 1


def test_only_plain_convs_are_switched():
    assert supports_gemm(nn.Conv2d(3, 4, 3, bias=False))
    assert not supports_gemm(nn.Conv2d(3, 4, 3))  # bias
    assert not supports_gemm(nn.Conv2d(4, 4, 3, groups=2, bias=False))
    assert not supports_gemm(nn.Conv2d(4, 4, 3, dilation=2, bias=False))
    assert not supports_gemm(nn.Conv2d(4, 4, 3, padding="same", bias=False))
    assert not supports_gemm(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False))
    assert not supports_gemm(nn.Linear(3, 4))


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_trains_the_same_through_the_gemm_path(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).double()
    fast = copy.deepcopy(model)
    switched = use_gemm_convs(fast)
    assert switched > 0
    assert fast.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 32, 32, dtype=torch.double)
    model(x).square().sum().backward()
    fast(x).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), fast.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-9, msg=n)


def test_forward_hooks_still_fire_on_switched_convs():
    conv = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
    use_gemm_convs(conv)
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    conv(torch.randn(1, 4, 4, 4))
    assert seen == [torch.Size([1, 4, 4, 4])]


def test_switched_model_deep_copies():
    conv = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
    use_gemm_convs(conv)
    twin = copy.deepcopy(conv)
    with torch.no_grad():
        twin.weight.add_(1.0)
    x = torch.randn(1, 4, 4, 4)
    # The copy's forward is bound to the copy, not to the original module.
    torch.testing.assert_close(twin(x), F.conv2d(x, twin.weight, None, 1, 1))


def test_auto_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_gemm_convs("on", cpu, "fp32") and not resolve_gemm_convs("off", cpu, "bf16")
    assert not resolve_gemm_convs("auto", cuda, "bf16")
    assert not resolve_gemm_convs("auto", cpu, "fp32")
    assert not resolve_gemm_convs("auto", cpu, "bf16", compiled=True)


def test_prepare_model_switches_only_when_asked():
    model = prepare_model(create_model("resnet18"), torch.device("cpu"), channels_last=True, gemm_convs=False)
    assert not any("forward" in vars(m) for m in model.modules())
    model = prepare_model(create_model("resnet18"), torch.device("cpu"), channels_last=True, gemm_convs=True)
    assert sum("forward" in vars(m) for m in model.modules()) == 20


def test_config_rejects_unknown_setting():
    assert config_from_dict({"gemm_convs": "off"}).gemm_convs == "off"
    with pytest.raises(CifarlabError, match="gemm_convs"):
        config_from_dict({"gemm_convs": "sometimes"})
