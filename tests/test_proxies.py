"""Block proxies (BI, angular distance, relative L2, skip) against hand computations, and their
comparison with real criticality against scipy."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from scipy import stats

from layercrit.analyses.proxies.compare import (
    _kendall_rows,
    _spearman_rows,
    bootstrap_rank_correlations,
    compare_proxies,
)
from layercrit.analyses.proxies.measure import proxies
from layercrit.analyses.proxies.result import ProxyResult
from layercrit.analyses.proxies.similarity import (
    angular_distance,
    block_influence,
    cosine,
    last_positions,
    relative_l2,
    sample_means,
)
from layercrit.data import Dataset
from layercrit.errors import LayercritError
from layercrit.testing import TinyResNet, TinyTransformer, assert_no_hooks, assert_same_state, snapshot

R = 1 / math.sqrt(2)

# Two residual blocks x ↦ x + A x on 2-d tokens, hand-set:
#   A0 = [[0, -1], [1, 0]] (adds the vector turned by 90°), A1 = [[0, 0], [0, -1]] (removes the 2nd coordinate).
# Sample 0: tokens (1, 0), (0, 0) (a zero vector), (3, 4) (padding, mask 0).
#   (1, 0) → (1, 1) → (1, 0): cos 1/√2 at each block, BI 1 − 1/√2, angular 1/4; over both blocks cos 1, angular 0.
#   (0, 0) stays 0: cos := 0 (eps), BI 1, angular 1/2, relative L2 0/eps = 0.
# Sample 1: tokens (0, 2), (0, 2), (0, 2) (no padding).
#   (0, 2) → (−2, 2) → (−2, 0): cos 1/√2 at each block; over both blocks cos 0, angular 1/2.
#   relative L2: block 0 ‖(−2, 0)‖/‖(0, 2)‖ = 1, block 1 ‖(0, −2)‖/‖(−2, 2)‖ = 1/√2.
A0 = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
A1 = torch.tensor([[0.0, 0.0], [0.0, -1.0]])
X0 = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]], [[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
X1 = X0 + X0 @ A0.T
X2 = X1 + X1 @ A1.T


def test_hand_set_toy_states():
    assert torch.equal(X1[0, 0], torch.tensor([1.0, 1.0])) and torch.equal(X2[0, 0], torch.tensor([1.0, 0.0]))
    assert torch.equal(X1[1, 0], torch.tensor([-2.0, 2.0])) and torch.equal(X2[1, 0], torch.tensor([-2.0, 0.0]))


def test_block_influence_by_hand():
    bi = block_influence(X0, X1, MASK)
    assert bi.dtype == torch.float64 and bi.shape == (2, 3)
    assert bi[0, 0].item() == pytest.approx(1 - R) and bi[0, 1].item() == 1.0  # zero vector: finite, cos 0
    assert math.isnan(bi[0, 2].item())  # padding is masked
    assert torch.allclose(bi[1], torch.full((3,), 1 - R, dtype=torch.float64))
    means, counts = sample_means(bi)
    assert counts.tolist() == [2, 3]
    assert means[0].item() == pytest.approx((1 - R + 1) / 2) and means[1].item() == pytest.approx(1 - R)
    # per token: (1 − R + 1 + 3 (1 − R)) / 5; per sequence: mean of the two means
    per_token = float((means * counts).sum() / counts.sum())
    assert per_token == pytest.approx((2 - R + 3 * (1 - R)) / 5)


def test_angular_distance_by_hand():
    one = angular_distance(X0, X1, MASK)
    assert one[0, 0].item() == pytest.approx(0.25) and one[0, 1].item() == 0.5 and math.isnan(one[0, 2].item())
    two = angular_distance(X0, X2, MASK)  # blocks 0 and 1 together
    assert two[0, 0].item() == 0.0 and two[1, 0].item() == pytest.approx(0.5)
    # last non-padded token: sample 0's is position 1 (the zero vector), sample 1's position 2
    last = angular_distance(X0, X2, MASK, last_only=True)
    assert last.shape == (2,) and last.tolist() == pytest.approx([0.5, 0.5])
    assert angular_distance(X0, X1, None, last_only=True)[0].item() == pytest.approx(
        math.acos(float(cosine(X0[0, 2], X1[0, 2]))) / math.pi)


def test_relative_l2_by_hand():
    rel = relative_l2(X1, X2, MASK)
    assert rel[1, 0].item() == pytest.approx(R) and rel[0, 1].item() == 0.0 and math.isnan(rel[0, 2].item())
    assert relative_l2(X0, X1, MASK)[1, 0].item() == pytest.approx(1.0)


def test_last_positions_left_and_right_padding():
    assert last_positions(torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 1]])).tolist() == [1, 2, 2]
    with pytest.raises(LayercritError, match="no tokens"):
        last_positions(torch.tensor([[0, 0]]))


def test_cosine_is_clamped_where_round_off_leaves_the_domain():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 7, generator=g, dtype=torch.float64)
    y = x * 3.0
    raw = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    assert bool((raw > 1).any())  # without the clamp, arccos would give NaN for these
    d = angular_distance(x, y)
    assert torch.isfinite(d).all() and float(d.abs().max()) < 1e-7


def test_shapes_and_vision_maps():
    fmap = torch.randn(2, 3, 4, 4)
    assert block_influence(fmap, fmap * 2).shape == (2, 1)  # one flat vector per sample
    assert block_influence(fmap[:, :, 0, 0], fmap[:, :, 0, 0]).shape == (2, 1)
    with pytest.raises(LayercritError, match="does not fit"):
        block_influence(X0, X1, MASK[:, :2])


def test_float32_inputs_are_computed_in_float64():
    a = torch.tensor([[1.0, 1e-4]], dtype=torch.float32)
    assert block_influence(a, torch.tensor([[1.0, 0.0]])).dtype == torch.float64


# --- rank statistics against scipy ------------------------------------------------------------------

FIXED_X = np.array([[0.1, 0.4, 0.35, 0.8, 0.2, 0.2], [3.0, 1.0, 2.0, 5.0, 4.0, 6.0]])
FIXED_Y = np.array([[0.05, 0.3, 0.5, 0.7, 0.1, 0.6], [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]])


def test_vectorized_rank_correlations_equal_scipy():
    rho, tau = _spearman_rows(FIXED_X, FIXED_Y), _kendall_rows(FIXED_X, FIXED_Y)
    for i in range(2):
        assert rho[i] == pytest.approx(stats.spearmanr(FIXED_X[i], FIXED_Y[i]).statistic, abs=1e-12)
        assert tau[i] == pytest.approx(stats.kendalltau(FIXED_X[i], FIXED_Y[i]).statistic, abs=1e-12)
    assert np.isnan(_spearman_rows(np.ones((1, 4)), FIXED_Y[:1, :4])).all()


def _tables(proxy_values: dict[str, list[float]], crit: list[float]):
    layers = [f"b.{i}" for i in range(len(crit))]
    rows = [{"layer": la, "label": f"L{i}", "proxy": p, "n": 1, "value": v[i]}
            for p, v in proxy_values.items() for i, la in enumerate(layers)]
    crit_rows = [{"layer": la, "probe": "rerandomize", "trial": t, "criticality": c + 0.01 * t}
                 for la, c in zip(layers, crit) for t in range(2)]
    crit_rows.append({"layer": "(unmodified)", "probe": "none", "trial": 0, "criticality": 0.0})
    return pd.DataFrame(rows), pd.DataFrame(crit_rows), layers


def test_compare_proxies_equals_scipy_on_fixed_numbers():
    bi = [0.1, 0.4, 0.35, 0.8, 0.2, 0.25]
    crit = [0.05, 0.3, 0.5, 0.7, 0.1, 0.6]
    table, crit_table, _ = _tables({"bi_token": bi}, crit)
    c = compare_proxies(table, crit_table, bootstrap=0)
    row = c.correlations.iloc[0]
    mean_crit = np.array(crit) + 0.005  # the mean over the two trials
    s, k = stats.spearmanr(bi, mean_crit), stats.kendalltau(bi, mean_crit)
    assert (row["proxy"], row["probe"], row["blocks"]) == ("bi_token", "rerandomize", 6)
    assert row["spearman_r"] == pytest.approx(s.statistic) and row["spearman_p"] == pytest.approx(s.pvalue)
    assert row["kendall_tau"] == pytest.approx(k.statistic) and row["kendall_p"] == pytest.approx(k.pvalue)
    assert math.isnan(row["spearman_low"]) and row["bootstrap"] == 0
    # pruning: lowest by BI b.0, b.4, b.5; by criticality b.0, b.4, b.1
    p = c.pruning
    assert p["k"].tolist() == [1, 2, 3]
    assert p["overlap"].tolist() == pytest.approx([1.0, 1.0, 2 / 3])
    assert p["pruned_by_proxy"].iloc[2] == "L0;L4;L5" and p["pruned_by_probe"].iloc[2] == "L0;L4;L1"


def test_compare_proxies_bootstrap_resamples_both_sides_together():
    rng = np.random.default_rng(1)
    n, layers = 40, [f"b.{i}" for i in range(5)]
    truth = np.array([0.1, 0.5, 0.3, 0.9, 0.7])
    prox = truth + 0.8 * rng.standard_normal((n, 5))
    real = truth + 0.8 * rng.standard_normal((n, 5))
    samples = pd.DataFrame([{"sample": i, "layer": la, "proxy": "bi_token", "n": 1, "value": prox[i, j], "weight": 1.0}
                            for i in range(n) for j, la in enumerate(layers)])
    crit_samples = pd.DataFrame([{"sample": i, "layer": la, "probe": "skip", "trial": 0, "criticality": real[i, j],
                                  "loss": math.nan, "weight": 1.0} for i in range(n) for j, la in enumerate(layers)])
    table = samples.groupby("layer", sort=False)["value"].mean().rename("value").reset_index().assign(proxy="bi_token", n=1)
    crit = crit_samples.groupby("layer", sort=False)["criticality"].mean().reset_index().assign(probe="skip", trial=0)
    result = ProxyResult(table, samples=samples, criticality=crit, criticality_samples=crit_samples)
    a = compare_proxies(result, bootstrap=300, seed=3).correlations.iloc[0]
    b = compare_proxies(result, bootstrap=300, seed=3).correlations.iloc[0]
    assert a["bootstrap"] == 300 and a["spearman_low"] == b["spearman_low"]  # seeded
    assert -1 <= a["spearman_low"] < a["spearman_r"] < a["spearman_high"] <= 1
    assert -1 <= a["kendall_low"] <= a["kendall_high"] <= 1
    # the same computation by hand: resample samples, the same draw on both sides
    direct = bootstrap_rank_correlations(prox, np.ones_like(prox), real, np.ones_like(real), 300, 3)
    assert direct["spearman_low"] == a["spearman_low"] and direct["kendall_high"] == a["kendall_high"]
    # a criticality table without per-sample values: no interval, and a note saying why
    c = compare_proxies(result, crit, bootstrap=100).correlations.iloc[0]
    assert math.isnan(c["spearman_low"]) and "no per-sample values of the criticality" in c["note"]


def test_bootstrap_weights_make_token_means():
    """With token-count weights a unit's value is the mean over all tokens, Σ w·v / Σ w."""
    from layercrit.analyses.proxies.compare import _resample_means

    v, w = np.array([[1.0], [4.0]]), np.array([[1.0], [3.0]])
    assert _resample_means(v, w, np.array([[1.0, 1.0], [2.0, 0.0]])).ravel().tolist() == [13 / 4, 1.0]


def test_compare_proxies_errors():
    table, crit_table, _ = _tables({"bi_token": [0.1, 0.2, 0.3]}, [0.3, 0.2, 0.1])
    with pytest.raises(LayercritError, match="no criticality of probe"):
        compare_proxies(table, crit_table, probes=["skip"])
    with pytest.raises(LayercritError, match="no criticality to compare with"):
        compare_proxies(table)
    with pytest.raises(LayercritError, match="lacks columns"):
        compare_proxies(table.drop(columns="value"), crit_table)
    with pytest.raises(LayercritError, match="Expected `bootstrap`"):
        compare_proxies(table, crit_table, bootstrap=-1)
    with pytest.raises(LayercritError, match="one model at a time"):
        compare_proxies(table.assign(model=["a", "b", "a"]), crit_table)
    c = compare_proxies(table.assign(value=0.5), crit_table, bootstrap=10).correlations.iloc[0]
    assert math.isnan(c["spearman_r"]) and "constant" in c["note"]


# --- proxies of a model, from hooks ---------------------------------------------------------------

# The final "norm" (a, b) ↦ (a, a + b) changes the last block's output: read after it, sample 0's
# first token would give cos((1, 1), (1, 1)) = 1 (BI 0) and sample 1's cos((−2, 2), (−2, −2)) = 0 (BI 1)
# instead of 1 − 1/√2.
NORM = torch.tensor([[1.0, 0.0], [1.0, 1.0]])


class _Block(nn.Module):
    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(a)

    def forward(self, hidden_states, attention_mask=None):
        return (hidden_states + self.lin(hidden_states), None)  # a tuple, as Hugging Face blocks return


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(A0), _Block(A1)])
        self.norm = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.norm.weight.copy_(NORM)

    def forward(self, inputs_embeds, attention_mask=None, output_hidden_states=False):
        h, states = inputs_embeds, [inputs_embeds]
        for block in self.layers:
            h = block(h, attention_mask=attention_mask)[0]
            states.append(h)
        out = self.norm(h)
        if output_hidden_states:
            return out, (*states[:-1], out)  # Hugging Face: the last hidden state is taken after the norm
        return out


def _toy_data() -> Dataset:
    return Dataset({"inputs_embeds": X0, "attention_mask": MASK}, None, spec="toy")


def _value(result, layer, proxy, n=1):
    t = result.table
    return float(t[(t["layer"] == layer) & (t["proxy"] == proxy) & (t["n"] == n)]["value"].iloc[0])


def test_proxies_of_the_hand_set_toy():
    model = _Toy()
    before = snapshot(model)
    r = proxies(model, _toy_data(), max_n=2, output="hidden:mean", batch_size=1)
    assert_same_state(model, before)
    assert_no_hooks(model)
    bi_token, bi_seq = (2 - R + 3 * (1 - R)) / 5, ((2 - R) / 2 + (1 - R)) / 2
    for layer in ("layers.0", "layers.1"):
        assert _value(r, layer, "bi_token") == pytest.approx(bi_token)
        assert _value(r, layer, "bi_sequence") == pytest.approx(bi_seq)
        assert _value(r, layer, "angular_all") == pytest.approx((0.25 + 0.5 + 3 * 0.25) / 5)
        assert _value(r, layer, "angular_last") == pytest.approx((0.5 + 0.25) / 2)
    assert _value(r, "layers.0", "relative_l2") == pytest.approx(0.8)
    assert _value(r, "layers.1", "relative_l2") == pytest.approx(0.8 * R)
    assert _value(r, "layers.0", "angular_all", 2) == pytest.approx(0.4)
    assert _value(r, "layers.0", "angular_last", 2) == pytest.approx(0.5)
    assert not ((r.table["layer"] == "layers.1") & (r.table["n"] == 2)).any()  # no span past the last block
    row = r.table[(r.table["layer"] == "layers.0") & (r.table["proxy"] == "bi_token")].iloc[0]
    assert (row["samples"], row["tokens"]) == (2, 5)
    assert r.config["output"] == "hidden:mean" and r.config["blocks"] == ["layers.0", "layers.1"]


def test_proxies_read_block_outputs_not_the_post_norm_hidden_states():
    """The post-norm trap: the final norm changes the last block's output, so its BI read from
    `hidden_states[-1]` differs from the true one."""
    model = _Toy()
    _, states = model(X0, MASK, output_hidden_states=True)
    wrong = float(sample_means(block_influence(states[-2], states[-1], MASK))[0].mean())
    r = proxies(model, _toy_data(), output="hidden:mean", skip=False)
    right = _value(r, "layers.1", "bi_sequence")
    assert right == pytest.approx(((2 - R) / 2 + (1 - R)) / 2)
    assert abs(right - wrong) > 0.1


def _skipped_output(skip: set[int]) -> torch.Tensor:
    h = X0
    for i, a in enumerate((A0, A1)):
        if i not in skip:
            h = h + h @ a.T
    return h @ NORM.T


def _pooled(h: torch.Tensor) -> torch.Tensor:
    w = MASK.double().unsqueeze(-1)
    return (h.double() * w).sum(1) / w.sum(1)


def test_skip_criticality_per_sample_against_a_hand_built_model():
    model = _Toy()
    r = proxies(model, _toy_data(), output="hidden:mean", batch_size=2)
    p = _pooled(_skipped_output(set()))
    for i, layer in enumerate(("layers.0", "layers.1")):
        q = _pooled(_skipped_output({i}))
        per_sample = 1 - torch.nn.functional.cosine_similarity(p, q, dim=1)
        s = r.criticality_samples
        got = s[(s["layer"] == layer) & (s["probe"] == "skip")].sort_values("sample")["criticality"].to_numpy()
        assert got == pytest.approx(per_sample.numpy())
        c = r.criticality
        assert float(c[(c["layer"] == layer) & (c["probe"] == "skip")]["criticality"].iloc[0]) == pytest.approx(
            float(per_sample.mean()))
        assert _value(r, layer, "skip_criticality") == pytest.approx(float(per_sample.mean()))  # no labels
    assert_no_hooks(model)


def test_proxies_remove_hooks_after_an_error():
    model = _Toy()

    def boom(*_):
        raise RuntimeError("boom")

    handle = model.norm.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        proxies(model, _toy_data(), output="hidden:mean")
    handle.remove()
    assert_no_hooks(model)


def test_proxies_of_a_resnet_skip_blocks_that_change_shape():
    torch.manual_seed(0)
    model = TinyResNet(width=4).eval()
    r = proxies(model, torch.randn(6, 1, 8, 8), max_n=2, batch_size=4)
    t = r.table.set_index(["layer", "proxy", "n"])
    assert r.config["blocks"] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert math.isnan(t.loc[("layer2.0", "bi_token", 1), "value"]) and "shape" in t.loc[("layer2.0", "bi_token", 1), "note"]
    assert math.isnan(t.loc[("layer1.1", "angular_all", 2), "value"])  # spans layer2.0
    assert 0 <= t.loc[("layer2.1", "bi_token", 1), "value"] <= 2
    assert t.loc[("layer1.0", "angular_all", 2), "value"] >= 0
    assert set(r.criticality["layer"]) == {"layer1.0", "layer1.1", "layer2.1"}  # skip: the shape-keeping blocks
    assert_no_hooks(model)


def test_proxies_of_a_vit_and_compare_with_rerandomize():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    r = proxies(model, (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), against=["rerandomize"], trials=2)
    assert set(r.criticality["probe"]) == {"skip", "rerandomize"} and len(r.criticality) == 2 + 4
    assert "skip_loss" in set(r.table["proxy"])  # labels: the loss change
    c = compare_proxies(r, bootstrap=50)
    assert set(c.correlations["probe"]) == {"skip", "rerandomize"}
    assert (c.pruning["k"] == 1).all()  # 2 blocks: k = 1 only


def test_proxy_result_round_trips_through_json_and_csv(tmp_path):
    torch.manual_seed(0)
    r = proxies(TinyTransformer().eval(), torch.randn(4, 1, 8, 8), max_n=2)
    for name in ("p.json", "p.csv"):
        back = ProxyResult.load(r.save(tmp_path / name))
        for part in ("table", "samples", "criticality", "criticality_samples", "pruning"):
            a, b = getattr(r, part), getattr(back, part)
            assert list(a.columns) == list(b.columns) and len(a) == len(b), (name, part)
        assert back.config["blocks"] == r.config["blocks"]
    a = compare_proxies(r, bootstrap=30).correlations
    b = compare_proxies(ProxyResult.load(tmp_path / "p.csv"), bootstrap=30).correlations
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(LayercritError, match="lacks columns"):
        r.criticality.to_csv(tmp_path / "c.csv")
        ProxyResult.load(tmp_path / "c.csv")


def test_cli_proxies_compare_and_plots(tmp_path, capsys):
    from layercrit.cli.app import main

    out = tmp_path / "p.csv"
    assert main(["proxies", "--model", "vit-tiny", "--data", "digits", "--images", "12", "--max-n", "2",
                 "--against", "rerandomize", "--bootstrap", "20", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bi_token" in text and "rerandomize crit." in text and "overlap" in text
    loaded = ProxyResult.load(out)
    assert len(loaded.samples) and len(loaded.criticality_samples) and len(loaded.pruning)
    assert set(loaded.criticality["probe"]) == {"skip", "rerandomize"}
    cmp_out = tmp_path / "c.json"
    assert main(["compare-proxies", "--proxies", str(out), "--probe", "skip", "--bootstrap", "20",
                 "--out", str(cmp_out)]) == 0
    assert "vs skip" in capsys.readouterr().out and cmp_out.is_file()
    for kind in ("proxy-scatter", "proxy-bump"):
        assert main(["plot", kind, "--results", str(out), "--out", str(tmp_path / f"{kind}.png")]) == 0
        assert (tmp_path / f"{kind}.png").stat().st_size > 1000
    # The HTML report of a proxies file: the comparison tables and both figures.
    assert main(["report", "--proxies", str(out), "--out", str(tmp_path / "rep"), "--quiet"]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "Spearman" in page and "Pruning the k least important" in page and "the probe rerandomize" in page
    assert 'name="layercrit-figures" content="2"' in page


def test_cli_proxies_errors(tmp_path, capsys):
    from layercrit.cli.app import main

    assert main(["proxies", "--model", "fcn-3x64", "--data", "digits", "--images", "4", "--quiet"]) == 2
    assert "no stack of repeated blocks" in capsys.readouterr().err
    assert main(["compare-proxies", "--proxies", str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_prefix_and_full_executors_give_the_same_numbers():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    data = (torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,)))
    runs = [proxies(model, data, against=["rerandomize"], trials=2, batch_size=3, executor=e) for e in ("prefix", "full")]
    assert [r.config["executor"] for r in runs] == ["prefix", "full"]
    for part in ("table", "criticality", "pruning"):
        a, b = getattr(runs[0], part), getattr(runs[1], part)
        assert a.shape == b.shape
        for col in a.columns:
            if pd.api.types.is_float_dtype(a[col]):
                np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=0, atol=1e-6, err_msg=col)
    with pytest.raises(LayercritError, match="Expected `executor`"):
        proxies(model, data, executor="auto")
    assert_no_hooks(model)
