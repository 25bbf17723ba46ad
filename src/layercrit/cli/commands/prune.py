"""`layercrit prune`: write a Hugging Face model without some of its blocks, as a folder `from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path

from ...errors import LayercritError
from .._args import _model_arg


def _spec(model: str) -> str:
    """A bare path (a model folder, a .gguf file) means `hf:PATH`; other specs are taken as they are."""
    if model.startswith("hf:") or not (Path(model).exists() or model.lower().endswith(".gguf")):
        return model
    return f"hf:{model}"


def run(args) -> int:
    from ...models.hf import model_folder
    from ...models.prune import block_indices, check_prune_output, save_pruned
    from ...training.checkpoints import build_model
    from ...units.blocks import find_block_stack

    if bool(args.drop) == bool(args.ranking):
        raise LayercritError("prune: give the blocks to drop, either --drop BLOCK … or --from FILE --proxy NAME --k K")
    if args.ranking and (args.proxy is None or args.k is None):
        raise LayercritError("prune --from FILE needs --proxy NAME (a proxy or probe in the file) and --k K")
    if args.drop and (args.proxy is not None or args.k is not None):
        raise LayercritError("prune: --proxy and --k go with --from FILE, not with --drop")
    out = check_prune_output(args.out)
    blocks = list(args.drop or [])
    if args.ranking:
        from ...analyses.proxies.ranking import least_important

        blocks = least_important(args.ranking, args.proxy, args.k)
    spec = _spec(args.model)
    model, _ = build_model(spec, args.weights, dict(args.model_arg))
    drop = block_indices(model, blocks)
    stack = find_block_stack(model)
    tokenizer_from = model_folder(spec[len("hf:"):]) if spec.startswith("hf:") else None
    info = {"source": spec, "ranking": None if not args.ranking else {"file": str(args.ranking), "name": args.proxy, "k": args.k}}
    save_pruned(model, drop, out, tokenizer_from=tokenizer_from, info=info)
    width = max(2, len(str(len(stack) - 1)))
    names = ", ".join(f"L{i:0{width}d} ({stack.names[i]})" for i in drop)
    print(f"dropped {len(drop)} of {len(stack)} blocks: {names}")
    print(f"wrote {out} ({len(stack) - len(drop)} blocks; load it with from_pretrained, or --model hf:{out})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="write a Hugging Face model without some blocks (a folder from_pretrained loads)")
    p.add_argument("model", metavar="MODEL",
                   help="hf:PATH or a bare PATH (a Hugging Face model folder or .gguf file), or another model spec "
                        "that builds a transformers model (then with --weights)")
    p.add_argument("--model-arg", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model (hf: task=causal-lm|base|…; repeatable)")
    p.add_argument("--weights", metavar="FILE", help="state dict (.pt/.pth/.safetensors) or layercrit checkpoint")
    p.add_argument("--drop", nargs="+", metavar="BLOCK",
                   help="blocks to drop: labels (L05), 0-based indices (5) or module paths (model.layers.5)")
    p.add_argument("--from", dest="ranking", type=Path, metavar="FILE",
                   help="drop the --k least important blocks of a ranking in a `layercrit proxies` result or a "
                        "`compare-proxies` output")
    p.add_argument("--proxy", metavar="NAME", help="with --from: the proxy (bi_token, angular_last, …) or probe (skip, "
                                                   "rerandomize) whose ranking is used")
    p.add_argument("--k", type=int, metavar="K", help="with --from: how many blocks to drop")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="a new or empty folder for the pruned model")
    p.set_defaults(fn=run)
