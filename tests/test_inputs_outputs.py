"""Inputs that are not one float tensor, and output adapters, on tiny models with hand-set weights."""

import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from layercrit import LayercritError, load_data, measure
from layercrit.data.inputs import call_model, concat, num_samples, take
from layercrit.engine.engine import Engine
from layercrit.engine.measures import CHUNK_BYTES, MeasureSums, sample_measures
from layercrit.engine.outputs import IGNORE, create_output, list_outputs
from layercrit.testing import assert_no_hooks, assert_same_state, snapshot

LN2, LN5 = math.log(2.0), math.log(5.0)


class TinyLM(nn.Module):
    """A causal "LM" that predicts its current token: logits_t = lm_head(embed(x_t)) = diag(ln 2, ln 5, 0)[x_t].

    Token 0 → p = softmax(ln 2, 0, 0) = (2, 1, 1)/4; token 1 → (1, 5, 1)/7; token 2 → uniform.
    Zeroing `embed` makes every position uniform. The forward asserts the ids arrive as integers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(3, 3)
        self.lm_head = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.diag(torch.tensor([LN2, LN5, 0.0])))
            self.lm_head.weight.copy_(torch.eye(3))
        self.seen_dtypes = set()

    def forward(self, input_ids, attention_mask=None):
        assert not input_ids.is_floating_point(), input_ids.dtype
        self.seen_dtypes.add(input_ids.dtype)
        return self.lm_head(self.embed(input_ids))


class TinyEncoder(nn.Module):
    """Per-token vectors proj(embed(x_t)) with embed 0 → (1, 0), 1 → (0, 1), 2 → (2, 1), proj = I."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(3, 2)
        self.proj = nn.Linear(2, 2)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]]))
            self.proj.weight.copy_(torch.eye(2))
            self.proj.bias.zero_()
        self.as_dict = as_dict

    def forward(self, input_ids, attention_mask=None):
        h = self.proj(self.embed(input_ids))
        return {"last_hidden_state": h} if self.as_dict else h


def _crit_uniform(p):
    """1 − cos(p, uniform) for a probability vector p."""
    p = torch.tensor(p, dtype=torch.float64)
    return 1.0 - float(p.sum() / 3 / (p.norm() * math.sqrt(1 / 3)))


C0 = _crit_uniform([0.5, 0.25, 0.25])  # token 0 vs uniform: 1 − 4/√18
C1 = _crit_uniform([1 / 7, 5 / 7, 1 / 7])  # token 1 vs uniform: 1 − 7/9


def lm_batch():
    """A = [0, 1, 1, 0] (all real), B = [1, 1, 2, 2] right-padded after two tokens."""
    ids = torch.tensor([[0, 1, 1, 0], [1, 1, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask}


def _row(result, probe="zero"):
    t = result.table
    return t[t["probe"] == probe].iloc[0]


def test_inputs_helpers_keep_structure_and_dtype():
    x = lm_batch()
    assert num_samples(x) == 2
    part = take(x, slice(1, 2))
    assert part["input_ids"].dtype == torch.int64 and part["input_ids"].tolist() == [[1, 1, 2, 2]]
    out = (torch.arange(6.0).reshape(2, 3), {"h": torch.ones(2, 1)}, torch.tensor(3.0))
    parts = [take(out, slice(0, 1)), take(out, slice(1, 2))]
    back = concat(parts)
    assert torch.equal(back[0], out[0]) and torch.equal(back[1]["h"], out[1]["h"]) and back[2] is out[2]


def test_call_model_passes_keywords_and_no_cache():
    class Cached(nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=True):
            assert use_cache is False
            return input_ids.float()

    assert call_model(Cached(), {"input_ids": torch.ones(1, 2, dtype=torch.long)}).dtype == torch.float32


def test_token_ids_stay_integer_end_to_end(tmp_path):
    model = TinyLM()
    before = snapshot(model)
    x = lm_batch()
    result = measure(model, x, probes="zero", layers=["embed"])
    assert model.seen_dtypes == {torch.int64}
    assert_same_state(model, before)
    assert_no_hooks(model)
    # The same through an .npz of named arrays, int32 ids kept as int32.
    np.savez(tmp_path / "tok.npz", input_ids=x["input_ids"].numpy().astype(np.int32), attention_mask=x["attention_mask"].numpy())
    data = load_data(str(tmp_path / "tok.npz"))
    assert data.x["input_ids"].dtype == torch.int32 and data.y is None and data.input_shape == (4,)
    model.seen_dtypes.clear()
    again = measure(model, data, probes="zero", layers=["embed"])
    assert model.seen_dtypes == {torch.int32}
    assert _row(again)["criticality"] == pytest.approx(_row(result)["criticality"], abs=1e-12)


def test_npz_keeps_x_float32_and_reads_labels(tmp_path):
    np.savez(tmp_path / "img.npz", x=np.zeros((3, 1, 2, 2), np.uint8), y=np.array([0, 1, 1]))
    data = load_data(str(tmp_path / "img.npz"))
    assert data.x.dtype == torch.float32 and data.y.tolist() == [0, 1, 1]
    np.savez(tmp_path / "seq.npz", input_ids=np.zeros((3, 4), np.int64), labels=np.array([2, 0, 1]))
    data = load_data(str(tmp_path / "seq.npz"))
    assert set(data.x) == {"input_ids"} and data.y.tolist() == [2, 0, 1] and data.num_classes == 3
    sub = data.subset(2, seed=0)
    assert sub.x["input_ids"].shape == (2, 4) and len(sub) == 2 and sub.identity != data.identity


def test_next_token_by_hand():
    """Every real position is a sample; padding (B's last two) is left out.

    Zeroing `embed` makes q uniform. Positions A: tokens 0,1,1,0 → C0, C1, C1, C0; B: 1, 1 → C1, C1:
    criticality = (2·C0 + 4·C1)/6. Labels (the next real token): A t0→1 (p 1/4, wrong), t1→1 (5/7,
    right), t2→0 (1/7, wrong); B t0→1 (5/7, right); A t3 and B t1 have none. Unmodified: accuracy
    1/2, loss (ln 4 + 2 ln 7/5 + ln 7)/4, perplexity its exp. Probed: loss ln 3, perplexity 3, and the
    arg-max of a uniform row is class 0: right only at A t2 → accuracy 1/4.
    """
    result = measure(TinyLM(), lm_batch(), probes="zero", layers=["embed"])
    assert result.config["output"] == "next-token" and result.config["output_choice"].startswith("automatic")
    row, base = _row(result), _row(result, "none")
    assert row["criticality"] == pytest.approx((2 * C0 + 4 * C1) / 6, abs=1e-7)
    loss = (math.log(4) + 2 * math.log(7 / 5) + math.log(7)) / 4
    assert base["loss"] == pytest.approx(loss, abs=1e-7) and base["perplexity"] == pytest.approx(math.exp(loss), rel=1e-7)
    assert base["accuracy"] == pytest.approx(0.5)
    assert row["loss"] == pytest.approx(math.log(3), abs=1e-7) and row["perplexity"] == pytest.approx(3.0, rel=1e-7)
    assert row["accuracy"] == pytest.approx(0.25) and row["accuracy_drop"] == pytest.approx(0.25)
    assert row["output"] == "next-token" and row["n_nonfinite"] == 0 and row["note"] == ""
    assert math.isnan(row["rel_l2"])


def test_next_token_last_and_every_k_by_hand():
    """last: A t3 (token 0) and B t1 (token 1) → (C0 + C1)/2, no labels (nothing follows).
    every:2: the 2nd and 4th real positions: A t1, t3 and B t1 → (C1 + C0 + C1)/3; only A t1 has a
    label (→ 1, right under the unmodified model)."""
    last = _row(measure(TinyLM(), lm_batch(), probes="zero", layers=["embed"], output="next-token:last"))
    assert last["criticality"] == pytest.approx((C0 + C1) / 2, abs=1e-7)
    assert math.isnan(last["loss"]) and math.isnan(last["perplexity"]) and math.isnan(last["accuracy"])
    every = measure(TinyLM(), lm_batch(), probes="zero", layers=["embed"], output="next-token:every:2")
    assert _row(every)["criticality"] == pytest.approx((C0 + 2 * C1) / 3, abs=1e-7)
    base = _row(every, "none")
    assert base["accuracy"] == 1.0 and base["loss"] == pytest.approx(math.log(7 / 5), abs=1e-7)
    assert every.config["output"] == "next-token:every:2" and every.config["output_choice"] == "asked for"


def test_next_token_with_sequence_labels_at_last_position():
    """(N,) labels with next-token:last: the expected next token of each sequence (A → 0, B → 1):
    A's last token 0 predicts 0 (p 1/2), B's last real token 1 predicts 1 (5/7)."""
    x = lm_batch()
    base = _row(measure(TinyLM(), (x, torch.tensor([0, 1])), probes="zero", layers=["embed"], output="next-token:last"), "none")
    assert base["accuracy"] == 1.0 and base["loss"] == pytest.approx((math.log(2) + math.log(7 / 5)) / 2, abs=1e-7)
    with pytest.raises(LayercritError, match=r"fit --output next-token:last only"):
        measure(TinyLM(), (x, torch.tensor([0, 1])), probes="zero", layers=["embed"])


@pytest.mark.parametrize("as_dict", [False, True])
def test_hidden_adapters_by_hand(as_dict):
    """Swapping proj's rows maps (a, b) to (b, a): 1 − cos = 1 − 2ab/(a² + b²), rel_l2 = |a − b|√2/√(a² + b²).

    A = [0, 1, 2] all real; B = [1, 2, 2] left-padded (first position masked).
    mean: A (1, 2/3) → 1/13, √(2/13); B (2, 1) → 1/5, √(2/5) (unmasked it would be (4/3, 1): 0.04).
    cls: A (1, 0) → 1, √2; B's first real position (2, 1) → 1/5, √(2/5) (position 0 would be (0, 1): 1).
    last: A (2, 1) and B (2, 1) → 1/5, √(2/5).
    """
    x = {"input_ids": torch.tensor([[0, 1, 2], [1, 2, 2]]), "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]])}
    swap = {"proj.weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "proj.bias": torch.zeros(2)}
    expected = {"hidden:mean": ((1 / 13 + 0.2) / 2, (math.sqrt(2 / 13) + math.sqrt(0.4)) / 2),
                "hidden:cls": ((1 + 0.2) / 2, (math.sqrt(2) + math.sqrt(0.4)) / 2),
                "hidden:last": (0.2, math.sqrt(0.4))}
    for name, (crit, rel) in expected.items():
        result = measure(TinyEncoder(as_dict), x, probes="reinit", reference=swap, layers=["proj"], output=name)
        row = result.table.iloc[1]
        assert row["criticality"] == pytest.approx(crit, abs=1e-7), name
        assert row["rel_l2"] == pytest.approx(rel, abs=1e-7), name
        assert all(math.isnan(row[k]) for k in ("accuracy", "loss", "kl", "agreement", "perplexity"))
        assert result.table.iloc[0]["criticality"] == pytest.approx(0.0, abs=1e-12)
    if as_dict:  # an output with last_hidden_state and no logits: hidden:mean chosen automatically
        auto = measure(TinyEncoder(True), x, probes="reinit", reference=swap, layers=["proj"])
        assert auto.config["output"] == "hidden:mean"
        assert auto.table.iloc[1]["criticality"] == pytest.approx(expected["hidden:mean"][0], abs=1e-7)


def test_chunked_measures_equal_unchunked():
    torch.manual_seed(0)
    p, q = torch.randn(40, 300) * 3, torch.randn(40, 300) * 3
    rows = torch.tensor([0, 3, 4, 9, 17, 18, 30, 39])
    labels = torch.tensor([5, IGNORE, 299, 0, IGNORE, 7, 8, 1])
    whole = sample_measures(p, q, labels, rows=rows, chunk_bytes=1 << 40)
    tiny = sample_measures(p, q, labels, rows=rows, chunk_bytes=1)  # one row per chunk
    assert whole.keys() == tiny.keys() and len(whole["criticality"]) == 8 and len(whole["loss"]) == 6
    for k in whole:
        torch.testing.assert_close(whole[k], tiny[k], rtol=0, atol=1e-12)
    direct = sample_measures(p[rows], q[rows])
    torch.testing.assert_close(whole["criticality"], direct["criticality"], rtol=0, atol=1e-12)
    vec = sample_measures(p, q, softmax=False, chunk_bytes=1)
    torch.testing.assert_close(vec["rel_l2"], (p - q).double().norm(dim=1) / p.double().norm(dim=1))


def test_a_32k_vocabulary_is_measured_in_chunks(monkeypatch):
    """No chunk of a (tokens × 32 000) comparison takes more than CHUNK_BYTES of float64 work."""
    import layercrit.engine.measures as m

    seen = []
    real = m._measure_chunk
    monkeypatch.setattr(m, "_measure_chunk", lambda p, q, *a: seen.append(p.shape) or real(p, q, *a))
    p = torch.zeros(600, 32000)
    out = sample_measures(p, p, torch.zeros(600, dtype=torch.long))
    assert len(out["criticality"]) == 600 and len(seen) > 1
    assert all(rows * cols * 8 * m._TEMPORARIES <= CHUNK_BYTES for rows, cols in seen)


def test_nonfinite_outputs_are_counted_not_averaged():
    """fc.weight → [[1e30, 0], [0, 1]]: x1 = (1e10, 0) overflows to +inf (left out, counted); x2 = (1, 0)
    gives q = (1, 0) against p = softmax(1, 0); x3 = (0, 1) is unchanged (0). Mean over the two finite rows."""
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    x = torch.tensor([[1e10, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ref = {"0.weight": torch.tensor([[1e30, 0.0], [0.0, 1.0]]), "0.bias": torch.zeros(2)}
    row = measure(model, x, probes="reinit", reference=ref).table.iloc[1]
    p = torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), 0)
    crit = 1 - float(p[0] / p.norm())
    assert row["n_nonfinite"] == 1 and "non-finite on 1 of 3" in row["note"]
    assert row["criticality"] == pytest.approx(crit / 2, abs=1e-7)
    sums = MeasureSums()
    sums.update({"criticality": torch.tensor([0.5, math.nan]), "loss": torch.tensor([math.inf, 1.0])})
    got = sums.compute()
    assert got["criticality"] == 0.5 and got["n_nonfinite"] == 1 and got["loss"] == math.inf


def test_adapter_names():
    assert "next-token:every:K" in list_outputs()
    assert create_output("next-token:every:3").name == "next-token:every:3"
    for bad in ("softmax", "next-token:sometimes", "next-token:every:0", "hidden:max", "logits:x"):
        with pytest.raises(LayercritError, match="unknown output"):
            create_output(bad)
    with pytest.raises(LayercritError, match="unknown output"):
        measure(TinyLM(), lm_batch(), output="hidden:max")


def test_bad_input_one_line_each():
    x = lm_batch()
    cases = [
        (dict(model=TinyEncoder(True), data=x, output="logits"), r"has no `logits` \(fields: last_hidden_state\); choose --output"),
        (dict(model=TinyLM(), data=x, output="logits"), r"per-position logits of shape \(2, 4, 3\).*next-token"),
        (dict(model=nn.Linear(4, 3), data=torch.zeros(2, 4), output="next-token"), r"needs \(batch, positions, vocabulary\) logits"),
        (dict(model=TinyEncoder(), data=x), r"not a causal language model; say what to compare: --output next-token"),
        (dict(model=TinyLM(), data={"input_ids": torch.tensor([[0, 5], [1, 2]])}),
         r"token ids range over 0..5 but the model's input embedding has 3 rows"),
    ]
    for kwargs, message in cases:
        with pytest.raises(LayercritError, match=message) as e:
            measure(kwargs["model"], kwargs["data"], probes="zero", output=kwargs.get("output"))
        assert "\n" not in str(e.value)
    pooled = nn.Linear(4, 3)
    with pytest.raises(LayercritError, match=r"hidden:cls pools .* use --output hidden"):
        measure(pooled, torch.zeros(2, 4), probes="zero", output="hidden:cls")
    assert measure(pooled, torch.zeros(2, 4), probes="zero", output="hidden").config["output"] == "hidden"
    lm = TinyLM()
    lm.config = SimpleNamespace(max_position_embeddings=3)
    with pytest.raises(LayercritError, match=r"sequences of 4 tokens are longer than the model's context of 3 positions "
                                             r"\(config.max_position_embeddings\); use a smaller --seq-len"):
        measure(lm, x, probes="zero")


def test_engine_with_dict_inputs_falls_back_from_incremental():
    engine = Engine(TinyLM(), lm_batch(), executor="auto")
    base, _ = engine.evaluate([])
    assert engine.stats()["output"] == "next-token" and math.isfinite(base["loss"])
    full = measure(TinyLM(), lm_batch(), probes="zero", executor="full").table
    auto = measure(TinyLM(), lm_batch(), probes="zero", executor="auto").table
    np.testing.assert_allclose(full["criticality"], auto["criticality"], rtol=0, atol=1e-12)


def test_text_data_errors_without_transformers(tmp_path):
    (tmp_path / "t.txt").write_text("hello world")
    with pytest.raises(LayercritError, match=r"tokenizer folder '.*nope' does not exist"):
        load_data(f"text:{tmp_path / 't.txt'}", tokenizer=tmp_path / "nope")
    with pytest.raises(LayercritError, match=r"needs a tokenizer: --tokenizer DIR"):
        load_data(f"text:{tmp_path / 't.txt'}")
    with pytest.raises(LayercritError, match=r"--tokenizer, --seq-len apply to text:FILE data only"):
        load_data("digits", tokenizer="x", seq_len=4)


TOKEN_MODEL = '''
import torch, torch.nn as nn

class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, 3)
        self.lm_head = nn.Linear(3, 3, bias=False)

    def forward(self, input_ids, attention_mask=None):
        return self.lm_head(self.embed(input_ids))

def make():
    return LM()
'''


def test_cli_token_ids_and_vocabulary_error(tmp_path):
    (tmp_path / "lm.py").write_text(TOKEN_MODEL)
    np.savez(tmp_path / "ok.npz", input_ids=np.array([[0, 1, 2, 1], [2, 2, 0, 1]]), attention_mask=np.ones((2, 4), np.int64))
    np.savez(tmp_path / "bad.npz", input_ids=np.array([[0, 1, 7, 1]]))

    def run(data, *extra):
        return subprocess.run([sys.executable, "-m", "layercrit", "measure", "--model", "lm.py:make", "--data", data,
                               "--trials", "1", "--quiet", *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    ok = run("ok.npz", "--out", "r.csv")
    assert ok.returncode == 0, ok.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "r.csv")
    assert (table["output"] == "next-token").all() and len(table) == 3
    bad = run("bad.npz")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "token ids range over 0..7 but the model's input embedding has 3 rows" in bad.stderr
    wrong = run("ok.npz", "--output", "logits")
    assert wrong.returncode == 2 and "--output next-token" in wrong.stderr and wrong.stderr.strip().count("\n") == 0
