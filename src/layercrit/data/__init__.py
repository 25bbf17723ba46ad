"""Data loading: `load_data(spec)` turns a data spec into a `Dataset` of tensors.

Specs:
    `digits` (the test split; `digits:train`, `digits:all`): scikit-learn's 8×8 digits.
    `path/to/file.npz`: arrays `x` and optional `y`, or named model inputs (`input_ids`, …) and
        optional `labels`.
    `text:FILE`: a text file tokenized by a local Hugging Face tokenizer (`tokenizer=DIR`), packed
        into windows of `seq_len` tokens every `stride` tokens.
    `cifar10:DIR[:train|test]`: a `cifar-10-batches-py` folder.
    `mnist:DIR[:train|test]`: a folder with the four MNIST IDX files (optionally `.gz`).
    `imagefolder:DIR`: one subfolder of images per class (ImageNet validation layout; one split).
    `DIR`: detected: CIFAR-10 batches (`data_batch_1` or `test_batch`), else MNIST IDX files
        (`*-idx3-ubyte*`), else an image folder (has subfolders).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import LayercritError
from .base import Dataset
from .cifar import load_cifar10
from .digits import load_digits
from .imagefolder import Normalize, load_imagefolder, wrap_normalized
from .inputs import as_inputs
from .mnist import load_mnist
from .npz import load_npz
from .text import load_text

__all__ = [
    "SPECS",
    "api_inputs",
    "as_dataset",
    "Dataset",
    "Normalize",
    "held_out_spec",
    "load_cifar10",
    "load_data",
    "load_digits",
    "load_imagefolder",
    "load_mnist",
    "load_npz",
    "load_text",
    "wrap_normalized",
]

# Every form of a data spec and what it loads (help texts list them all; keep in step with `load_data`).
SPECS: dict[str, str] = {
    "digits[:train|test|all]": "scikit-learn's 8×8 digits (default split: test for evaluation, train for training)",
    "FILE.npz": "arrays x (inputs, used as given) and optionally y (integer labels); or named model inputs "
                "(input_ids, attention_mask, …: integer dtypes kept) and optionally labels",
    "text:FILE": "a text file tokenized by a local Hugging Face tokenizer (--tokenizer DIR), packed into windows "
                 "of --seq-len tokens every --stride tokens",
    "cifar10:DIR[:train|test]": "a cifar-10-batches-py folder",
    "mnist:DIR[:train|test]": "a folder with the four MNIST IDX files (optionally .gz)",
    "imagefolder:DIR": "one subfolder of images per class (ImageNet validation layout), resized and center-cropped",
    "DIR": "a data folder, its format detected: CIFAR-10 batches, MNIST IDX files or class subfolders",
}
SPEC_FORMS = (
    "'digits[:train|test|all]', 'cifar10:DIR[:train|test]', 'mnist:DIR[:train|test]', 'imagefolder:DIR', "
    "'text:FILE', a file ending in .npz or a data folder"
)
_SPLIT_LOADERS = {"cifar10": load_cifar10, "mnist": load_mnist}


def _detect(folder: Path) -> str | None:
    """The format of a bare data folder, or None."""
    if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
        return "cifar10"
    if any(folder.glob("*-idx3-ubyte*")):
        return "mnist"
    if any(p.is_dir() for p in folder.iterdir()):
        return "imagefolder"
    return None


def load_data(spec: str, split: str | None = None, *, tokenizer: str | Path | None = None, seq_len: int | None = None,
              stride: int | None = None) -> Dataset:
    """Load a data spec.

    Args:
        spec: `digits[:train|test|all]`, `cifar10:DIR[:train|test]`, `mnist:DIR[:train|test]`,
            `imagefolder:DIR`, `text:FILE`, a `.npz` file or a data folder (format detected).
        split: default split when the spec names none ("test" for evaluation, "train" for training);
            ignored by `.npz` files and image folders, which hold one split.
        tokenizer, seq_len, stride: for `text:FILE` only (see `load_text`): a local Hugging Face
            tokenizer folder, tokens per window, tokens between window starts.
    """
    if not isinstance(spec, str) or not spec:
        raise LayercritError(f"Expected a data spec such as 'digits', 'cifar10:DIR' or 'file.npz', got {spec!r}")
    name, _, rest = spec.partition(":")
    if name == "text":
        if not rest:
            raise LayercritError(f"data spec {spec!r} names no file; expected 'text:FILE'")
        return load_text(rest, tokenizer, seq_len, stride, spec=spec)
    given = [flag for flag, v in (("--tokenizer", tokenizer), ("--seq-len", seq_len), ("--stride", stride)) if v is not None]
    if given:
        raise LayercritError(f"{', '.join(given)} apply to text:FILE data only, not to {spec!r}")
    if name == "digits":
        return load_digits(rest or split or "test")
    if name in _SPLIT_LOADERS or name == "imagefolder":
        if not rest:
            raise LayercritError(f"data spec {spec!r} names no folder; expected '{name}:DIR'")
        folder, _, last = rest.rpartition(":")
        if name == "imagefolder" or last not in ("train", "test"):
            folder, last = rest, None  # no split suffix: the whole rest is the folder (it may contain ':')
        if name == "imagefolder":
            return load_imagefolder(folder, spec=spec)
        return _SPLIT_LOADERS[name](folder, last or split or "test", spec=spec)
    path = Path(spec)
    if path.suffix.lower() == ".npz":
        return load_npz(path, spec)
    if path.is_dir():
        fmt = _detect(path)
        if fmt == "imagefolder":
            return load_imagefolder(path, spec=spec)
        if fmt is not None:
            return _SPLIT_LOADERS[fmt](path, split or "test", spec=spec)
        raise LayercritError(
            f"data folder {spec!r} holds no CIFAR-10 batches (data_batch_1, test_batch), MNIST IDX files "
            "(*-idx3-ubyte) or class subfolders; name its format, e.g. 'cifar10:DIR'"
        )
    raise LayercritError(f"unknown data spec {spec!r}; expected {SPEC_FORMS}")


def held_out_spec(train_spec: str) -> str | None:
    """The built-in test split matching a training data spec (`digits:train` → `digits:test`), if any."""
    name, _, rest = train_spec.partition(":")
    if not rest and Path(train_spec).is_dir() and _detect(Path(train_spec)) in _SPLIT_LOADERS:
        name, rest = _detect(Path(train_spec)), train_spec
    if name == "digits":
        return "digits:test" if rest in ("", "train") else None
    if name in ("cifar10", "mnist"):
        path, sep, split = rest.rpartition(":")
        if sep and split in ("train", "test"):
            return f"{name}:{path}:test" if split == "train" else None
        return f"{name}:{rest}:test"
    return None  # .npz files and image folders have no built-in split: pass test data explicitly


def api_inputs(x: torch.Tensor | Mapping[str, torch.Tensor]):
    """Inputs given to the API: floating tensors as float32 (as the data loaders give them), integer
    tensors (token ids, masks) unchanged."""
    x = as_inputs(x)

    def one(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.is_floating_point() else t

    return {k: one(v) for k, v in x.items()} if isinstance(x, dict) else one(x)


def as_dataset(data: Dataset | str | torch.Tensor | Mapping | tuple) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str):
        return load_data(data)
    if isinstance(data, (torch.Tensor, Mapping)):
        return Dataset(api_inputs(data), None, spec="tensor")
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], (torch.Tensor, Mapping)):
        return Dataset(api_inputs(data[0]), None if data[1] is None else data[1].long(), spec="tensor")
    raise LayercritError(
        f"Expected data as a Dataset, a data spec, a tensor, a dict of tensors or (inputs, labels), got {type(data).__name__}"
    )
