"""Convolution as one matrix multiply (im2col GEMM), for the small maps where oneDNN is slow on CPU.

On CPUs with AMX, oneDNN's bf16 convolutions are slow on small maps, the backward pass
above all: a 3x3 conv of ResNet18's layer4 (512 channels, 4x4 maps) takes much longer,
forward plus both gradients, than one of its layer1 (64 channels, 32x32) that does the
same multiply-adds (``benchmarks/conv_paths.py``; figures in docs/performance.md). A conv over a small map is a small
matmul in disguise: with the batch in the rows, ``(B*Ho*Wo, k*k*Cin) @ (k*k*Cin, Cout)``
is big enough for the matrix units, and building the ``k*k``-times larger patch matrix
costs little when the map is small. So for such maps this module runs forward, input
gradient and weight gradient as matmuls over a channels-last patch matrix.

:func:`use_gemm_convs` switches a model's qualifying ``nn.Conv2d`` layers to it; the
parameters, state dict and forward hooks stay those of the ordinary module, so
checkpoints and Grad-CAM do not notice. Which path a call takes depends only on its
shapes (:func:`takes_gemm_path`), never on timing, so reruns and resumed runs compute
the same numbers.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

#: A conv takes the GEMM path when kernel taps x output pixels (kh*kw*Ho*Wo, the patch
#: matrix's size relative to one image's channels) is at most this. Chosen from
#: benchmarks/conv_paths.py on the AMX Xeon (bf16, 2 threads): the GEMM path won for 3x3
#: convs onto 4x4 maps (144) and smaller and for 1x1 convs onto 8x8 (64) and smaller;
#: oneDNN won or tied for 3x3 onto 5x5 (225) and 8x8 and for 1x1 onto 16x16 (256), where
#: building the patch matrix costs more memory traffic than the matmul saves.
MAX_GEMM_TAPS = 144


def takes_gemm_path(weight: torch.Tensor, out_hw: tuple[int, int]) -> bool:
    """Whether a conv with this weight and output size (Ho, Wo) runs as a GEMM."""
    kh, kw = weight.shape[-2:]
    return kh * kw * out_hw[0] * out_hw[1] <= MAX_GEMM_TAPS


def conv_out_size(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    """(Ho, Wo) of ``conv`` applied to ``x`` (integer padding, dilation 1)."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = x.shape[-2:], conv.kernel_size, conv.stride, conv.padding
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def _patches(x_nhwc: torch.Tensor, k: tuple[int, int], stride: tuple[int, int],
             pad: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B*Ho*Wo, kh*kw*C), columns ordered (row, col, channel).

    That column order is the physical layout of a channels-last conv weight
    (Cout, kh, kw, Cin), so the weight needs no copy to become the matmul's other side.
    """
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = k, stride, pad, out_hw
    if ph or pw:
        x_nhwc = F.pad(x_nhwc, (0, 0, pw, pw, ph, ph))
    x_nhwc = x_nhwc.contiguous()
    b, _, _, c = x_nhwc.shape
    sb, sy, sx, sc = x_nhwc.stride()
    # Every patch as a strided view (B, Ho, Wo, kh, kw, C) of the padded input, then one
    # copy. Stacking the kh*kw shifted slices instead went through a slow non-contiguous
    # cat that took more time than the matmuls it fed.
    view = x_nhwc.as_strided((b, ho, wo, kh, kw, c), (sb, sh * sy, sw * sx, sy, sx, sc))
    return view.reshape(-1, kh * kw * c)


def _fold(cols: torch.Tensor, shape_nhwc: tuple[int, int, int, int], k: tuple[int, int],
          stride: tuple[int, int], pad: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """Adjoint of :func:`_patches`: sum each patch column back onto its pixel (B, H, W, C)."""
    (b, h, w, c), (kh, kw), (sh, sw), (ph, pw), (ho, wo) = shape_nhwc, k, stride, pad, out_hw
    cols = cols.view(b, ho, wo, kh, kw, c)
    # Accumulate in at least fp32: up to kh*kw overlapping taps add into each pixel.
    dtype = torch.promote_types(cols.dtype, torch.float32)
    out = torch.zeros(b, h + 2 * ph, w + 2 * pw, c, dtype=dtype, device=cols.device)
    for i in range(kh):
        for j in range(kw):
            out[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :] += cols[:, :, :, i, j, :]
    return out[:, ph : ph + h, pw : pw + w, :]


class GemmConv2dFunction(torch.autograd.Function):
    """conv2d (no bias, groups 1, dilation 1) as im2col matmuls; inputs already in ``dtype``."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, out_hw):
        """(B, Cin, H, W) input, (Cout, Cin, kh, kw) weight -> (B, Cout, Ho, Wo) = out_hw, channels-last."""
        b, c, h, w = x.shape
        co, _, kh, kw = weight.shape
        cols = _patches(x.permute(0, 2, 3, 1), (kh, kw), stride, padding, out_hw)
        w2d = weight.permute(0, 2, 3, 1).reshape(co, -1)  # (Cout, kh*kw*Cin)
        out = cols @ w2d.t()  # (B*Ho*Wo, Cout)
        # Saving the patch matrix (k*k times the input) is cheap on the small maps this
        # path is used for and spares rebuilding it for the weight gradient.
        ctx.save_for_backward(cols, w2d)
        ctx.geometry = ((b, h, w, c), (kh, kw), stride, padding, out_hw, weight.shape, x.dtype)
        # (B, Ho, Wo, Cout) viewed as (B, Cout, Ho, Wo): a channels-last tensor, no copy.
        return out.view(b, *out_hw, co).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        """Input gradient by folding the patch gradients back; weight gradient as one matmul."""
        cols, w2d = ctx.saved_tensors
        shape_nhwc, k, stride, padding, out_hw, w_shape, x_dtype = ctx.geometry
        g2d = grad_out.permute(0, 2, 3, 1).reshape(-1, w_shape[0]).to(cols.dtype)  # (B*Ho*Wo, Cout)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_cols = g2d @ w2d  # (B*Ho*Wo, kh*kw*Cin)
            grad_x = _fold(grad_cols, shape_nhwc, k, stride, padding, out_hw)
            grad_x = grad_x.to(x_dtype).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            co, ci, kh, kw = w_shape
            grad_w = (g2d.t() @ cols).view(co, kh, kw, ci).permute(0, 3, 1, 2)
        return grad_x, grad_w, None, None, None


def gemm_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, through :class:`GemmConv2dFunction` when :func:`takes_gemm_path` says so.

    Under autocast the input and weight are cast to the autocast dtype first, as
    ``F.conv2d`` would be; the weight gradient comes back in the weight's own dtype.
    """
    out_hw = conv_out_size(x, conv)
    if not takes_gemm_path(conv.weight, out_hw):
        return conv._conv_forward(x, conv.weight, conv.bias)
    device_type = x.device.type
    weight = conv.weight
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return GemmConv2dFunction.apply(x, weight, conv.stride, conv.padding, out_hw)


def supports_gemm(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain conv2d the GEMM path implements exactly."""
    return (
        type(conv) is nn.Conv2d
        and conv.bias is None
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
    )


def use_gemm_convs(model: nn.Module) -> int:
    """Route every supported ``nn.Conv2d`` of ``model`` through :func:`gemm_conv2d`.

    Only the instance's ``forward`` changes (module hooks, parameters and the state dict
    do not), and each call still picks its path by shape. Returns how many convs were
    switched.
    """
    count = 0
    for module in model.modules():
        if supports_gemm(module):
            module.forward = types.MethodType(gemm_conv2d, module)
            count += 1
    return count
