"""Image classifiers for 32x32 inputs, built by name: ``create_model("fast")``.

See :func:`create_model` for the attributes every model carries (``features``, ``head``,
``cam_layer``, ``spec``) and :func:`list_models` for the names.
"""

from cifarlab.models.norm import NORMS, make_norm
from cifarlab.models.registry import ModelSpec, create_model, list_models

__all__ = ["NORMS", "ModelSpec", "create_model", "list_models", "make_norm"]
