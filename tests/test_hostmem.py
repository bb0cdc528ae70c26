"""The allocator setting: large blocks stop being mmapped once it is applied."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cifarlab.hostmem import OPT_OUT_ENV, keep_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")

# Runs in a child so the test process keeps its own allocator settings. mallinfo2's
# hblkhd is the bytes glibc holds in mmapped blocks: a 64 MB tensor adds to it unless
# large blocks come from the heap.
_CHILD = textwrap.dedent(
    """
    import ctypes, json, sys, torch
    from cifarlab.hostmem import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mmapped_growth():
        before = libc.mallinfo2().hblkhd
        x = torch.empty(64 * 2**20, dtype=torch.uint8)
        grown = libc.mallinfo2().hblkhd - before
        del x
        return grown

    out = {"default": mmapped_growth()}
    out["applied"] = keep_freed_memory()
    out["kept"] = mmapped_growth()
    print(json.dumps(out))
    """
)


def _child(env_extra: dict[str, str]) -> dict:
    env = {**os.environ, **env_extra}
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_large_blocks_come_from_the_heap_once_applied():
    out = _child({OPT_OUT_ENV: "1"})
    assert out["default"] >= 64 * 2**20  # glibc's default: a fresh mapping per large block
    assert out["applied"] is True
    assert out["kept"] == 0


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(OPT_OUT_ENV, "0")
    assert keep_freed_memory() is False
    out = _child({OPT_OUT_ENV: "0"})
    assert out["applied"] is False
    assert out["kept"] >= 64 * 2**20
