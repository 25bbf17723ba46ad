"""Readable labels for layers and blocks, in the papers' styles.

Gavrikov et al. label torchvision-layout ResNet layers `[0.0] conv` (stem), `[s.b] conv1`,
`[s.b] downsample` and `[Head] fc`; Zhang et al. name blocks `stage0`, `stage1.resblk1`, …,
`final_linear`. Both styles are recognised from module names alone, so a ResNet built by a
user's factory with torchvision's names (`conv1`, `layer1.0.conv1`, `layer1.0.downsample.0`,
`fc`) gets them too. Other models are labelled with their module names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch.nn as nn

from .errors import LayercritError

__all__ = ["block_units", "is_resnet_layout", "layer_labels", "resnet_root"]

_STYLES = ("auto", "name", "gavrikov", "zhang")
_BLOCK = re.compile(r"^layer(\d+)\.(\d+)(?:\.(.+))?$")
_STEM = {"conv1", "bn1"}


def is_resnet_layout(model: nn.Module) -> bool:
    """Whether the module names follow torchvision's ResNet layout."""
    names = {n for n, _ in model.named_modules()}
    return "conv1" in names and "fc" in names and any(_BLOCK.match(n) for n in names)


def resnet_root(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(prefix, module) of a ResNet-layout model, looking through wrappers that hold it as their only
    parameterized child (a normalization wrapper's `model.`, DataParallel's `module.`)."""
    prefix = ""
    for _ in range(4):
        if is_resnet_layout(model):
            return prefix, model
        if any(True for _ in model.parameters(recurse=False)):
            return None
        holders = [(n, c) for n, c in model.named_children() if any(True for _ in c.parameters())]
        if len(holders) != 1:
            return None
        prefix, model = prefix + holders[0][0] + ".", holders[0][1]
    return None


def _gavrikov(name: str) -> str:
    if name in _STEM:
        return "[0.0] " + name.rstrip("1")
    if name == "fc":
        return "[Head] fc"
    m = _BLOCK.match(name)
    if m and m.group(3):
        rest = m.group(3).replace("downsample.0", "downsample").replace("downsample.1", "downsample.bn")
        return f"[{m.group(1)}.{m.group(2)}] {rest}"
    return name


def _zhang_block(name: str) -> str | None:
    if name in _STEM:
        return "stage0"
    if name == "fc":
        return "final_linear"
    m = _BLOCK.match(name)
    if m:
        return f"stage{m.group(1)}.resblk{int(m.group(2)) + 1}"
    return None


def _zhang(name: str) -> str:
    block = _zhang_block(name)
    if block is None:
        return name
    m = _BLOCK.match(name)
    rest = m.group(3) if m else (None if name == "fc" else name)
    return f"{block}.{rest}" if rest else block


def _check_style(style: str) -> None:
    if style not in _STYLES:
        raise LayercritError(f"Expected `label_style` to be one of {', '.join(_STYLES)}, got {style!r}")


def layer_labels(model: nn.Module, names: Sequence[str], style: str = "auto") -> dict[str, str]:
    """Label for each layer name. "auto" is Gavrikov's style on ResNet layouts, else the name."""
    _check_style(style)
    root = resnet_root(model)
    if style == "auto":
        style = "gavrikov" if root else "name"
    fn = {"gavrikov": _gavrikov, "zhang": _zhang}.get(style)
    prefix = root[0] if root else ""
    if fn is None:
        return {n: n or "(root)" for n in names}
    return {n: fn(n[len(prefix):]) if n.startswith(prefix) else n for n in names}


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_stack_holder(module: nn.Module) -> bool:
    # A plain module that holds a stack of same-typed blocks (a ViT's `encoder`) is opened up;
    # a residual block (whose `downsample` Sequential mixes types) is not.
    for child in module.children():
        if isinstance(child, _CONTAINERS):
            kinds = [type(c) for c in child.children()]
            if len(kinds) >= 2 and len(set(kinds)) == 1:
                return True
    return False


def _generic_blocks(module: nn.Module, prefix: str, root: bool) -> list[str]:
    if root or isinstance(module, _CONTAINERS) or _is_stack_holder(module):
        if not root and any(True for _ in module.parameters(recurse=False)):
            return [prefix]
        out = []
        for name, child in module.named_children():
            out += _generic_blocks(child, f"{prefix}.{name}" if prefix else name, False)
        if root and any(True for _ in module.parameters(recurse=False)):
            out.insert(0, "")
        return out
    return [prefix]


def block_units(model: nn.Module, style: str = "auto") -> list[tuple[str, str, tuple[str, ...]]]:
    """Blocks for `granularity="block"`: (name, label, module-name prefixes) in model order.

    ResNet layouts give Zhang's units (the stem `conv1`+`bn1` as `stage0`, each residual block,
    `final_linear`); other models give each top-level child, opening containers and stacks of
    blocks (so a ViT's encoder blocks are units of their own).
    """
    _check_style(style)
    root = resnet_root(model)
    if root:
        pre, net = root
        blocks: dict[str, list[str]] = {}
        for n, child in net.named_children():
            if n.startswith("layer") and isinstance(child, _CONTAINERS):
                for b, _ in child.named_children():
                    blocks.setdefault(f"{n}.{b}", []).append(f"{n}.{b}")
            else:
                blocks.setdefault("stem" if n in _STEM else n, []).append(n)
        out = []
        for key, prefixes in blocks.items():
            zlabel = _zhang_block(prefixes[0]) or key
            name = zlabel if key == "stem" else pre + key
            out.append((name, zlabel if style in ("auto", "zhang") else name, tuple(pre + p for p in prefixes)))
        return out
    return [(p, p or "(root)", (p,)) for p in _generic_blocks(model, "", True)]
