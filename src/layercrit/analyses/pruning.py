"""Perplexity after pruning: the model with the k least important blocks of a ranking skipped.

A ranking (a proxy such as Block Influence, the angular distance, the relative L2 change, or the real
single-block skip criticality) orders the blocks of the stack from least to most important.
`pruning_curve` skips the first k blocks of each ranking *jointly* (each skipped block returns the
residual stream it was given, as the `skip` probe does) for k = 1 … `max_k` and measures the pruned
model's next-token loss, perplexity exp(mean loss) and next-token accuracy over every labelled
position, beside the unmodified model (k = 0).

The `greedy` ranking is built on the way: at each step it skips the block whose removal costs least
(the lowest mean loss) given the blocks already skipped. Step j tries every remaining block, so k
greedy steps cost Σ_{j<k} (L − j) evaluations of the data, ≈ k·L; all L/2 steps cost ≈ 3L²/8 (345
forwards over the data for L = 30). `greedy_max_k` limits the steps.

Blocks are named in the table by label and 0-based index (`L05`, 5) so that "layer 5" cannot be
read as 1-based."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LayercritError, check_int

__all__ = ["PRUNING_CURVE_COLUMNS", "PruningCurve", "greedy_cost", "pruning_curve", "rankings_from_proxies"]

PRUNING_CURVE_COLUMNS = ["model", "ranking", "k", "dropped", "dropped_index", "perplexity", "accuracy", "loss",
                         "n_tokens"]

# Proxy rows of a `ProxyResult` used as rankings, and the name each gets (n = 1: a single block).
_PROXY_RANKINGS = {"bi_token": "bi_token", "angular_last": "angular_last", "angular_all": "angular_all",
                   "relative_l2": "relative_l2", "skip_loss": "skip", "skip_criticality": "skip"}


@dataclass
class PruningCurve:
    """Result of `pruning_curve`.

    Attributes:
        table: one row per (ranking, k): the blocks skipped (`dropped`: labels, `dropped_index`: 0-based
            indices into the block stack, both ";"-joined, in the ranking's order), the pruned model's
            perplexity, next-token accuracy, mean loss (nats) and the number of scored tokens. k = 0 is
            the unmodified model (the same numbers in every ranking).
        orders: each ranking's blocks, least important first (the greedy one as far as it was built).
        config: the resolved settings.
    """

    table: pd.DataFrame
    orders: dict[str, list[str]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the table as `.csv` (config in `<stem>.config.json` beside it) or `.json`."""
        from ..results import save_table

        return save_table(self.table, path, {**self.config, "orders": self.orders})

    @classmethod
    def load(cls, path: str | Path) -> PruningCurve:
        """Read a table written by `save`."""
        import json

        path = Path(path)
        if not path.is_file():
            raise LayercritError(f"pruning-curve file {str(path)!r} does not exist")
        try:
            if path.suffix.lower() == ".json":
                doc = json.loads(path.read_text())
                table, config = pd.DataFrame(doc.get("rows", []), columns=PRUNING_CURVE_COLUMNS), doc.get("config", {})
            else:
                table = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"dropped": str, "dropped_index": str})
                side = path.with_suffix(".config.json")
                config = json.loads(side.read_text()) if side.is_file() else {}
        except (ValueError, OSError) as e:
            raise LayercritError(f"cannot read pruning-curve file {str(path)!r}: {e}") from None
        missing = [c for c in PRUNING_CURVE_COLUMNS if c not in table.columns]
        if missing:
            raise LayercritError(f"{str(path)!r} is not a pruning-curve table: it lacks the columns {', '.join(missing)}")
        for c in ("dropped", "dropped_index"):
            table[c] = table[c].fillna("").astype(str)
        orders = config.pop("orders", {}) if isinstance(config, dict) else {}
        return cls(table, orders, config)


def greedy_cost(n_blocks: int, steps: int) -> int:
    """Evaluations of the data that `steps` greedy steps over `n_blocks` blocks need: Σ_{j<steps} (L − j)."""
    steps = min(steps, n_blocks)
    return sum(n_blocks - j for j in range(steps))


def rankings_from_proxies(result, probes: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Block scores (low: least important) of a `ProxyResult`'s single-block proxies, and of the mean
    criticality of each probe in `probes` (e.g. "rerandomize").

    Rankings: `bi_token` (ShortGPT's BI), `angular_last` and `angular_all` (n = 1), `relative_l2`,
    `skip` (the measured Δ loss of skipping the block alone, else its skip criticality), and
    `<probe>` for each probe asked for. NaN values (blocks that cannot be skipped) are left out.
    """
    table = result.table
    out: dict[str, dict[str, float]] = {}
    for proxy, name in _PROXY_RANKINGS.items():
        rows = table[(table["proxy"] == proxy) & (table["n"] == 1)]
        scores = {str(r.layer): float(r.value) for r in rows.itertuples() if np.isfinite(r.value)}
        if scores and name not in out:
            out[name] = scores
    crit = result.criticality
    for probe in probes:
        rows = crit[crit["probe"] == probe]
        if rows.empty:
            raise LayercritError(f"the proxies result has no criticality of probe {probe!r}; it has "
                                 f"{', '.join(sorted(crit['probe'].unique())) or 'none'}")
        means = rows.groupby("layer", sort=False)["criticality"].mean()
        out[probe] = {str(k): float(v) for k, v in means.items() if np.isfinite(v)}
    return out


def _order(name: str, ranking, names: list[str]) -> list[str]:
    """A ranking as block names, least important first: a sequence of names (kept in its order) or a
    mapping name → score (ascending; ties by position in the stack)."""
    position = {n: i for i, n in enumerate(names)}
    if isinstance(ranking, Mapping):
        blocks = sorted(ranking, key=lambda b: (float(ranking[b]), position.get(b, len(names))))
    else:
        blocks = list(ranking)
    unknown = [b for b in blocks if b not in position]
    if unknown:
        raise LayercritError(f"ranking {name!r} names blocks that are not in the model's block stack: "
                             f"{', '.join(map(str, unknown[:5]))}; the stack has {names[0]} … {names[-1]}")
    if len(set(blocks)) != len(blocks):
        raise LayercritError(f"ranking {name!r} names a block twice")
    return blocks


class _Shapes:
    """Input and output shape of every block on the first batch (a block whose shape changes cannot be skipped)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model, self.names = model, names
        self.shapes: dict[str, list] = {n: [None, None] for n in names}
        self.handles: list = []

    def __enter__(self) -> _Shapes:
        def first(v):
            if isinstance(v, torch.Tensor):
                return tuple(v.shape)
            if isinstance(v, (tuple, list)) and v:
                return first(v[0])
            return getattr(v, "shape", None)

        for n in self.names:
            m = self.model.get_submodule(n)
            self.handles.append(m.register_forward_pre_hook(
                lambda mod, args, kwargs, n=n: self.shapes[n].__setitem__(0, first(args) if args else first(
                    next(iter(kwargs.values()), None))), with_kwargs=True))
            self.handles.append(m.register_forward_hook(lambda mod, args, out, n=n: self.shapes[n].__setitem__(1, first(out))))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __exit__(self, *exc) -> None:
        self.remove()

    def skippable(self) -> set[str]:
        return {n for n, (a, b) in self.shapes.items() if a is not None and a == b}


def _score(adapter, x, y, out) -> tuple[float, int, int]:
    """Σ next-token loss (nats, float64), number of correct argmax predictions and of scored positions."""
    rows = adapter.rows(x, y, out)
    if rows.labels is None:
        raise LayercritError(f"output {adapter.name} gives no labels to score: perplexity needs next tokens or labels")
    values = adapter.values(out, rows)
    if rows.index is not None:
        values = values.index_select(0, rows.index.to(values.device))
    labels = rows.labels.to(values.device)
    ok = labels >= 0
    values, labels = values[ok], labels[ok]
    if not len(labels):
        return 0.0, 0, 0
    loss = F.cross_entropy(values.float(), labels, reduction="none").double().sum()
    correct = (values.argmax(-1) == labels).sum()
    return float(loss), int(correct), int(len(labels))


class _Evaluator:
    """Scores sets of skipped blocks on the data, one pass over its batches per call."""

    def __init__(self, model, dataset, adapter, batch_size: int, device, executor: str, names: list[str]) -> None:
        self.model, self.dataset, self.adapter = model, dataset, adapter
        self.batch_size, self.device, self.executor, self.names = batch_size, device, executor, names
        self.passes = 0
        self.evaluations = 0

    def __call__(self, sets: Sequence[Sequence[str]], progress=None) -> list[tuple[float, int, int]]:
        """(Σ loss, correct, tokens) of the unmodified model first, then of each set skipped jointly."""
        from ..data.inputs import num_samples, take, to_device
        from ..engine.executors.base import eval_mode
        from .proxies.measure import _device_model, _executor, _skip

        ex = _executor(self.model, self.executor)
        order = {n: i for i, n in enumerate(self.names)}
        keyed = [sorted(s, key=order.__getitem__) for s in sets]
        ex.prepare([_skip(b) for b in keyed if b])
        totals = [[0.0, 0, 0] for _ in range(len(keyed) + 1)]
        n = num_samples(self.dataset.x)
        with torch.no_grad(), eval_mode(self.model), _device_model(self.model, self.device) as dev:
            for start in range(0, n, self.batch_size):
                idx = slice(start, start + self.batch_size)
                x = to_device(take(self.dataset.x, idx), dev)
                y = None if self.dataset.y is None else self.dataset.y[idx].to(dev)
                try:
                    out = ex.start_batch(x)
                    scored = [_score(self.adapter, x, y, out)]
                    del out
                    for blocks in keyed:
                        scored.append(scored[0] if not blocks else _score(self.adapter, x, y, ex.run(_skip(blocks))))
                        if progress is not None:
                            progress.update(1)
                finally:
                    ex.end_batch()
                for t, s in zip(totals, scored):
                    t[0] += s[0]
                    t[1] += s[1]
                    t[2] += s[2]
        self.passes += 1
        self.evaluations += len(keyed)
        return [tuple(t) for t in totals]


def _row(model_name: str, ranking: str, blocks: Sequence[str], labels: dict[str, str], index: dict[str, int],
         score: tuple[float, int, int]) -> dict:
    loss_sum, correct, tokens = score
    loss = loss_sum / tokens if tokens else math.nan
    return {"model": model_name, "ranking": ranking, "k": len(blocks), "dropped": ";".join(labels[b] for b in blocks),
            "dropped_index": ";".join(str(index[b]) for b in blocks), "perplexity": math.exp(loss) if tokens else math.nan,
            "accuracy": correct / tokens if tokens else math.nan, "loss": loss, "n_tokens": tokens}


def pruning_curve(
    model: nn.Module,
    data,
    *,
    rankings=None,
    max_k: int | None = None,
    greedy: bool = False,
    greedy_max_k: int | None = None,
    output: str | None = "next-token",
    images: int | None = None,
    data_seed: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    executor: str = "prefix",
    model_name: str = "model",
    progress: bool = False,
) -> PruningCurve:
    """Perplexity and next-token accuracy of the model with the k least important blocks of each
    ranking skipped at once, k = 0 (the unmodified model) … `max_k`.

    Args:
        model: the model (unchanged afterwards).
        data: a `Dataset`, a data spec, a tensor or a dict of tensors (token ids, attention mask).
        rankings: None (measure the proxies on the same data first: `proxies(model, data, max_n=1)`,
            L + 1 forwards, giving `bi_token`, `angular_last`, `angular_all`, `relative_l2` and `skip`);
            a `ProxyResult` (see `rankings_from_proxies`); or a mapping ranking name → block names
            least important first, or → {block: score} (low: least important).
        max_k: the most blocks skipped (default: half the blocks, L // 2).
        greedy: also build the greedy ranking (see the module docstring for its cost).
        greedy_max_k: greedy steps (default `max_k`): Σ_{j<k} (L − j) evaluations of the data.
        output: output adapter; "next-token" scores every position on the next input id.
        images: random evaluation subset of this many samples (None: all).
        data_seed: seed of that subset.
        batch_size: samples per forward.
        device: where to compute (default: the model's device).
        executor: "prefix" (re-run only the blocks from the first skipped one on) or "full".
        model_name: the `model` column.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    from ..data import as_dataset
    from ..data.inputs import take, to_device
    from ..engine.outputs import resolve_output
    from ..units.blocks import find_block_stack
    from ..units.layers import select_units
    from .proxies import ProxyResult, proxies

    check_int("batch_size", batch_size)
    check_int("data_seed", data_seed, low=0)
    stack = find_block_stack(model)
    if stack is None or len(stack.names) < 2:
        raise LayercritError(f"{type(model).__name__} has no stack of repeated blocks (transformer layers, residual "
                             "blocks) to prune")
    names = list(stack.names)
    max_k = len(names) // 2 if max_k is None else max_k
    check_int("max_k", max_k)
    if max_k >= len(names):
        raise LayercritError(f"Expected `max_k` to be below the {len(names)} blocks of the stack, got {max_k}")
    greedy_max_k = max_k if greedy_max_k is None else greedy_max_k
    check_int("greedy_max_k", greedy_max_k)
    greedy_max_k = min(greedy_max_k, max_k)
    dataset = as_dataset(data).subset(images, data_seed)
    units = {u.name: u for u in select_units(model, granularity="block")}
    labels = {n: units[n].label if n in units else n for n in names}
    index = {n: i for i, n in enumerate(names)}
    source = "given"
    if rankings is None:
        rankings = proxies(model, dataset, max_n=1, output=output, skip=True, prune=False, batch_size=batch_size,
                           device=device, executor=executor, model_name=model_name, progress=progress)
        source = "proxies measured on the same data"
    if isinstance(rankings, ProxyResult):
        rankings = rankings_from_proxies(rankings)
        source = source if source != "given" else "a proxies result"
    if not isinstance(rankings, Mapping):
        raise LayercritError(f"Expected `rankings` to be None, a ProxyResult or a mapping name → blocks, got "
                             f"{type(rankings).__name__}")
    if "greedy" in rankings and greedy:
        raise LayercritError("a ranking is named 'greedy', the name of the greedy order: rename it")
    orders = {str(k): _order(str(k), v, names) for k, v in rankings.items()}

    # The output adapter and the skippable blocks, from one unmodified forward on the first batch.
    from ..engine.executors.base import eval_mode
    from .proxies.measure import _device_model

    with torch.no_grad(), eval_mode(model), _device_model(model, device) as dev, _Shapes(model, names) as shapes:
        x = to_device(take(dataset.x, slice(0, batch_size)), dev)
        y = None if dataset.y is None else dataset.y[:batch_size].to(dev)
        from ..data.inputs import call_model

        out = call_model(model, x)
        adapter, why = resolve_output(output, model, out)
        adapter.check(x, y, out)
        _score(adapter, x, y, out)  # fails early on an output without labels
        del out
    skippable = shapes.skippable()
    for name, order in orders.items():
        bad = [labels[b] for b in order[:max_k] if b not in skippable]
        if bad:
            raise LayercritError(f"ranking {name!r} would skip {', '.join(bad)}, whose input and output differ in "
                                 "shape: such a block cannot be skipped")
    short = {name: len(o) for name, o in orders.items() if len(o) < max_k}
    if short:
        raise LayercritError(f"Expected every ranking to order at least max_k = {max_k} blocks; "
                             + ", ".join(f"{n!r} orders {c}" for n, c in short.items()))

    sets: dict[tuple, list[str]] = {}
    for order in orders.values():
        for k in range(1, max_k + 1):
            sets.setdefault(tuple(sorted(order[:k], key=index.__getitem__)), order[:k])
    keys = list(sets)
    candidates = sorted(skippable, key=index.__getitem__)
    n_batches = -(-len(dataset) // batch_size)
    total = (len(keys) + (greedy_cost(len(candidates), greedy_max_k) if greedy else 0)) * n_batches
    bar = tqdm(total=total, desc=f"{model_name}: pruning", unit="fwd", disable=not progress, leave=False)
    evaluate = _Evaluator(model, dataset, adapter, batch_size, device, executor, names)
    try:
        scores = evaluate([list(k) for k in keys], bar)
        base, by_set = scores[0], dict(zip(keys, scores[1:]))
        greedy_order: list[str] = []
        if greedy:
            for _ in range(greedy_max_k):
                remaining = [b for b in candidates if b not in greedy_order]
                if not remaining:
                    break
                tried = evaluate([greedy_order + [b] for b in remaining], bar)[1:]
                # least mean loss; a tie goes to the earlier block
                best = min(range(len(remaining)), key=lambda i: (tried[i][0] / max(tried[i][2], 1), i))
                greedy_order.append(remaining[best])
                by_set.setdefault(tuple(sorted(greedy_order, key=index.__getitem__)), tried[best])
    finally:
        bar.close()
    rows = []
    if greedy:
        orders["greedy"] = greedy_order
    for name, order in orders.items():
        rows.append(_row(model_name, name, [], labels, index, base))
        for k in range(1, (len(order) if name == "greedy" else max_k) + 1):
            key = tuple(sorted(order[:k], key=index.__getitem__))
            rows.append(_row(model_name, name, order[:k], labels, index, by_set[key]))
    table = pd.DataFrame(rows, columns=PRUNING_CURVE_COLUMNS)
    config = {"model": model_name, "data": dataset.spec, "data_identity": dataset.identity, "n": len(dataset),
              "output": adapter.name, "output_reason": why, "rankings": source, "max_k": max_k, "greedy": greedy,
              "greedy_max_k": greedy_max_k if greedy else None, "images": images, "data_seed": data_seed,
              "batch_size": batch_size, "executor": executor, "blocks": names, "stack": stack.path,
              "evaluations": evaluate.evaluations, "passes": evaluate.passes}
    return PruningCurve(table, {k: list(v) for k, v in orders.items()}, config)
