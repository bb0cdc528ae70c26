"""The model card (``README.md``) of a Hugging Face-style export.

YAML front matter the Hub reads (``library_name``, ``license``, ``pipeline_tag``, ``tags``,
``datasets``, ``metrics``, and a ``model-index`` with the accuracy for CIFAR-10 runs),
then the run's results, the data and its caveats, the recipe, the input convention, a
loading snippet and the verification line. Only the data folder's name goes in, never
this machine's paths.
"""

from __future__ import annotations

import json
from typing import Any

from cifarlab.checkpoint import data_provenance
from cifarlab.export.results import Results

#: The Hugging Face Hub's id of CIFAR-10.
HUB_CIFAR10 = "uoft-cs/cifar10"
_RECIPE = ("preset", "model", "norm", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
           "scheduler", "label_smoothing", "augment", "progressive_resize", "tta", "precision", "seed",
           "limit_train", "limit_test", "holdout")


def data_facts(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What the model was trained on (:func:`cifarlab.checkpoint.data_provenance`), in words."""
    facts = data_provenance(ckpt)
    synthetic, jpeg, folder, name = facts["synthetic"], facts["jpeg"], facts["folder"], facts["name"]
    classes = list(ckpt["classes"])
    if synthetic:
        words = ("**Synthetic data.** This model was trained and evaluated on images cifarlab generates "
                 "(oriented gratings), not on photographs: its accuracy says nothing about real images.")
    elif jpeg:
        words = (f"CIFAR-10 as re-encoded to JPEG at quality 75 (folder `{folder}`, read as `{name}`): the same "
                 "32x32 images with JPEG artefacts. Accuracy on this copy is close to, but not directly comparable "
                 "with, published CIFAR-10 numbers measured on the original files.")
    elif name == "cifar10":
        words = "CIFAR-10 (the official python batches): 50,000 training and 10,000 test images, 32x32."
    else:
        words = f"`{name}` data from the folder `{folder}` ({len(classes)} classes)." if folder else f"`{name}` data."
    return {**facts, "words": words}


def front_matter(meta: dict[str, Any], facts: dict[str, Any], results: Results) -> str:
    """The YAML header (JSON-quoted scalars are valid YAML, and safe for any class name)."""
    model = meta["model"]["name"]
    tags = ["cifarlab", "image-classification", "pytorch", "safetensors", model]
    tags += ["synthetic-data"] if facts["synthetic"] else (["cifar10"] if facts["cifar10"] else [])
    lines = ["---", "library_name: cifarlab", "license: mit", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {json.dumps(t)}" for t in tags]
    if facts["cifar10"]:
        lines += ["datasets:", f"- {HUB_CIFAR10}"]
    lines += ["metrics:", "- accuracy"]
    if facts["cifar10"] and results.accuracy is not None:
        dataset = "CIFAR-10 (JPEG q75 copy)" if facts["jpeg"] else "CIFAR-10"
        lines += [
            "model-index:",
            f"- name: {json.dumps('cifarlab-' + model)}",
            "  results:",
            "  - task: {type: image-classification, name: Image Classification}",
            f"    dataset: {{type: {HUB_CIFAR10}, name: {json.dumps(dataset)}, split: {results.split}}}",
            f"    metrics: [{{type: accuracy, value: {results.accuracy:.4f}, name: {results.split} accuracy}}]",
        ]
    return "\n".join(lines + ["---"])


def render_card(meta: dict[str, Any], ckpt: dict[str, Any], results: Results, verification: list[str], params: int) -> str:
    """The whole ``README.md``."""
    facts = data_facts(ckpt)
    model = meta["model"]["name"]
    title = f"# cifarlab `{model}`" + (" on synthetic data" if facts["synthetic"] else
                                       " on CIFAR-10 (JPEG q75 copy)" if facts["jpeg"] else
                                       " on CIFAR-10" if facts["cifar10"] else f" on `{facts['name']}`")
    parts = [front_matter(meta, facts, results), "", title, ""]
    if facts["synthetic"]:
        parts += ["> **Warning: synthetic data.** Trained and evaluated on generated patterns, not photographs. "
                  "Use it to try the pipeline, not to classify real images.", ""]
    parts += [
        f"A `{model}` image classifier ({params / 1e6:.2f}M parameters, {len(meta['classes'])} classes) trained "
        f"with cifarlab for {_epochs(ckpt.get('epoch'))}.",
        "",
        *_results_section(results),
        "## Data",
        "",
        facts["words"],
        "",
        *_recipe_section(ckpt),
        *_use_section(meta),
        "## Verification",
        "",
        "Before it was written, this export was compared with the checkpoint it comes from (fp32):",
        "",
        *[f"    {line}" for line in verification],
        "",
        f"Exported by cifarlab {meta['cifarlab_version']} with torch {meta['torch_version']}; weights sha256 "
        f"`{meta['source']['weights_sha256']}`.",
        "",
    ]
    return "\n".join(parts)


def _epochs(epoch: Any) -> str:
    return "an unknown number of epochs" if epoch is None else f"{epoch} epoch{'' if epoch == 1 else 's'}"


def _results_section(results: Results) -> list[str]:
    out = ["## Results", ""]
    if results.accuracy is None:
        return out + [f"No accuracy is known ({results.how}).", ""]
    err = f" ± {results.stderr:.2%} (standard error)" if results.stderr is not None else ""
    count = f" on {results.n:,} {results.split} images" if results.n else f" on the {results.split} split"
    out += [f"**{results.split.capitalize()} accuracy: {results.accuracy:.2%}**{count}{err}, from {results.how}.", ""]
    if results.per_class:
        out += ["| class | accuracy | images |", "|---|---:|---:|"]
        out += [f"| {name} | {acc:.2%} | {n} |" for name, acc, n in results.per_class]
        out.append("")
    return out


def _recipe_section(ckpt: dict[str, Any]) -> list[str]:
    cfg = ckpt.get("config") or {}
    rows = [(k, cfg[k]) for k in _RECIPE if cfg.get(k) not in (None, "") and not (k == "holdout" and not cfg[k])]
    if not rows:
        return []
    out = ["## Training recipe", "", "| setting | value |", "|---|---|"]
    out += [f"| {k} | `{v}` |" for k, v in rows]
    return out + ["", "The full resolved config is in the `cifarlab` metadata of `model.safetensors`.", ""]


def _use_section(meta: dict[str, Any]) -> list[str]:
    tta = meta["tta"]
    predict = "model(x)" if tta == "none" else f'predict_logits(model, x, "{tta}")'
    imports = [] if tta == "none" else ["from cifarlab.engine import predict_logits"]
    return [
        "## Use it",
        "",
        "Input: RGB images resized to 32x32 (antialiased bilinear, as `cifarlab predict` does), as float32 "
        "(N, 3, 32, 32) normalised with `(pixels/255 - mean) / std` (`mean`/`std` in `config.json`). "
        f"The accuracy above predicts with test-time augmentation `{tta}`.",
        "",
        "```python",
        "import numpy as np, torch",
        "from PIL import Image",
        "import cifarlab",
        "from cifarlab.data import normalize",
        *imports,
        "",
        'model, info = cifarlab.load_pretrained("path/to/this/folder")',
        'img = Image.open("cat.png").convert("RGB").resize((32, 32), Image.BILINEAR)',
        "pixels = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None]  # uint8 (1, 3, 32, 32)",
        'x = normalize(pixels, info["mean"], info["std"])',
        "with torch.no_grad():",
        f"    probs = {predict}.softmax(1)[0]",
        'print(info["classes"][int(probs.argmax())], float(probs.max()))',
        "```",
        "",
        "Nothing here is a pickle: `config.json` and `model.safetensors` load without running code from the files.",
        "",
    ]
