"""`layercrit prune` and `models.prune`: the written folder loads with plain `from_pretrained` and computes
what layercrit's in-memory `skip` of the same blocks computes (to 1e-5), on tiny random Llama, GPT-2 and
Qwen2 (per-layer `layer_types` with sliding-window attention) built from transformers configs, and on
the real SmolLM2-135M; the in-memory pruned model generates with a key-value cache (renumbered
`layer_idx`); bad input is one line, exit 2, nothing written. Runs in .venv-eco."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import transformers

from layercrit import LayercritError
from layercrit.cli import main
from layercrit.engine.probes import Change, substitute
from layercrit.models.prune import block_indices, drop_blocks, save_pruned


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=4,
                                                                     n_head=2, bos_token_id=0, eos_token_id=0))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True))
    else:  # per-layer attention types: a layer that reads the wrong entry attends over the wrong window
        cfg = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=3, max_window_layers=0,
                                       layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"])
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # norms with unit weights only rescale: give them a direction to change
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def tokens() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def skipped_logits(model, blocks: list[str], x) -> torch.Tensor:
    """layercrit's `skip` of `blocks` (each returns the residual stream it was given), in memory."""
    with torch.no_grad(), substitute(model, Change({}, skip=frozenset(blocks))):
        return model(**x).logits


def layer_count(config) -> int:
    return config.num_hidden_layers


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_pruned_folder_equals_skipped_model(kind, tmp_path, capsys):
    model = tiny(kind)
    src = tmp_path / "src"
    model.save_pretrained(src)
    prefix = "transformer.h" if kind == "gpt2" else "model.layers"
    out = tmp_path / "pruned"
    assert main(["prune", f"hf:{src}", "--drop", "L01", "2", "--out", str(out)]) == 0  # a label and a 0-based index
    printed = capsys.readouterr().out
    assert f"L01 ({prefix}.1), L02 ({prefix}.2)" in printed
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(loaded) is type(model) and layer_count(loaded.config) == 2 and len(loaded.get_submodule(prefix)) == 2
    x = tokens()
    with torch.no_grad():
        pruned = loaded(**x).logits
    expected = skipped_logits(model, [f"{prefix}.1", f"{prefix}.2"], x)
    assert (pruned - expected).abs().max() < 1e-5
    with torch.no_grad():  # not the unpruned model's logits
        assert (model(**x).logits - pruned).abs().max() > 1e-3
    if kind == "gpt2":
        assert json.loads((out / "config.json").read_text())["n_layer"] == 2
    if kind == "qwen2":
        assert loaded.config.layer_types == ["sliding_attention", "sliding_attention"]
    if kind in ("gpt2", "llama"):  # tied: one tensor in the file, shared after loading
        assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    doc = json.loads((out / "layercrit-prune.json").read_text())
    assert [d["label"] for d in doc["dropped"]] == ["L01", "L02"] and [d["index"] for d in doc["dropped"]] == [1, 2]
    assert doc["blocks_before"] == 4 and doc["blocks_after"] == 2


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_drop_blocks_renumbers_and_generates_with_cache(kind):
    """The in-memory pruned model: config and `layer_idx` renumbered, so a key-value cache of 2 layers
    works; its greedy tokens equal the reloaded folder's; the source model is unchanged."""
    model = tiny(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruned = drop_blocks(model, ["L00", 3])
    assert layer_count(model.config) == 4 and all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert layer_count(pruned.config) == 2
    idx = sorted({m.layer_idx for m in pruned.modules() if isinstance(getattr(m, "layer_idx", None), int)})
    assert idx == [0, 1]
    x = {"input_ids": tokens()["input_ids"][:1, :6]}
    with torch.no_grad():
        fresh = type(model)(pruned.config).eval()
        fresh.load_state_dict(pruned.state_dict())
        a = pruned.generate(**x, max_new_tokens=5, do_sample=False, pad_token_id=0)
        b = fresh.generate(**x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b) and a.shape[1] == 11


def test_block_selection():
    model = tiny("llama")
    assert block_indices(model, ["L03", "1", "model.layers.2", "L03"]) == [1, 2, 3]  # sorted, once each
    assert block_indices(model, ["l0", 2]) == [0, 2]
    for bad, match in ((["L04"], r"unknown block 'L04': the model has 4 blocks, L00 … L03"),
                       (["model.layers.9"], "unknown block"), (["x"], "unknown block 'x'"),
                       ([0, 1, 2, 3], "cannot drop all 4 blocks"), ([], "no blocks to drop")):
        with pytest.raises(LayercritError, match=match):
            block_indices(model, bad)


def test_prune_from_a_ranking_file(tmp_path, capsys):
    """`--from proxies.csv --proxy NAME --k K` drops the K lowest blocks of that ranking (ties: block order)."""
    model = tiny("llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    rows = [{"model": "m", "layer": f"model.layers.{i}", "label": f"L{i:02d}", "proxy": "bi_token", "n": 1, "value": v,
             "samples": 3, "tokens": 30, "note": ""} for i, v in enumerate([0.30, 0.10, 0.20, 0.10])]
    pd.DataFrame(rows).to_csv(tmp_path / "proxies.csv", index=False)
    out = tmp_path / "pruned"
    assert main(["prune", str(src), "--from", str(tmp_path / "proxies.csv"), "--proxy", "bi_token", "--k", "2",
                 "--out", str(out)]) == 0
    assert "L01 (model.layers.1), L03 (model.layers.3)" in capsys.readouterr().out
    doc = json.loads((out / "layercrit-prune.json").read_text())
    assert [d["index"] for d in doc["dropped"]] == [1, 3] and doc["ranking"]["name"] == "bi_token"
    # a compare-proxies pruning table names the sets directly
    pd.DataFrame([{"proxy": "bi_token", "probe": "skip", "k": 1, "overlap": 1.0, "blocks_by_proxy": "model.layers.2",
                   "blocks_by_probe": "model.layers.0"}]).to_csv(tmp_path / "cmp.pruning.csv", index=False)
    out2 = tmp_path / "pruned2"
    assert main(["prune", str(src), "--from", str(tmp_path / "cmp.pruning.csv"), "--proxy", "skip", "--k", "1",
                 "--out", str(out2)]) == 0
    assert json.loads((out2 / "layercrit-prune.json").read_text())["dropped"][0]["index"] == 0


def test_prune_bad_input_one_line_nothing_written(tmp_path, capsys):
    model = tiny("gpt2")
    src = tmp_path / "src"
    model.save_pretrained(src)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    capsys.readouterr()
    pd.DataFrame([{"layer": "transformer.h.0", "proxy": "bi_token", "n": 1, "value": 0.1}]).to_csv(tmp_path / "p.csv", index=False)
    cases = [
        (["--drop", "L07"], "new", "unknown block 'L07': the model has 4 blocks"),
        (["--drop", "0", "1", "2", "3"], "new", "cannot drop all 4 blocks"),
        (["--drop", "L01"], "full", "exists and is not empty"),
        (["--from", str(tmp_path / "p.csv"), "--proxy", "angular_last", "--k", "1"], "new", "has no proxy or probe 'angular_last'"),
        (["--from", str(tmp_path / "p.csv"), "--proxy", "bi_token", "--k", "3"], "new", "--k 3 is more than the 1 blocks"),
        (["--drop", "L01", "--k", "2"], "new", "--proxy and --k go with --from"),
        ([], "new", "either --drop BLOCK"),
    ]
    for extra, out, message in cases:
        code = main(["prune", f"hf:{src}", *extra, "--out", str(tmp_path / out)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("layercrit: error: ") and message in err, (extra, err)
    assert not (tmp_path / "new").exists() and [p.name for p in full.iterdir()] == ["keep.txt"]
    code = main(["prune", "fcn-3x256", "--drop", "L00", "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert code == 2 and "prune writes Hugging Face models" in err and err.count("\n") == 1
    code = main(["prune", f"hf:{tmp_path / 'nothing'}", "--drop", "L00", "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.*"))
    with pytest.raises(LayercritError, match="prune writes Hugging Face models"):
        save_pruned(torch.nn.Sequential(torch.nn.Linear(2, 2)), [0], tmp_path / "new")


def test_prune_smollm_two_blocks(smollm2, smollm2_text, tmp_path, capsys):
    """SmolLM2 without L05 and L17: the written folder (with the GGUF's tokenizer) equals the in-memory skip."""
    out = tmp_path / "smollm2-28"
    assert main(["prune", smollm2.spec, "--drop", "L05", "L17", "--out", str(out)]) == 0
    assert "dropped 2 of 30 blocks: L05 (model.layers.5), L17 (model.layers.17)" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert loaded.config.num_hidden_layers == 28 and loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    x = smollm2_text
    with torch.no_grad():
        pruned = loaded(**x).logits
    expected = skipped_logits(smollm2.model, ["model.layers.5", "model.layers.17"], x)
    mask = x["attention_mask"].bool()
    assert (pruned - expected)[mask].abs().max() < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok("The capital of France")["input_ids"] == smollm2.tokenizer("The capital of France")["input_ids"]
    size = (out / "model.safetensors").stat().st_size
    assert 28 * 3538944 * 4 < size < (134515008 - 2 * 3538944) * 4 + 10**6  # float32, one copy of the tied embedding
