"""`layercrit layers`: list the probe-able layers of a model."""

from __future__ import annotations

import json

import pandas as pd

from ...units.blocks import find_block_stack
from ...units.layers import GRANULARITIES, list_layers, select_units
from .._args import (
    _add_model_args,
    _add_text_args,
    _load_data,
    _load_model,
)


def run(args) -> int:
    data = _load_data(args) if args.data else None
    model, _ = _load_model(args, data)
    if args.granularity != "layer":
        return _units(model, args)
    layers = list_layers(model, include_norm=True, label_style=args.label_style)
    rows = [{"name": la.name or "(root)", "label": la.label, "type": la.kind, "params": la.n_params,
             "probed": "yes" if (args.include_norm or not la.is_norm) else "no (norm)"} for la in layers]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    print(f"{sum(r['probed'] == 'yes' for r in rows)} probe-able layers, {sum(r['params'] for r in rows):,} parameters")
    return 0


def _units(model, args) -> int:
    """`--granularity block|attn|mlp`: the units the probes reset (blocks, sub-layers), one row each."""
    units = select_units(model, granularity=args.granularity, include_norm=args.include_norm, label_style=args.label_style)
    rows = [{"name": u.name, "label": u.label, "layers": len(u.layers), "params": u.n_params} for u in units]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(pd.DataFrame(rows).to_string(index=False))
    stack = find_block_stack(model)
    what = "blocks" if args.granularity == "block" else f"{args.granularity} sub-layers"
    print(f"{len(units)} units ({len(stack) if stack is not None else 0} {what}), {sum(r['params'] for r in rows):,} parameters")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("layers", help="list the probe-able layers of a model")
    _add_model_args(p)
    p.add_argument("--data", metavar="SPEC", help="data the model takes (sizes built-in models)")
    _add_text_args(p)
    p.add_argument("--include-norm", action="store_true", help="mark normalization layers as probed")
    p.add_argument("--label-style", default="auto", choices=["auto", "name", "gavrikov", "figure", "zhang"],
                   help="layer labels: auto (default: the papers' names where the architecture is known), the module "
                        "name, or Gavrikov's / Zhang's naming")
    p.add_argument("--granularity", default="layer", choices=GRANULARITIES,
                   help="list each layer (default), or the units probes reset: each block (residual block, transformer "
                        "layer; the embeddings and head one unit each), or each block's attn / mlp sub-layer")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=run)
