"""Progress of one pass over a loader, for whoever watches the run.

On a terminal, tqdm's bar. Anywhere else (nohup, a CI log, a captured notebook cell) a
bar is noise or nothing at all, and an fp32 CPU epoch can take minutes: print a plain
line about every ``LINE_EVERY_S`` seconds instead, so a log shows the run is alive and
when it will finish.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import torch

#: Seconds between plain progress lines: often enough to show life in a log, rarely
#: enough that a 10-minute epoch adds ~20 lines, and each line's host sync costs nothing.
LINE_EVERY_S = 30.0
MODES = ("bar", "lines", "off")
_now = time.perf_counter  # one name to read the clock by (tests replace it)


def progress_mode(progress: bool | None, stream: TextIO | None = None) -> str:
    """'bar' on a terminal, 'lines' elsewhere for ``None`` (auto); True/False force bar/off."""
    if progress is None:
        stream = stream if stream is not None else sys.stderr
        return "bar" if stream.isatty() else "lines"
    return "bar" if progress else "off"


class Progress:
    """Step counter of one pass, shown as ``mode`` says ('bar', 'lines' or 'off').

    :meth:`update` is called after every step with the running device tensors; it reads
    them on the host only when something is shown (every ``log_every`` steps for the
    bar, once per line otherwise), so CUDA steps do not wait on the host.
    """

    def __init__(self, mode: str, total: int | None, desc: str = "", *, log_every: int = 20, stream: TextIO | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.total = total
        self.desc = desc
        self.log_every = max(1, log_every)
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._start = self._last_line = _now()
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, step: int, n: int, loss_sum: torch.Tensor, correct: torch.Tensor, lr: float | None) -> None:
        """After step ``step`` (1-based) of this pass, ``n`` images seen so far."""
        if self._bar is not None:
            if step % self.log_every == 0:
                postfix = {"loss": f"{loss_sum.item() / n:.4f}", "acc": f"{correct.item() / n:.4f}"}
                if lr is not None:
                    postfix["lr"] = f"{lr:.3g}"
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)
        elif self.mode == "lines":
            now = _now()
            if now - self._last_line >= LINE_EVERY_S:
                self._last_line = now
                print(self._line(step, n, loss_sum, correct, now - self._start), file=self.stream, flush=True)

    def _line(self, step: int, n: int, loss_sum: torch.Tensor, correct: torch.Tensor, elapsed: float) -> str:
        """``epoch 2/8  step 120/390  loss 1.2345  acc 55.21%  312 img/s  ETA 3m41s``"""
        of = f"/{self.total}" if self.total else ""
        text = f"{self.desc + '  ' if self.desc else ''}step {step}{of}  "
        text += f"loss {loss_sum.item() / n:.4f}  acc {correct.item() / n:.2%}  {n / elapsed:.0f} img/s"
        if self.total:
            left = elapsed / step * (self.total - step)
            text += f"  ETA {int(left // 60)}m{int(left % 60):02d}s"
        return text

    def close(self) -> None:
        """Remove the bar (lines need no closing)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
