"""Class activation maps through pytorch-grad-cam: Grad-CAM, Grad-CAM++, XGrad-CAM,
LayerCAM, EigenCAM and Score-CAM (:data:`cifarlab.config.CAM_METHODS`).

Each method weights a layer's activations A (K channels, h x w) in its own way, e.g.
Grad-CAM's ``relu(sum_k w_k A_k)`` with ``w_k`` the spatial mean of dY_c/dA_k. The
weighting is the library's (its method classes' ``get_cam_image``); what is ours is the
rest: batching on the model's own device, eval mode for the call (restored after),
autograd even under ``inference_mode``, and the output. The library's ``__call__``
min-max scales each map, which would turn "no evidence anywhere" into a full-strength
map; here the raw layer-resolution maps are kept, and :func:`upsample_and_normalise`
divides by the max so 0 keeps meaning "no evidence for the class".

Hooks: a method object registers two forward hooks on the layer. They live for one
forward/backward of one chunk and are removed in a ``finally`` before the weighting runs
(Score-CAM's weighting runs the model once per channel: with the hooks still on, every
one of those passes would store another copy of the activations). The model comes back
as it went in: same mode, no hooks, no ``.grad`` on its parameters.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.config import CAM_METHODS
from cifarlab.errors import CifarlabError
from cifarlab.explain.layers import candidate_layers, resolve_layer, unwrap

#: Display names, for headings and printed lines.
CAM_TITLES = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "scorecam": "Score-CAM",
}
# pytorch_grad_cam class of each method.
_CLASSES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}
# Score-CAM builds (images x channels) masked copies of the inputs at once on the device
# (a 256-channel layer: 3 MB per 32x32 image) and runs them through the model in batches
# of this many.
_SCORECAM_IMAGES = 8
_SCORECAM_BATCH = 256


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`CAM_METHODS`, else a one-line user error."""
    if method not in CAM_METHODS:
        raise CifarlabError(f"unknown CAM method {method!r}; choose one of: {', '.join(CAM_METHODS)}")
    return method


def cam_title(method: str) -> str:
    """The method's usual written name: ``"gradcam++"`` -> ``"Grad-CAM++"``."""
    return CAM_TITLES[check_method(method)]


def layer_cams(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None = None,
    method: str = "gradcam",
    batch_size: int = 128,
) -> tuple[torch.Tensor, str]:
    """Raw CAM maps at the layer's resolution: ``(B, h, w)`` float32 on the CPU, >= 0.

    ``images`` are normalised model inputs (B, 3, H, W); ``targets`` the class to explain
    per image (EigenCAM ignores it: it is the activations' first principal component).
    Runs in eval mode (BatchNorm uses running stats, as at test time) and in fp32; the
    model's train/eval mode is restored. Returns the maps and the layer name.
    """
    check_method(method)
    model = unwrap(model)
    name, module = resolve_layer(model, layer)
    device = next(model.parameters()).device
    step = max(1, min(batch_size, _SCORECAM_IMAGES) if method == "scorecam" else batch_size)
    was_training = model.training
    model.eval()
    out = []
    try:
        # The gradient methods need autograd even when the caller evaluates under
        # inference_mode/no_grad; the clones turn inference tensors into ones autograd may save.
        with torch.inference_mode(False), torch.enable_grad():
            for i in range(0, images.shape[0], step):
                x = images[i : i + step].to(device).clone()
                t = targets[i : i + step].to(device).long().clone()
                out.append(_chunk_maps(model, module, name, x, t, method))
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, 0, 0), name
    return torch.cat(out), name


def _chunk_maps(model: nn.Module, module: nn.Module, name: str, x: torch.Tensor, t: torch.Tensor, method: str) -> torch.Tensor:
    """(b, h, w) raw maps of one chunk: hooked forward (+ backward), hooks off, then the method's weighting."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(pytorch_grad_cam, _CLASSES[method])(model, [module])
    capture = cam.activations_and_grads
    try:
        x.requires_grad_(cam.uses_gradients)
        with torch.set_grad_enabled(cam.uses_gradients):
            logits = capture(x)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= logits.shape[1]):
            raise CifarlabError(f"target class out of range for a model with {logits.shape[1]} outputs")
        if cam.uses_gradients:
            # Samples are independent in eval mode, so one gradient of the summed target
            # logits gives each sample its own dY_c/dA. It is taken with respect to the
            # input, which leaves the parameters' .grad untouched; on its way it passes
            # the layer, where the library's tensor hook records dY_c/dA.
            torch.autograd.grad(logits.gather(1, t.view(-1, 1)).sum(), x)
        acts = [a.float().numpy() for a in capture.activations]
        grads = [g.float().numpy() for g in capture.gradients]
    finally:
        capture.release()
    if len(acts) != 1 or acts[0].ndim != 4:
        shape = tuple(acts[0].shape) if acts else None
        raise CifarlabError(
            f"layer '{name}' does not output one image-shaped map per call (got {shape}); "
            f"choose a conv layer: {', '.join(candidate_layers(model))}"
        )
    if method == "scorecam":
        cam.batch_size = _SCORECAM_BATCH
    targets = [ClassifierOutputTarget(int(c)) for c in t.tolist()]
    # Score-CAM's weighting draws a tqdm bar per image on stderr: keep it off the user's terminal.
    quiet = contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext()
    with quiet, torch.no_grad():
        raw = cam.get_cam_image(x.detach(), module, targets, acts[0], grads[0] if grads else None, False)
    return torch.from_numpy(np.maximum(np.asarray(raw, dtype=np.float32), 0.0))


def upsample_and_normalise(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample (B, h, w) maps to ``size`` and scale each to [0, 1] by its max.

    Dividing by the max (not min-max) keeps zero meaning "no evidence for the class"; a
    map that is all zero (no positive evidence anywhere) stays all zero.
    """
    if maps.numel() == 0:
        return maps.new_zeros((maps.shape[0], *size))
    up = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp_min(0)  # bilinear interpolation of non-negative maps is non-negative; guard rounding
    peak = up.flatten(1).amax(1).view(-1, 1, 1)
    return torch.where(peak > 0, up / peak.clamp_min(1e-12), torch.zeros_like(up))


def cam_maps(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None = None,
    method: str = "gradcam",
    batch_size: int = 128,
) -> tuple[torch.Tensor, str]:
    """CAM maps at image resolution: ``(B, H, W)`` float32 in [0, 1] on the CPU, and the layer name."""
    maps, name = layer_cams(model, images, targets, layer, method, batch_size)
    return upsample_and_normalise(maps, tuple(images.shape[-2:])), name
