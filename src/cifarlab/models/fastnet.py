"""A small, fast CIFAR net in the style of the public speed-run results.

Design taken from (not copied from) Keller Jordan's airbench94/airbench96, David Page's
"How to train your ResNet" (Myrtle.ai, 2018) and tysam-code's hlb-cifar10:

* a frozen 2x2 *patch-whitening* stem: 12 filters that decorrelate the 3x2x2 pixel
  patches of the training set, plus their 12 negated copies so the following GELU loses
  no information (GELU(z) - GELU(-z) = z), fitted once by :meth:`FastNet.init_from_data`;
* three conv groups ``conv3x3 -> maxpool2 -> norm -> GELU``, then
  ``(conv3x3 -> norm -> GELU) x (depth - 1)``. Pooling right after the first conv means
  the norm, activation and every later conv of the group run on a quarter of the
  positions -- the cheapest order on CPU and GPU alike;
* BatchNorm with a frozen unit scale, a learnable shift, momentum 0.4 and eps 1e-12;
* a global max-pool head with a bias-free linear layer and logits scaled by 1/9.

``fast`` (widths 64/256/256, depth 2) is the airbench94 shape, about 1.97M parameters;
``fast-long`` (widths 128/384/512, depth 3 with a residual over each group's last two
convs, as airbench96 adds) is the bigger sibling for longer runs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import CifarlabError
from cifarlab.models.norm import make_norm

#: Whitening patch size. airbench94 uses 2x2 (hlb-cifar10 used 3x3): 12 patch dimensions,
#: so 24 stem channels, and a 31x31 map that pools to the 15/7/3 pyramid below.
WHITEN_KERNEL = 2
#: Added to each patch-covariance eigenvalue before the 1/sqrt scaling; airbench94 uses 5e-4.
#: It caps the gain of the noisiest (smallest-eigenvalue, highest-frequency) directions.
#: The default of ``FastNet(whiten_eps=...)``: JPEG data with subsampled chroma has far
#: weaker fine colour detail than the original CIFAR-10 files (benchmarks/whiten_spectrum.py).
WHITEN_EPS = 5e-4
#: airbench94 multiplies the logits by 1/9 ("scaling_factor"): a fixed softmax temperature
#: tuned together with its learning rate and label smoothing (0.2). It keeps the initial
#: predictions near uniform and shrinks the head's effective step size relative to the
#: conv layers, so the whole net can share one high learning rate.
LOGIT_SCALE = 1 / 9
#: BatchNorm settings of the speed runs. airbench94's ``batchnorm_momentum = 0.6`` is the
#: weight kept on the *old* running statistics; it passes ``momentum=1 - 0.6`` to PyTorch,
#: whose momentum is the weight of the *new* batch. So 0.4 here: the running statistics
#: track the quickly changing weights of a few-epoch run closely. eps 1e-12 and a frozen
#: unit scale (only the shift learns) are airbench94's too (its BatchNorm has weight=False):
#: the next conv can absorb most of a per-channel scale, so it is left out of training.
SPEEDRUN_BATCHNORM = {"momentum": 0.4, "eps": 1e-12, "learn_scale": False}


class PatchWhitening(nn.Conv2d):
    """Frozen ``kernel x kernel`` conv that whitens image patches (no padding: 32 -> 31).

    The first ``C*k*k`` filters are the eigenvectors of the patch covariance scaled by
    ``1/sqrt(eigenvalue + eps)`` (largest eigenvalue first), the other half their negatives.
    Data that spans only ``r`` patch directions (numerical rank of the covariance, e.g. 4
    for grayscale images) gets its ``r`` informative filters repeated in the other slots.
    The weight never trains (``requires_grad=False``); the bias is learnable, set by
    :meth:`init_from_data` so the whitened output is centred on the fitting data (airbench94
    trains this bias for the first 3 epochs only, then freezes it).
    Before :meth:`init_from_data` the filters are a random orthonormal basis (+/-), which is
    the whitening transform for already-white data, so forward and backward always work.
    """

    def __init__(self, in_channels: int = 3, kernel_size: int = WHITEN_KERNEL) -> None:
        dims = in_channels * kernel_size * kernel_size
        super().__init__(in_channels, 2 * dims, kernel_size, padding=0, bias=True)
        self.weight.requires_grad_(False)

    def reset_parameters(self) -> None:
        """Random orthonormal +/- filters and zero bias (the state before fitting)."""
        dims = self.weight.shape[0] // 2
        basis = torch.empty(dims, dims)
        nn.init.orthogonal_(basis)
        with torch.no_grad():
            self.weight.copy_(torch.cat([basis, -basis]).view_as(self.weight))
            self.bias.zero_()

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = WHITEN_EPS) -> None:
        """Fit the filters to ``images``, a float (N, C, H, W) batch normalised like training.

        Statistics are accumulated in float64 from chunks (so ~5000 CIFAR images need only
        ~12 MB of patches at a time); the eigendecomposition runs on the CPU in float64,
        then the result is copied to this layer's device and dtype.

        Raises:
            ValueError: ``images`` is not a float batch with this layer's channel count and
                at least ``kernel`` pixels per side.
        """
        k = self.kernel_size
        if (
            images.ndim != 4
            or images.shape[1] != self.in_channels
            or not images.is_floating_point()
            or images.shape[2] < k[0]
            or images.shape[3] < k[1]
            or images.shape[0] == 0
        ):
            raise ValueError(
                f"init_from_data needs a non-empty float (N, {self.in_channels}, H, W) batch "
                f"with H, W >= {k[0]}; got {images.dtype} {tuple(images.shape)}"
            )
        dims = self.weight.shape[0] // 2
        total = torch.zeros(dims, dtype=torch.float64)
        second = torch.zeros(dims, dims, dtype=torch.float64)
        count = 0
        for chunk in images.split(256):
            # unfold orders each patch as (channel, row, col), the conv weight's own layout.
            patches = F.unfold(chunk.float(), k).transpose(1, 2).reshape(-1, dims)
            total += patches.sum(0).double().cpu()
            second += (patches.T @ patches).double().cpu()
            count += patches.shape[0]
        mean = total / count
        cov = second / count - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        # Largest variance first, like airbench94, so channel order means something when
        # visualised; clamp the tiny negative values round-off can produce.
        eigenvalues = eigenvalues.flip(0).clamp_min(0.0)
        eigenvectors = eigenvectors.flip(1)
        filters = eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]
        # Directions the data does not span (flat-colour images span 3 of the 12, grayscale
        # ones 4) come out with eigenvalues at float64 round-off. Whitened, they would be
        # channels of pure rounding noise (fp32) or exact constants (bf16), which the
        # BatchNorm behind the identity-initialised conv1 (eps 1e-12) treats as signal: it
        # scales their gradient by up to 1e6 per layer, and the bias gradient, a sum of
        # such terms that should cancel, came out ~2e7 times its true value (README,
        # Precision on CPUs). Those slots repeat the informative filters instead, so every
        # stem channel carries data. Photos span all 12 (CIFAR-10: smallest eigenvalue
        # 1e-5 of the largest, the cut-off is 3e-15 of it) and are fitted exactly as before.
        rank = int((eigenvalues > eigenvalues[0] * dims * torch.finfo(torch.float64).eps).sum())
        if 0 < rank < dims:
            filters[rank:] = filters[torch.arange(rank, dims) % rank]
        shift = -(filters @ mean)
        self.weight.copy_(torch.cat([filters, -filters]).view_as(self.weight))
        self.bias.copy_(torch.cat([shift, -shift]))


class LogitScale(nn.Module):
    """Multiply by a fixed constant (not a parameter, so not trained or saved)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x * scale``."""
        return x * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}"


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    _identity_init_(conv.weight)
    return conv


@torch.no_grad()
def _identity_init_(weight: torch.Tensor) -> None:
    """Make the first min(out, in) filters copy their own input channel (centre tap 1).

    airbench94 initialises its convs this way ("an implicit residual"): at the start
    each conv passes its input through on those channels, so the deep plain stack trains
    like a residual net; the remaining filters keep PyTorch's default random init.
    """
    n = min(weight.shape[0], weight.shape[1])
    weight[:n].zero_()
    idx = torch.arange(n)
    weight[idx, idx, weight.shape[2] // 2, weight.shape[3] // 2] = 1.0


class ConvGroup(nn.Module):
    """``conv1 -> pool -> norm1 -> act1``, then ``conv{i} -> norm{i} -> act{i}`` for i = 2..depth.

    With ``residual`` the input of conv2 is added back before the last activation
    (airbench96's residual over the last two convs of each group).
    """

    def __init__(
        self, in_channels: int, out_channels: int, depth: int, residual: bool, norm: str
    ) -> None:
        super().__init__()
        norm_kwargs = SPEEDRUN_BATCHNORM if norm == "batch" else {}
        self.depth = depth
        self.residual = residual
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = make_norm(norm, out_channels, **norm_kwargs)
        self.act1 = nn.GELU()
        for i in range(2, depth + 1):
            self.add_module(f"conv{i}", _conv3x3(out_channels, out_channels))
            self.add_module(f"norm{i}", make_norm(norm, out_channels, **norm_kwargs))
            self.add_module(f"act{i}", nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in, H, W) to (B, out, H//2, W//2)."""
        x = self.act1(self.norm1(self.pool(self.conv1(x))))
        skip = x
        for i in range(2, self.depth + 1):
            x = getattr(self, f"norm{i}")(getattr(self, f"conv{i}")(x))
            if self.residual and i == self.depth:
                x = x + skip
            x = getattr(self, f"act{i}")(x)
        return x


def _check_arch(widths: object, depth: object, residual: object) -> list[int]:
    if (
        not isinstance(widths, (list, tuple))
        or not widths
        or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
    ):
        raise CifarlabError(
            f"widths must be a non-empty list of positive integers, e.g. [64, 256, 256]; "
            f"got {widths!r}"
        )
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise CifarlabError(f"depth (convs per group) must be an integer >= 1; got {depth!r}")
    if not isinstance(residual, bool):
        raise CifarlabError(f"residual must be true or false; got {residual!r}")
    if residual and depth < 2:
        raise CifarlabError("residual needs depth >= 2 (it skips over convs 2..depth)")
    return list(widths)


class FastNet(nn.Module):
    """Patch-whitening stem + ``len(widths)`` :class:`ConvGroup` s + max-pool linear head.

    On a 32x32 input the map is 31x31 after the stem, then 15, 7 and 3 pixels after the
    groups. ``cam_layer`` is ``"features.group1"``: the post-activation output of the first
    group (15x15). The second group's conv1 is also 15x15 but it is a pre-norm linear map
    whose per-channel offsets would leak into Grad-CAM as a flat bias; everything after it
    is 7x7 or smaller, below the 8x8 Grad-CAM needs.
    """

    cam_layer = "features.group1"

    def __init__(
        self,
        *,
        num_classes: int = 10,
        norm: str = "batch",
        dropout: float = 0.0,
        widths: Sequence[int] = (64, 256, 256),
        depth: int = 2,
        residual: bool = False,
        whiten_eps: float = WHITEN_EPS,
    ) -> None:
        super().__init__()
        widths = _check_arch(widths, depth, residual)
        if (
            not isinstance(whiten_eps, (int, float))
            or isinstance(whiten_eps, bool)
            or not math.isfinite(whiten_eps)
            or whiten_eps <= 0
        ):
            raise CifarlabError(f"whiten_eps must be a positive number; got {whiten_eps!r}")
        #: Eigenvalue floor used by :meth:`init_from_data` (part of the architecture spec,
        #: so a checkpoint says how its stem was fitted).
        self.whiten_eps = float(whiten_eps)
        whiten = PatchWhitening(3, WHITEN_KERNEL)
        layers: OrderedDict[str, nn.Module] = OrderedDict(whiten=whiten, whiten_act=nn.GELU())
        in_channels = whiten.out_channels
        for i, width in enumerate(widths, start=1):
            layers[f"group{i}"] = ConvGroup(in_channels, width, depth, residual, norm)
            in_channels = width
        self.features = nn.Sequential(layers)
        self.head = nn.Sequential(
            OrderedDict(
                pool=nn.AdaptiveMaxPool2d(1),
                flatten=nn.Flatten(),
                dropout=nn.Dropout(dropout),
                fc=nn.Linear(in_channels, num_classes, bias=False),
                scale=LogitScale(LOGIT_SCALE),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 3, H, W) images to (B, num_classes) logits."""
        return self.head(self.features(x))

    def init_from_data(self, images: torch.Tensor, eps: float | None = None) -> None:
        """Fit the whitening stem to a normalised float training batch (N, 3, H, W).

        Call once before training (airbench94 uses 5000 training images); it only sets the
        frozen stem weight and its bias, and may be called again to refit. ``eps`` defaults
        to the model's ``whiten_eps``.
        """
        self.features.whiten.init_from_data(images, eps=self.whiten_eps if eps is None else eps)
