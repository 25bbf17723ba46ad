"""`text:FILE`: a text file tokenized by a local Hugging Face tokenizer, packed into windows.

The whole file is tokenized once (no special tokens), then cut into windows of `seq_len` tokens
starting every `stride` tokens (default: a window's length, no overlap); a tail shorter than a window is
dropped. A tokenizer that adds special tokens around a sequence (BERT's `[CLS] … [SEP]`) gets them
around each window, inside the `seq_len`; one that adds none (GPT-2) gives plain packed windows.
Every window is full, so `attention_mask` is all ones. Samples are dicts
`{"input_ids": int64 (N, seq_len), "attention_mask": int64 (N, seq_len)}`.

The tokenizer is loaded with `AutoTokenizer.from_pretrained(DIR, local_files_only=True)`: nothing
is downloaded. The data identity holds the tokenizer's name, a hash of its files and a hash of
the text, so the same file under another tokenizer (or an edited file) is other data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import LayercritError, check_int
from ..models.hf import is_tokenizer_file
from .base import Dataset

__all__ = ["DEFAULT_SEQ_LEN", "load_text"]

DEFAULT_SEQ_LEN = 128

def tokenizer_hash(folder: Path) -> str:
    """sha256 over the names and bytes of the tokenizer's files in `folder` (16 hex digits)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_tokenizer_file(p):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _special_tokens(tok) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single sequence ([CLS] / [SEP], <s>, or none),
    read from how it encodes one word with and without them (the same in every transformers version)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain) :])
    return [], []


def load_tokenizer(folder: str | Path | None):
    """A Hugging Face tokenizer from a local folder (no download), or a one-line error."""
    if folder is None:
        raise LayercritError("text data needs a tokenizer: --tokenizer DIR (a local Hugging Face tokenizer folder)")
    folder = Path(folder)
    if not folder.is_dir():
        raise LayercritError(f"tokenizer folder {str(folder)!r} does not exist")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise LayercritError("text data needs the transformers package: pip install 'layercrit[hf]'") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds for an unusable folder)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LayercritError(f"cannot load a tokenizer from {str(folder)!r}: {first}") from None


def load_text(path: str | Path, tokenizer: str | Path | None, seq_len: int | None = None, stride: int | None = None,
              spec: str | None = None) -> Dataset:
    """Tokenize a text file and pack it into windows (see the module docstring).

    Args:
        path: a UTF-8 text file.
        tokenizer: a local Hugging Face tokenizer folder.
        seq_len: tokens per window, special tokens included (default `DEFAULT_SEQ_LEN`).
        stride: tokens between window starts (default: `seq_len` minus the special tokens, no overlap).
        spec: the data spec, for messages and the identity.
    """
    path = Path(path)
    spec = spec or f"text:{path}"
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    check_int("seq_len", seq_len, low=2)
    if stride is not None:
        check_int("stride", stride)
    if not path.is_file():
        raise LayercritError(f"text file {str(path)!r} does not exist")
    tok = load_tokenizer(tokenizer)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LayercritError(f"text file {str(path)!r} is not UTF-8: {e}") from None
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    prefix, suffix = _special_tokens(tok)
    specials = len(prefix) + len(suffix)
    content = seq_len - specials
    if content < 1:
        raise LayercritError(f"--seq-len {seq_len} leaves no room for text beside the tokenizer's {specials} special tokens")
    stride = content if stride is None else stride
    if len(ids) < content:
        raise LayercritError(
            f"text file {str(path)!r} has {len(ids)} tokens, fewer than one window of {seq_len}; "
            "use a smaller --seq-len or a longer text"
        )
    windows = [prefix + ids[s : s + content] + suffix for s in range(0, len(ids) - content + 1, stride)]
    input_ids = torch.tensor(windows, dtype=torch.long)
    folder = Path(tokenizer).resolve()
    meta = {
        "format": "text", "path": str(path), "tokens": len(ids), "seq_len": seq_len, "stride": stride,
        "tokenizer": str(folder), "tokenizer_name": f"{folder.name} ({type(tok).__name__})",
        "tokenizer_hash": tokenizer_hash(folder), "text_hash": hashlib.sha256(raw).hexdigest()[:16],
        "vocab_size": len(tok),
    }
    meta["fingerprint"] = (f"tokenizer={meta['tokenizer_name']}:{meta['tokenizer_hash']}|text={meta['text_hash']}"
                           f"|seq_len={seq_len}|stride={stride}")
    return Dataset({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, None, spec=spec, meta=meta)
