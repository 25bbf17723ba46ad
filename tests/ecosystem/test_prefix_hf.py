"""The block-prefix executor on Hugging Face models: equal to the full forward for every probe kind,
with padding in the batch; masks and rotary tables reach the re-run blocks; concatenated trials equal
one-by-one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import layercrit
from layercrit.engine.executors.prefix import PrefixExecutor
from layercrit.testing import assert_same_measures


def tiny(kind: str, seed: int | None = 0) -> torch.nn.Module:
    """A tiny random-config model; `seed=None` draws from the caller's RNG state (a factory)."""
    if seed is not None:
        torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=4, n_head=2)
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=32, num_labels=3)
        return transformers.BertForSequenceClassification(cfg)
    if kind == "vit":
        cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=64, num_labels=5)
        return transformers.ViTForImageClassification(cfg)
    raise ValueError(kind)


def data(kind: str, n: int = 6):
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return torch.randn(n, 3, 16, 16, generator=g)
    ids = torch.randint(0, 97, (n, 12), generator=g)
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    mask[3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(kind: str, executor: str, probes, **kw):
    model = tiny(kind)
    reference = tiny(kind, seed=1).state_dict() if "reinit" in probes else None
    result = layercrit.measure(model, data(kind), factory=lambda: tiny(kind, seed=None), probes=probes,
                               reference=reference,
                               trials=kw.pop("trials", 2), granularity="block", executor=executor, batch_size=4, **kw)
    return result


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "vit"])
def test_prefix_equals_full(kind):
    probes = ["rerandomize", "reinit", "zero", "skip"]
    blocks = ["L*"]  # skip is defined for the blocks (not the embeddings or the head)
    prefix = run(kind, "prefix", probes, batch_trials=False, layers=blocks)
    full = run(kind, "full", probes, layers=blocks)
    assert prefix.config["executor_used"] == "prefix"
    assert_same_measures(prefix, full)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_concatenated_trials_equal_one_by_one(kind):
    one = run(kind, "prefix", ["rerandomize"], batch_trials=False)
    cat = run(kind, "prefix", ["rerandomize"], batch_trials=True)
    assert_same_measures(cat, one, ("criticality", "l2", "kl"))


def test_auto_uses_prefix_on_hf_and_says_so():
    result = run("gpt2", "auto", ["rerandomize"])
    assert result.config["executor_used"] == "prefix"
    assert result.config.get("executor_reason")


def test_masks_reach_rerun_blocks():
    """With the attention mask dropped from the re-run blocks, padded sequences would change: the
    prefix run of a probe on the last block must equal the full forward on padded rows."""
    model = tiny("bert").eval()
    x = data("bert")
    units = layercrit.select_units(model, granularity="block")
    last = [u for u in units if u.name.endswith("layer.3")][0]
    values = layercrit.create_probe("zero").values(model, last, 0)
    ex = PrefixExecutor(model)
    ex.prepare([values])
    with torch.no_grad():
        ex.start_batch(x)
        q = ex.run_many([values])[0].logits
        ex.end_batch()
        with layercrit.substitute(model, values):
            ref = model(**x).logits
        # the same without the mask differs: the test would catch a dropped mask
        with layercrit.substitute(model, values):
            unmasked = model(input_ids=x["input_ids"]).logits
    torch.testing.assert_close(q, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(unmasked[[1, 3]], ref[[1, 3]], atol=1e-4)


def test_memory_budget_keeps_every_jth_boundary():
    model = tiny("gpt2").eval()
    small = run("gpt2", "prefix", ["zero"], memory_budget=4 * 12 * 32 * 4 * 2)  # room for ~2 boundaries
    full = run("gpt2", "full", ["zero"])
    assert small.config["executor_used"] == "prefix"
    torch.testing.assert_close(torch.tensor(small.table["criticality"].to_numpy(float)),
                               torch.tensor(full.table["criticality"].to_numpy(float)), rtol=0, atol=1e-5)
    del model


def test_llama_kwargs_reach_concatenated_blocks():
    """The concatenated path calls block k itself with the keyword arguments a pre-hook kept (mask,
    rotary `position_embeddings`): with padding in the batch it must equal the full forward, and
    the same block without its mask differs on the padded rows (so a dropped mask would fail)."""
    model = tiny("llama").eval()
    x = data("llama")
    last = [u for u in layercrit.select_units(model, granularity="block") if u.name.endswith("layers.3")][0]
    probe = layercrit.create_probe("rerandomize")
    draws = [probe.values(model, last, t) for t in range(3)]
    ex = PrefixExecutor(model, batch_trials=True)
    ex.prepare(draws)
    with torch.no_grad():
        ex.start_batch(x)
        args, kwargs = ex._batch["inputs"][3]
        assert "position_embeddings" in kwargs  # the rotary table reached the kept call
        outs = ex.run_many(draws)
        ex.end_batch()
        for v, q in zip(draws, outs):
            with layercrit.substitute(model, v):
                torch.testing.assert_close(q.logits, model(**x).logits, rtol=0, atol=1e-5)
        unmasked = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        with_mask, without = model.model.layers[3](*args, **kwargs), model.model.layers[3](*args, **unmasked)
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    assert not torch.allclose(first(with_mask)[1], first(without)[1], atol=1e-4)  # row 1 is padded


def test_automatic_choice_of_concatenation_equals_one_by_one(monkeypatch):
    """batch_trials None: off on the CPU; where it is timed (CUDA, forced here) the first group's draws
    are each computed once and every result equals the one-by-one run."""
    one = run("gpt2", "prefix", ["rerandomize"], batch_trials=False)
    cpu = run("gpt2", "prefix", ["rerandomize"])
    assert cpu.config["batch_trials_used"] is False
    monkeypatch.setattr(PrefixExecutor, "_on_cuda", lambda self: True)
    timed = run("gpt2", "prefix", ["rerandomize"], trials=3)
    assert timed.config["batch_trials_used"] in (True, False)
    three = run("gpt2", "prefix", ["rerandomize"], batch_trials=False, trials=3)
    assert_same_measures(timed, three, ("criticality", "l2", "kl"))
    torch.testing.assert_close(torch.tensor(cpu.table["kl"].to_numpy(float)), torch.tensor(one.table["kl"].to_numpy(float)),
                               rtol=0, atol=1e-12)


def test_bfloat16_weights_keep_bfloat16_boundaries_and_measure_in_float64():
    """A model held in bf16 (as a 7B model on one GPU would be): the kept boundaries are bf16 (half the
    bytes of fp32), the prefix executor equals the full forward, and the measures are finite."""
    def bf16(seed=0):
        return tiny("gpt2", seed).to(torch.bfloat16)

    x = data("gpt2")
    kw = dict(probes=["zero", "skip"], layers=["L*"], granularity="block", batch_size=6)
    p16 = layercrit.measure(bf16(), x, executor="prefix", **kw)
    f16 = layercrit.measure(bf16(), x, executor="full", **kw)
    p32 = layercrit.measure(tiny("gpt2"), x, executor="prefix", **kw)
    assert p16.config["kept_peak_bytes"] * 2 == p32.config["kept_peak_bytes"]
    a, b = p16.table["criticality"].to_numpy(float), f16.table["criticality"].to_numpy(float)
    assert np.isfinite(a).all()
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
