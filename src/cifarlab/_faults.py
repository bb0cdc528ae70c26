"""Fault injection for the robustness tests and ``benchmarks/soak_resume.py``.

Set ``CIFARLAB_FAULT`` to a comma-separated list of ``ACTION@POINT=N`` items, optionally
suffixed ``/rR`` to apply on rank R only (default: every rank)::

    kill@step=7        SIGKILL this process right after global training step 7
    int@step=3         send this process a real SIGINT after step 3 (as Ctrl-C would)
    term@step=3        ... a real SIGTERM
    int@save=1         ... a SIGINT while the 1st checkpoint of this process is being written
    kill@save=2        SIGKILL in the middle of the 2nd checkpoint write (temp file written,
                       not yet renamed over the old checkpoint)
    enospc@save=2      make the 2nd checkpoint write fail with OSError(ENOSPC), as a full
                       disk would, after part of the file was written

The faults are real: a real signal goes through the real handlers, a real SIGKILL ends
the process with nothing cleaned up. Unset (the normal case) costs one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "CIFARLAB_FAULT"

_ACTIONS = ("kill", "int", "term", "enospc")
_POINTS = ("step", "save")
_SIGNALS = {"kill": signal.SIGKILL, "int": signal.SIGINT, "term": signal.SIGTERM}

_parsed: tuple[str, list[tuple[str, str, int, int | None]]] | None = None
_saves = 0


def _plan() -> list[tuple[str, str, int, int | None]]:
    """Parsed (action, point, n, rank) items of $CIFARLAB_FAULT (re-parsed if it changed)."""
    global _parsed
    text = os.environ.get(ENV, "")
    if _parsed is not None and _parsed[0] == text:
        return _parsed[1]
    items = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            spec, _, only_rank = part.partition("/r")
            action, _, where = spec.partition("@")
            point, _, n = where.partition("=")
            if action not in _ACTIONS or point not in _POINTS:
                raise ValueError(part)
            items.append((action, point, int(n), int(only_rank) if only_rank else None))
        except ValueError:
            raise ValueError(f"bad {ENV} item {part!r}; expected ACTION@POINT=N[/rR]") from None
    _parsed = (text, items)
    return items


def _fire(action: str) -> None:
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), _SIGNALS[action])


def _matching(point: str, n: int) -> list[str]:
    if not os.environ.get(ENV):
        return []
    rank = int(os.environ.get("RANK", "0") or 0)
    return [a for a, p, k, r in _plan() if p == point and k == n and (r is None or r == rank)]


def at_step(global_step: int) -> None:
    """Called by the training loop after each optimizer step."""
    for action in _matching("step", global_step):
        _fire(action)


def in_save() -> None:
    """Called by :func:`cifarlab.checkpoint.save_checkpoint` after the temp file is written,
    before it is fsynced and renamed: the most fragile moment of a save."""
    global _saves
    if not os.environ.get(ENV):
        return
    _saves += 1
    for action in _matching("save", _saves):
        _fire(action)
