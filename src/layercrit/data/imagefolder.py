"""Image folders in the ImageNet validation layout: one subfolder per class, the images inside it.

Classes are the sorted subfolder names (label i = i-th name); hidden entries (starting with ".")
are ignored, so a stray `.ipynb_checkpoints` cannot shift the labels. Files with an image extension
(case-insensitive) are taken in sorted order. Each image is decoded with Pillow, converted to RGB,
resized bilinearly so that its short side is `resize` and center-cropped to `crop`×`crop` (the
arithmetic of torchvision's `Resize(256)` + `CenterCrop(224)`), then scaled to [0, 1].

The tensors are then normalized per channel by `mean` and `std` (ImageNet's by default, what
torchvision's and timm's pretrained weights expect), so every consumer — `measure`, `train`,
`robustness`, sweeps — gives a model the inputs it was trained on; `meta["normalization"]` records
the constants (distribution shifts un-normalize with them). `mean=(0, 0, 0), std=(1, 1, 1)` keeps
the [0, 1] pixels; `wrap_normalized` puts the normalization inside a model instead.

Unreadable images are skipped, listed in `meta["skipped"]` and reported in one warning (a single
damaged file should not abort the evaluation of 50,000); `meta["files"]` lists the images kept, in
the order of `x`. `strict=True` fails on the first unreadable image instead. Decoded images are
cached on disk (`layercrit.data.cache`), so only the first load of a folder pays for decoding.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm.auto import tqdm

from ..errors import LayercritError, check_int
from . import cache as _cache
from .base import Dataset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "Normalize", "load_imagefolder", "wrap_normalized"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What Pillow raises for a damaged or unsupported file (UnidentifiedImageError is an OSError;
# some plugins report broken headers as SyntaxError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class Normalize(nn.Module):
    """`(x - mean) / std` per channel of (N, C, H, W) inputs.

    `mean` and `std` are non-persistent buffers: they follow `.to(device)` but stay out of state dicts.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not len(mean) or min(std) <= 0:
            raise LayercritError(f"Expected one mean and one positive std per channel, got mean={mean} std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def wrap_normalized(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """`nn.Sequential(normalize=Normalize(mean, std), model=model)`: normalizes, then calls `model`.

    The wrapped model is the child named `model` (the same object, not a copy), so its parameters
    appear as `model.<name>` in the wrapper: `wrapper.model.load_state_dict(sd)` takes a plain state
    dict, and `wrapper.state_dict()` equals the model's with keys prefixed by `model.` (the
    normalization constants are not saved). Typical use: `wrap_normalized(net, **data.meta["normalize"])`.
    """
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), model=model))


def _decode(path: Path, resize: int, crop: int, draft: bool) -> np.ndarray:
    """One image as uint8 (3, crop, crop): RGB, short side resized to `resize` (bilinear), center crop."""
    with Image.open(path) as img:
        if draft and img.format == "JPEG":
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale while both sides stay >= `resize`: several
            # times faster for large photos; pixels then differ slightly from a full-size decode.
            img.draft("RGB", (resize, resize))
        img = img.convert("RGB")
    w, h = img.size
    long = int(resize * max(w, h) / min(w, h))  # torchvision's rounding (truncation)
    size = (resize, long) if w <= h else (long, resize)
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    return np.asarray(img.crop((left, top, left + crop, top + crop))).transpose(2, 0, 1)


def _list(root: Path) -> tuple[list[str], list[str], list[int]]:
    """(classes, files relative to `root` as "class/name", labels)."""
    if not root.is_dir():
        raise LayercritError(f"image folder {str(root)!r} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise LayercritError(
            f"image folder {str(root)!r} has no class subfolders; expected one subfolder of images per class"
        )
    files, labels = [], []
    for label, c in enumerate(classes):
        names = sorted(
            p.name
            for p in (root / c).iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        )
        files += [f"{c}/{n}" for n in names]
        labels += [label] * len(names)
    if not files:
        raise LayercritError(
            f"image folder {str(root)!r} has no images ({' '.join(IMAGE_EXTENSIONS)}) in its {len(classes)} class folders"
        )
    return classes, files, labels


def _decode_all(
    root: Path, files: list[str], labels: list[int], resize: int, crop: int, draft: bool, strict: bool
) -> dict:
    x = np.empty((len(files), 3, crop, crop), dtype=np.uint8)
    keep = np.ones(len(files), dtype=bool)
    # Decoding 50,000 ImageNet files takes minutes: a bar with its ETA on a terminal (not in logs or pipes).
    bar = tqdm(files, desc=f"decoding {root.name}", unit="img", disable=None if len(files) >= 500 else True, leave=False)
    for i, name in enumerate(bar):
        try:
            x[i] = _decode(root / name, resize, crop, draft)
        except _DECODE_ERRORS as e:
            if strict:
                raise LayercritError(
                    f"image {str(root / name)!r} cannot be read ({type(e).__name__}: {e}); "
                    "fix or remove it, or load with strict=False to skip unreadable images"
                ) from None
            keep[i] = False
    if not keep.all():
        x = x[keep]
    return {
        "x": torch.from_numpy(x),
        "y": torch.tensor(labels, dtype=torch.int64)[torch.from_numpy(keep)],
        "files": [f for f, k in zip(files, keep) if k],
        "skipped": [f for f, k in zip(files, keep) if not k],
    }


def _valid(entry: dict | None, crop: int) -> bool:
    if entry is None:
        return False
    x, y, files = entry.get("x"), entry.get("y"), entry.get("files")
    return (
        isinstance(x, torch.Tensor)
        and x.dtype == torch.uint8
        and tuple(x.shape[1:]) == (3, crop, crop)
        and isinstance(y, torch.Tensor)
        and y.dtype == torch.int64
        and isinstance(files, list)
        and isinstance(entry.get("skipped"), list)
        and len(x) == len(y) == len(files)
    )


def load_imagefolder(
    path: str | Path,
    resize: int = 256,
    crop: int = 224,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    strict: bool = False,
    cache: bool = True,
    draft: bool = True,
    spec: str | None = None,
) -> Dataset:
    """Every image of a class-per-subfolder folder as (N, 3, crop, crop) float32, `(pixels/255 − mean)/std`.

    Args:
        path: the folder holding one subfolder per class.
        resize: length of the short side after resizing.
        crop: side of the center crop (at most `resize`).
        mean: per-channel mean of the [0, 1] pixels subtracted (ImageNet's by default).
        std: per-channel std divided by.
        strict: fail on the first unreadable image instead of skipping it.
        cache: reuse decoded images from the on-disk cache and store them there.
        draft: let JPEGs much larger than needed decode at reduced size (faster; `False` reproduces a
            full-size decode exactly, as torchvision does).
        spec: the data spec recorded in the Dataset (default `imagefolder:<path>`).
    """
    for name, v in (("resize", resize), ("crop", crop)):
        check_int(name, v)
    if crop > resize:
        raise LayercritError(f"Expected `crop` ({crop}) to be at most `resize` ({resize})")
    normalize = {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    Normalize(**normalize)  # validates mean/std now rather than when the model is wrapped
    root = Path(path)
    classes, files, labels = _list(root)
    params = {"resize": resize, "crop": crop, "draft": draft, "classes": classes, "labels": labels}
    key = _cache.cache_key("imagefolder", root, files, params) if cache else None
    entry = _cache.load_cached("imagefolder", key) if cache else None
    # A strict load re-decodes an entry with skipped files, so it fails with the decoder's own message.
    cached = _valid(entry, crop) and not (strict and entry["skipped"])
    if not cached:
        entry = _decode_all(root, files, labels, resize, crop, draft, strict)
        if cache:
            _cache.save_cached("imagefolder", key, entry)
    skipped = entry["skipped"]
    if not entry["files"]:
        raise LayercritError(f"none of the {len(files)} images in {str(root)!r} could be read (first: {skipped[0]})")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable images (first: {root / skipped[0]})", stacklevel=2)
    x = entry["x"].float().div_(255.0)
    x.sub_(torch.tensor(normalize["mean"]).view(1, -1, 1, 1)).div_(torch.tensor(normalize["std"]).view(1, -1, 1, 1))
    return Dataset(
        x,
        entry["y"],
        spec=spec or f"imagefolder:{root}",
        num_classes=len(classes),
        meta={
            "format": "imagefolder",
            "split": "all",
            "path": str(root),
            "classes": classes,
            "files": entry["files"],
            "skipped": skipped,
            "normalize": normalize,
            "normalization": normalize,  # x = (pixels / 255 - mean) / std per channel
            "resize": resize,
            "crop": crop,
            "cached": cached,
        },
    )
