"""Test helpers: tiny models with hand-set weights, importable by users' own tests."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    "MEASURES",
    "TinyCNN",
    "TinyLinear",
    "TinyMLP",
    "TinyResNet",
    "TinyTransformer",
    "assert_no_hooks",
    "assert_same_measures",
    "assert_same_state",
    "exact_measures",
    "snapshot",
]


class TinyLinear(nn.Module):
    """logits = W x + b with W, b given (a 2-input, 2-class model by default: W = I, b = 0)."""

    def __init__(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = torch.eye(2) if weight is None else weight
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else bias)

    def forward(self, x):
        return self.fc(x.flatten(1))


class TinyMLP(nn.Module):
    """Two Linear layers with a ReLU between; hand-settable via `load_state_dict`."""

    def __init__(self, d_in: int = 4, hidden: int = 3, classes: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TinyCNN(nn.Module):
    """Conv → BatchNorm → ReLU → pool → Linear, for 1×8×8 inputs."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    """A two-stage residual network with torchvision's module names (`conv1`, `layer1.0.conv1`, `fc`)."""

    def __init__(self, classes: int = 10, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(_Block(width, width, 1), _Block(width, width, 1))
        self.layer2 = nn.Sequential(_Block(width, 2 * width, 2), _Block(2 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Patch embedding, a learned position embedding and class token (own `nn.Parameter`s), two encoder blocks."""

    def __init__(self, classes: int = 10, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([_EncoderBlock(dim, heads), _EncoderBlock(dim, heads)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos
        for block in self.encoder.layers:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


# Assertions the tests share: probes restore bit-exactly, leave no hook, executors agree.


def assert_same_state(model, before):
    """Every parameter and buffer equal bit for bit to the saved `before` (a dict of clones)."""
    after = dict(model.named_parameters()) | dict(model.named_buffers())
    assert after.keys() == before.keys()
    for name, value in after.items():
        assert torch.equal(value, before[name]), name


def snapshot(model):
    """Clones of every parameter and buffer, for `assert_same_state`."""
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def assert_no_hooks(model):
    """No forward, forward-pre or backward hook left on any module."""
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


MEASURES = ["criticality", "agreement", "l1", "l2", "kl", "accuracy", "loss"]


def assert_same_measures(got, expected, measures=MEASURES, atol=1e-5, keys=("layer", "probe", "trial")):
    """Two results (or tables) hold the same rows and every measure agrees to `atol` (NaN where NaN)."""
    a, b = (getattr(t, "table", t) for t in (got, expected))
    keys = [k for k in keys if k in a.columns]
    a, b = a.set_index(keys), b.set_index(keys)
    assert a.index.equals(b.index)
    for m in measures:
        if m in a and a[m].notna().any():
            torch.testing.assert_close(torch.tensor(a[m].to_numpy(float)), torch.tensor(b[m].to_numpy(float)),
                                       rtol=0, atol=atol, equal_nan=True, msg=lambda msg, m=m: f"{m}: {msg}")


def exact_measures(p_logits: torch.Tensor, q_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """criticality, kl, l1 and l2 of softmax rows in float64 without cancellation: the reference the
    float32 measures are held to (tests/test_measures_precision.py, benchmarks/bench_lm_cost.py).

    y = log q − log p from the logits' differences, y = x − log Σ p·e^x with x = (z_q − z_p) − (z_q −
    z_p)_t at p's argmax t (log q − log p as a difference of two log-softmax values keeps only
    1e-16·|log-normalizer| of y: for nearly identical peaked rows, a relative error of 1e-6 in y_t);
    q − p = p·expm1(y); 1 − cos as ‖q⊥‖²/(‖q‖(‖q‖ + ⟨q, p̂⟩)), q⊥ = (q − p)⊥p; KL = Σ p·(e^y − 1 − y)
    with the series where |y| is small.
    """
    zp, zq = p_logits.detach().flatten(1).double(), q_logits.detach().flatten(1).double()
    lp = torch.log_softmax(zp, 1)
    p = lp.exp()
    dz = zq - zp  # exact for float32 logits
    x = dz - dz.gather(1, zp.argmax(1, keepdim=True))
    total = (p * torch.expm1(x)).sum(1)  # Σ p·e^x − 1: from its own terms where that is near 0
    shift = torch.where(total > -0.5, torch.log1p(total), torch.log((p * torch.exp(x)).sum(1)))
    y = x - shift[:, None]
    d = p * torch.expm1(y)  # q − p
    q = p + d
    phat = p / p.norm(dim=1, keepdim=True)
    along = (q * phat).sum(1)
    perp = d - (d * phat).sum(1, keepdim=True) * phat
    ee = (perp * perp).sum(1)
    nq = (along * along + ee).sqrt()
    series = y * y * (0.5 + y * (1 / 6 + y * (1 / 24 + y * (1 / 120 + y / 720))))
    g = torch.where(y.abs() < 1e-2, series, torch.expm1(y) - y)
    return {"criticality": ee / (nq * (nq + along)), "kl": (p * g).sum(1), "l1": d.abs().sum(1), "l2": d.norm(dim=1)}
