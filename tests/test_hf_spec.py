"""`hf:PATH` specs in the core environment (no transformers, no gguf): a path that is not a model, a
missing package, a wrong option — each one line naming what was found or what to install."""

from __future__ import annotations

import importlib.util
import json

import pytest

import layercrit
from layercrit import LayercritError
from layercrit.cli import main


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(b"\0" * 8)
    return d


def test_paths_that_are_not_models(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "fake.gguf").write_bytes(b"GGML1234")
    only_config = tmp_path / "cfg"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    (only_config / "README.md").write_text("x")
    cases = [("hf:", "names no path"),
             (f"hf:{tmp_path / 'missing'}", "does not exist (expected a Hugging Face model folder or a .gguf file)"),
             (f"hf:{tmp_path / 'empty'}", "is not a Hugging Face model folder: it has no config.json (it is empty)"),
             (f"hf:{tmp_path}", "it has no config.json (it holds cfg/, empty/, fake.gguf, notes.txt)"),
             (f"hf:{tmp_path / 'notes.txt'}", "is a file but not a .gguf file"),
             (f"hf:{tmp_path / 'fake.gguf'}", "is not a GGUF file"),
             (f"hf:{only_config}", "has config.json but no weights (model.safetensors or pytorch_model.bin; it holds README.md, config.json)")]
    for spec, message in cases:
        with pytest.raises(LayercritError) as e:
            layercrit.create_model(spec)
        assert message in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))


def test_options_are_checked(folder):
    with pytest.raises(LayercritError, match="Expected `task` to be one of causal-lm, base, masked-lm"):
        layercrit.resolve_factory(f"hf:{folder}", task="lm")
    with pytest.raises(LayercritError, match="hf: models take the model arguments task, attn_implementation; got num_classes"):
        layercrit.resolve_factory(f"hf:{folder}", num_classes=3)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed here")
def test_missing_transformers_names_the_install(folder, tmp_path, capsys):
    with pytest.raises(LayercritError, match=r"hf: model specs need the transformers package: pip install 'layercrit\[hf\]'"):
        layercrit.create_model(f"hf:{folder}")
    assert main(["layers", "--model", f"hf:{folder}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'layercrit[hf]'" in err


@pytest.mark.skipif(importlib.util.find_spec("gguf") is not None, reason="gguf is installed here")
def test_missing_gguf_names_the_install(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 12)
    with pytest.raises(LayercritError, match="loading m.gguf needs the gguf package: pip install gguf"):
        layercrit.create_model(f"hf:{f}")
