"""CIFAR-10, MNIST and image-folder loaders on small files written in the real formats."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from layercrit.data import Normalize, load_cifar10, load_data, load_imagefolder, load_mnist, wrap_normalized
from layercrit.data import cache as data_cache
from layercrit.data import imagefolder as imagefolder_mod
from layercrit.errors import LayercritError


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Every test gets its own cache folder: nothing is written to ~/.cache."""
    monkeypatch.setenv(data_cache.ENV_VAR, str(tmp_path / "cache"))


# ---------------------------------------------------------------- CIFAR-10


def _batch(path, data, labels) -> None:
    """A batch as the CIFAR distribution stores it: protocol-2 pickle with bytes keys."""
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"training batch", b"data": data, b"labels": labels}, f, protocol=2)


def _cifar(root, n=4, n_test=6, skip=()):
    """Five training batches of `n` random images and a test batch; returns {file: (data, labels)}."""
    rng = np.random.default_rng(0)
    root.mkdir()
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        k = n_test if name == "test_batch" else n
        data, labels = rng.integers(0, 256, (k, 3072), dtype=np.uint8), rng.integers(0, 10, k).tolist()
        if name not in skip:
            _batch(root / name, data, labels)
        out[name] = (data, labels)
    return out


def test_cifar_splits_shapes_and_normalization(tmp_path):
    batches = _cifar(tmp_path / "c")
    train = load_cifar10(tmp_path / "c", "train")
    test = load_cifar10(tmp_path / "c", "test")
    raw_train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]) / 255.0
    assert train.x.shape == (20, 3, 32, 32) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64
    assert train.y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert test.y.tolist() == batches["test_batch"][1]
    # Zhang et al.: one scalar mean/std over all training pixels -> the training split is standardized.
    assert abs(float(train.x.double().mean())) < 1e-6 and abs(float(train.x.double().std(correction=0)) - 1) < 1e-6
    assert train.meta["mean"] == pytest.approx(raw_train.mean()) and train.meta["std"] == pytest.approx(raw_train.std())
    # The test split reuses the training statistics; rows are the R, G, B 32×32 planes.
    mean, std = train.meta["mean"], train.meta["std"]
    expected = (batches["test_batch"][0].reshape(6, 3, 32, 32) / 255.0 - mean) / std
    np.testing.assert_allclose(test.x.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert test.meta | {"mean": 0} == {
        "format": "cifar10",
        "split": "test",
        "path": str(tmp_path / "c"),
        "mean": 0,
        "std": std,
        "normalization": {"mean": mean, "std": std},  # what distribution shifts un-normalize with
    }
    assert test.num_classes == train.num_classes == 10


def test_cifar_accepts_numpy1_global_name(tmp_path):
    """Real CIFAR pickles name `numpy.core.multiarray._reconstruct` (numpy 1); numpy 2 writes `numpy._core`."""
    _cifar(tmp_path / "c")
    path = tmp_path / "c" / "test_batch"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert load_cifar10(tmp_path / "c", "test").x.shape == (6, 3, 32, 32)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_foreign_globals_without_running_them(tmp_path):
    _cifar(tmp_path / "c")
    marker = tmp_path / "executed"
    with open(tmp_path / "c" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(LayercritError, match=r"data_batch_2' refers to \w+\.system, which is refused"):
        load_cifar10(tmp_path / "c", "train")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("data", "labels", "match"),
    [
        (np.zeros((2, 3000), np.uint8), [0, 1], "has data rows of 3000 bytes; expected 3072"),
        (np.zeros((2, 3072), np.float32), [0, 1], "has data of float32 and shape"),
        (np.zeros((2, 3072), np.uint8), [0], "has 2 images but 1 labels"),
        (np.zeros((2, 3072), np.uint8), [0, 10], r"has labels in 0\.\.10; expected 0\.\.9"),
        (np.zeros((2, 3072), np.uint8), [b"a", b"b"], "has labels of dtype .*; expected a list of integers"),
    ],
)
def test_cifar_bad_batch(tmp_path, data, labels, match):
    _cifar(tmp_path / "c")
    _batch(tmp_path / "c" / "data_batch_4", data, labels)
    with pytest.raises(LayercritError, match="data_batch_4' " + match):
        load_cifar10(tmp_path / "c", "train")


def test_cifar_unreadable_and_missing_files(tmp_path):
    _cifar(tmp_path / "c", skip=("data_batch_3", "data_batch_5"))
    with pytest.raises(LayercritError, match=r"lacks data_batch_3, data_batch_5; expected data_batch_1\.\.5"):
        load_cifar10(tmp_path / "c", "train")
    _cifar(tmp_path / "t", skip=[f"data_batch_{i}" for i in range(1, 6)])
    with pytest.raises(LayercritError, match="lacks data_batch_1.* normalize the test split too"):
        load_cifar10(tmp_path / "t", "test")
    _cifar(tmp_path / "g")
    (tmp_path / "g" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(LayercritError, match="test_batch' is not a readable pickle"):
        load_cifar10(tmp_path / "g", "test")
    with pytest.raises(LayercritError, match="unknown CIFAR-10 split 'val'"):
        load_cifar10(tmp_path / "g", "val")
    with pytest.raises(LayercritError, match="CIFAR-10 folder .*nowhere' does not exist"):
        load_cifar10(tmp_path / "nowhere")


# ---------------------------------------------------------------- MNIST


def _idx(arr: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic or (2051 if arr.ndim == 3 else 2049)
    return struct.pack(f">{1 + arr.ndim}i", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def _mnist(root, gz=False, train=True):
    """IDX files of 12 train and 5 test random images; returns {name: array}."""
    rng = np.random.default_rng(1)
    root.mkdir()
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5),
    }
    for name, arr in arrays.items():
        if train or name.startswith("t10k"):
            raw = _idx(arr)
            (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_splits(tmp_path, gz):
    arrays = _mnist(tmp_path / "m", gz=gz)
    train = load_mnist(tmp_path / "m", "train")
    test = load_mnist(tmp_path / "m", "test")
    assert train.x.shape == (12, 1, 28, 28) and train.x.dtype == torch.float32 and test.x.shape == (5, 1, 28, 28)
    assert train.y.dtype == torch.int64 and train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert abs(float(train.x.double().mean())) < 1e-6 and abs(float(train.x.double().std(correction=0)) - 1) < 1e-6
    raw = arrays["train-images-idx3-ubyte"] / 255.0
    assert train.meta["mean"] == pytest.approx(raw.mean()) and train.meta["std"] == pytest.approx(raw.std())
    expected = (arrays["t10k-images-idx3-ubyte"][:, None] / 255.0 - raw.mean()) / raw.std()
    np.testing.assert_allclose(test.x.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert (test.meta["format"], test.meta["split"], test.meta["stats_from"], test.num_classes) == (
        "mnist",
        "test",
        "train",
        10,
    )


def test_mnist_test_only_uses_own_stats(tmp_path):
    _mnist(tmp_path / "m", train=False)
    with pytest.warns(UserWarning, match="no training images; normalizing the test split with its own"):
        test = load_mnist(tmp_path / "m", "test")
    assert test.meta["stats_from"] == "test" and abs(float(test.x.double().mean())) < 1e-6
    with pytest.raises(LayercritError, match="has no train split; expected train-images-idx3-ubyte and"):
        load_mnist(tmp_path / "m", "train")


def test_mnist_bad_files(tmp_path):
    arrays = _mnist(tmp_path / "m")
    images = tmp_path / "m" / "train-images-idx3-ubyte"
    images.write_bytes(_idx(arrays["train-images-idx3-ubyte"], magic=2049))
    with pytest.raises(LayercritError, match="train-images-idx3-ubyte' has magic number 2049; expected 2051"):
        load_mnist(tmp_path / "m", "train")
    images.write_bytes(_idx(arrays["train-images-idx3-ubyte"])[:-100])
    with pytest.raises(LayercritError, match=r"train-images-idx3-ubyte' has 9324 bytes but .* needs 9424; .*truncated"):
        load_mnist(tmp_path / "m", "train")
    images.write_bytes(b"\x00\x00")
    with pytest.raises(LayercritError, match="has 2 bytes, shorter than its 16-byte header"):
        load_mnist(tmp_path / "m", "train")
    images.write_bytes(_idx(arrays["train-images-idx3-ubyte"][:11]))
    with pytest.raises(LayercritError, match="hold 11 images but 12 labels"):
        load_mnist(tmp_path / "m", "train")
    images.unlink()
    (tmp_path / "m" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(LayercritError, match=r"train-images-idx3-ubyte.gz' cannot be read"):
        load_mnist(tmp_path / "m", "train")
    (tmp_path / "m" / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(LayercritError, match=r"lacks train-images-idx3-ubyte \(or train-images-idx3-ubyte.gz\)"):
        load_mnist(tmp_path / "m", "test")


# ---------------------------------------------------------------- image folders


def _save(path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _folder(root):
    """Classes dog (2 PNG), ant (1 JPEG), cat (1 PNG, 1 JPEG), all larger than 256 px; returns their colours."""
    colours = {
        "dog/b.png": (200, 0, 0),
        "dog/a.PNG": (0, 200, 0),
        "ant/x.jpg": (9, 9, 9),
        "cat/z.jpeg": (50, 100, 150),
        "cat/c.png": (1, 2, 3),
    }
    for name, colour in colours.items():
        _save(root / name, np.broadcast_to(np.array(colour), (300, 320, 3)))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return colours


RAW = {"mean": (0, 0, 0), "std": (1, 1, 1)}  # the [0, 1] pixels themselves, for geometry checks


def test_imagefolder_classes_order_and_values(tmp_path):
    _folder(tmp_path / "f")
    data = load_imagefolder(tmp_path / "f", resize=16, crop=12)
    assert data.meta["classes"] == ["ant", "cat", "dog"] and data.num_classes == 3
    assert data.meta["files"] == ["ant/x.jpg", "cat/c.png", "cat/z.jpeg", "dog/a.PNG", "dog/b.png"]
    assert data.y.tolist() == [0, 1, 1, 2, 2]
    assert data.x.shape == (5, 3, 12, 12) and data.x.dtype == torch.float32
    # Uniform PNGs keep their colour exactly through resize and crop: (colour / 255 - mean) / std per
    # channel, ImageNet's constants by default (what pretrained torchvision/timm weights expect).
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for i, colour in ((1, [1.0, 2.0, 3.0]), (4, [200.0, 0, 0])):
        expected = ((torch.tensor(colour).div(255).view(3, 1, 1) - mean) / std).expand(3, 12, 12)
        torch.testing.assert_close(data.x[i], expected, rtol=0, atol=1e-6)
    assert data.meta["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    raw = load_imagefolder(tmp_path / "f", resize=16, crop=12, **RAW)
    assert torch.equal(raw.x[1], torch.tensor([1.0, 2.0, 3.0]).div(255).view(3, 1, 1).expand(3, 12, 12))
    assert (data.meta["format"], data.meta["split"], data.meta["skipped"]) == ("imagefolder", "all", [])


def test_imagefolder_default_resize_and_crop(tmp_path):
    """A 400×300 image: short side to 256 (341×256, torchvision truncates), center crop 224 from (58, 16)."""
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (300, 400, 3))
    _save(tmp_path / "f" / "a" / "img.png", arr)
    data = load_imagefolder(tmp_path / "f", cache=False, **RAW)
    assert data.x.shape == (1, 3, 224, 224)
    ref = np.asarray(Image.fromarray(arr.astype(np.uint8)).resize((341, 256), Image.BILINEAR))[16:240, 58:282]
    assert torch.equal(data.x[0], torch.from_numpy(ref.transpose(2, 0, 1).copy()).float() / 255)


def test_imagefolder_center_crop_offsets(tmp_path):
    """9×6 image, short side already 6: no resampling; crop 4 starts at top 1, left round(2.5) = 2."""
    arr = np.arange(9 * 6 * 3).reshape(6, 9, 3) % 256
    _save(tmp_path / "f" / "a" / "img.png", arr)
    data = load_imagefolder(tmp_path / "f", resize=6, crop=4, cache=False, **RAW)
    assert torch.equal(data.x[0] * 255, torch.from_numpy(arr[1:5, 2:6].transpose(2, 0, 1)).float())


def test_imagefolder_jpeg_draft_close_to_full_decode(tmp_path):
    y, x = np.mgrid[0:1000, 0:1200]
    _save(tmp_path / "f" / "a" / "big.jpg", np.stack([x % 256, y % 256, (x + y) // 10 % 256], -1))
    fast = load_imagefolder(tmp_path / "f", resize=64, crop=48, cache=False, **RAW)
    full = load_imagefolder(tmp_path / "f", resize=64, crop=48, cache=False, draft=False, **RAW)
    assert fast.x.shape == full.x.shape == (1, 3, 48, 48)
    assert float((fast.x - full.x).abs().mean()) < 0.05


def test_wrap_normalized():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    wrapped = wrap_normalized(model, mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 2.0])
    x = torch.rand(2, 3, 2, 2)
    mean, std = torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1), torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    assert torch.allclose(wrapped(x), model((x - mean) / std))
    assert wrapped.model is model
    assert list(wrapped.state_dict()) == [f"model.{k}" for k in model.state_dict()]
    with pytest.raises(LayercritError, match="one mean and one positive std per channel"):
        Normalize([0.5, 0.5], [1.0])


def test_imagefolder_cache(tmp_path, monkeypatch):
    _folder(tmp_path / "f")
    calls = []
    decode = imagefolder_mod._decode
    monkeypatch.setattr(imagefolder_mod, "_decode", lambda *a: calls.append(a[0].name) or decode(*a))

    def load(**kw):
        calls.clear()
        return load_imagefolder(tmp_path / "f", **{"resize": 16, "crop": 12} | kw)

    first = load()
    assert len(calls) == 5 and not first.meta["cached"]
    entries = list((tmp_path / "cache").glob("imagefolder-*.pt"))
    assert len(entries) == 1
    second = load()
    assert calls == [] and second.meta["cached"]
    assert (
        torch.equal(first.x, second.x)
        and torch.equal(first.y, second.y)
        and first.meta == second.meta | {"cached": False}
    )
    os.utime(tmp_path / "f" / "cat" / "c.png", ns=(1, 1))  # new mtime: new key
    assert len(load().x) == 5 and len(calls) == 5
    _save(tmp_path / "f" / "cat" / "c.png", np.zeros((300, 300, 3)))
    os.utime(tmp_path / "f" / "cat" / "c.png", ns=(1, 1))  # same mtime as before, new size: new key
    assert load(**RAW).x[1].max() == 0 and len(calls) == 5
    assert load(crop=8).x.shape == (5, 3, 8, 8) and len(calls) == 5  # other transform: other key
    for entry in (tmp_path / "cache").glob("imagefolder-*.pt"):
        entry.write_bytes(b"garbage")  # a damaged entry is decoded again and overwritten, never fatal
    assert torch.equal(load().x[0], first.x[0]) and len(calls) == 5
    load()
    assert calls == []
    load(cache=False)
    assert len(calls) == 5
    monkeypatch.setenv(data_cache.ENV_VAR, str(tmp_path / "f" / "cat" / "c.png"))  # a file: not writable
    with pytest.warns(UserWarning, match="could not write the data cache .*; data will be decoded again"):
        assert len(load().x) == 5


def test_imagefolder_unreadable_images(tmp_path):
    _folder(tmp_path / "f")
    (tmp_path / "f" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    buf = io.BytesIO()
    Image.fromarray(np.full((300, 300, 3), 7, np.uint8)).save(buf, format="JPEG")
    (tmp_path / "f" / "dog" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable images \(first: .*cat/bad.jpg\)"):
        data = load_imagefolder(tmp_path / "f", resize=16, crop=12)
    assert data.meta["skipped"] == ["cat/bad.jpg", "dog/cut.jpg"]
    assert data.meta["files"] == ["ant/x.jpg", "cat/c.png", "cat/z.jpeg", "dog/a.PNG", "dog/b.png"]
    assert data.y.tolist() == [0, 1, 1, 2, 2] and len(data.x) == 5
    with pytest.warns(UserWarning, match="skipped 2"):  # also when served from the cache
        assert load_imagefolder(tmp_path / "f", resize=16, crop=12).meta["cached"]
    for cache in (True, False):
        with pytest.raises(LayercritError, match=r"image '.*cat/bad.jpg' cannot be read .*strict=False"):
            load_imagefolder(tmp_path / "f", resize=16, crop=12, strict=True, cache=cache)


def test_imagefolder_empty_or_unusable(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayercritError, match="'.*empty' has no class subfolders"):
        load_imagefolder(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("")
    with pytest.raises(LayercritError, match=r"has no images \(.jpg .*\) in its 1 class folders"):
        load_imagefolder(tmp_path / "noimg")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(LayercritError, match=r"none of the 1 images .* could be read \(first: a/x.png\)"):
        load_imagefolder(tmp_path / "bad")
    with pytest.raises(LayercritError, match="does not exist"):
        load_imagefolder(tmp_path / "nowhere")
    with pytest.raises(LayercritError, match=r"Expected `crop` \(32\) to be at most `resize` \(16\)"):
        load_imagefolder(tmp_path / "bad", resize=16, crop=32)
    with pytest.raises(LayercritError, match="Expected `resize` to be a positive integer, got 0"):
        load_imagefolder(tmp_path / "bad", resize=0)


# ---------------------------------------------------------------- load_data dispatch


def test_load_data_dispatch(tmp_path):
    c, m, f = tmp_path / "cifar-10-batches-py", tmp_path / "mnist", tmp_path / "imgs"
    _cifar(c)
    _mnist(m, gz=True)
    (f / "b").mkdir(parents=True)
    _save(f / "a" / "x.png", np.full((260, 270, 3), 255))
    cases = {  # (spec, split argument): (format, split, samples)
        (f"cifar10:{c}", None): ("cifar10", "test", 6),
        (f"cifar10:{c}:train", "test"): ("cifar10", "train", 20),  # the spec's split wins
        (f"mnist:{m}:test", None): ("mnist", "test", 5),
        (f"mnist:{m}", "train"): ("mnist", "train", 12),
        (str(c), "train"): ("cifar10", "train", 20),
        (str(m), None): ("mnist", "test", 5),
        (f"imagefolder:{f}", "train"): ("imagefolder", "all", 1),
        (str(f), None): ("imagefolder", "all", 1),
    }
    for (spec, split_arg), (fmt, split, n) in cases.items():
        data = load_data(spec, split=split_arg)
        assert (data.meta["format"], data.meta["split"], len(data), data.spec) == (fmt, split, n, spec), spec
    image = load_data(str(f))
    assert image.num_classes == 2 and image.x.shape == (1, 3, 224, 224) and torch.allclose(image.x * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
                                                                                + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
                                                                                torch.ones(1, 3, 224, 224))
    (tmp_path / "plain").mkdir()
    with pytest.raises(LayercritError, match="holds no CIFAR-10 batches .* name its format"):
        load_data(str(tmp_path / "plain"))
    with pytest.raises(LayercritError, match="data spec 'cifar10:' names no folder"):
        load_data("cifar10:")
    with pytest.raises(LayercritError, match=r"unknown data spec 'nothing'; expected 'digits.*cifar10:DIR\[:train"):
        load_data("nothing")
