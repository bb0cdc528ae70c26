"""Multi-process training under ``torchrun``: process-group setup and the few collectives
the training loop needs.

``torchrun --nproc_per_node=N -m cifarlab train ...`` starts N copies of the command with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
environment. :func:`setup` reads them and joins the process group: gloo on CPU, nccl on
CUDA (one GPU per process, ``cuda:LOCAL_RANK``). Without those variables everything here
is a no-op for a single process, so the training loop calls the helpers unconditionally.

Only rank 0 prints and writes files; the helpers here are what keeps every rank taking
the same decisions (stop, save, diverged) at the same step, because a rank that leaves
the loop alone would leave the others waiting in their next all-reduce.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from cifarlab.errors import CifarlabError

#: Where the process group listens when the launcher does not say (torchrun's default too).
DEFAULT_MASTER_ADDR = "127.0.0.1"


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. ``world_size == 1``: a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that prints and writes files (rank 0)."""
        return self.rank == 0


_SINGLE = DistInfo()
_info = _SINGLE


def launched_world_size() -> int:
    """WORLD_SIZE from the launcher's environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def info() -> DistInfo:
    """The current process's :class:`DistInfo` (single-process until :func:`setup` ran)."""
    return _info


def is_main() -> bool:
    """True on rank 0, and always in a single-process run."""
    return _info.is_main


def rank() -> int:
    """This process's rank (0 in a single-process run)."""
    return _info.rank


def world_size() -> int:
    """Number of training processes (1 in a single-process run)."""
    return _info.world_size


def setup(device_type: str) -> DistInfo:
    """Join the process group that torchrun's environment describes; idempotent.

    ``device_type`` is the resolved training device ('cpu' or 'cuda'): it picks the
    backend (gloo or nccl) and, on CUDA, binds this process to ``cuda:LOCAL_RANK``.
    Raises CifarlabError when the environment is half set up (e.g. WORLD_SIZE without
    RANK) rather than hanging in a rendezvous that can never complete.
    """
    global _info
    if _info.enabled:
        return _info
    world = launched_world_size()
    if world <= 1:
        return _info
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise CifarlabError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: launch multi-process "
            "training with `torchrun --nproc_per_node=N -m cifarlab train ...`"
        )
    rank_, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    os.environ.setdefault("MASTER_ADDR", DEFAULT_MASTER_ADDR)
    backend = "nccl" if device_type == "cuda" else "gloo"
    _pin_to_loopback(os.environ["MASTER_ADDR"])
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CifarlabError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank_, world_size=world)
    _info = DistInfo(rank=rank_, world_size=world, local_rank=local_rank, backend=backend)
    atexit.register(cleanup)  # a process group left open makes torch warn at exit
    return _info


def cleanup() -> None:
    """Leave the process group (safe to call more than once, or without one)."""
    global _info
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _info = _SINGLE


def barrier() -> None:
    """Wait until every rank got here (no-op in a single process)."""
    if _info.enabled:
        dist.barrier()


def _collective_device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo works on CPU tensors.
    if _info.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks, in float64 (identity for one process).

    Used for epoch metrics: each rank contributes (sum of loss*n, correct, n) so the
    reduced accuracy is exactly that of the whole split, not a mean of rank means.
    """
    if not _info.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(values: Sequence[float]) -> list[float]:
    """Element-wise max of ``values`` over all ranks (identity for one process).

    The training loop's agreement step: flags such as "a signal arrived" or "the loss
    is not finite here" become true on every rank when they are true on any.
    """
    if not _info.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_strided(t: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble on every rank a CPU tensor that was split as ``full[rank::world_size]``.

    The test split is sharded that way, so the final epoch's logits and targets come
    back in the original order for the report.
    """
    if not _info.enabled:
        return t
    parts: list[torch.Tensor | None] = [None] * _info.world_size
    dist.all_gather_object(parts, t.detach().cpu())
    out = torch.empty((total, *t.shape[1:]), dtype=t.dtype)
    for r, part in enumerate(parts):
        out[r :: _info.world_size] = part
    return out


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    After the last training step each rank's running statistics saw only its own
    shard's batch; evaluation on every rank must use the ones the checkpoint stores.
    """
    if not _info.enabled:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise CifarlabError(f"environment variable {name}={text!r} is not an integer") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pin_to_loopback(master_addr: str) -> None:
    """Single-host jobs (MASTER_ADDR on loopback) talk over the loopback interface only.

    gloo and nccl otherwise pick the interface the hostname resolves to, which opens
    ports on the machine's network for a job that never leaves it. The user's own
    GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME always win.
    """
    if not _is_loopback(master_addr):
        return
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return
    loopback = next((n for n in names if n == "lo" or n.startswith("lo")), None)
    if loopback is None:
        return
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
