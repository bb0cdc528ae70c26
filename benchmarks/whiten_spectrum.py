"""Eigenvalues of a dataset's 2x2 patch covariance, and the gain the fast nets' whitening
stem gives each patch direction at several ``whiten_eps`` floors.

The stem is fitted by the model's own ``init_from_data`` on a seeded random subset of the
training split, normalised like training (as ``cifarlab train`` does); filter i is unit
eigenvector i scaled by 1/sqrt(eigenvalue_i + eps), so its norm is the gain and the
eigenvalue is recovered as gain**-2 - eps. It also prints the variance of each 2x2 Haar
component (mean, horizontal, vertical and diagonal detail) of the luma and chroma planes
(JPEG's YCbCr), to show which patch directions an encoder's chroma subsampling emptied,
and (image folders) the JPEG chroma subsampling of every ``--check-every``-th file.
Last line: one JSON object.

    python benchmarks/whiten_spectrum.py --data ../shared/datasets/cifar10-jpeg --eps 5e-4,5e-3,5e-2
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="image folder root (train/<class>/*, test/<class>/*)")
    p.add_argument("--dataset", default="imagefolder", choices=["imagefolder", "cifar10"])
    p.add_argument("--eps", default="5e-4,5e-3,5e-2", help="comma list of whiten_eps values")
    p.add_argument("--images", type=int, default=5000, help="fitting subset size (training uses 5000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-every", type=int, default=200, help="read the JPEG header of every N-th file")
    args = p.parse_args(argv)

    from cifarlab.data.sources import load_dataset
    from cifarlab.models import create_model
    from cifarlab.context import stem_fit_batch

    ds = load_dataset(args.dataset, args.data)
    x = stem_fit_batch(ds, args.seed, args.images)  # (N, 3, 32, 32), exactly what training fits on

    result: dict = {"data": args.data, "images": len(x), "seed": args.seed, "gain": {}}
    for eps in (float(e) for e in args.eps.split(",")):
        model = create_model("fast", whiten_eps=eps)
        model.init_from_data(x)
        # First half of the stem's filters: one per patch direction, largest variance first.
        half = model.features.whiten.weight.shape[0] // 2
        gain = model.features.whiten.weight[:half].flatten(1).norm(dim=1).double()
        result["eigenvalues"] = [float(f"{v:.3g}") for v in (gain**-2 - eps).tolist()]
        result["gain"][f"{eps:g}"] = [round(v, 2) for v in gain.tolist()]
        print(f"eps {eps:g}: gains " + " ".join(f"{v:.1f}" for v in gain.tolist()))
    # JPEG's RGB -> YCbCr (ITU-R BT.601, full range), on the fitting subset back in [0, 1].
    rgb = x.double() * torch.tensor(ds.std).view(1, 3, 1, 1) + torch.tensor(ds.mean).view(1, 3, 1, 1)
    to_ycbcr = torch.tensor(
        [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
        dtype=torch.float64,
    )
    planes = torch.einsum("dc,nchw->ndhw", to_ycbcr, rgb)
    # Orthonormal 2x2 Haar basis over (top-left, top-right, bottom-left, bottom-right).
    haar = torch.tensor(
        [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64
    ) / 2
    result["haar_variance"] = {}
    for name, plane in zip(("Y", "Cb", "Cr"), planes.unbind(1)):
        patches = torch.nn.functional.unfold(plane[:, None], 2).transpose(1, 2).reshape(-1, 4)
        var = (patches @ haar.T).var(0)
        result["haar_variance"][name] = [float(f"{v:.3g}") for v in var.tolist()]
        print(f"{name:2s} Haar variance (mean, horiz., vert., diag.): " + " ".join(f"{v:.2e}" for v in var.tolist()))
    if args.dataset == "imagefolder":
        result["jpeg_subsampling"] = _jpeg_subsampling(args.data, args.check_every)
        print(f"JPEG chroma subsampling of every {args.check_every}th file: {result['jpeg_subsampling']}")
    print("eigenvalues (largest first): " + " ".join(f"{v:.2e}" for v in result["eigenvalues"]))
    print(json.dumps(result))
    return 0


def _jpeg_subsampling(root: str, every: int) -> dict[str, int]:
    """Count the chroma subsampling of every ``every``-th file (sorted paths) under root."""
    from collections import Counter
    from pathlib import Path

    from PIL import Image, JpegImagePlugin

    names = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
    counts: Counter[str] = Counter()
    for path in sorted(Path(root).glob("*/*/*"))[::every]:
        with Image.open(path) as im:
            kind = names.get(JpegImagePlugin.get_sampling(im), "other") if im.format == "JPEG" else im.format
        counts[str(kind)] += 1
    return dict(counts)


if __name__ == "__main__":
    raise SystemExit(main())
