"""Self-describing checkpoints: written atomically, read only with ``weights_only=True``.

A checkpoint is a plain dict of tensors and primitives, so the safe unpickler reads it:

    format, version       "cifarlab", 1
    model                 {"name": str, "kwargs": dict}  → create_model(name, **kwargs)
    state_dict            model weights (the unwrapped model, never DDP/compiled)
    classes, mean, std    what the model predicts and how inputs were normalised
    dataset               {"name", "root", "synthetic"}
    config                the resolved TrainConfig as a dict
    epoch, step           completed epochs, global optimizer steps
    step_in_epoch         steps done in epoch ``epoch`` (0 at an epoch end; >0 mid-epoch)
    steps_per_epoch, world_size   the run's shape; resume refuses a different one mid-epoch
    partial               mid-epoch only: the epoch's running loss/correct sums, LRs, seconds
    metrics, best         last epoch's metrics; best test accuracy and its epoch
    optimizer, scheduler, scaler   states for --resume (absent in exported weights)
    rng                   Python / NumPy / torch CPU and CUDA generator states (see rng_state)
    versions              torch / cifarlab versions that wrote it

The data order and augmentation need no stored state: the loader derives them from
(seed, epoch, batch index), so ``epoch`` and ``step_in_epoch`` pin them down exactly.

``model.safetensors`` holds the same weights with the description as JSON metadata.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarlab import _faults
from cifarlab.errors import CifarlabError

FORMAT = "cifarlab"
VERSION = 1
_META_KEY = "cifarlab"  # safetensors metadata key holding the JSON description


@dataclass
class PartialEpoch:
    """An epoch's running sums up to a mid-epoch checkpoint (summed over ranks), so the
    epoch a resumed run finishes reports exact totals."""

    loss_sum: float = 0.0
    correct: int = 0
    n: int = 0
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    amp_skipped: int = 0

    def add(self, loss_sum: float, correct: int, n: int, lrs: list[float], seconds: float, amp_skipped: int) -> "PartialEpoch":
        """These sums plus the steps trained since (a new object)."""
        return PartialEpoch(
            loss_sum=self.loss_sum + loss_sum,
            correct=self.correct + int(correct),
            n=self.n + int(n),
            lrs=[float(v) for v in self.lrs] + list(lrs),
            seconds=self.seconds + seconds,
            amp_skipped=self.amp_skipped + amp_skipped,
        )

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``partial`` entry."""
        return {
            "loss_sum": self.loss_sum,
            "correct": self.correct,
            "n": self.n,
            "lrs": self.lrs,
            "seconds": self.seconds,
            "amp_skipped": self.amp_skipped,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PartialEpoch":
        """Read a ``partial`` entry (keys a checkpoint lacks count as zero)."""
        return cls(
            loss_sum=float(d.get("loss_sum", 0.0)),
            correct=int(d.get("correct", 0)),
            n=int(d.get("n", 0)),
            lrs=[float(v) for v in d.get("lrs", [])],
            seconds=float(d.get("seconds", 0.0)),
            amp_skipped=int(d.get("amp_skipped", 0)),
        )


@dataclass
class TrainingCheckpoint:
    """What ``checkpoints/last.pt`` and ``best.pt`` hold (see the module docstring), typed.

    ``description`` is the part fixed for the whole run (model spec, classes, mean/std,
    dataset, config, versions, environment, steps_per_epoch, world_size); the other
    fields are the run's progress and the states a resume restores.
    """

    description: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    epoch: int  # completed epochs
    step_in_epoch: int = 0  # >0: saved mid-epoch, ``partial`` holds the epoch so far
    partial: PartialEpoch | None = None
    metrics: dict[str, Any] | None = None  # the last completed epoch's row
    best_acc: float = 0.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    lookahead: dict[str, Any] | None = None
    amp_skipped_steps: int = 0  # completed epochs; the current one's is in ``partial``
    rng: dict[str, Any] | None = None

    @property
    def steps_per_epoch(self) -> int | None:
        return self.description.get("steps_per_epoch")

    @property
    def world_size(self) -> int:
        return int(self.description.get("world_size", 1))

    @property
    def config(self) -> dict[str, Any]:
        return self.description["config"]

    @property
    def classes(self) -> list[str]:
        return list(self.description["classes"])

    def to_dict(self) -> dict[str, Any]:
        """The plain dict :func:`save_checkpoint` writes (tensors and primitives only)."""
        spe = int(self.description.get("steps_per_epoch") or 0)
        return {
            **self.description,
            "state_dict": self.state_dict,
            "epoch": self.epoch,
            "step": self.epoch * spe + self.step_in_epoch,
            "step_in_epoch": self.step_in_epoch,
            "partial": self.partial.to_dict() if self.partial is not None else None,
            "metrics": self.metrics,
            "best": {"test_acc": self.best_acc, "epoch": self.best_epoch},
            "history": self.history,
            "lrs": self.lrs,
            "seconds": self.seconds,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "lookahead": self.lookahead,
            "amp_skipped_steps": self.amp_skipped_steps,
            "rng": self.rng,
        }

    @classmethod
    def from_dict(cls, ckpt: dict[str, Any]) -> "TrainingCheckpoint":
        """Read a dict from :func:`read_checkpoint`; keys older checkpoints lack take defaults."""
        described = ("model", "classes", "mean", "std", "dataset", "config", "versions", "environment",
                     "steps_per_epoch", "world_size")
        best = ckpt.get("best") or {}
        partial = ckpt.get("partial")
        return cls(
            description={k: ckpt[k] for k in described if k in ckpt},
            state_dict=ckpt["state_dict"],
            epoch=int(ckpt.get("epoch", 0)),
            step_in_epoch=int(ckpt.get("step_in_epoch", 0)),
            partial=PartialEpoch.from_dict(partial) if partial else None,
            metrics=ckpt.get("metrics"),
            best_acc=float(best.get("test_acc", 0.0)),
            best_epoch=int(best.get("epoch", 0)),
            history=list(ckpt.get("history", [])),
            lrs=list(ckpt.get("lrs", [])),
            seconds=float(ckpt.get("seconds", 0.0)),
            optimizer=ckpt.get("optimizer"),
            scheduler=ckpt.get("scheduler"),
            scaler=ckpt.get("scaler"),
            lookahead=ckpt.get("lookahead"),
            amp_skipped_steps=int(ckpt.get("amp_skipped_steps", 0)),
            rng=ckpt.get("rng"),
        )


def atomic_write(path: str | os.PathLike, write: "callable") -> None:
    """Write a file so a crash at any moment leaves either the old or the new file.

    ``write(f)`` fills a temp file in the same directory; it is fsynced, renamed over
    ``path`` with os.replace (atomic on POSIX), and the directory is fsynced so the
    rename itself survives a power loss. On any error the temp file is removed and
    the previous file stays untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = _oserror_in_chain(exc)
        if cause is not None and cause is not exc:
            # torch.save hitting a full disk raises OSError inside its zip writer, whose
            # cleanup then fails with a RuntimeError ("unexpected pos ...") that hides it.
            # Callers turn OSError into a one-line "disk full, resume with ..." message.
            raise cause from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _oserror_in_chain(exc: BaseException) -> OSError | None:
    """The first OSError in ``exc``'s cause/context chain (``exc`` itself included)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class NonFiniteStateError(CifarlabError):
    """A checkpoint was about to be written with NaN/inf weights or optimizer state."""

    def __init__(self, path: Path, names: list[str]):
        super().__init__(f"refusing to write {path}: non-finite values in {', '.join(names[:5])}")
        self.names = names


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any], *, check_finite: bool = True) -> None:
    """Atomically ``torch.save`` a checkpoint dict (see module docstring for its keys).

    With ``check_finite`` (the default) the weights and optimizer state are checked
    first and :class:`NonFiniteStateError` is raised instead of writing NaN/inf: a
    diverged model must never replace the last good checkpoint.
    """
    path = Path(path)
    if check_finite:
        from cifarlab.guards import nonfinite_entries

        tensors = list(payload.get("state_dict", {}).items())
        for i, state in (payload.get("optimizer") or {}).get("state", {}).items():
            tensors += [(f"optimizer.{i}.{k}", v) for k, v in state.items()]
        bad = nonfinite_entries(tensors)
        if bad:
            raise NonFiniteStateError(path, bad)
    payload = {"format": FORMAT, "version": VERSION, **payload}

    def write(f) -> None:
        torch.save(payload, f)
        _faults.in_save()  # test hook: a crash or full disk at the most fragile moment

    atomic_write(path, write)


def rng_state() -> dict[str, Any]:
    """Every global generator's state, as tensors and plain data (weights_only-loadable).

    Nothing in cifarlab's own pipeline draws from these (the loader has its own
    per-batch generators) but dropout, user code and libraries do; restoring them is
    what makes a resumed run continue bit for bit.
    """
    import numpy as np

    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(v) for v in py_state], "gauss": gauss},
        # numpy's uint32 key array as int64: plain tensors are what the safe loader reads.
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any] | None) -> None:
    """Undo :func:`rng_state` (missing parts, e.g. CUDA on a CPU machine, are skipped)."""
    if not state:
        return
    import numpy as np

    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "numpy" in state:
        nps = state["numpy"]
        keys = nps["keys"].numpy().astype(np.uint32)
        np.random.set_state((nps["kind"], keys, nps["pos"], nps["has_gauss"], nps["cached"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict safely; every failure is a one-line CifarlabError.

    Accepts ``.pt`` files written by :func:`save_checkpoint` and ``.safetensors``
    weights exported by :func:`export_safetensors`. Never unpickles arbitrary objects:
    a file that needs more than tensors and primitives is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CifarlabError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand \d+", str(exc))
        what = found.group(0) if found else "unsupported content"
        raise CifarlabError(
            f"refusing to load {path}: it contains objects other than tensors and plain data "
            f"({what}); cifarlab never unpickles code"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as exc:
        raise CifarlabError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); use another checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CifarlabError(f"{path} is not a cifarlab checkpoint")
    if ckpt.get("version") != VERSION:
        raise CifarlabError(f"{path} has checkpoint version {ckpt.get('version')}, expected {VERSION}")
    for key in ("model", "state_dict", "classes", "mean", "std"):
        if key not in ckpt:
            raise CifarlabError(f"checkpoint {path} lacks '{key}'")
    return ckpt


def data_provenance(ckpt: dict[str, Any], data: str | None = None) -> dict[str, Any]:
    """What a checkpoint's model was trained on, for model cards: ``synthetic``, ``jpeg`` (the
    JPEG q75 copy of CIFAR-10, recognised by its ``cifar10-jpeg`` folder), ``cifar10`` (either
    CIFAR-10), ``folder`` (the data folder's name only: the full path is the training
    machine's business) and ``name`` (the dataset kind). ``data`` overrides the stored root."""
    ds = ckpt.get("dataset") or {}
    cfg = ckpt.get("config") or {}
    synthetic = bool(ds.get("synthetic")) or cfg.get("dataset") == "synthetic"
    root = None if synthetic else (data or ds.get("root") or cfg.get("data"))
    jpeg = bool(root) and "cifar10-jpeg" in Path(str(root)).parts
    name = ds.get("name") or cfg.get("dataset") or "unknown"
    return {
        "synthetic": synthetic,
        "jpeg": jpeg,
        "cifar10": not synthetic and (jpeg or name == "cifar10"),
        "folder": Path(str(root)).name if root else "",
        "name": name,
    }


def describe(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The metadata part of a checkpoint: everything but weights and optimizer state."""
    skip = {"state_dict", "optimizer", "scheduler", "scaler", "rng"}
    return {k: v for k, v in ckpt.items() if k not in skip}


def build_model(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (eval mode, CPU)."""
    from cifarlab.models import create_model

    spec = ckpt["model"]
    model = create_model(spec["name"], **spec["kwargs"])
    weights = ckpt["state_dict"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CifarlabError(f"checkpoint weights do not fit model {spec['name']}: {str(exc)[:200]}") from None
    return model.eval()


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Notebook API: ``model, info = cifarlab.load_checkpoint(path)``.

    Returns the model in eval mode on the CPU, and its description: model name and
    kwargs, class names, mean/std, config, epoch and metrics.
    """
    ckpt = read_checkpoint(path)
    return build_model(ckpt), describe(ckpt)


def export_safetensors(path: str | os.PathLike, ckpt: dict[str, Any]) -> None:
    """Write the checkpoint's weights as safetensors with a JSON description."""
    from safetensors.torch import save

    weights = ckpt["state_dict"]
    meta = {k: v for k, v in describe(ckpt).items() if k in ("model", "classes", "mean", "std", "config", "dataset", "epoch", "metrics", "versions")}
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    blob = save(tensors, metadata={_META_KEY: json.dumps(meta)})
    atomic_write(path, lambda f: f.write(blob))


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError, OSError) as exc:
        raise CifarlabError(f"{path} is not a valid cifarlab safetensors file ({type(exc).__name__})") from None
    return {"format": FORMAT, "version": VERSION, **meta, "state_dict": tensors}
