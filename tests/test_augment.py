"""Tests for cifarlab.data.augment: each op does exactly what it claims, per sample, reproducibly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cifarlab.data import AugmentSpec, augment_batch
from cifarlab.errors import CifarlabError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def positive_batch(b: int = 256, seed: int = 1) -> torch.Tensor:
    """Random batch with no zeros (so any zero in the output was written by the augmentation)."""
    return torch.rand(b, 3, 32, 32, generator=gen(seed)) + 0.5


# ----------------------------------------------------------------------------- crop


def test_crop_is_a_window_of_the_zero_padded_input_with_varied_offsets():
    pad = 4
    x = positive_batch(256)
    out = augment_batch(x, AugmentSpec(crop_pad=pad), gen(0))
    padded = F.pad(x, (pad, pad, pad, pad))
    side = 2 * pad + 1
    matches = torch.zeros(x.shape[0], side * side, dtype=torch.bool)
    for oy in range(side):
        for ox in range(side):
            window = padded[:, :, oy : oy + 32, ox : ox + 32]
            matches[:, oy * side + ox] = (window == out).all(dim=(1, 2, 3))
    assert matches.any(dim=1).all(), "some crop is not a window of the padded image"
    offsets = matches.float().argmax(dim=1)
    assert offsets.unique().numel() > 40, "samples should get (mostly) different crop offsets"
    # Zero padding really is used: some outputs have zero borders.
    assert (out == 0).any()


def test_crop_pad_zero_with_nothing_else_is_identity():
    x = positive_batch(8)
    out = augment_batch(x, AugmentSpec(), gen(0))
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr(), "must return a new tensor"


# ----------------------------------------------------------------------------- flip


def test_flip_each_sample_unchanged_or_mirrored_about_half():
    x = positive_batch(2000)
    out = augment_batch(x, AugmentSpec(flip=True), gen(3))
    same = (out == x).all(dim=(1, 2, 3))
    mirrored = (out == x.flip(-1)).all(dim=(1, 2, 3))
    assert (same ^ mirrored).all()
    assert 0.45 < mirrored.float().mean().item() < 0.55


def test_crop_and_flip_compose_as_crop_then_flip():
    pad = 2
    x = positive_batch(128)
    out = augment_batch(x, AugmentSpec(crop_pad=pad, flip=True), gen(5))
    padded = F.pad(x, (pad, pad, pad, pad))
    found = torch.zeros(x.shape[0], dtype=torch.bool)
    flipped = torch.zeros(x.shape[0], dtype=torch.bool)
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            window = padded[:, :, oy : oy + 32, ox : ox + 32]
            plain = (window == out).all(dim=(1, 2, 3))
            mirror = (window.flip(-1) == out).all(dim=(1, 2, 3))
            found |= plain | mirror
            flipped |= mirror & ~plain
    assert found.all()
    assert 0.25 < flipped.float().mean().item() < 0.75


# ----------------------------------------------------------------------------- cutout


@pytest.mark.parametrize("size", [1, 8, 16])
def test_cutout_zeroes_exactly_one_clipped_square(size):
    x = positive_batch(512)
    out = augment_batch(x, AugmentSpec(cutout=size), gen(size))
    zero = out == 0
    # Same hole in every channel, everything else untouched.
    assert (zero == zero[:, :1]).all()
    assert torch.equal(out[~zero], x[~zero])
    hole = zero[:, 0]
    rows, cols = hole.any(dim=2), hole.any(dim=1)
    assert rows.any(dim=1).all(), "the centre lies in the image, so every hole is non-empty"
    heights, widths = rows.sum(1), cols.sum(1)
    # Exactly the bounding rectangle is zero (a rectangle, not some other shape).
    assert torch.equal(hole, rows.unsqueeze(2) & cols.unsqueeze(1))
    assert (heights <= size).all() and (widths <= size).all()
    # Clipped only where it touches a border.
    top, bottom = rows[:, 0], rows[:, -1]
    left, right = cols[:, 0], cols[:, -1]
    assert ((heights == size) | top | bottom).all()
    assert ((widths == size) | left | right).all()
    if size > 1:
        assert (heights < size).any(), "squares may hang off the image (DeVries & Taylor)"
        assert (heights == size).any()
    # Centres vary across samples.
    assert rows.float().argmax(1).unique().numel() > 10


# ----------------------------------------------------------------------------- rotate


def smooth_batch(b: int = 64) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    pattern = torch.stack([xs, ys, xs * ys]) + 2.0  # smooth, asymmetric, no zeros
    return pattern.expand(b, -1, -1, -1).clone()


def test_rotate_zero_is_identity():
    x = smooth_batch()
    assert torch.equal(augment_batch(x, AugmentSpec(rotate=0.0), gen(0)), x)
    assert torch.equal(augment_batch(x, AugmentSpec.parse("rotate:0"), gen(0)), x)


def test_small_rotation_keeps_centre_and_changes_image():
    x = smooth_batch(64)
    out = augment_batch(x, AugmentSpec(rotate=5.0), gen(1))
    centre = (slice(None), slice(None), slice(12, 20), slice(12, 20))
    # 5 degrees moves a pixel 4 px from the centre by < 0.4 px; the gradient is 2/31 per px.
    assert (out[centre] - x[centre]).abs().max() < 0.05
    assert not torch.allclose(out, x, atol=1e-3)
    per_sample = (out - x).abs().flatten(1).amax(1)
    assert per_sample.unique().numel() > 32, "each sample gets its own angle"


def bar_orientation_degrees(img: torch.Tensor) -> torch.Tensor:
    """Orientation of a bright bar per sample from second moments (image y axis points down)."""
    w = img[:, 0].clamp_min(0)
    coords = torch.arange(32, dtype=img.dtype) - 15.5
    ys, xs = coords.view(1, 32, 1), coords.view(1, 1, 32)
    total = w.sum((1, 2))
    my, mx = (w * ys).sum((1, 2)) / total, (w * xs).sum((1, 2)) / total
    dy, dx = ys - my.view(-1, 1, 1), xs - mx.view(-1, 1, 1)
    mu20, mu02, mu11 = (w * dx * dx).sum((1, 2)), (w * dy * dy).sum((1, 2)), (w * dx * dy).sum((1, 2))
    return torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02))


def test_rotation_is_a_rotation_with_per_sample_angles_within_range():
    # A horizontal bar, short enough that no rotation clips it.
    coords = torch.arange(32, dtype=torch.float64) - 15.5
    ys, xs = coords.view(32, 1), coords.view(1, 32)
    bar = torch.exp(-(ys**2) / 2.0) * (xs.abs() < 10)
    x = bar.expand(512, 3, 32, 32).clone()
    limit = 30.0
    out = augment_batch(x, AugmentSpec(rotate=limit), gen(7))
    assert bar_orientation_degrees(x).abs().max() < 0.5
    angles = bar_orientation_degrees(out)
    assert angles.abs().max() <= limit + 1.0
    assert angles.min() < -0.8 * limit and angles.max() > 0.8 * limit, "angles span [-limit, limit]"
    assert angles.std() > limit / 3**0.5 * 0.8, "roughly uniform, not concentrated at 0"
    # A rotation preserves the bar's mass (it stays inside the image) - a shear or scale would not.
    assert torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.02)
    # Bilinear with zero fill is a convex combination of input pixels and zeros.
    assert (out <= x.amax() + 1e-9).all() and (out >= 0).all()


# ----------------------------------------------------------------------------- general


FULL = AugmentSpec(crop_pad=4, flip=True, cutout=16, rotate=5.0, brightness=0.1, contrast=0.1)


def test_same_seed_same_batch_different_seed_different():
    x = positive_batch(64)
    a = augment_batch(x, FULL, gen(11))
    b = augment_batch(x, FULL, gen(11))
    c = augment_batch(x, FULL, gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_input_is_not_modified():
    x = positive_batch(32)
    before = x.clone()
    augment_batch(x, FULL, gen(0))
    augment_batch(x, AugmentSpec(cutout=8), gen(0))
    assert torch.equal(x, before)


@pytest.mark.parametrize("spec", [FULL, AugmentSpec(cutout=8), AugmentSpec(flip=True), AugmentSpec()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_shape_dtype_and_memory_format(spec, dtype):
    x = positive_batch(16).to(dtype)
    cl = x.contiguous(memory_format=torch.channels_last)
    out = augment_batch(x, spec, gen(0))
    out_cl = augment_batch(cl, spec, gen(0))
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert out_cl.shape == x.shape and out_cl.dtype == dtype
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    assert torch.allclose(out, out_cl), "the layout must not change the values"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_semantics_without_host_sync():
    x = positive_batch(64).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment_batch(x, FULL, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == x.device and out.shape == x.shape


# ----------------------------------------------------------------------------- parse


@pytest.mark.parametrize(
    "text, expected",
    [
        ("none", AugmentSpec()),
        ("", AugmentSpec()),
        ("crop,flip,cutout", AugmentSpec(crop_pad=4, flip=True, cutout=16)),
        ("crop:4,flip,cutout:16,rotate:5", AugmentSpec(crop_pad=4, flip=True, cutout=16, rotate=5.0)),
        ("rotate", AugmentSpec(rotate=5.0)),
        (" Crop:2 , FLIP ", AugmentSpec(crop_pad=2, flip=True)),
        ("cutout:8,crop:0", AugmentSpec(cutout=8)),
        ("rotate:2.5", AugmentSpec(rotate=2.5)),
        ("translate:2,flip:alt", AugmentSpec(crop_pad=2, crop_reflect=True, flip=True, flip_alternate=True)),
        ("translate", AugmentSpec(crop_pad=4, crop_reflect=True)),
        ("translate:2,flip:alt,brightness:0.14,contrast:0.13",
         AugmentSpec(crop_pad=2, crop_reflect=True, flip=True, flip_alternate=True, brightness=0.14, contrast=0.13)),
        ("brightness", AugmentSpec(brightness=0.1)),
        ("contrast:0", AugmentSpec()),
    ],
)
def test_parse_good(text, expected):
    spec = AugmentSpec.parse(text)
    assert spec == expected
    assert AugmentSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    ["blur", "crop:x", "crop:-1", "crop:2.5", "cutout:", "flip:1", "crop,crop", "rotate:500", "rotate:nan", "none,flip", "crop;flip",
     "crop:2,translate:2", "flip:always", "translate:x", "contrast:1.5", "brightness:-0.1", "brightness:inf",
     "contrast:x"],
)
def test_parse_bad_raises_cifarlab_error(text):
    with pytest.raises(CifarlabError):
        AugmentSpec.parse(text)


def test_constructor_validates():
    with pytest.raises(CifarlabError):
        AugmentSpec(crop_pad=-1)
    with pytest.raises(CifarlabError):
        AugmentSpec(rotate=-3.0)
    with pytest.raises(CifarlabError):
        AugmentSpec(contrast=2.0)
    with pytest.raises(CifarlabError):
        AugmentSpec(brightness=True)


# ----------------------------------------------------------------------------- colour


def test_colour_is_one_shift_and_scale_per_image_within_range():
    x = positive_batch(512)
    out = augment_batch(x, AugmentSpec(brightness=0.2, contrast=0.3), gen(4))
    # Recover each image's affine map from two pixels: out = (x + s) * c.
    a, b = x.flatten(1), out.flatten(1)
    scale = (b[:, 1] - b[:, 0]) / (a[:, 1] - a[:, 0])
    shift = b[:, 0] / scale - a[:, 0]
    assert torch.allclose(b, (a + shift[:, None]) * scale[:, None], atol=1e-4)
    assert scale.min() >= 0.7 - 1e-4 and scale.max() <= 1.3 + 1e-4
    assert shift.abs().max() <= 0.2 + 1e-4
    # Spread over the range, not one value: per-sample draws.
    assert scale.max() - scale.min() > 0.4 and shift.max() - shift.min() > 0.25


def test_colour_comes_before_cutout_so_the_hole_stays_at_the_mean():
    x = positive_batch(64)
    out = augment_batch(x, AugmentSpec(cutout=8, brightness=1.0, contrast=0.5), gen(2))
    zeros = (out == 0).flatten(1).sum(1)
    assert (zeros >= 3 * 4 * 4).all(), "every image keeps a zeroed (mean-colour) cutout square"


def test_translate_is_a_window_of_the_reflect_padded_input():
    pad = 2
    x = positive_batch(128)
    out = augment_batch(x, AugmentSpec.parse(f"translate:{pad}"), gen(4))
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    side = 2 * pad + 1
    seen = set()
    for i in range(x.shape[0]):
        hits = [(a, b) for a in range(side) for b in range(side) if torch.equal(out[i], padded[i, :, a : a + 32, b : b + 32])]
        assert hits, f"sample {i} is not a window of the reflect-padded image"
        seen.add(hits[0])
    assert len(seen) > side, "offsets vary per sample"
    assert (out != 0).all(), "reflection, not zeros, fills the border"


def test_translate_wider_than_the_image_is_refused():
    with pytest.raises(CifarlabError, match="translate:8"):
        augment_batch(torch.rand(2, 3, 8, 8), AugmentSpec.parse("translate:8"), gen(0))


def test_alternate_flip_uses_the_given_flips_and_needs_them():
    x = positive_batch(16)
    spec = AugmentSpec.parse("flip:alt")
    flips = torch.arange(16) % 3 == 0
    out = augment_batch(x, spec, gen(0), flips=flips)
    assert torch.equal(out[flips], x[flips].flip(-1)) and torch.equal(out[~flips], x[~flips])
    with pytest.raises(ValueError, match="flip:alt"):
        augment_batch(x, spec, gen(0))
