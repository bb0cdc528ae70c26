"""Where and how a model runs: device, autocast precision, memory format, conv path.

Each of these is resolved once from the config (``Runtime.resolve(cfg)``) and then used
everywhere the same way: ``runtime.prepare(model)`` moves a model onto the device in the
chosen memory format and conv path, ``runtime.autocast()`` wraps its forward passes.
Training, evaluation, explanation, the report and the benchmarks all go through here, so
a checkpoint runs in ``evaluate`` exactly as it ran in ``train``.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass

import torch
from torch import nn

from cifarlab import __version__
from cifarlab.errors import CifarlabError
from cifarlab.gemm_conv import use_gemm_convs

#: The autocast dtype of each reduced precision ('fp32' runs without autocast).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda if available else cpu; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CifarlabError("--device cuda asked for, but no CUDA GPU is available (use --device cpu)")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX-512 BF16 or AMX).

    Without them bf16 autocast is emulated and much slower than fp32 (figures in
    docs/performance.md), so 'auto' must not pick it blindly.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_amx() -> bool:
    """True when the CPU has AMX-BF16 matrix units (Intel Xeon since Sapphire Rapids)."""
    try:
        return bool(torch.cpu.get_capabilities().get("amx_bf16"))
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Pick the autocast dtype name: 'fp32', 'bf16' or 'fp16'."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise CifarlabError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def resolve_channels_last(setting: str, device: torch.device) -> bool:
    """channels_last is faster for convs on CUDA (tensor cores) and on CPU with oneDNN."""
    if setting == "auto":
        return device.type == "cuda" or torch.backends.mkldnn.is_available()
    return setting == "on"


def resolve_gemm_convs(setting: str, device: torch.device, precision: str, compiled: bool = False) -> bool:
    """Whether small-map convs run as im2col matmuls (:mod:`cifarlab.gemm_conv`).

    'auto' turns them on only where they were measured faster (bf16 on a CPU with AMX,
    see benchmarks/conv_paths.py) and leaves torch.compile's graphs alone; on CUDA
    cuDNN's kernels are fast at every map size.
    """
    if setting == "auto":
        return device.type == "cpu" and precision == "bf16" and cpu_has_amx() and not compiled
    return setting == "on"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for a resolved precision ('fp32' → no-op)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool, gemm_convs: bool) -> nn.Module:
    """Move ``model`` to ``device`` in the memory format and conv path chosen for it."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if gemm_convs:
        use_gemm_convs(model)
    return model


def is_channels_last(model: nn.Module) -> bool:
    """Whether ``model``'s conv weights are stored channels_last (False for a model without convs)."""
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


@dataclass(frozen=True)
class Runtime:
    """The resolved device, precision, memory format and conv path of one process."""

    device: torch.device
    precision: str = "fp32"  # 'fp32' | 'bf16' | 'fp16', never 'auto'
    channels_last: bool = False
    gemm_convs: bool = False  # small-map convs run as matmuls (cifarlab.gemm_conv)

    @classmethod
    def resolve(cls, cfg, *, local_rank: int | None = None, training: bool = True) -> "Runtime":
        """Resolve the config's ``device``/``precision``/``channels_last``/``gemm_convs``.

        ``local_rank`` (multi-process runs) puts a CUDA run on ``cuda:LOCAL_RANK``.
        ``training=False`` (evaluate, explain, predict) ignores ``compile``: inference
        never compiles, so it may take the GEMM path a compiled training run left off.
        """
        device = resolve_device(cfg.device)
        if local_rank is not None and device.type == "cuda":
            device = torch.device("cuda", local_rank)
        precision = resolve_precision(cfg.precision, device)
        channels_last = resolve_channels_last(cfg.channels_last, device)
        compiled = bool(cfg.compile) and training
        gemm = resolve_gemm_convs(cfg.gemm_convs, device, precision, compiled=compiled)
        return cls(device, precision, channels_last, gemm)

    @classmethod
    def of_model(cls, model: nn.Module, precision: str) -> "Runtime":
        """The runtime a model already prepared elsewhere lives in (``precision`` may be 'auto')."""
        device = next(model.parameters()).device
        return cls(device, resolve_precision(precision, device), is_channels_last(model))

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` on this device, in this memory format and conv path."""
        return prepare_model(model, self.device, self.channels_last, self.gemm_convs)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for this precision (a no-op in fp32)."""
        return autocast(self.device, self.precision)

    def environment(self) -> dict[str, str]:
        """Device and library versions, recorded in checkpoints and reports."""
        return environment_info(self.device, self.precision)


def environment_info(device: torch.device, precision: str) -> dict[str, str]:
    """Device and library versions, recorded in checkpoints and reports."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {
        "device": str(device),
        "device_name": name,
        "cpu_threads": str(torch.get_num_threads()),
        "precision": precision,
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # TorchVersion would not pass weights_only loading
        "cifarlab": __version__,
        "platform": platform.platform(),
    }
