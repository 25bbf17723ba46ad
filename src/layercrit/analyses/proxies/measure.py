"""Cheap block proxies of the layer-pruning literature, and how well they agree with real resets.

The pruning literature ranks the blocks of a residual network by similarity proxies computed in one
pass and drops the lowest: ShortGPT's Block Influence BI = 1 − cos(x_in, x_out) of each token, Gromov
et al.'s angular distance arccos(cos(x^ℓ, x^{ℓ+n}))/π at the last token. `proxies` computes them (and
the relative L2 change ‖x_out − x_in‖/‖x_in‖ and the effect of skipping each block) from hooks on the
blocks — the residual stream entering block ℓ (forward pre-hook) and its output (forward hook), never
the post-norm `hidden_states[-1]` — row-wise, clamped before `arccos`, in float64, padding masked.
`compare_proxies` puts them beside the real criticality of the same blocks on the same data.

Cosine with a zero vector: cos(a, b) = a·b / max(‖a‖‖b‖, eps), so a zero vector is orthogonal to
everything (cos 0, BI 1, angular distance 0.5) instead of NaN.

Hidden states are read batch-first: (B, T, D) gives T tokens per sample, (B, D) one, and a
(B, C, H, W) feature map (a ResNet stage) one vector of C·H·W per sample."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ...engine.measures import sample_measures
from ...errors import LayercritError, check_int
from .compare import compare_proxies
from .recorder import _Recorder, _Sums, _ValuesCache
from .result import (
    CRIT_SAMPLE_COLUMNS,
    CRITICALITY_COLUMNS,
    PROXY_COLUMNS,
    PRUNING_COLUMNS,
    SAMPLE_COLUMNS,
    ProxyResult,
    _empty,
)


def _executor(model: nn.Module, name: str):
    """The executor running the probed forwards: "prefix" re-runs only the blocks from the probed one
    on (from the block outputs kept in the unmodified pass), "full" the whole model."""
    from ...engine.executors.full import FullForward

    if name == "full":
        return FullForward(model)
    if name == "prefix":
        from ...engine.executors.prefix import PrefixExecutor

        return PrefixExecutor(model)
    raise LayercritError(f"Expected `executor` to be 'prefix' or 'full', got {name!r}")


def _skip(blocks: Sequence[str]):
    """The structural change that skips `blocks` of the stack (each returns the residual stream it was given)."""
    from ...engine.probes import Change

    return Change({}, skip=frozenset(blocks), modes=dict.fromkeys(blocks, "input"))


def _row_samples(rows, n_rows: int, batch: int, device: torch.device) -> torch.Tensor:
    """The sample (row of the batch) each compared output row belongs to."""
    if rows.index is None:
        return torch.arange(n_rows, device=device) * batch // max(n_rows, 1)
    per = max(n_rows // batch, 1)  # a flattened (B·T, V) output: T rows per sample
    return rows.index.to(device) // per


def _sample_mean(values: torch.Tensor, sample_of: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the mean of its finite row values (NaN when none) and how many there were."""
    ok = ~values.isnan()
    sums = torch.zeros(batch, dtype=torch.float64, device=values.device).index_add_(0, sample_of[ok], values[ok])
    counts = torch.bincount(sample_of[ok], minlength=batch).double()
    return torch.where(counts > 0, sums / counts.clamp_min(1), math.nan), counts


def _compare_rows(adapter, rows, p_values: torch.Tensor, q_out, batch: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample criticality (and loss, with labels) of a probed output against the unmodified one."""
    q_values = adapter.values(q_out, rows)
    m = sample_measures(p_values, q_values, rows.labels, ("criticality", "loss"), softmax=adapter.softmax, rows=rows.index)
    n_rows = len(rows.index) if rows.index is not None else len(q_values)
    sample_of = _row_samples(rows, len(q_values), batch, q_values.device)
    if rows.index is None:
        sample_of = sample_of[:n_rows]
    out = {"criticality": _sample_mean(m["criticality"], sample_of, batch)}
    if "loss" in m and rows.labels is not None:
        labelled = rows.labels.to(sample_of.device) >= 0
        out["loss"] = _sample_mean(m["loss"], sample_of[labelled], batch)
    return out


@contextlib.contextmanager
def _device_model(model: nn.Module, device) -> Iterator[torch.device]:
    first = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    if first is not None and first.device != dev:
        model.to(dev)  # as the engine does: the model moves to the device it is evaluated on
    yield dev


def proxies(
    model: nn.Module,
    data,
    *,
    max_n: int = 4,
    output: str | None = None,
    skip: bool = True,
    against: Sequence[str] = (),
    factory: Callable[[], nn.Module] | None = None,
    trials: int = 1,
    seed: int = 0,
    prune: bool = True,
    images: int | None = None,
    data_seed: int = 0,
    batch_size: int = 32,
    device: str | None = None,
    executor: str = "prefix",
    model_name: str = "model",
    progress: bool = False,
) -> ProxyResult:
    """The pruning literature's proxies of every block, from one pass over the data.

    Per block (the stack `blocks.find_block_stack` finds: transformer layers, ResNet residual blocks
    across stages, ViT blocks): `bi_token` and `bi_sequence` (Block Influence 1 − cos(x_in, x_out),
    averaged over all non-padded tokens, or per sequence first), `relative_l2` (‖x_out − x_in‖/‖x_in‖
    per token), `angular_last` and `angular_all` for n = 1 … `max_n` (the angular distance between
    the stream entering block ℓ and the stream leaving block ℓ+n−1, at each sequence's last
    non-padded token, or averaged over all of them; a row per n, named by block ℓ), and the effect
    of skipping the block: `skip_loss`, the change of the loss (data with labels or a language
    model), else `skip_criticality`. Blocks whose input and output differ in shape (a downsampling
    ResNet block) get no similarity proxies (NaN, with a note) and cannot be skipped.

    The same pass measures the real criticality of each block under `skip` and the probes in
    `against` (e.g. "rerandomize"), per sample, and, with `prune`, the model with the k least
    important blocks of every ranking skipped at once, k = 1 … L/2: `compare_proxies(result)` then
    needs nothing else.

    Args:
        model: the model (unchanged afterwards; hooks are removed also after an error).
        data: a `Dataset`, a data spec, a tensor or a dict of tensors (token ids, attention mask).
        max_n: the longest span of the angular distance.
        output: output adapter (`outputs.create_output`); None: chosen from the output.
        skip: run one forward per block with the block skipped (`skip_loss`, the `skip` criticality).
        against: further probes whose criticality to measure (e.g. ["rerandomize"]).
        factory: the untrained constructor, for "rerandomize".
        trials: draws per block of random probes.
        seed: probe seed (trial t uses `derive_seed(seed, t)`).
        prune: measure the pruned models (needs `skip`).
        images: random evaluation subset of this many samples (None: all).
        data_seed: seed of that subset.
        batch_size: samples per forward.
        device: where to compute (default: the model's device).
        executor: how the probed forwards run: "prefix" (default; only the blocks from the probed one
            on, see `prefix.PrefixExecutor`) or "full" (the whole model each time; the same numbers).
        model_name: the `model` column.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    from ...data import as_dataset
    from ...data.inputs import attention_mask, num_samples, take, to_device
    from ...engine.executors.base import eval_mode
    from ...engine.outputs import resolve_output
    from ...engine.probes import build_probes
    from ...seeding import derive_seed
    from ...units.blocks import find_block_stack
    from ...units.layers import select_units

    for name, value, low in (("max_n", max_n, 1), ("trials", trials, 1), ("seed", seed, 0), ("batch_size", batch_size, 1),
                             ("data_seed", data_seed, 0)):
        check_int(name, value, low=low)
    against = [against] if isinstance(against, str) else list(against)
    dataset = as_dataset(data).subset(images, data_seed)
    stack = find_block_stack(model)
    if stack is None or len(stack.names) < 2:
        raise LayercritError(f"{type(model).__name__} has no stack of repeated blocks (transformer layers, residual "
                             "blocks): block proxies need one")
    names = list(stack.names)
    max_n = min(max_n, len(names))
    units = {u.name: u for u in select_units(model, granularity="block")}
    labels = {n: units[n].label if n in units else n for n in names}
    probe_objs = [p for p in build_probes([a for a in against if a != "skip"], factory) if p.name != "skip"]
    for p in probe_objs:
        p.check(model, [units[n] for n in names if n in units])
    proxy_sums, crit_sums = _Sums(), _Sums()
    cache = _ValuesCache()
    n_samples = num_samples(dataset.x)
    adapter = why = None
    trial_ids = {p.name: range(trials) if p.random else [0] for p in probe_objs}
    forwards = 1 + (len(names) if skip else 0) + sum(len(names) * len(t) for t in trial_ids.values())
    ex = _executor(model, executor)
    # What the probed forwards will change, for the executor's plan (it reads the names, not the values:
    # the values are drawn when their block runs).
    ex.prepare(([_skip([n]) for n in names] if skip else [])
               + [dict.fromkeys(units[n].params) for p in probe_objs for n in names if n in units])
    bar = tqdm(total=forwards * -(-n_samples // batch_size), desc=f"{model_name}: proxies", unit="fwd",
               disable=not progress, leave=False)
    try:
        with torch.no_grad(), eval_mode(model), _device_model(model, device) as dev, \
                _Recorder(model, names, max_n, proxy_sums) as rec:
            for start in range(0, n_samples, batch_size):
                idx = slice(start, start + batch_size)
                x = to_device(take(dataset.x, idx), dev)
                y = None if dataset.y is None else dataset.y[idx].to(dev)
                try:
                    rec.start(attention_mask(x))
                    try:
                        p_out = ex.start_batch(x)
                    finally:
                        rec.active = False
                    rec.stop()
                    batch = num_samples(x)
                    if adapter is None:
                        adapter, why = resolve_output(output, model, p_out)
                        adapter.check(x, dataset.y, p_out)
                    rows = adapter.rows(x, y, p_out)
                    p_values = adapter.values(p_out, rows)
                    base = _compare_rows(adapter, rows, p_values, p_out, batch)
                    bar.update(1)
                    for name in names if skip else []:
                        shape_in, shape_out = rec.shapes[name]
                        if shape_in == shape_out:  # a block that changes the shape has no identity to skip
                            q = _compare_rows(adapter, rows, p_values, ex.run(_skip([name])), batch)
                            _add_probe(crit_sums, proxy_sums, name, "skip", 0, q, base)
                        bar.update(1)
                    for probe in probe_objs:
                        for name in names:
                            if name in units:  # the draws of one block together (the executor may batch them)
                                draws = [cache.get(probe, model, units[name], derive_seed(seed, t)) for t in trial_ids[probe.name]]
                                for trial, out in zip(trial_ids[probe.name], ex.run_many(draws)):
                                    q = _compare_rows(adapter, rows, p_values, out, batch)
                                    _add_probe(crit_sums, None, name, probe.name, trial, q, base)
                            bar.update(len(trial_ids[probe.name]))
                finally:
                    ex.end_batch()
    finally:
        bar.close()
    config = {"model": model_name, "data": dataset.spec, "data_identity": dataset.identity, "n": n_samples,
              "max_n": max_n, "output": adapter.name, "output_reason": why, "skip": skip, "against": against,
              "trials": trials, "seed": seed, "images": images, "data_seed": data_seed, "batch_size": batch_size,
              "blocks": names, "stack": stack.path, "executor": ex.name}
    result = _tables(model_name, names, labels, max_n, rec, proxy_sums, crit_sums, probe_objs, trial_ids, seed,
                     n_samples, has_loss=any(k[3] == "loss" for k in crit_sums.parts), skip=skip, config=config)
    if prune and skip:
        result.pruning = _prune(model, dataset, names, rec.shapes, result, adapter, batch_size, device, executor)
    return result


def _add_probe(crit_sums: _Sums, proxy_sums: _Sums | None, name: str, probe: str, trial: int,
               q: dict[str, tuple[torch.Tensor, torch.Tensor]], base: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Record one probed forward: its criticality (and loss) per sample, and for `skip` the proxy."""
    for measure, (values, counts) in q.items():
        crit_sums.add((name, probe, trial, measure), values, counts)
    if proxy_sums is None:
        return
    if "loss" in q:
        (lq, cq), (lp, _) = q["loss"], base["loss"]
        proxy_sums.add((name, "skip_loss", 1), lq - lp, cq)
    else:
        proxy_sums.add((name, "skip_criticality", 1), *q["criticality"])


def _weighted(values: np.ndarray, weights: np.ndarray) -> float:
    ok = (weights > 0) & np.isfinite(values)
    return float((weights[ok] * values[ok]).sum() / weights[ok].sum()) if ok.any() else math.nan


def _tables(model_name: str, names: list[str], labels: dict[str, str], max_n: int, rec: _Recorder, proxy_sums: _Sums,
            crit_sums: _Sums, probe_objs: list, trial_ids: dict, seed: int, n_samples: int, *, has_loss: bool,
            skip: bool, config: dict) -> ProxyResult:
    from ...seeding import derive_seed

    sample_ids = np.arange(n_samples)
    # (proxy name, key in the sums, token-weighted)
    specs = [("bi_token", "bi", True), ("bi_sequence", "bi", False), ("relative_l2", "relative_l2", True)]
    rows, sample_parts = [], []
    for i, name in enumerate(names):
        wanted = [(p, key, 1, tok) for p, key, tok in specs]
        for n in range(1, min(max_n, len(names) - i) + 1):
            wanted += [("angular_last", "angular_last", n, False), ("angular_all", "angular_all", n, True)]
        if skip:
            wanted.append(("skip_loss" if has_loss else "skip_criticality",) * 2 + (1, True))
        for proxy, key, n, tokens in wanted:
            got = proxy_sums.get((name, key, n))
            note_key = (name, "angular" if key.startswith("angular") else key, n)
            if got is None:
                note = rec.notes.get(note_key, "input and output differ in shape: the block cannot be skipped"
                                     if key.startswith("skip") else "not measured")
                rows.append({"model": model_name, "layer": name, "label": labels[name], "proxy": proxy, "n": n,
                             "value": math.nan, "samples": 0, "tokens": 0, "note": note})
                continue
            values, counts = got
            weights = counts if tokens else (counts > 0).astype(float)
            rows.append({"model": model_name, "layer": name, "label": labels[name], "proxy": proxy, "n": n,
                         "value": _weighted(values, weights), "samples": int((counts > 0).sum()),
                         "tokens": int(counts.sum()), "note": ""})
            sample_parts.append(pd.DataFrame({"sample": sample_ids, "layer": name, "proxy": proxy, "n": n,
                                              "value": values, "weight": weights}))
    table = pd.DataFrame(rows, columns=PROXY_COLUMNS)
    samples = pd.concat(sample_parts, ignore_index=True) if sample_parts else _empty(SAMPLE_COLUMNS)
    crit_rows, crit_parts = [], []
    probes = ([("skip", False, [0])] if skip else []) + [(p.name, p.random, list(trial_ids[p.name])) for p in probe_objs]
    for probe, random, trials in probes:
        for name in names:
            for trial in trials:
                got = crit_sums.get((name, probe, trial, "criticality"))
                if got is None:
                    continue
                values, counts = got
                loss = crit_sums.get((name, probe, trial, "loss"))
                crit_rows.append({"model": model_name, "layer": name, "label": labels[name], "probe": probe, "trial": trial,
                                  "seed": derive_seed(seed, trial) if random else None, "n": n_samples,
                                  "criticality": _weighted(values, counts),
                                  "loss": math.nan if loss is None else _weighted(*loss)})
                crit_parts.append(pd.DataFrame({
                    "sample": sample_ids, "layer": name, "probe": probe, "trial": trial, "criticality": values,
                    "loss": math.nan if loss is None else loss[0], "weight": counts,
                    "loss_weight": 0.0 if loss is None else loss[1]}))
    criticality = pd.DataFrame(crit_rows, columns=CRITICALITY_COLUMNS)
    criticality["seed"] = criticality["seed"].astype("Int64")
    crit_samples = pd.concat(crit_parts, ignore_index=True) if crit_parts else _empty(CRIT_SAMPLE_COLUMNS)
    return ProxyResult(table, samples, criticality, crit_samples, config=config)


def _prune(model: nn.Module, dataset, names: list[str], shapes: dict, result: ProxyResult, adapter, batch_size: int,
           device, executor: str) -> pd.DataFrame:
    """Criticality (and loss) of the model with every set of k least important blocks skipped at once."""
    from ...data.inputs import num_samples, take, to_device
    from ...engine.executors.base import eval_mode

    if result.criticality.empty:
        return _empty(PRUNING_COLUMNS)
    plan = compare_proxies(result, bootstrap=0).pruning
    order = {n: i for i, n in enumerate(names)}
    skippable = {n for n, (a, b) in shapes.items() if a == b}
    sets: dict[frozenset, int] = {}
    for column in ("blocks_by_proxy", "blocks_by_probe"):
        for blocks, k in zip(plan[column], plan["k"]):
            chosen = frozenset(blocks.split(";"))
            if chosen <= skippable:
                sets.setdefault(chosen, int(k))
    if not sets:
        return _empty(PRUNING_COLUMNS)
    keyed = [sorted(s, key=order.__getitem__) for s in sets]
    sums = _Sums()
    n_samples = num_samples(dataset.x)
    ex = _executor(model, executor)
    ex.prepare([_skip(blocks) for blocks in keyed])
    with torch.no_grad(), eval_mode(model), _device_model(model, device) as dev:
        for start in range(0, n_samples, batch_size):
            idx = slice(start, start + batch_size)
            x = to_device(take(dataset.x, idx), dev)
            y = None if dataset.y is None else dataset.y[idx].to(dev)
            try:
                p_out = ex.start_batch(x)
                rows = adapter.rows(x, y, p_out)
                p_values = adapter.values(p_out, rows)
                batch = num_samples(x)
                for blocks in keyed:
                    q = _compare_rows(adapter, rows, p_values, ex.run(_skip(blocks)), batch)
                    for measure, (values, counts) in q.items():
                        sums.add((";".join(blocks), measure), values, counts)
            finally:
                ex.end_batch()
    out = []
    for blocks in keyed:
        key = ";".join(blocks)
        loss = sums.get((key, "loss"))
        out.append({"blocks": key, "k": len(blocks), "criticality": _weighted(*sums.get((key, "criticality"))),
                    "loss": math.nan if loss is None else _weighted(*loss)})
    return pd.DataFrame(out, columns=PRUNING_COLUMNS).sort_values(["k", "blocks"], ignore_index=True)
