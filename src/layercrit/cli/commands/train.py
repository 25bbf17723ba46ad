"""`layercrit train`: train a model, saving checkpoint 0 and the chosen epochs."""

from __future__ import annotations

import argparse

import pandas as pd

from ..._utils.io import check_output_dir
from .._args import _add_model_args, _int_list, _out_path


def run(args) -> int:
    from ...training.trainer import TrainConfig, train

    check_output_dir(args.out)
    config = TrainConfig(
        model=args.model, model_kwargs=dict(args.model_arg), data=args.data, test_data=args.test_data,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, momentum=args.momentum,
        weight_decay=args.weight_decay, milestones=args.milestones, gamma=args.gamma, seed=args.seed,
        augment=args.augment, save_epochs=args.save_epochs,
    )
    run = train(config, args.out, resume=args.resume, progress=not args.quiet, device=args.device)
    rows = pd.DataFrame(run.manifest["checkpoints"])
    print(rows.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"checkpoints and manifest.json in {run.out_dir}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model, saving checkpoint 0 and the chosen epochs")
    _add_model_args(p, weights=False)
    p.add_argument("--data", default="digits:train", metavar="SPEC", help="training data: a data spec (default digits:train; forms below)")
    p.add_argument("--test-data", metavar="SPEC", help="held-out data (default: the data's own test split)")
    p.add_argument("--epochs", type=int, default=40, help="epochs to train (default 40)")
    p.add_argument("--out", type=_out_path, required=True, metavar="DIR",
                   help="folder for the checkpoints and manifest.json (created with its parents)")
    p.add_argument("--save-epochs", type=_int_list, metavar="LIST", help="e.g. 0,1,2,5,10-20 (default: every epoch)")
    p.add_argument("--lr", type=float, help="learning rate (default per data format, see README)")
    p.add_argument("--batch-size", type=int, default=128, help="samples per SGD step (default 128)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (default 0)")
    p.add_argument("--milestones", type=_int_list, metavar="LIST", help="epochs where lr *= gamma (default 30/60/90%%)")
    p.add_argument("--gamma", type=float, default=0.2, help="learning-rate factor at each milestone (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, shuffling and augmentation (default 0)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None, help="pad-4 crop + flip (default: CIFAR only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", help="e.g. cpu, cuda (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=run)
