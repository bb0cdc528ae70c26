"""On-disk cache of decoded dataset splits.

One file per dataset identity (source kind + absolute root, plus the generator
parameters for synthetic data). The file stores a *fingerprint* of everything the
decoded tensors depend on (every source file's relative path, size and mtime_ns, or
the synthetic parameters); a load whose fingerprint differs is a miss and the same
file is overwritten, so editing a dataset never leaves stale copies behind.

Files are written atomically (temporary file in the same directory, fsync,
``os.replace``), so concurrent writers (e.g. several DDP ranks on one host) and
interrupted runs can never leave a half-written cache behind. Any problem reading a
cache file (truncated, corrupt, foreign format) is treated as a miss: the cache is an
optimisation and must never be the reason a run fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

log = logging.getLogger(__name__)

# Bump when the payload layout changes; old files then simply miss and are rebuilt.
CACHE_FORMAT = 1

# Cache files live in a subfolder so that other cifarlab caches can share cache_dir.
_SUBDIR = "datasets"


def default_cache_dir() -> Path:
    """Return the cache root: ``$CIFARLAB_CACHE`` if set (and non-empty), else ``~/.cache/cifarlab``."""
    env = os.environ.get("CIFARLAB_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cifarlab"


def _digest(obj: Any) -> str:
    """sha256 of a canonical JSON encoding (sorted keys, so dict order never changes a key)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_path(cache_dir: str | os.PathLike, identity: Mapping[str, Any]) -> Path:
    """Path of the cache file for a dataset identity (must contain a ``kind`` entry)."""
    kind = str(identity["kind"])
    return Path(cache_dir) / _SUBDIR / f"{kind}-{_digest(dict(identity))[:24]}.pt"


def fingerprint(identity: Mapping[str, Any], entries: Iterable[tuple[str, int, int]]) -> str:
    """Full cache key: the identity plus every source file's ``(relpath, size, mtime_ns)``.

    Streams the entries through sha256 (60k files hash in a few ms) rather than
    building one large JSON document.
    """
    h = hashlib.sha256()
    h.update(f"format={CACHE_FORMAT}\n".encode())
    h.update(_digest(dict(identity)).encode())
    for rel, size, mtime_ns in entries:
        # NUL cannot occur in a path, so the encoding is unambiguous.
        h.update(f"\n{rel}\0{size}\0{mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def load(path: Path, key: str) -> dict[str, Any] | None:
    """Return the cached payload at ``path`` if it exists and was built for ``key``, else None.

    Uses ``torch.load(weights_only=True)``: the file may come from anywhere on disk, and
    the restricted unpickler cannot execute code. Every failure is a miss, never fatal.
    """
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken cache must never be fatal
        log.warning("ignoring unreadable dataset cache %s (%s); rebuilding it", path, exc)
        return None
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        log.warning("ignoring dataset cache %s in an unknown format; rebuilding it", path)
        return None
    if payload.get("key") != key:
        log.info("dataset cache %s is out of date (source files changed); rebuilding it", path)
        return None
    return payload


def save(path: Path, key: str, payload: Mapping[str, Any]) -> bool:
    """Atomically write ``payload`` (plus format and key) to ``path``; return whether it worked.

    A failure (read-only or full disk) is logged and swallowed: the run can go on
    with the data already in memory.
    """
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            torch.save({**payload, "format": CACHE_FORMAT, "key": key}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(path.parent)
        return True
    except Exception as exc:  # noqa: BLE001 - caching is best effort
        log.warning("could not write dataset cache %s (%s); continuing without it", path, exc)
        return False
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable too (POSIX only; directories cannot be opened on Windows)."""
    if os.name != "posix":
        return
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
