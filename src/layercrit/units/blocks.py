"""Block stacks: the repeated blocks of a network (transformer layers, residual blocks), wherever they sit.

`find_block_stack(model)` looks for containers (`nn.ModuleList`/`nn.Sequential`) whose children are
two or more *composite* modules of one class (modules with parameterized submodules: blocks, not a
list of `Linear` heads). Consecutive sibling containers of the same block class form one stack: a
ResNet's stages `layer1` … `layer4` are one stack of residual blocks across its stages, so `names`
runs from `layer1.0` to `layer4.1` (the first block of a downsampling stage changes the shape, so it
has no identity to skip). Of several stacks (an encoder and a decoder, a vision tower and a language
model) the one holding the most parameters wins; ties go to the longer.

The modules outside the stack that own parameters are split by where they are registered: before the
stack (`embed`: token, patch and position embeddings; parameters owned directly by a module that holds
the stack, such as a ViT's `cls_token` and `pos_embed`, count as embeddings) or after it (`head`: final
norm, pooler, `lm_head`, classifier). Within each block, the attention and MLP sub-layers are found by
name (`attn`, `attention`, `self_attn`, a Mixer's `mlp_tokens` …; `mlp`, `feed_forward`, `ffn`,
`mlp_channels` …; BERT's `intermediate` and `output` together are its MLP), else by class name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

__all__ = ["BlockStack", "find_block_stack"]

_CONTAINERS = (nn.ModuleList, nn.Sequential)

# Sub-layer names, in order of preference. The attention role is "token mixing" in general: a
# Mixer's token MLP and a state-space `mixer` take it.
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "selfattention", "attn_layer",
               "mixer", "mlp_tokens", "mixer_tokens", "token_mixing", "token_mixer")
_MLP_NAMES = ("mlp", "feed_forward", "feedforward", "ffn", "ff", "mlp_channels", "mixer_channels",
              "channel_mixing", "channel_mixer", "block_sparse_moe", "moe")
_MLP_PAIRS = (("intermediate", "output"),)  # BERT: the MLP is two modules, the second adds the residual


@dataclass(frozen=True)
class BlockStack:
    """The stack of repeated blocks of a model.

    Attributes:
        path: module path of the container holding the blocks ("model.layers", "transformer.h",
            "blocks"); for a stack across stages (a ResNet), the path of the module holding the stages.
        names: full module paths of the blocks, in order.
        embed: module paths before the stack that own parameters (embeddings, patch embedding; a
            module on the way to the stack is listed for its own direct parameters only).
        head: module paths after it that own parameters (final norm, pooler, lm_head, classifier).
        attn: per block, the module paths of its attention (token-mixing) sub-layer; () if none found.
        mlp: per block, the module paths of its MLP sub-layer (two for BERT); () if none found.
        stages: the container(s) holding the blocks (one, or a ResNet's `layer1` … `layer4`).
        kind: class name of the blocks.
    """

    path: str
    names: tuple[str, ...]
    embed: tuple[str, ...]
    head: tuple[str, ...]
    attn: tuple[tuple[str, ...], ...]
    mlp: tuple[tuple[str, ...], ...]
    stages: tuple[str, ...]
    kind: str

    def __len__(self) -> int:
        return len(self.names)

    def block_of(self, name: str) -> int | None:
        """Index of the block that is or contains module `name`, else None."""
        for i, b in enumerate(self.names):
            if name == b or name.startswith(b + "."):
                return i
        return None

    @property
    def ancestors(self) -> tuple[str, ...]:
        """Paths of the modules on the way from the root to the stack (their direct parameters are embeddings)."""
        parts = self.path.split(".") if self.path else []
        return ("",) + tuple(".".join(parts[: i + 1]) for i in range(len(parts)))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_params(module: nn.Module, recurse: bool = True) -> bool:
    return any(True for _ in module.parameters(recurse=recurse))


def _is_block(module: nn.Module) -> bool:
    """A composite module: it has submodules with parameters (a block, not a single layer)."""
    return any(_has_params(c) for c in module.children())


def _stack_children(container: nn.Module) -> list[str] | None:
    """Child names of `container` if they are ≥ 2 blocks of one class, else None."""
    kids = list(container.named_children())
    if len(kids) < 2 or len({type(c) for _, c in kids}) != 1 or not all(_is_block(c) for _, c in kids):
        return None
    return [n for n, _ in kids]


def _n_params(modules: list[nn.Module]) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _sublayers(block: nn.Module, path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(attention paths, MLP paths) of one block."""
    children = {n: c for n, c in block.named_children() if _has_params(c)}
    lower = {n.lower(): n for n in children}
    attn = next(((_join(path, lower[n]),) for n in _ATTN_NAMES if n in lower), ())
    mlp = next(((_join(path, lower[n]),) for n in _MLP_NAMES if n in lower), ())
    if not mlp:
        mlp = next((tuple(_join(path, lower[n]) for n in pair) for pair in _MLP_PAIRS if all(n in lower for n in pair)), ())
    if attn and mlp:
        return attn, mlp
    # By class name, also one level down (T5: `layer` = [T5LayerSelfAttention, T5LayerFF]).
    candidates = []
    for n, c in children.items():
        if isinstance(c, _CONTAINERS):
            candidates += [(_join(_join(path, n), k), g) for k, g in c.named_children() if _has_params(g)]
        else:
            candidates.append((_join(path, n), c))
    for p, c in candidates:
        cls = type(c).__name__.lower()
        if not attn and "attention" in cls and "cross" not in cls:
            attn = (p,)
        elif not mlp and ("mlp" in cls or "feedforward" in cls or "ffn" in cls or cls.endswith("ff")):
            mlp = (p,)
    return attn, mlp


def find_block_stack(model: nn.Module) -> BlockStack | None:
    """The stack of repeated blocks in `model` (see the module docstring), or None if it has none."""
    modules = dict(model.named_modules())
    stacks: list[tuple[str, list[str], list[str]]] = []  # (path, stage paths, block paths)
    for holder_path, holder in modules.items():
        runs: list[list[tuple[str, list[str], type]]] = [[]]  # consecutive stack containers of one block class
        for cname, child in holder.named_children():
            kids = _stack_children(child) if isinstance(child, _CONTAINERS) else None
            if kids is None:
                runs.append([])
                continue
            cpath = _join(holder_path, cname)
            kind = type(next(child.children()))
            if runs[-1] and runs[-1][-1][2] is not kind:
                runs.append([])
            runs[-1].append((cpath, [_join(cpath, k) for k in kids], kind))
        for run in runs:
            if run:
                path = holder_path if len(run) > 1 else run[0][0]
                stacks.append((path, [r[0] for r in run], [b for r in run for b in r[1]]))
    if not stacks:
        return None
    path, stages, names = max(stacks, key=lambda s: (_n_params([modules[b] for b in s[2]]), len(s[2])))
    embed, head = _outside(modules, stages)
    subs = [_sublayers(modules[b], b) for b in names]
    return BlockStack(
        path=path,
        names=tuple(names),
        embed=tuple(embed),
        head=tuple(head),
        attn=tuple(a for a, _ in subs),
        mlp=tuple(m for _, m in subs),
        stages=tuple(stages),
        kind=type(modules[names[0]]).__name__,
    )


def _outside(modules: dict[str, nn.Module], stages: list[str]) -> tuple[list[str], list[str]]:
    """Modules with parameters registered before (embed) and after (head) the stack, in model order."""
    parts = stages[0].split(".")
    holders = [".".join(parts[:i]) for i in range(len(parts))]  # the root down to the stages' parent
    embed_levels: list[list[str]] = []
    head_levels: list[list[str]] = []
    for depth, holder in enumerate(holders):
        on_path = set(stages) if depth == len(holders) - 1 else {".".join(parts[: depth + 1])}
        before, after, seen = [], [], False
        for cname, child in modules[holder].named_children():
            cpath = _join(holder, cname)
            if cpath in on_path:
                seen = True
                continue
            if _has_params(child):
                (after if seen else before).append(cpath)
        if _has_params(modules[holder], recurse=False):
            before.append(holder)
        embed_levels.append(before)
        head_levels.append(after)
    embed = [p for level in embed_levels for p in level]
    head = [p for level in reversed(head_levels) for p in level]
    return embed, head
