"""cifarlab: train small-image classifiers with the best known recipe, and see what they learned.

Notebook API::

    import cifarlab
    model, info = cifarlab.load_checkpoint("runs/fast-.../checkpoints/best.pt")
    net = cifarlab.create_model("resnet18", num_classes=10, norm="batch")
    cifarlab.list_models()
    model, info = cifarlab.load_pretrained("runs/fast-.../export/hf")   # cifarlab export --format hf
"""

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models", "load_checkpoint", "load_pretrained"]


def __getattr__(name: str):
    # Lazy: `import cifarlab` stays cheap (no torch import) until the API is used.
    if name in ("create_model", "list_models"):
        from cifarlab import models

        return getattr(models, name)
    if name == "load_checkpoint":
        from cifarlab.checkpoint import load_checkpoint

        return load_checkpoint
    if name == "load_pretrained":
        from cifarlab.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'cifarlab' has no attribute {name!r}")
