"""Readable labels for layers and blocks, in the papers' styles.

Gavrikov et al. label torchvision-layout ResNet layers `[0.0] conv` (stem), `[s.b] conv1`,
`[s.b] downsample` and `[Head] fc` in their text ("gavrikov", the default on ResNets); the axis of
their Figure 1 adds kernel sizes, `[0.0] conv:7x7`, `[1.0] conv2:3x3`, `[1.0] downsample bn`
("figure", with each convolution's own kernel size: a ResNet-18's `conv1` is `conv1:3x3`). Zhang
et al. name blocks `stage0`, `stage1.resblk1`, …, `final_linear`. The styles are recognised from
module names, so torchvision's and timm's ResNets (same names: `conv1`, `layer1.0.conv1`,
`layer1.0.downsample.0`, `fc`) and a user's factory with those names get them; a `downsample`
convolution and its norm are told apart by type (timm's ResNet-D puts an average pool first).
Models with a stack of blocks (transformers, see `blocks.find_block_stack`) get short labels by block
(`L03`, `L03.attn`, `L03.mlp.down`, `embed`, `head`; tied parameters named: `embed (tied: lm_head)`),
and `stack_units` gives their block, attn and mlp units. Other models are labelled with their module
names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch.nn as nn

from ..errors import LayercritError
from .blocks import BlockStack, find_block_stack

__all__ = ["block_units", "is_resnet_layout", "layer_labels", "resnet_root", "stack_layer_labels", "stack_units"]

_STYLES = ("auto", "name", "gavrikov", "figure", "zhang")
BLOCK_LABEL = re.compile(r"^layer(\d+)\.(\d+)(?:\.(.+))?$")
_STEM = {"conv1", "bn1"}


def is_resnet_layout(model: nn.Module) -> bool:
    """Whether the module names follow torchvision's ResNet layout."""
    names = {n for n, _ in model.named_modules()}
    return "conv1" in names and "fc" in names and any(BLOCK_LABEL.match(n) for n in names)


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


def gavrikov_label(name: str, module: nn.Module | None = None, figure: bool = False) -> str:
    """Gavrikov's label of ResNet layer `name`; `module` (the layer) tells a downsample convolution
    from its norm by type, and gives the kernel size that `figure` (the Figure 1 style) adds."""
    kernel = getattr(module, "kernel_size", None) if figure and isinstance(module, nn.Conv2d) else None
    size = f":{kernel[0]}x{kernel[1]}" if kernel else ""
    if name in _STEM:
        return "[0.0] " + name.rstrip("1") + size
    if name == "fc":
        return "[Head] fc"
    m = BLOCK_LABEL.match(name)
    if m and m.group(3):
        rest = m.group(3)
        if rest.startswith("downsample."):
            if module is None:
                rest = rest.replace("downsample.0", "downsample").replace("downsample.1", "downsample.bn")
            else:
                rest = "downsample" if isinstance(module, nn.Conv2d) else "downsample bn" if figure else "downsample.bn"
            size = ""  # (the figure shows none for the downsampling convolution)
        return f"[{m.group(1)}.{m.group(2)}] {rest}{size}"
    return name


def _zhang_block(name: str) -> str | None:
    if name in _STEM:
        return "stage0"
    if name == "fc":
        return "final_linear"
    m = BLOCK_LABEL.match(name)
    if m:
        return f"stage{m.group(1)}.resblk{int(m.group(2)) + 1}"
    return None


def _zhang(name: str) -> str:
    block = _zhang_block(name)
    if block is None:
        return name
    m = BLOCK_LABEL.match(name)
    rest = m.group(3) if m else (None if name == "fc" else name)
    return f"{block}.{rest}" if rest else block


def _check_style(style: str) -> None:
    if style not in _STYLES:
        raise LayercritError(f"Expected `label_style` to be one of {', '.join(_STYLES)}, got {style!r}")


def layer_labels(model: nn.Module, names: Sequence[str], style: str = "auto") -> dict[str, str]:
    """Label for each layer name. "auto" is Gavrikov's style on ResNet layouts, the short block labels
    of `stack_layer_labels` on other models with a stack of blocks (transformers), else the name."""
    _check_style(style)
    root = resnet_root(model)
    if style == "auto" and not root and (stack := find_block_stack(model)) is not None:
        return stack_layer_labels(model, stack, names)
    if style == "auto":
        style = "gavrikov" if root else "name"
    prefix = root[0] if root else ""
    if style in ("gavrikov", "figure"):
        return {n: gavrikov_label(n[len(prefix):], model.get_submodule(n), style == "figure") if n.startswith(prefix) else n
                for n in names}
    if style == "zhang":
        return {n: _zhang(n[len(prefix):]) if n.startswith(prefix) else n for n in names}
    return {n: n or "(root)" for n in names}


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


# -- models with a stack of blocks (transformers): units and short labels ------------------------------

_GRANULARITIES = ("block", "attn", "mlp")


def _strip_proj(rel: str) -> str:
    # `q_proj` -> `q`, `down_proj` -> `down`; GPT-2's `c_proj` stays (`c` says nothing)
    return ".".join(c[:-5] if c.endswith("_proj") and len(c) > 5 and not c.startswith("c_") else c for c in rel.split("."))


def _direct(model: nn.Module, path: str) -> list[str]:
    return [n for n, _ in model.get_submodule(path).named_parameters(recurse=False)]


def _outside_short(model: nn.Module, stack: BlockStack, entry: str, name: str, generic: tuple[str, ...]) -> str:
    """`name` (at or under the embed/head `entry`) relative to the module holding `entry`, without a
    generic first component (`embeddings.word_embeddings` -> `word_embeddings`, `head` -> ``); the own
    parameters of a generic module with layers inside are named (`cls_token+position_embeddings`)."""
    if entry in stack.ancestors:  # a module on the way to the stack: its own parameters only
        return "+".join(_direct(model, entry))
    holder = entry.rpartition(".")[0]
    comps = (name[len(holder) + 1 :] if holder else name).split(".")
    if comps[0] in generic:
        comps = comps[1:]
    if comps or not any(True for c in model.get_submodule(name).children() if any(True for _ in c.parameters())):
        return ".".join(comps)
    return "+".join(_direct(model, name))


def _in_entry(stack: BlockStack, entry: str, name: str) -> bool:
    return name == entry or (entry not in stack.ancestors and name.startswith(entry + "."))


def _tied_names(model: nn.Module, inside) -> list[str]:
    """Module paths outside a unit (`inside(path)` False) that hold a parameter the unit owns: tied weights."""
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules():
        for _, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(mname)
    out: list[str] = []
    for paths in owners.values():
        if any(inside(o) for o in paths):
            out += [o for o in paths if not inside(o) and o not in out]
    return out


def _with_ties(model: nn.Module, label: str, inside) -> str:
    tied = _tied_names(model, inside)
    return f"{label} (tied: {', '.join(tied)})" if tied else label


def stack_layer_labels(model: nn.Module, stack: BlockStack, names: Sequence[str]) -> dict[str, str]:
    """Short labels of layers of a model with a block stack: `L03.attn.q`, `L03.mlp.down`, `embed.wte`,
    `head.lm_head`, with tied parameters named (`embed.wte (tied: lm_head)`)."""
    width = max(2, len(str(len(stack) - 1)))
    out: dict[str, str] = {}
    for name in names:
        label = name or "(root)"
        i = stack.block_of(name)
        if i is not None:
            block, label = stack.names[i], f"L{i:0{width}d}"
            rest = ""
            for role, paths in (("attn", stack.attn[i]), ("mlp", stack.mlp[i])):
                for p in paths:
                    if not rest and (name == p or name.startswith(p + ".")):
                        inner = name[len(p) + 1 :] if len(paths) == 1 else name[len(block) + 1 :]
                        rest = role + ("." + inner if inner else "")
            if name != block:
                label += "." + _strip_proj(rest or name[len(block) + 1 :])
        else:
            for role, entries, generic in (("embed", stack.embed, ("embeddings", "embedding", "embed")),
                                           ("head", stack.head, ("head",))):
                entry = next((e for e in entries if _in_entry(stack, e, name)), None)
                if entry is not None:
                    short = _outside_short(model, stack, entry, name, generic)
                    label = _with_ties(model, f"{role}.{short}" if short else role, lambda o, n=name: o == n)
                    break
        out[name] = label
    counts: dict[str, int] = {}
    for label in out.values():
        counts[label] = counts.get(label, 0) + 1
    return {n: (label if counts[label] == 1 else n or "(root)") for n, label in out.items()}


def stack_units(
    model: nn.Module, granularity: str = "block", style: str = "auto"
) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] | None:
    """Units of a model with a block stack (None if it has none), as (name, label, prefixes, exact):
    the unit holds the layers at or under a prefix and the layers named in `exact` (a module on the way to
    the stack, for its own parameters only: a ViT's `cls_token`).

    `granularity="block"` gives the embeddings, each block and the head (labels `embed`, `L00`, …, `head`);
    "attn" and "mlp" give each block's attention / MLP sub-layer (`L00.attn`, `L00.mlp`). A unit is named
    by its module path, or by its module paths joined with `+` (GPT-2's `transformer.wte+transformer.wpe`;
    a module on the way to the stack contributes its parameter names).
    """
    _check_style(style)
    if granularity not in _GRANULARITIES:
        raise LayercritError(f"Expected `granularity` to be one of layer, {', '.join(_GRANULARITIES)}, got {granularity!r}")
    stack = find_block_stack(model)
    if stack is None:
        return None
    width = max(2, len(str(len(stack) - 1)))
    readable = style == "auto"
    units: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = []

    def add(paths: Sequence[str], label: str, tie_label: bool = False) -> None:
        if not paths:
            return
        exact = tuple(p for p in paths if p in stack.ancestors)
        prefixes = tuple(p for p in paths if p not in stack.ancestors)
        parts = [n for p in paths for n in ([f"{p}.{d}" if p else d for d in _direct(model, p)] if p in exact else [p])]
        name = "+".join(parts)
        if tie_label:
            label = _with_ties(model, label, lambda o: o in exact or any(o == p or o.startswith(p + ".") for p in prefixes))
        units.append((name, label if readable else name, prefixes, exact))

    if granularity == "block":
        add(stack.embed, "embed", tie_label=True)
    for i, block in enumerate(stack.names):
        tag = f"L{i:0{width}d}"
        if granularity == "block":
            add((block,), tag)
        else:
            add(getattr(stack, granularity)[i], f"{tag}.{granularity}")
    if granularity == "block":
        add(stack.head, "head", tie_label=True)
    return units
