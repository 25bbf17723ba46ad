"""Drop blocks from a Hugging Face model and write the smaller model as a folder `from_pretrained` loads.

What a pruned model needs besides fewer blocks (the questions of transformers #30508, ShortGPT #8,
LLM-Drop #5): the config's layer count (`num_hidden_layers`; GPT-2's `n_layer`), its per-layer lists
(`layer_types`, …) trimmed to the kept blocks, and every `layer_idx` renumbered 0 … L'−1, since the
key-value cache and per-layer settings are indexed by it. Tied weights stay tied; weights are
written as safetensors, the source's tokenizer files beside them. The written model computes what
the `skip` probe of the same blocks computes in memory.

Blocks are named by label (`L05`), by 0-based index (`5` or "5"), or by module path (`model.layers.5`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch.nn as nn

from .._utils.io import make_output_dir
from ..errors import LayercritError
from ..units.blocks import find_block_stack
from .hf import is_tokenizer_file, quiet_progress_bars

__all__ = ["LAYER_COUNT_KEYS", "TOKENIZER_EXTRA_FILES", "block_indices", "check_prune_output", "drop_blocks", "save_pruned"]

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
TOKENIZER_EXTRA_FILES = ("chat_template.jinja", "chat_template.json")  # templates, beside the tokenizer's own files


def _stack(model: nn.Module):
    """The model's block stack, checked to be one container of a Hugging Face model."""
    if not (hasattr(model, "config") and callable(getattr(model, "save_pretrained", None))):
        raise LayercritError(f"prune writes Hugging Face models (a transformers PreTrainedModel); got {type(model).__name__}")
    stack = find_block_stack(model)
    if stack is None or len(stack.stages) != 1:
        raise LayercritError(f"cannot prune {type(model).__name__}: it has no single stack of blocks")
    container = model.get_submodule(stack.stages[0])
    if not isinstance(container, nn.ModuleList) or [f"{stack.stages[0]}.{i}" for i in range(len(container))] != list(stack.names):
        raise LayercritError(f"cannot prune {type(model).__name__}: its blocks are not one ModuleList ({stack.stages[0]})")
    return stack


def block_indices(model: nn.Module, blocks: Sequence[str | int]) -> list[int]:
    """0-based indices of `blocks` (labels `L05`, indices, or module paths), sorted, without repeats."""
    stack = _stack(model)
    n = len(stack)
    width = max(2, len(str(n - 1)))
    names = {name: i for i, name in enumerate(stack.names)}
    out: set[int] = set()
    for b in blocks:
        text = str(b).strip()
        i = None
        if isinstance(b, int) and not isinstance(b, bool):
            i = b
        elif text in names:
            i = names[text]
        elif text[:1] in "Ll" and text[1:].isdigit():
            i = int(text[1:])
        elif text.isdigit():
            i = int(text)
        if i is None or not 0 <= i < n:
            raise LayercritError(f"unknown block {text!r}: the model has {n} blocks, L{0:0{width}d} … L{n - 1:0{width}d} "
                                 f"(0-based indices 0 … {n - 1}, module paths {stack.names[0]} … {stack.names[-1]})")
        out.add(i)
    if not out:
        raise LayercritError("no blocks to drop: name at least one (a label such as L05, a 0-based index or a module path)")
    if len(out) == n:
        raise LayercritError(f"cannot drop all {n} blocks: at least one must stay")
    return sorted(out)


def _count_key(config, n: int) -> str:
    for key in LAYER_COUNT_KEYS:
        if getattr(config, key, None) == n:
            return key
    raise LayercritError(f"the model's config has no layer count equal to its {n} blocks ({', '.join(LAYER_COUNT_KEYS)})")


def _trim_config(config, n: int, keep: list[int]) -> None:
    """Set the layer count to len(keep) and trim the per-layer lists (any `*layer*` list of n entries)."""
    setattr(config, _count_key(config, n), len(keep))  # GPT-2's attribute_map sends num_hidden_layers to n_layer
    for key, value in list(vars(config).items()):
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, key, type(value)(value[i] for i in keep))
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        warnings.warn("the config scales attention by 1 / (layer_idx + 1): renumbered blocks compute differently "
                      "from the skipped ones", stacklevel=3)


def drop_blocks(model: nn.Module, blocks: Sequence[str | int]) -> nn.Module:
    """A copy of Hugging Face model `model` without `blocks`: config and `layer_idx` updated; `model` is unchanged.

    Args:
        model: a transformers `PreTrainedModel` with one stack of blocks (decoder layers, encoder layers).
        blocks: labels (`L05`), 0-based indices or module paths of the blocks to drop.
    """
    drop = set(block_indices(model, blocks))
    stack = _stack(model)
    n = len(stack)
    keep = [i for i in range(n) if i not in drop]
    pruned = copy.deepcopy(model)  # shares nothing with `model`; ties inside it (lm_head = embeddings) are kept
    container = pruned.get_submodule(stack.stages[0])
    parent_path, _, attr = stack.stages[0].rpartition(".")
    kept = nn.ModuleList([container[i] for i in keep])
    setattr(pruned.get_submodule(parent_path), attr, kept)
    for new, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    configs = {id(pruned.config): pruned.config}
    for module in pruned.modules():  # submodules may hold their own config object (a decoder's text config)
        c = getattr(module, "config", None)
        if c is not None and getattr(c, _count_key(pruned.config, n), None) == n:
            configs.setdefault(id(c), c)
    for c in configs.values():
        _trim_config(c, n, keep)
    return pruned


def check_prune_output(out_dir: str | os.PathLike) -> Path:
    """An output folder for a pruned model: absent or empty, creatable; else one line, nothing written."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise LayercritError(f"output folder {str(out)!r} is a file; expected a new or empty folder")
        if any(out.iterdir()):
            raise LayercritError(f"output folder {str(out)!r} exists and is not empty; give a new or empty folder")
    for p in out.parents:
        if p.exists():
            if not p.is_dir():
                raise LayercritError(f"cannot create output folder {str(out)!r}: {str(p)!r} is a file")
            break
    return out


def _copy_tokenizer(source: Path | None, out: Path) -> list[str]:
    """Copy the tokenizer files (and chat templates) of folder `source` into `out`; their names."""
    if source is None or not source.is_dir():
        return []
    names = [p.name for p in sorted(source.iterdir())
             if p.is_file() and (is_tokenizer_file(p) or p.name in TOKENIZER_EXTRA_FILES) and not (out / p.name).exists()]
    for name in names:
        shutil.copy2(source / name, out / name)
    return names


def save_pruned(model: nn.Module, blocks: Sequence[str | int], out_dir: str | os.PathLike,
                tokenizer_from: str | os.PathLike | None = None, info: dict | None = None) -> Path:
    """Write `model` without `blocks` as a Hugging Face folder (config, safetensors, tokenizer files).

    The folder is written beside `out_dir` and renamed into place: it is complete or absent.

    Args:
        model: a transformers `PreTrainedModel`.
        blocks: labels (`L05`), 0-based indices or module paths of the blocks to drop.
        out_dir: a new or empty folder.
        tokenizer_from: a folder whose tokenizer files are copied (default: none).
        info: extra provenance written to `layercrit-prune.json` (e.g. the source spec).

    Returns:
        `out_dir`.
    """
    out = check_prune_output(out_dir)
    stack = _stack(model)
    drop = block_indices(model, blocks)
    width = max(2, len(str(len(stack) - 1)))
    pruned = drop_blocks(model, drop)
    make_output_dir(out.parent if str(out.parent) else Path("."))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with quiet_progress_bars():
            pruned.save_pretrained(str(tmp), safe_serialization=True)
        copied = _copy_tokenizer(Path(tokenizer_from) if tokenizer_from is not None else None, tmp)
        doc = {"format": "layercrit-prune", "version": 1, **(info or {}), "blocks_before": len(stack),
               "blocks_after": len(stack) - len(drop),
               "dropped": [{"index": i, "label": f"L{i:0{width}d}", "name": stack.names[i]} for i in drop],
               "tokenizer_files": copied}
        (tmp / "layercrit-prune.json").write_text(json.dumps(doc, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except OSError as e:
        raise LayercritError(f"could not write {str(out)!r} ({e.strerror or e}); nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
