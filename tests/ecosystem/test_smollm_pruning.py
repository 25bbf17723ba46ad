"""Perplexity after pruning on the real SmolLM2-135M-Instruct (30 Llama blocks) and real news text
(fixtures in conftest.py: 4 windows of 64 tokens, one right-padded). Kept tiny for CI: given rankings
(no proxies pass), k ≤ 2. The reference is plain transformers: the model's own `labels` loss, and the
model with the skipped blocks taken out of its `ModuleList`. Runs in .venv-eco."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

import layercrit
from layercrit.cli import main


@contextmanager
def _without(model, drop):
    """The Llama model with the blocks `drop` (0-based) taken out of its layer list, restored afterwards."""
    layers, n = model.model.layers, model.config.num_hidden_layers
    model.model.layers = torch.nn.ModuleList([b for i, b in enumerate(layers) if i not in drop])
    model.config.num_hidden_layers = len(model.model.layers)
    try:
        yield model
    finally:
        model.model.layers, model.config.num_hidden_layers = layers, n


def _hf_perplexity(model, x) -> float:
    """exp of transformers' own mean next-token loss, padding labelled -100."""
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    with torch.no_grad():
        return math.exp(float(model(**x, labels=labels, use_cache=False).loss))


def test_smollm_pruning_curve_matches_transformers(smollm2, smollm2_text):
    model, x = smollm2.model, smollm2_text
    rankings = {"mine": ["model.layers.17", "model.layers.11"]}
    curve = layercrit.pruning_curve(model, x, rankings=rankings, max_k=2, batch_size=4, model_name="SmolLM2")
    t = curve.table.set_index("k")
    assert t.loc[0, "n_tokens"] == 3 * 63 + 39  # every position whose next token is real
    assert t.loc[0, "perplexity"] == pytest.approx(_hf_perplexity(model, x), rel=1e-4)
    with _without(model, {17}):
        assert t.loc[1, "perplexity"] == pytest.approx(_hf_perplexity(model, x), rel=1e-4)
    with _without(model, {11, 17}):
        assert t.loc[2, "perplexity"] == pytest.approx(_hf_perplexity(model, x), rel=1e-4)
    assert t.loc[2, "dropped"] == "L17;L11" and t.loc[2, "dropped_index"] == "17;11"
    assert 0 < t.loc[2, "accuracy"] < 1 and len(model.model.layers) == 30


def test_smollm_pruning_curve_cli_from_proxies(smollm2, smollm2_text_file, tmp_path, capsys):
    """`proxies --out` (one pass: the similarity proxies only) then `pruning-curve --from` on 2 windows
    of 64 tokens of real text, k ≤ 2."""
    proxies = tmp_path / "p.csv"
    assert main(["proxies", "--model", smollm2.spec, "--data", f"text:{smollm2_text_file}", "--seq-len", "64",
                 "--images", "2", "--max-n", "1", "--no-skip", "--output", "next-token", "--batch-size", "2",
                 "--quiet", "--out", str(proxies)]) == 0
    out, fig = tmp_path / "c.csv", tmp_path / "c.png"
    assert main(["pruning-curve", "--model", smollm2.spec, "--data", f"text:{smollm2_text_file}", "--seq-len", "64",
                 "--images", "2", "--from", str(proxies), "--rankings", "bi_token", "relative_l2", "--max-k", "2",
                 "--batch-size", "2", "--quiet", "--out", str(out), "--figure", str(fig)]) == 0
    text = capsys.readouterr().out
    curve = layercrit.PruningCurve.load(out)
    assert set(curve.table["ranking"]) == {"bi_token", "relative_l2"} and len(curve.table) == 6 and fig.is_file()
    assert (curve.table["n_tokens"] == 2 * 63).all()
    base = curve.table[curve.table.k == 0]["perplexity"]
    assert base.nunique() == 1 and f"{base.iloc[0]:.2f}" in text
