"""Training with self-describing checkpoints: checkpoint 0 before the first update, then epochs.

Recipe defaults follow Zhang et al. App. A: SGD with momentum 0.9, cross entropy, batch 128,
learning rate ×0.2 at 30 %, 60 % and 90 % of the epochs, no weight decay. Deterministic under a
seed on CPU: the model is built under `seed`, batches are shuffled (and augmented) by their own
generator, whose state is saved in every checkpoint so `resume` continues bit-exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._utils.io import atomic_path, check_output_dir, make_output_dir
from ..data import Dataset, held_out_spec, load_data
from ..engine.executors.base import eval_mode
from ..engine.outputs import logits_of
from ..errors import LayercritError, check_int
from ..models import factory_for_data
from ..seeding import generator
from .checkpoints import apply_weights, load_checkpoint, save_checkpoint

__all__ = ["DEFAULT_LR", "TrainConfig", "TrainRun", "evaluate_error", "train"]

# Default learning rate per data format: chosen so the default run trains (see README).
DEFAULT_LR = {"digits": 0.05, "npz": 0.05, "cifar10": 0.05, "mnist": 0.05, "imagefolder": 0.05}
MANIFEST = "manifest.json"


@dataclass
class TrainConfig:
    """A training run (stored in every checkpoint and in the manifest)."""

    model: str = "fcn-3x256"  # model spec
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # constructor arguments
    data: str = "digits"  # training data spec (digits: the train split)
    test_data: str | None = None  # held-out data spec (default: the data's built-in test split)
    epochs: int = 40
    lr: float | None = None  # default: DEFAULT_LR of the data format
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] | None = None  # default: 30 %, 60 %, 90 % of the epochs
    gamma: float = 0.2  # learning-rate factor at each milestone
    seed: int = 0
    augment: bool | None = None  # pad 4 + random crop + flip; default: on for CIFAR-10
    save_epochs: list[int] | None = None  # default: every epoch (0 is always saved)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            check_int(name, v)
        if self.lr is not None and not self.lr > 0:
            raise LayercritError(f"Expected `lr` to be positive, got {self.lr!r}")
        if self.milestones is None:
            self.milestones = sorted({max(1, round(self.epochs * f)) for f in (0.3, 0.6, 0.9)})
        if self.save_epochs is None:
            self.save_epochs = list(range(self.epochs + 1))
        bad = [e for e in self.save_epochs if not 0 <= e <= self.epochs]
        if bad:
            raise LayercritError(f"save epochs {bad} are outside 0..{self.epochs}")
        self.save_epochs = sorted(set(self.save_epochs) | {0, self.epochs})


@dataclass
class TrainRun:
    """What `train` produced: the final model and the folder with its checkpoints."""

    model: nn.Module
    out_dir: Path
    manifest: dict


def evaluate_error(model: nn.Module, data: Dataset, batch_size: int = 512) -> tuple[float, float]:
    """(0-1 error, mean cross-entropy) of `model` on labelled `data`, in eval mode."""
    wrong, loss = 0.0, 0.0
    device = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model):
        for i in range(0, len(data), batch_size):
            x, y = data.x[i : i + batch_size].to(device), data.y[i : i + batch_size].to(device)
            out = logits_of(model(x)).double()
            wrong += float((out.argmax(1) != y).sum())
            loss += float(F.cross_entropy(out, y, reduction="sum"))
    return wrong / len(data), loss / len(data)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Pad 4 (zeros), random 32×32-style crop back to the input size, random horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=g)
    dx = torch.randint(0, 9, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    mirrored = dx.view(n, 1, 1, 1) + (w - 1) - torch.arange(w).view(1, 1, 1, w)
    cols = torch.where(flip.view(n, 1, 1, 1), mirrored, cols)
    idx = torch.arange(n)[:, None, None, None]
    ch = torch.arange(x.shape[1])[None, :, None, None]
    return padded[idx, ch, rows, cols]


def _load_pair(config: TrainConfig) -> tuple[Dataset, Dataset | None]:
    train_data = load_data(config.data, split="train")
    if train_data.y is None:
        raise LayercritError(f"training data {config.data!r} has no labels ('y')")
    test_spec = config.test_data or held_out_spec(config.data)
    test_data = load_data(test_spec, split="test") if test_spec else None
    if test_data is not None and test_data.input_shape != train_data.input_shape:
        raise LayercritError(
            f"test data has samples of shape {test_data.input_shape}, training data {train_data.input_shape}"
        )
    return train_data, test_data


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))


def train(
    config: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = False, device: str | None = None
) -> TrainRun:
    """Train `config.model` on `config.data`, saving checkpoints to `out_dir`.

    Args:
        config: the run.
        out_dir: folder for `epoch_XXXX.pt` checkpoints and `manifest.json` (created if missing).
        resume: continue from the newest checkpoint in `out_dir` (same config required).
        progress: show a progress bar.
        device: where to train (default: CUDA when available, else CPU; deterministic on CPU).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = check_output_dir(out_dir)  # created with its parents once the data has loaded
    train_data, test_data = _load_pair(config)
    fmt = train_data.meta.get("format", "npz")
    lr = config.lr if config.lr is not None else DEFAULT_LR.get(fmt, 0.05)
    augment = config.augment if config.augment is not None else fmt == "cifar10"
    if augment and train_data.x.ndim != 4:
        raise LayercritError(f"augmentation needs image data (N, C, H, W); got shape {tuple(train_data.x.shape)}")
    factory = factory_for_data(config.model, config.model_kwargs, train_data.num_classes, train_data.input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = factory()
    model.to(device)
    hparams = asdict(config) | {"lr": lr, "augment": augment, "model_kwargs": factory.kwargs}
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=config.milestones, gamma=config.gamma)
    g = generator(config.seed + 1)
    manifest = {"format": "layercrit-run", "version": 1, "config": hparams, "checkpoints": []}
    start = 0
    if resume and (out_dir / MANIFEST).is_file():
        manifest = json.loads((out_dir / MANIFEST).read_text())
        if manifest.get("config") != json.loads(json.dumps(hparams)):
            raise LayercritError(f"cannot resume in {str(out_dir)!r}: it holds a run with a different configuration")
        last = manifest["checkpoints"][-1]
        ckpt = load_checkpoint(out_dir / last["file"])
        apply_weights(model, ckpt["state_dict"], f"checkpoint {last['file']}")
        if "optimizer" in ckpt:
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            g.set_state(ckpt["generator"])
        start = ckpt["epoch"]
    elif out_dir.exists() and (out_dir / MANIFEST).is_file():
        raise LayercritError(f"{str(out_dir)!r} already holds a training run; use resume or another folder")
    make_output_dir(out_dir)
    # Only the epoch boundaries saved with optimizer state can be resumed bit-exactly, so every
    # checkpoint carries it: the epoch-0 one too.

    def save(epoch: int) -> None:
        train_err, train_loss = evaluate_error(model, train_data)
        metrics = {"train_error": train_err, "train_loss": train_loss}
        if test_data is not None:
            metrics["test_error"], metrics["test_loss"] = evaluate_error(model, test_data)
        name = f"epoch_{epoch:04d}.pt"
        save_checkpoint(
            out_dir / name,
            model.state_dict(),
            epoch=epoch,
            model={"spec": config.model, "kwargs": factory.kwargs},
            data={"spec": config.data, "test_spec": config.test_data, "identity": train_data.identity},
            seed=config.seed,
            hparams=hparams,
            metrics=metrics,
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
            generator=g.get_state(),
        )
        manifest["checkpoints"] = [c for c in manifest["checkpoints"] if c["epoch"] != epoch]
        manifest["checkpoints"].append({"epoch": epoch, "file": name, **metrics})
        _write_manifest(out_dir, manifest)

    if start == 0 and not manifest["checkpoints"]:
        save(0)
    x_all, y_all = train_data.x, train_data.y
    # One step per SGD batch (a total and an ETA from the first batches on), the epoch in the description.
    steps = -(-len(x_all) // config.batch_size)
    bar = tqdm(total=config.epochs * steps, initial=start * steps, desc="train", unit="batch", disable=not progress)
    for epoch in range(start + 1, config.epochs + 1):
        bar.set_description(f"train epoch {epoch}/{config.epochs}", refresh=False)
        model.train()
        perm = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(perm), config.batch_size):
            idx = perm[i : i + config.batch_size]
            x, y = x_all[idx], y_all[idx]
            if augment:
                x = _augment(x, g)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(logits_of(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
        sched.step()
        if epoch in config.save_epochs:
            save(epoch)
    bar.close()
    model.eval()
    return TrainRun(model, out_dir, manifest)
