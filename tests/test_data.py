"""Tests for cifarlab.data: sources, cache, Split.take, normalize and DeviceLoader.

Everything runs on tiny datasets generated under tmp_path; the real CIFAR-10 copy is
never touched here.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    AugmentSpec,
    DeviceLoader,
    Split,
    channel_stats,
    default_cache_dir,
    load_dataset,
    normalization,
    normalize,
)
from cifarlab.data import cache as data_cache
from cifarlab.data import cifar10, decode, imagefolder, sources, synthetic
from cifarlab.errors import CifarlabError


@pytest.fixture(scope="module")
def tiny() -> sources.Dataset:
    """A small synthetic dataset shared by the loader tests (generated in memory, never cached on disk)."""
    images, labels = sources.generate_synthetic(320, 10, torch.Generator().manual_seed(0))
    mean, std = channel_stats(images)
    classes = tuple(f"class{i}" for i in range(10))
    return sources.Dataset("synthetic", None, classes, Split(images, labels), Split(images[:50], labels[:50]), mean, std, True)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.rglob("*.pt"))


# ============================================================================ synthetic


def test_synthetic_shapes_dtypes_and_balance(cache_dir):
    ds = load_dataset("synthetic", None, cache_dir=cache_dir, num_classes=10, synthetic_train=500, synthetic_test=100)
    assert ds.name == "synthetic" and ds.synthetic and ds.root is None
    assert ds.classes == tuple(f"class{i}" for i in range(10))
    assert ds.train.images.shape == (500, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (100, 3, 32, 32)
    assert ds.train.labels.dtype == torch.int64 and ds.train.images.is_contiguous()
    assert torch.bincount(ds.train.labels, minlength=10).tolist() == [50] * 10
    assert torch.bincount(ds.test.labels, minlength=10).tolist() == [10] * 10
    mean, std = channel_stats(ds.train.images)
    assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)
    assert all(0.3 < m < 0.7 for m in ds.mean) and all(0.1 < s < 0.4 for s in ds.std)


def test_synthetic_is_deterministic_per_seed(tmp_path):
    a = load_dataset("synthetic", None, cache_dir=tmp_path / "a", synthetic_train=200, synthetic_test=50, seed=3)
    b = load_dataset("synthetic", None, cache_dir=tmp_path / "b", synthetic_train=200, synthetic_test=50, seed=3)
    c = load_dataset("synthetic", None, cache_dir=tmp_path / "c", synthetic_train=200, synthetic_test=50, seed=4)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert not torch.equal(a.train.images[:50], a.test.images), "train and test are different draws"


def test_synthetic_is_not_separable_by_mean_colour(cache_dir):
    ds = load_dataset("synthetic", None, cache_dir=cache_dir, synthetic_train=2000, synthetic_test=1000)
    feats = ds.train.images.float().mean(dim=(2, 3))
    centroids = torch.stack([feats[ds.train.labels == k].mean(0) for k in range(10)])
    test_feats = ds.test.images.float().mean(dim=(2, 3))
    pred = torch.cdist(test_feats, centroids).argmin(1)
    accuracy = (pred == ds.test.labels).float().mean().item()
    assert accuracy < 0.3, f"nearest mean colour scores {accuracy:.2f}: classes must differ in pattern, not colour"


def test_synthetic_classes_differ_in_orientation():
    """The label is carried by structure: the gradient orientation histogram separates classes."""
    images, labels = sources.generate_synthetic(1000, 4, torch.Generator().manual_seed(0))
    x = images.float()
    gx = x[:, :, 1:-1, 2:] - x[:, :, 1:-1, :-2]
    gy = x[:, :, 2:, 1:-1] - x[:, :, :-2, 1:-1]
    # Dominant gradient orientation per image (structure tensor over all channels, doubled angle).
    angle2 = torch.atan2(2 * (gx * gy).sum((1, 2, 3)), (gx * gx - gy * gy).sum((1, 2, 3)))
    feats = torch.stack([angle2.cos(), angle2.sin()], 1)
    centroids = torch.stack([feats[labels == k].mean(0) for k in range(4)])
    accuracy = (torch.cdist(feats, centroids).argmin(1) == labels).float().mean().item()
    assert accuracy > 0.8


def test_channel_stats_is_exact_population_mean_and_std():
    images = torch.randint(0, 256, (3, 3, 4, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.double() / 255
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(x.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-12)


def test_synthetic_bad_arguments(cache_dir):
    with pytest.raises(CifarlabError):
        load_dataset("synthetic", None, cache_dir=cache_dir, num_classes=1)
    with pytest.raises(CifarlabError):
        load_dataset("synthetic", None, cache_dir=cache_dir, synthetic_train=3, num_classes=10)


def test_synthetic_is_cached(cache_dir, monkeypatch):
    first = load_dataset("synthetic", None, cache_dir=cache_dir, synthetic_train=100, synthetic_test=20)
    monkeypatch.setattr(synthetic, "generate_synthetic", _fail("generated again despite the cache"))
    second = load_dataset("synthetic", None, cache_dir=cache_dir, synthetic_train=100, synthetic_test=20)
    assert torch.equal(first.train.images, second.train.images)
    assert second.synthetic and second.mean == first.mean


def test_unknown_kind_and_missing_root(cache_dir):
    with pytest.raises(CifarlabError, match="unknown dataset kind"):
        load_dataset("mnist", None, cache_dir=cache_dir)
    with pytest.raises(CifarlabError, match="--data"):
        load_dataset("imagefolder", None, cache_dir=cache_dir)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("CIFARLAB_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "cifarlab"


def _fail(message: str):
    def fail(*args, **kwargs):
        raise AssertionError(message)

    return fail


# ============================================================================ imagefolder


def _save(path: Path, image: Image.Image, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def make_tree(root: Path) -> Path:
    """Two classes in mixed formats, sizes and modes, plus junk that must be ignored."""
    # cat: exact-size RGB PNG of a known colour, odd-size JPEG, grayscale PNG
    _save(root / "train/cat/a.png", Image.new("RGB", (32, 32), (200, 10, 30)))
    _save(root / "train/cat/b.jpg", _noise((45, 37), 1), "JPEG")
    _save(root / "train/cat/c.png", Image.new("L", (16, 20), 77))
    # dog: RGBA PNG of odd size, CMYK JPEG, palette GIF, nested folder
    _save(root / "train/dog/a.png", Image.new("RGBA", (33, 31), (10, 220, 40, 128)))
    _save(root / "train/dog/b.jpeg", Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")
    _save(root / "train/dog/sub/c.gif", Image.new("P", (64, 64), 3))
    # test split
    _save(root / "test/cat/x.jpg", _noise((32, 32), 2), "JPEG")
    _save(root / "test/dog/y.png", Image.new("RGB", (32, 32), (1, 2, 3)))
    _save(root / "test/dog/z.JPG", Image.new("L", (32, 32), 128), "JPEG")
    # junk: macOS metadata, hidden files and hidden class folders
    (root / "train/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1 not an image")
    (root / "train/cat/.DS_Store").write_bytes(b"junk")
    (root / "train/dog/._b.jpeg").write_bytes(b"AppleDouble junk")
    _save(root / "train/.hidden_class/h.png", Image.new("RGB", (32, 32)))
    _save(root / "test/.ipynb_checkpoints/h.png", Image.new("RGB", (32, 32)))
    _save(root / "train/dog/.secret/h.png", Image.new("RGB", (32, 32)))
    return root


def test_imagefolder_loads_mixed_formats(tmp_path, cache_dir):
    root = make_tree(tmp_path / "data")
    ds = load_dataset("imagefolder", root, cache_dir=cache_dir)
    assert ds.name == "imagefolder" and not ds.synthetic and ds.root == str(root.resolve())
    assert ds.classes == ("cat", "dog")
    assert ds.train.images.shape == (6, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (3, 3, 32, 32)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.test.labels.tolist() == [0, 1, 1]
    train = ds.train.images
    # files are sorted per class: cat/a.png, cat/b.jpg, cat/c.png, dog/a.png, dog/b.jpeg, dog/sub/c.gif
    assert (train[0] == torch.tensor([200, 10, 30], dtype=torch.uint8).view(3, 1, 1)).all()
    assert (train[2] == 77).all(), "grayscale becomes R=G=B"
    assert (train[3] == torch.tensor([10, 220, 40], dtype=torch.uint8).view(3, 1, 1)).all(), "alpha dropped"
    cmyk = train[4].float().mean((1, 2))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60, f"CMYK (0,255,255,0) is red, got {cmyk}"
    assert (ds.test.images[1] == torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)).all()
    mean, std = channel_stats(train)
    assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)


def test_imagefolder_resizes_with_antialiasing(tmp_path, cache_dir):
    root = tmp_path / "data"
    # 1-px checkerboard at 128x128: point sampling would give pure 0/255, antialiasing gives grey.
    board = (np.indices((128, 128)).sum(0) % 2 * 255).astype(np.uint8)
    _save(root / "train/a/big.png", Image.fromarray(board, "L"))
    _save(root / "test/a/small.png", Image.new("RGB", (32, 32), (5, 5, 5)))
    ds = load_dataset("imagefolder", root, cache_dir=cache_dir)
    big = ds.train.images[0].float()
    assert ds.train.images.shape == (1, 3, 32, 32)
    assert 100 < big.mean() < 155 and big.std() < 30


def test_fast_jpeg_path_matches_pillow(tmp_path):
    paths = [
        _save(tmp_path / "rgb.jpg", _noise((32, 32), 5), "JPEG"),
        _save(tmp_path / "odd.jpg", _noise((50, 41), 6), "JPEG"),
        _save(tmp_path / "gray.jpg", _noise((32, 32), 7).convert("L"), "JPEG"),
    ]
    decoder = decode._jpeg_decoder()
    assert decoder is not None, "torchvision's JPEG op should be available in this environment"
    for path in paths:
        fast = decode._decode_image(str(path), decoder)
        slow = decode._decode_image(str(path), None)
        assert np.array_equal(fast, slow), path.name


def test_imagefolder_process_pool_gives_same_result(tmp_path, cache_dir, monkeypatch):
    root = make_tree(tmp_path / "data")
    in_process = load_dataset("imagefolder", root, cache_dir=tmp_path / "c1")
    monkeypatch.setattr(decode, "_POOL_MIN_FILES", 0)
    pooled = load_dataset("imagefolder", root, cache_dir=tmp_path / "c2")
    assert torch.equal(in_process.train.images, pooled.train.images)
    assert torch.equal(in_process.test.images, pooled.test.images)


def test_imagefolder_reports_every_bad_image(tmp_path, cache_dir, monkeypatch):
    root = make_tree(tmp_path / "data")
    (root / "train/cat/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = (root / "train/cat/a.png").read_bytes()
    (root / "test/dog/truncated.png").write_bytes(good[: len(good) // 2])
    (root / "train/dog/notes.txt").write_text("hello")
    monkeypatch.setattr(decode, "_POOL_MIN_FILES", 0)  # collected across pool workers too
    with pytest.raises(CifarlabError) as err:
        load_dataset("imagefolder", root, cache_dir=cache_dir)
    message = str(err.value)
    assert "3 file(s)" in message
    for name in ("broken.jpg", "truncated.png", "notes.txt"):
        assert name in message
    assert "\n" not in message
    assert not cache_files(cache_dir), "a failed load must not be cached"


def test_imagefolder_class_mismatch(tmp_path, cache_dir):
    root = make_tree(tmp_path / "data")
    _save(root / "test/bird/x.png", Image.new("RGB", (32, 32)))
    with pytest.raises(CifarlabError, match="only in test: \\['bird'\\]"):
        load_dataset("imagefolder", root, cache_dir=cache_dir)


def test_imagefolder_empty_class(tmp_path, cache_dir):
    root = make_tree(tmp_path / "data")
    (root / "train/fish").mkdir()
    (root / "train/fish/.DS_Store").write_bytes(b"junk")
    (root / "test/fish").mkdir()
    _save(root / "test/fish/x.png", Image.new("RGB", (32, 32)))
    with pytest.raises(CifarlabError, match="fish.*no image files"):
        load_dataset("imagefolder", root, cache_dir=cache_dir)


def test_imagefolder_missing_dirs(tmp_path, cache_dir):
    with pytest.raises(CifarlabError, match="does not exist.*--data"):
        load_dataset("imagefolder", tmp_path / "nope", cache_dir=cache_dir)
    _save(tmp_path / "only_train/train/a/x.png", Image.new("RGB", (32, 32)))
    with pytest.raises(CifarlabError, match="test.*is missing"):
        load_dataset("imagefolder", tmp_path / "only_train", cache_dir=cache_dir)
    (tmp_path / "no_classes/train").mkdir(parents=True)
    (tmp_path / "no_classes/test").mkdir(parents=True)
    with pytest.raises(CifarlabError, match="no class subfolders"):
        load_dataset("imagefolder", tmp_path / "no_classes", cache_dir=cache_dir)


# ============================================================================ cache


def test_cache_hit_decodes_nothing(tmp_path, cache_dir, monkeypatch):
    root = make_tree(tmp_path / "data")
    first = load_dataset("imagefolder", root, cache_dir=cache_dir)
    assert len(cache_files(cache_dir)) == 1
    monkeypatch.setattr(imagefolder, "decode_images", _fail("decoded despite a valid cache"))
    monkeypatch.setattr(decode, "_decode_image", _fail("decoded despite a valid cache"))
    second = load_dataset("imagefolder", root, cache_dir=cache_dir)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.classes == second.classes and first.mean == second.mean


class CountingDecoder:
    def __init__(self):
        self.calls = 0
        self.real = decode.decode_images

    def __call__(self, paths, **kwargs):
        self.calls += 1
        return self.real(paths, **kwargs)


def test_cache_invalidated_when_a_file_changes(tmp_path, cache_dir, monkeypatch):
    root = make_tree(tmp_path / "data")
    counter = CountingDecoder()
    monkeypatch.setattr(imagefolder, "decode_images", counter)
    load_dataset("imagefolder", root, cache_dir=cache_dir)
    load_dataset("imagefolder", root, cache_dir=cache_dir)
    assert counter.calls == 1

    # Touch: same bytes, new mtime -> decoded again.
    target = root / "train/cat/a.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    load_dataset("imagefolder", root, cache_dir=cache_dir)
    assert counter.calls == 2

    # Rewrite with new content -> decoded again and the new pixels show up.
    _save(target, Image.new("RGB", (32, 32), (0, 0, 255)))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    ds = load_dataset("imagefolder", root, cache_dir=cache_dir)
    assert counter.calls == 3
    assert (ds.train.images[0] == torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1)).all()

    # Adding a file changes the key as well.
    _save(root / "train/dog/new.png", Image.new("RGB", (32, 32)))
    ds = load_dataset("imagefolder", root, cache_dir=cache_dir)
    assert counter.calls == 4 and len(ds.train) == 7
    assert len(cache_files(cache_dir)) == 1, "a changed dataset overwrites its cache file"


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty", "foreign"])
def test_corrupt_cache_is_rebuilt(tmp_path, cache_dir, monkeypatch, damage):
    root = make_tree(tmp_path / "data")
    first = load_dataset("imagefolder", root, cache_dir=cache_dir)
    (path,) = cache_files(cache_dir)
    blob = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not a torch file" * 10)
    elif damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # loads fine but is not our payload
        torch.save({"format": data_cache.CACHE_FORMAT, "key": "wrong", "x": torch.zeros(1)}, path)
    counter = CountingDecoder()
    monkeypatch.setattr(imagefolder, "decode_images", counter)
    again = load_dataset("imagefolder", root, cache_dir=cache_dir)
    assert counter.calls == 1
    assert torch.equal(first.train.images, again.train.images)
    # ... and the rebuilt cache is good again.
    third = load_dataset("imagefolder", root, cache_dir=cache_dir)
    assert counter.calls == 1 and torch.equal(third.test.images, first.test.images)


def test_cache_write_is_atomic_and_leaves_no_temp_files(tmp_path, cache_dir):
    load_dataset("synthetic", None, cache_dir=cache_dir, synthetic_train=50, synthetic_test=10)
    files = [p.name for p in (cache_dir / "datasets").iterdir()]
    assert len(files) == 1 and files[0].endswith(".pt") and not files[0].startswith(".")


def test_unwritable_cache_is_not_fatal(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    ds = load_dataset("synthetic", None, cache_dir=blocker, synthetic_train=50, synthetic_test=10)
    assert len(ds.train) == 50


def test_cache_key_covers_root_and_params(tmp_path):
    a = data_cache.cache_path(tmp_path, {"kind": "imagefolder", "root": "/a"})
    b = data_cache.cache_path(tmp_path, {"kind": "imagefolder", "root": "/b"})
    assert a != b and a.name.startswith("imagefolder-")
    k1 = data_cache.fingerprint({"kind": "x"}, [("train/a.png", 10, 1)])
    assert k1 != data_cache.fingerprint({"kind": "x"}, [("train/a.png", 11, 1)])
    assert k1 != data_cache.fingerprint({"kind": "x"}, [("train/a.png", 10, 2)])
    assert k1 != data_cache.fingerprint({"kind": "x"}, [("train/b.png", 10, 1)])
    assert k1 != data_cache.fingerprint({"kind": "y"}, [("train/a.png", 10, 1)])


# ============================================================================ cifar10


def _write_fake_cifar(base: Path, n_per_batch: int = 20) -> dict[str, str]:
    """Official-format batches with random content; returns their md5s."""
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = list(cifar10.CIFAR10_TRAIN_FILES) + list(cifar10.CIFAR10_TEST_FILES)
    for i, name in enumerate(names):
        entry = {
            "batch_label": name,
            "labels": [int(v) for v in rng.integers(0, 10, n_per_batch)],
            "data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{j}.png" for j in range(n_per_batch)],
        }
        (base / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (base / cifar10.CIFAR10_META_FILE).write_bytes(pickle.dumps(meta, protocol=2))
    return {name: hashlib.md5((base / name).read_bytes()).hexdigest() for name in cifar10.CIFAR10_FILES}


def test_cifar10_checksum_mismatch_is_caught_before_unpickling(tmp_path, cache_dir, monkeypatch):
    _write_fake_cifar(tmp_path / "data" / "cifar-10-batches-py")
    monkeypatch.setattr(pickle, "load", _fail("unpickled an unverified file"))
    monkeypatch.setattr(pickle, "loads", _fail("unpickled an unverified file"))
    with pytest.raises(CifarlabError) as err:
        load_dataset("cifar10", tmp_path / "data", cache_dir=cache_dir)
    message = str(err.value)
    assert "md5" in message and "checksum" in message
    assert "data_batch_1" in message and "delete" in message and "re-download" in message


def test_cifar10_loads_verified_batches(tmp_path, cache_dir, monkeypatch):
    md5s = _write_fake_cifar(tmp_path / "data" / "cifar-10-batches-py")
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", md5s)
    ds = load_dataset("cifar10", tmp_path / "data", cache_dir=cache_dir)
    assert ds.name == "cifar10" and not ds.synthetic
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert ds.train.images.shape == (100, 3, 32, 32) and ds.test.images.shape == (20, 3, 32, 32)
    assert ds.train.labels.dtype == torch.int64
    assert ds.mean == CIFAR10_MEAN and ds.std == CIFAR10_STD
    assert ds.std != (0.2023, 0.1994, 0.2010)
    entry = pickle.loads((tmp_path / "data/cifar-10-batches-py/data_batch_1").read_bytes())
    assert torch.equal(ds.train.images[0], torch.from_numpy(entry["data"][0].reshape(3, 32, 32)))
    # A cache hit verifies nothing and unpickles nothing.
    monkeypatch.setattr(pickle, "load", _fail("unpickled despite the cache"))
    monkeypatch.setattr(cifar10, "_md5", _fail("hashed despite the cache"))
    again = load_dataset("cifar10", tmp_path / "data", cache_dir=cache_dir)
    assert torch.equal(again.train.images, ds.train.images)


def test_cifar10_missing_and_download_fails(tmp_path, cache_dir, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def offline(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, md5))
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(CifarlabError) as err:
        load_dataset("cifar10", tmp_path / "nodata", cache_dir=cache_dir)
    message = str(err.value)
    assert str(tmp_path / "nodata" / "cifar-10-batches-py") in message
    assert "--data" in message and "data_batch_1" in message and "network is unreachable" in message
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]


def test_cifar10_missing_without_download(tmp_path, cache_dir, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", _fail("must not download"))
    with pytest.raises(CifarlabError, match="--data"):
        load_dataset("cifar10", tmp_path, cache_dir=cache_dir, download=False)


# ============================================================================ Split.take


def make_split(labels: list[int]) -> Split:
    n = len(labels)
    ids = torch.arange(n)
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = (ids // 256).to(torch.uint8)
    images[:, 0, 0, 1] = (ids % 256).to(torch.uint8)
    return Split(images, torch.tensor(labels))


def split_ids(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()


def test_take_is_balanced_deterministic_and_nested():
    split = make_split([i % 10 for i in range(1000)])
    sub = split.take(95)
    assert len(sub) == 95
    counts = torch.bincount(sub.labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    again = split.take(95)
    assert torch.equal(sub.images, again.images) and torch.equal(sub.labels, again.labels)
    ids = split_ids(sub.images)
    assert torch.equal(ids, ids.sort().values), "original order is kept"
    assert set(split_ids(split.take(40).images).tolist()) <= set(ids.tolist())
    assert not torch.equal(ids[:10], torch.arange(10)), "a seeded shuffle, not simply the first samples"
    assert split.take(None) is split and split.take(1000) is split and split.take(5000) is split
    assert len(split.take(0)) == 0


def test_hold_out_splits_train_into_disjoint_balanced_parts():
    split = make_split([i % 10 for i in range(1000)])
    rest, held = split.hold_out(100)
    rest_ids, held_ids = split_ids(rest.images), split_ids(held.images)
    assert len(held) == 100 and len(rest) == 900
    assert set(rest_ids.tolist()).isdisjoint(held_ids.tolist())
    assert sorted(rest_ids.tolist() + held_ids.tolist()) == list(range(1000)), "every image lands in one part"
    assert torch.equal(torch.bincount(held.labels, minlength=10), torch.full((10,), 10))
    assert torch.equal(held.images, split.take(100).images), "the held-out part is take(n)"
    assert torch.equal(rest_ids, rest_ids.sort().values), "original order is kept"
    for bad in (0, 1000, -5):
        with pytest.raises(CifarlabError, match="hold out"):
            split.hold_out(bad)


def test_take_with_imbalanced_classes_uses_all_of_the_small_class():
    split = make_split([0] * 3 + [1] * 50 + [2] * 50)
    sub = split.take(30)
    assert torch.bincount(sub.labels, minlength=3).tolist() == [3, 14, 13]


# ============================================================================ DeviceLoader


IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # x == pixel value


def loader_ids(batches) -> list[int]:
    return [int(v) for x, _ in batches for v in (x[:, 0, 0, 0].round().long() * 256 + x[:, 0, 0, 1].round().long())]


def test_loader_sees_every_sample_once_per_epoch():
    split = make_split([i % 7 for i in range(103)])
    loader = DeviceLoader(split, 16, device="cpu", shuffle=True, seed=1, **IDENTITY)
    assert len(loader) == 7
    batches = list(loader)
    assert [x.shape[0] for x, _ in batches] == [16] * 6 + [7]
    ids = loader_ids(batches)
    assert sorted(ids) == list(range(103))
    assert ids != list(range(103))
    labels = torch.cat([y for _, y in batches])
    assert labels.dtype == torch.int64 and torch.equal(labels, split.labels[torch.tensor(ids)])
    x = batches[0][0]
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)


def test_loader_order_depends_only_on_seed_and_epoch():
    split = make_split([i % 5 for i in range(100)])
    a = DeviceLoader(split, 10, device="cpu", shuffle=True, seed=7, **IDENTITY)
    b = DeviceLoader(split, 10, device="cpu", shuffle=True, seed=7, **IDENTITY)
    c = DeviceLoader(split, 10, device="cpu", shuffle=True, seed=8, **IDENTITY)
    epoch0 = loader_ids(a)
    a.set_epoch(1)
    epoch1 = loader_ids(a)
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    b.set_epoch(1)
    assert loader_ids(b) == epoch1
    a.set_epoch(0)
    assert loader_ids(a) == epoch0, "re-iterating an epoch reproduces it"
    assert loader_ids(c) != epoch0
    plain = DeviceLoader(split, 10, device="cpu", shuffle=False, **IDENTITY)
    assert loader_ids(plain) == list(range(100))


def test_loader_drop_last():
    split = make_split([i % 5 for i in range(103)])
    loader = DeviceLoader(split, 16, device="cpu", shuffle=True, drop_last=True, **IDENTITY)
    assert len(loader) == 6
    batches = list(loader)
    assert len(batches) == 6 and all(x.shape[0] == 16 for x, _ in batches)
    assert len(set(loader_ids(batches))) == 96


def test_iter_from_equals_tail_of_full_pass_with_augmentation(tiny):
    ds = tiny
    kwargs = dict(device="cpu", mean=ds.mean, std=ds.std, shuffle=True, seed=3, augment=AugmentSpec.parse("crop,flip,cutout,rotate"))
    loader = DeviceLoader(ds.train, 32, **kwargs)
    loader.set_epoch(4)
    full = list(loader)
    for k in (0, 1, 3, len(full) - 1, len(full)):
        resumed = DeviceLoader(ds.train, 32, **kwargs)  # a fresh process resuming mid-epoch
        resumed.set_epoch(4)
        tail = list(resumed.iter_from(k))
        assert len(tail) == len(full) - k
        for (xa, ya), (xb, yb) in zip(full[k:], tail):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader.set_epoch(5)
    assert not torch.equal(list(loader)[0][0], full[0][0])
    with pytest.raises(ValueError):
        loader.iter_from(-1)


def test_augmentation_differs_per_batch_and_epoch_but_not_on_repeat(tiny):
    ds = tiny
    spec = AugmentSpec.parse("crop,flip,cutout")
    loader = DeviceLoader(ds.train, 64, device="cpu", mean=ds.mean, std=ds.std, shuffle=False, augment=spec)
    plain = DeviceLoader(ds.train, 64, device="cpu", mean=ds.mean, std=ds.std, shuffle=False)
    x0 = next(iter(loader))[0]
    assert not torch.equal(x0, next(iter(plain))[0])
    assert torch.equal(x0, next(iter(loader))[0])
    loader.set_epoch(1)
    assert not torch.equal(x0, next(iter(loader))[0]), "same images, new epoch -> new augmentation"


def test_augmentation_seeds_mix_in_batch_index_and_rank():
    # Identical images everywhere: any difference between outputs comes from the seeds.
    images = torch.full((64, 3, 32, 32), 100, dtype=torch.uint8)
    images[:, :, :, :16] = 200
    split = Split(images, torch.zeros(64, dtype=torch.int64))
    spec = AugmentSpec.parse("crop,flip,cutout")
    make = lambda rank, ws: DeviceLoader(split, 16, device="cpu", shuffle=False, augment=spec, rank=rank, world_size=ws, **IDENTITY)
    b0, b1 = [x for x, _ in make(0, 1)][:2]
    assert not torch.equal(b0, b1), "each batch must get its own augmentation stream"
    r0, r1 = next(iter(make(0, 2)))[0], next(iter(make(1, 2)))[0]
    assert not torch.equal(r0, r1), "each rank must get its own augmentation stream"


def test_world_size_two_shards_are_consistent():
    n = 101
    split = make_split([i % 5 for i in range(n)])
    ranks = [
        DeviceLoader(split, 8, device="cpu", shuffle=True, seed=2, rank=r, world_size=2, **IDENTITY) for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 7  # ceil(101/2)=51 samples -> 7 batches
    ids = [loader_ids(r) for r in ranks]
    assert len(ids[0]) == len(ids[1]) == 51
    assert set(ids[0]) | set(ids[1]) == set(range(n))
    assert len(set(ids[0]) & set(ids[1])) == 1, "only the wrap-around padding repeats"
    # Both ranks slice one shared permutation.
    single = DeviceLoader(split, 8, device="cpu", shuffle=True, seed=2, **IDENTITY)
    perm = single.epoch_indices().tolist()
    assert ids[0] == perm[0::2] and ids[1] == (perm + perm[:1])[1::2]
    for r in ranks:
        r.set_epoch(3)
    ids3 = [loader_ids(r) for r in ranks]
    assert ids3 != ids and set(ids3[0]) | set(ids3[1]) == set(range(n))


def test_world_size_larger_than_dataset_still_gives_equal_shards():
    split = make_split([0, 1, 2])
    loaders = [DeviceLoader(split, 2, device="cpu", shuffle=False, rank=r, world_size=8, **IDENTITY) for r in range(8)]
    assert {len(loader) for loader in loaders} == {1}
    assert sorted({i for loader in loaders for i in loader_ids(loader)}) == [0, 1, 2]


def test_normalization_uses_dataset_stats(tiny):
    ds = tiny
    loader = DeviceLoader(ds.train, 128, device="cpu", mean=ds.mean, std=ds.std, shuffle=True)
    x = torch.cat([x for x, _ in loader]).double()
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    # Matches the textbook formula exactly.
    expected = (ds.train.images[:5].float() / 255 - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    first = next(iter(DeviceLoader(ds.train, 5, device="cpu", mean=ds.mean, std=ds.std, shuffle=False)))[0]
    assert torch.allclose(first, expected, atol=1e-5)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
)
def test_normalize_is_bit_identical_to_loader_batches(tiny, device):
    """The public normalize() and DeviceLoader's unaugmented batches are one arithmetic."""
    ds = tiny
    loader = DeviceLoader(ds.train, 48, device=device, mean=ds.mean, std=ds.std, shuffle=True, seed=4)
    loader.set_epoch(2)
    order = loader.epoch_indices().cpu()
    for b, (x, _) in enumerate(loader):
        images = ds.train.images[order[b * 48 : (b + 1) * 48]]
        assert torch.equal(x, normalize(images, ds.mean, ds.std, device=device)), f"batch {b}"
        assert torch.equal(x, normalize(images.to(device), ds.mean, ds.std)), "device defaults to the images'"
    scale, shift = normalization(ds.mean, ds.std)
    assert scale.dtype == shift.dtype == torch.float32 and scale.shape == shift.shape == (1, 3, 1, 1)
    expected = (ds.train.images[:8].double() / 255 - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    assert torch.allclose(normalize(ds.train.images[:8], ds.mean, ds.std).double(), expected, atol=1e-5)


def test_loader_channels_last_and_device_residency(tiny):
    ds = tiny
    loader = DeviceLoader(
        ds.train, 16, device="cpu", mean=ds.mean, std=ds.std, shuffle=True, channels_last=True, augment=AugmentSpec(crop_pad=2)
    )
    assert loader.images_on_device.dtype == torch.uint8 and loader.images_on_device.device.type == "cpu"
    x, y = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (16, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda_never_syncs_per_batch(tiny):
    ds = tiny
    spec = AugmentSpec.parse("crop,flip,cutout,rotate")
    loader = DeviceLoader(ds.train, 64, device="cuda", mean=ds.mean, std=ds.std, shuffle=True, augment=spec, channels_last=True)
    cpu = DeviceLoader(ds.train, 64, device="cpu", mean=ds.mean, std=ds.std, shuffle=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Same order on both devices: the permutation is drawn on the CPU.
    assert torch.equal(torch.cat([y.cpu() for _, y in batches]), torch.cat([y for _, y in cpu]))


def test_alternate_flip_mirrors_each_image_every_other_epoch_and_resumes_exactly():
    """flip:alt: epoch e shows image i mirrored iff epoch e-1 did not; the first epoch's
    flips are random (about half), and a loader rebuilt from the same seed agrees."""
    from cifarlab.data import AugmentSpec, DeviceLoader

    n = 64
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    split = Split(images, torch.arange(n))  # label = image index, to undo the shuffle
    def epoch_views(loader, epoch):
        loader.set_epoch(epoch)
        xs, ys = zip(*loader)
        x, y = torch.cat(xs), torch.cat(ys)
        return x[torch.argsort(y)]
    kw = dict(device="cpu", mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, augment=AugmentSpec.parse("flip:alt"), seed=3)
    loader = DeviceLoader(split, 16, **kw)
    plain = DeviceLoader(split, 16, device="cpu", mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=False)
    x0 = torch.cat([x for x, _ in plain])
    views = [epoch_views(loader, e) for e in range(3)]
    flipped0 = torch.tensor([torch.equal(views[0][i], x0[i].flip(-1)) for i in range(n)])
    assert 16 < int(flipped0.sum()) < 48
    for i in range(n):
        assert torch.equal(views[1][i], views[0][i].flip(-1)), "epoch 1 mirrors epoch 0"
        assert torch.equal(views[2][i], views[0][i]), "epoch 2 repeats epoch 0"
    assert torch.equal(epoch_views(DeviceLoader(split, 16, **kw), 1), views[1])
