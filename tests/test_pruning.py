"""Perplexity after pruning (`layercrit.pruning_curve`) on tiny models, against independent computations.

The reference numbers come from plain PyTorch: the model copied with the skipped blocks replaced by
`nn.Identity` (so that the engine's skip and executors are not what is checked against themselves),
and the perplexity exp(Σ −log p(next token) / n) over every position that has a next token."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import layercrit
from layercrit import LayercritError, PruningCurve, pruning_curve
from layercrit.analyses.pruning import greedy_cost, rankings_from_proxies
from layercrit.testing import TinyResNet, TinyTransformer


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class TinyDecoder(nn.Module):
    """Embedding, six pre-norm residual blocks, a head: a causal "LM" (each position sees only itself)."""

    def __init__(self, vocab: int = 11, d: int = 8, n: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_Block(d) for _ in range(n)])
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for b in self.layers:
            x = b(x)
        return self.head(x)


def _decoder(seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    m = TinyDecoder()
    with torch.no_grad():  # blocks of clearly different weight, so rankings and the greedy order differ
        for i, b in enumerate(m.layers):
            b.fc.weight.mul_(0.5 + i)
    return m.eval()


def _data(n: int = 5, t: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # one right-padded sequence: positions 4… have no next token
    return {"input_ids": ids, "attention_mask": mask}


def _skipped(model: TinyDecoder, blocks) -> TinyDecoder:
    m = copy.deepcopy(model)
    for i in blocks:
        m.layers[i] = nn.Identity()
    return m


def _reference(model: nn.Module, data: dict) -> tuple[float, float, int]:
    """(perplexity, accuracy, tokens) over positions whose next position is real."""
    with torch.no_grad():
        logits = model(data["input_ids"])
    mask = data["attention_mask"].bool()
    ok = mask[:, 1:] & mask[:, :-1]
    lp = logits[:, :-1][ok]
    y = data["input_ids"][:, 1:][ok]
    loss = F.cross_entropy(lp.double(), y, reduction="sum").item()
    return math.exp(loss / len(y)), (lp.argmax(-1) == y).double().mean().item(), len(y)


def _row(curve: PruningCurve, ranking: str, k: int) -> pd.Series:
    t = curve.table
    return t[(t.ranking == ranking) & (t.k == k)].iloc[0]


def test_unmodified_row_and_joint_skips_match_an_independent_computation():
    model, data = _decoder(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order = ["layers.4", "layers.1", "layers.2"]
    curve = pruning_curve(model, data, rankings={"mine": order}, max_k=3, batch_size=2)
    ppl, acc, n = _reference(model, data)
    assert n == 5 * 6 - 2  # 6 scored positions per sequence, 2 fewer in the padded one
    base = _row(curve, "mine", 0)
    assert base["perplexity"] == pytest.approx(ppl, rel=1e-6) and base["accuracy"] == pytest.approx(acc)
    assert base["n_tokens"] == n and base["dropped"] == "" and base["loss"] == pytest.approx(math.log(ppl), rel=1e-6)
    for k in (1, 2, 3):
        idx = [int(o.split(".")[1]) for o in order[:k]]
        ppl_k, acc_k, _ = _reference(_skipped(model, idx), data)
        row = _row(curve, "mine", k)
        assert row["perplexity"] == pytest.approx(ppl_k, rel=1e-6) and row["accuracy"] == pytest.approx(acc_k)
        assert row["dropped"] == ";".join(f"L{i:02d}" for i in idx)  # label and 0-based index, in ranking order
        assert row["dropped_index"] == ";".join(map(str, idx))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_score_rankings_sort_ascending_and_full_executor_agrees():
    model, data = _decoder(), _data()
    scores = {f"layers.{i}": s for i, s in enumerate([0.5, 0.1, 0.9, 0.1, 0.7, 0.3])}  # tie 1/3: earlier first
    a = pruning_curve(model, data, rankings={"s": scores}, max_k=3)
    b = pruning_curve(model, data, rankings={"s": scores}, max_k=3, executor="full")
    assert list(a.table["dropped_index"]) == ["", "1", "1;3", "1;3;5"]
    assert a.orders["s"][:3] == ["layers.1", "layers.3", "layers.5"]
    pd.testing.assert_series_equal(a.table["perplexity"], b.table["perplexity"], rtol=1e-6)


def test_greedy_first_step_is_the_cheapest_single_skip_and_each_step_the_cheapest_given_the_last():
    model, data = _decoder(), _data()
    curve = pruning_curve(model, data, rankings={}, max_k=3, greedy=True)
    singles = {i: _reference(_skipped(model, [i]), data)[0] for i in range(6)}
    first = min(singles, key=singles.get)
    assert curve.orders["greedy"][0] == f"layers.{first}"
    assert _row(curve, "greedy", 1)["perplexity"] == pytest.approx(singles[first], rel=1e-6)
    chosen = [first]
    for k in (2, 3):
        tries = {i: _reference(_skipped(model, chosen + [i]), data)[0] for i in range(6) if i not in chosen}
        best = min(tries, key=tries.get)
        chosen.append(best)
        assert _row(curve, "greedy", k)["perplexity"] == pytest.approx(tries[best], rel=1e-6)
    assert curve.table[curve.table.ranking == "greedy"]["dropped_index"].iloc[-1] == ";".join(map(str, chosen))
    assert curve.config["evaluations"] == greedy_cost(6, 3) == 6 + 5 + 4


def test_default_rankings_are_the_proxies_on_the_same_data():
    model, data = _decoder(), _data()
    curve = pruning_curve(model, data, max_k=2)
    assert set(curve.table["ranking"]) == {"bi_token", "angular_last", "angular_all", "relative_l2", "skip"}
    assert len(curve.table) == 5 * 3  # k = 0, 1, 2 per ranking
    result = layercrit.proxies(model, data, max_n=1, output="next-token", prune=False, batch_size=8)
    ranked = rankings_from_proxies(result)
    assert curve.orders["bi_token"] == sorted(ranked["bi_token"], key=ranked["bi_token"].get)
    # the skip ranking's first block is the single block whose skip raises the loss least
    skip = result.table[result.table.proxy == "skip_loss"].set_index("layer")["value"]
    assert curve.orders["skip"][0] == skip.idxmin()


def test_tiny_transformer_classifier_with_labels():
    """On the core TinyTransformer (2 blocks, class logits) perplexity is exp(cross-entropy) of the labels."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    curve = pruning_curve(model, (x, y), rankings={"r": ["encoder.layers.1"]}, max_k=1, output="logits")
    with torch.no_grad():
        ce = F.cross_entropy(model(x).double(), y).item()
        hooks = [model.encoder.layers[1].register_forward_hook(lambda m, a, o: a[0])]
        ce1 = F.cross_entropy(model(x).double(), y).item()
        for h in hooks:
            h.remove()
    assert _row(curve, "r", 0)["perplexity"] == pytest.approx(math.exp(ce), rel=1e-6)
    assert _row(curve, "r", 1)["perplexity"] == pytest.approx(math.exp(ce1), rel=1e-6)
    assert _row(curve, "r", 1)["dropped_index"] == "1" and curve.table["n_tokens"].eq(6).all()


def test_save_load_and_figure(tmp_path):
    curve = pruning_curve(_decoder(), _data(), max_k=2, greedy=True, greedy_max_k=1)
    path = curve.save(tmp_path / "curve.csv")
    back = PruningCurve.load(path)
    pd.testing.assert_frame_equal(back.table, curve.table, check_dtype=False)
    assert back.orders == curve.orders and back.config["max_k"] == 2
    from layercrit.viz import PLOTS, save_figure

    fig, ax = PLOTS["pruning-curve"](curve)
    assert len(ax.get_lines()) == 6 + 1  # five proxies + greedy, and the unmodified line
    save_figure(fig, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    from layercrit.cli import main

    assert main(["plot", "pruning-curve", "--results", str(path), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").is_file()


def test_errors():
    model, data = _decoder(), _data()
    with pytest.raises(LayercritError, match="names blocks that are not in the model's block stack"):
        pruning_curve(model, data, rankings={"r": ["layers.9"]}, max_k=1)
    with pytest.raises(LayercritError, match="at least max_k = 3 blocks"):
        pruning_curve(model, data, rankings={"r": ["layers.0"]}, max_k=3)
    with pytest.raises(LayercritError, match="Expected `max_k` to be below the 6 blocks"):
        pruning_curve(model, data, rankings={}, max_k=6)
    with pytest.raises(LayercritError, match="Expected `max_k` to be a positive integer"):
        pruning_curve(model, data, rankings={}, max_k=0)
    with pytest.raises(LayercritError, match="cannot be skipped"):
        torch.manual_seed(0)
        pruning_curve(TinyResNet().eval(), (torch.randn(2, 1, 8, 8), torch.tensor([0, 1])),
                      rankings={"r": ["layer2.0"]}, max_k=1, output="logits")


def test_cli(tmp_path, capsys):
    from layercrit.cli import main

    model = tmp_path / "m.py"
    model.write_text(
        "import torch, torch.nn as nn\n"
        "class B(nn.Module):\n"
        "    def __init__(s):\n        super().__init__(); s.fc = nn.Linear(4, 4)\n"
        "    def forward(s, x): return x + s.fc(x)\n"
        "class LM(nn.Module):\n"
        "    def __init__(s):\n        super().__init__(); s.e = nn.Embedding(7, 4); s.layers = nn.ModuleList([B() for _ in range(4)]); s.h = nn.Linear(4, 7)\n"
        "    def forward(s, input_ids, attention_mask=None):\n        x = s.e(input_ids)\n        for b in s.layers: x = b(x)\n        return s.h(x)\n"
        "def make():\n    torch.manual_seed(0)\n    return LM()\n")
    data = tmp_path / "d.npz"
    import numpy as np

    ids = np.random.default_rng(0).integers(0, 7, (4, 6))
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids))
    out, fig = tmp_path / "c.csv", tmp_path / "c.png"
    rc = main(["pruning-curve", "--model", f"{model}:make", "--data", str(data), "--max-k", "2", "--greedy",
               "--out", str(out), "--figure", str(fig), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "greedy order: 2 steps over 4 blocks cost 7 evaluations" in text and "(none)" in text
    t = pd.read_csv(out)
    assert set(t.ranking) == {"bi_token", "angular_last", "angular_all", "relative_l2", "skip", "greedy"} and fig.is_file()
    assert main(["pruning-curve", "--model", f"{model}:make", "--data", str(data), "--probe", "rerandomize"]) == 2
    assert "needs --from" in capsys.readouterr().err
