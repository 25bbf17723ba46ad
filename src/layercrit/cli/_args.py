"""Options the commands share (pip's `cmdoptions`): model, data, text and engine arguments, and how
they become library calls (`_load_model`, `_load_data`, `_engine_settings`)."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from ..data import Dataset, load_data
from ..engine.executors.base import EXECUTORS
from ..errors import LayercritError
from ..models import ModelFactory
from ..training.checkpoints import build_model
from ..units.layers import GRANULARITIES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise LayercritError(f"{self.prog}: {message} (see --help)")


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _out_path(text: str) -> Path:
    return Path(text)


def _stats(text: str) -> str:
    if text != "stats":
        raise argparse.ArgumentTypeError(f"expected nothing or 'stats', got {text!r}")
    return text


def _int_list(text: str) -> list[int]:
    """`0,1,2,5` or ranges `0-10` (inclusive), mixed."""
    out: list[int] = []
    try:
        for part in filter(None, text.split(",")):
            lo, sep, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2,5 or 0-10, got {text!r}") from None
    return out


def _add_engine_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    """How the evaluations run: batch size, device, executor and the speed options."""
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"samples per forward pass (default {batch_size})")
    p.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: the model's, i.e. cpu)")
    p.add_argument("--executor", default="auto", choices=EXECUTORS.list(),
                   help="auto (default): recompute only what each probe changes when the model traces with "
                        "torch.fx, else the whole model; full: the whole model for every probe")
    p.add_argument("--memory-budget", type=float, metavar="MiB",
                   help="intermediate values the incremental executor keeps per batch (default 1024 MiB)")
    p.add_argument("--batch-trials", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the draws of one layer in one vmapped pass (default: on CUDA only)")
    p.add_argument("--autocast", choices=["bf16", "fp16"], help="CUDA mixed precision (measures stay fp32)")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="torch.compile the evaluated graphs (default backend inductor; needs a C++ compiler on the CPU)")


def _engine_settings(args) -> dict:
    budget = args.memory_budget
    if budget is not None and not budget > 0:
        raise LayercritError(f"--memory-budget should be a positive number of MiB, got {budget:g}")
    return {"batch_size": args.batch_size, "device": args.device, "executor": args.executor,
            "memory_budget": None if budget is None else max(1, int(budget * 2**20)),
            "batch_trials": args.batch_trials, "autocast": args.autocast, "compile": args.compile}


def _add_text_args(p: argparse.ArgumentParser) -> None:
    """How `text:FILE` data is tokenized (a local Hugging Face tokenizer; nothing is downloaded)."""
    p.add_argument("--tokenizer", metavar="DIR", help="text:FILE data: a local Hugging Face tokenizer folder "
                                                      "(default for --model hf:PATH: the model's own)")
    p.add_argument("--seq-len", type=int, metavar="N", help="text:FILE data: tokens per window (default 128)")
    p.add_argument("--stride", type=int, metavar="N", help="text:FILE data: tokens between window starts (default: no overlap)")


def _load_data(args) -> Dataset:
    tokenizer = args.tokenizer
    model = getattr(args, "model", None) or ""
    if tokenizer is None and model.startswith("hf:") and str(args.data).startswith("text:"):
        from ..models.hf import model_folder  # an hf: model tokenizes text with its own tokenizer

        tokenizer = model_folder(model[len("hf:"):])
    return load_data(args.data, tokenizer=tokenizer, seq_len=args.seq_len, stride=args.stride)


def _add_model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("--model", required=True, metavar="SPEC", help="built-in name, torchvision:NAME, timm:NAME, hf:PATH (a local Hugging Face "
                   "model folder or .gguf file, with its weights), package.module:callable or file.py:callable")
    p.add_argument("--model-arg", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model constructor (repeatable)")
    if weights:
        p.add_argument("--weights", metavar="FILE", help="state dict (.pt/.pth/.safetensors) or layercrit checkpoint")


def _load_model(args, data: Dataset | None) -> tuple[object, ModelFactory]:
    return build_model(args.model, getattr(args, "weights", None), dict(args.model_arg), data)


def _modcrit_settings(args) -> dict:
    return {"alphas": args.alphas, "noise_draws": args.noise_draws, "train_subset": args.train_subset,
            "data_seed": args.data_seed, "seed": args.seed, "loss": args.loss, "relative": args.relative,
            "curve": not getattr(args, "fast", True), "layers": args.layers, **_engine_settings(args)}


def add_robustness_args(p: argparse.ArgumentParser, name: str) -> None:
    """The arguments `robustness` and `distances` share (`name` picks the ones only one of them takes)."""
    p.add_argument("run", type=Path, metavar="CKPT_DIR", help="a checkpoint folder written by `layercrit train`")
    p.add_argument("--epochs", type=_int_list, metavar="LIST", help="checkpoints to use, e.g. 0,1,5-10 (default: all)")
    p.add_argument("--granularity", default="layer", choices=GRANULARITIES,
                   help="each layer (default), each block (residual block, transformer layer) or each "
                        "transformer block's attn / mlp sub-layer")
    p.add_argument("--layers", nargs="+", metavar="GLOB", help="name or label globs (default: every layer)")
    p.add_argument("--include-norm", action="store_true", help="also normalization layers")
    p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json", help="the tidy table (folders are created)")
    if name == "robustness":
        p.add_argument("--data", metavar="SPEC", help="evaluation data: a data spec (default: the run's test data; forms below)")
        p.add_argument("--trials", type=int, default=3, help="re-randomization trials (default 3)")
        p.add_argument("--seed", type=int, default=0, help="probe seed (default 0)")
        p.add_argument("--images", type=int, metavar="N",
                       help="seeded random evaluation subset (more than the data has: all of it, with a warning)")
        p.add_argument("--strict-images", action="store_true", help="an --images above the data's size is an error")
        p.add_argument("--data-seed", type=int, default=0, help="seed of the evaluation subset (default 0)")
        p.add_argument("--group", nargs="+", metavar="GROUP",
                       help="joint groups: NAME=GLOB,GLOB or all-but-first-block-per-stage / every-second-block")
        _add_engine_args(p, 256)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_modcrit_args(p: argparse.ArgumentParser, name: str) -> None:
    """The arguments `modcrit` and `rank` share (`name` picks the ones only one of them takes)."""
    if name == "modcrit":
        p.add_argument("run", type=Path, metavar="CKPT_DIR", help="a checkpoint folder written by `layercrit train`")
        p.add_argument("--data", metavar="SPEC", help="training set: a data spec (default: the run's own; forms below)")
    else:
        p.add_argument("runs", type=Path, nargs="+", metavar="CKPT_DIR", help="checkpoint folders of `layercrit train`")
    p.add_argument("--epsilon", type=float, nargs="+", default=[0.1], help="training-error thresholds (default 0.1)")
    p.add_argument("--relative", action="store_true", help="epsilon counts above the model's own training error")
    p.add_argument("--alphas", type=int, default=21, help="alpha grid points (default 21)")
    p.add_argument("--noise-draws", type=int, default=8, help="Monte-Carlo draws per (alpha, sigma) (default 8)")
    p.add_argument("--train-subset", type=int, metavar="N",
                   help="seeded subset of N training samples (faster; more than the set has: all of it)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the training subset (default 0)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--loss", default="error", choices=["error", "cross-entropy"],
                   help="training loss compared with epsilon: 0-1 error (default, the paper's) or cross-entropy")
    if name == "modcrit":  # rank needs only mu and sigma at alpha = 1: it always searches that way
        p.add_argument("--fast", action="store_true", help="only the alphas that can lower mu (no full curve)")
    p.add_argument("--layers", nargs="+", metavar="GLOB", help="modules: name or label globs (default: every layer)")
    _add_engine_args(p, 512)
    p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json",
                   help="the results; a CSV gets FILE.config.json and (modcrit) FILE.curve.csv, FILE.network.csv "
                        "or (rank) FILE.ranking.csv beside it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
