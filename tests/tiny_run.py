"""One tiny training run on synthetic data, shared by the explain/predict/report tests.

Each test module builds its own (module-scoped fixture) so modules stay independent;
the settings keep one run to a few seconds on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

TINY = dict(
    dataset="synthetic",
    num_classes=4,
    epochs=2,
    batch_size=64,
    lr=0.2,
    limit_train=512,
    limit_test=256,
    device="cpu",
    tta="none",
    seed=1,
)


def tiny_fit(out: Path, *, report: bool = False, **overrides):
    """Train the fast net for 2 epochs on 512 synthetic images; return fit()'s RunResult."""
    import io

    from cifarlab.config import resolve_config
    from cifarlab.train import fit

    cfg = resolve_config(preset="fast", overrides={**TINY, **overrides, "out": str(out)})
    return fit(cfg, progress=False, stream=io.StringIO(), report=report)
