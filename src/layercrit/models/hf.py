"""`hf:PATH` model specs: a local Hugging Face model folder, or a `.gguf` file, loaded offline.

A folder holds `config.json` and its weights (safetensors, or a `.bin` that transformers reads with
`weights_only=True`); it is loaded with `local_files_only=True` and never `trust_remote_code`. A `.gguf`
file (llama.cpp's format; needs the `gguf` package) is dequantized to float32 once and cached as a
plain safetensors folder with its tokenizer, under `$LAYERCRIT_CACHE_DIR` (default
`~/.cache/layercrit`), keyed by the file's absolute path, size and modification time: the first
load takes seconds to a minute, a later one under a second.

The task head comes from the config (`AutoModelForCausalLM` when its `architectures` name a causal
LM, or, without `architectures`, when its `model_type` is a decoder; a GGUF file always holds
one), else `AutoModel`; the keyword `task` chooses (see `TASKS`). The model has the pretrained
weights in float32; the init source for `rerandomize` builds the same architecture from the same
config (`from_config`) under the trial's seed.

transformers is imported only when an `hf:` spec is used.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._utils.io import CACHE_ENV_VAR, cache_dir
from ..errors import LayercritError

__all__ = ["GGUF_CACHE_VERSION", "TASKS", "TOKENIZER_FILES", "HFSource", "hf_source", "is_hf_model", "is_tokenizer_file",
           "model_folder", "quiet_progress_bars"]

GGUF_CACHE_VERSION = 1  # bump when the converted folder's layout changes: old entries are then never read
TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "base": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}
_OPTIONS = ("task", "attn_implementation")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_converted: dict[str, Path] = {}  # gguf cache key -> folder, for this process


# Files that define a Hugging Face tokenizer (a model folder also holds weights, which are not hashed).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "merges.txt")


def is_tokenizer_file(p: Path) -> bool:
    """Whether file `p` is part of a Hugging Face tokenizer (by its name)."""
    return p.name in TOKENIZER_FILES or p.name.startswith(("vocab", "spiece", "sentencepiece")) or p.suffix == ".model"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LayercritError("hf: model specs need the transformers package: pip install 'layercrit[hf]'") from None
    return transformers


def _dtype_kw() -> dict[str, Any]:
    """float32, under the keyword this transformers version takes (`dtype` from 4.56, `torch_dtype` before)."""
    from packaging.version import Version

    return {"dtype" if Version(_transformers().__version__) >= Version("4.56") else "torch_dtype": torch.float32}


@contextlib.contextmanager
def quiet_progress_bars():
    """No transformers progress bars ("Loading weights", "Writing model shards": a second or less from a
    local folder) inside the block; the setting is restored afterwards."""
    logging = _transformers().utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _listing(folder: Path, k: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    return "it holds " + ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _check_path(path: Path) -> None:
    """A model folder or a .gguf file, else one line saying what was found."""
    if not path.exists():
        raise LayercritError(f"hf: model path {str(path)!r} does not exist (expected a Hugging Face model folder or a .gguf file)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LayercritError(f"hf: model path {str(path)!r} is a file but not a .gguf file; expected a Hugging Face "
                                 "model folder (config.json and weights) or a .gguf file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise LayercritError(f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")
        if importlib.util.find_spec("gguf") is None:
            raise LayercritError(f"loading {path.name} needs the gguf package: pip install gguf")
        if importlib.util.find_spec("accelerate") is None:  # transformers refuses GGUF files without it
            raise LayercritError(f"loading {path.name} needs the accelerate package: pip install accelerate")
        _transformers()
        return
    if not (path / "config.json").is_file():
        raise LayercritError(f"{str(path)!r} is not a Hugging Face model folder: it has no config.json ({_listing(path)})")
    if not any((path / w).is_file() for w in _WEIGHT_FILES):
        raise LayercritError(f"Hugging Face model folder {str(path)!r} has config.json but no weights "
                             f"(model.safetensors or pytorch_model.bin; {_listing(path)})")
    _transformers()


def is_hf_model(path: str | os.PathLike) -> bool:
    """Whether `path` is a Hugging Face model folder or a GGUF file (without loading it)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    return (path / "config.json").is_file()


def _gguf_key(path: Path) -> str:
    st = path.stat()
    payload = {"version": GGUF_CACHE_VERSION, "path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantize `path` to float32 and write it with its tokenizer as a plain safetensors folder `out`.

    A GGUF-loaded model refuses `save_pretrained` ("quantized with GGUF and is not serializable"):
    the same architecture is rebuilt from the config without its quantization entry and given the
    dequantized weights.
    """
    tf = _transformers()
    folder, name = str(path.parent), path.name
    kw = {"gguf_file": name, "local_files_only": True}
    try:
        config = tf.AutoConfig.from_pretrained(folder, **kw)
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, **kw)
        loaded = tf.AutoModelForCausalLM.from_pretrained(folder, **kw, **_dtype_kw())
    except LayercritError:
        raise
    except Exception as e:  # noqa: BLE001  (transformers and gguf raise many kinds for a file they cannot read)
        raise LayercritError(f"cannot load the GGUF file {str(path)!r}: {type(e).__name__}: {_first_line(e)}") from None
    config.__dict__.pop("quantization_config", None)
    plain = tf.AutoModelForCausalLM.from_config(config, **_dtype_kw())
    plain.load_state_dict(loaded.state_dict())
    del loaded
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / "layercrit-source.json").write_text(json.dumps({"gguf": str(path.resolve()), "version": GGUF_CACHE_VERSION}) + "\n")


def _gguf_folder(path: Path) -> Path:
    """The converted folder of GGUF file `path`: from the cache, else converted now and cached.

    The folder is written beside its final name and renamed into place, so a cache entry is complete
    or absent. An unwritable cache is not fatal: the conversion goes to a temporary folder removed at exit.
    """
    key = _gguf_key(path)
    if key in _converted and (_converted[key] / "config.json").is_file():
        return _converted[key]
    final = cache_dir() / f"gguf-{path.stem[:40]}-{key}"
    if (final / "config.json").is_file():
        _converted[key] = final
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as e:
        warnings.warn(f"cannot write the model cache in {str(final.parent)!r} ({e.strerror or e}); "
                      f"{path.name} is converted again on every run", stacklevel=3)
        tmp = Path(tempfile.mkdtemp(prefix="layercrit-gguf-"))
        atexit.register(shutil.rmtree, tmp, True)
        _convert_gguf(path, tmp)
        _converted[key] = tmp
        return tmp
    try:
        _convert_gguf(path, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; the cache gets the usual mode
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not another process's conversion that won the race
                raise
    except OSError as e:
        raise LayercritError(f"could not write the converted model to {str(final)!r} ({e.strerror or e}); "
                             f"free space there or set ${CACHE_ENV_VAR} to another folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _converted[key] = final
    return final


def model_folder(path: str | os.PathLike) -> Path:
    """The Hugging Face folder of `path`: the folder itself, or a GGUF file's converted (cached) folder.

    It holds the tokenizer too where the model has one (a GGUF file always does), so it serves as
    `tokenizer=` for `text:FILE` data.
    """
    path = Path(path).expanduser()
    _check_path(path)
    return _gguf_folder(path) if path.is_file() else path


def _default_task(config, gguf: bool) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        return "causal-lm" if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) else "base"
    if gguf:
        return "causal-lm"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", None)
    return "causal-lm" if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "base"


@dataclass
class HFSource:
    """What an `hf:PATH` spec resolves to.

    Attributes:
        path: the path as given (a folder or a .gguf file).
        task: the head, a key of `TASKS` (None: from the config).
        attn_implementation: passed to transformers when given ("eager", "sdpa", …).
    """

    path: Path
    task: str | None = None
    attn_implementation: str | None = None

    @property
    def folder(self) -> Path:
        """The plain Hugging Face folder (a GGUF file converted on first use)."""
        return model_folder(self.path)

    def config(self):
        tf = _transformers()
        try:
            config = tf.AutoConfig.from_pretrained(str(self.folder), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001
            raise LayercritError(f"cannot read the config of {str(self.path)!r}: {type(e).__name__}: {_first_line(e)}") from None
        if self.attn_implementation is not None:
            config._attn_implementation = self.attn_implementation
        return config

    def auto_class(self, config=None):
        task = self.task or _default_task(config if config is not None else self.config(), self.path.is_file())
        return getattr(_transformers(), TASKS[task])

    def _options(self) -> dict[str, Any]:
        return {} if self.attn_implementation is None else {"attn_implementation": self.attn_implementation}

    def load(self) -> nn.Module:
        """The pretrained model, float32, in eval mode."""
        config = self.config()
        cls = self.auto_class(config)
        try:
            with quiet_progress_bars():
                model = cls.from_pretrained(str(self.folder), local_files_only=True, trust_remote_code=False,
                                            **self._options(), **_dtype_kw())
        except Exception as e:  # noqa: BLE001
            raise LayercritError(f"cannot load {str(self.path)!r} as {cls.__name__}: {type(e).__name__}: {_first_line(e)}") from None
        return model.eval()

    def build(self) -> nn.Module:
        """The same architecture from the same config, freshly initialized (under the caller's seed), float32."""
        config = self.config()
        return self.auto_class(config).from_config(config, trust_remote_code=False, **_dtype_kw()).eval()

    def tokenizer(self):
        """The model's tokenizer (from its folder; a GGUF file's embedded one)."""
        tf = _transformers()
        try:
            return tf.AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001
            raise LayercritError(f"cannot load a tokenizer from {str(self.path)!r}: {type(e).__name__}: {_first_line(e)}") from None


def hf_source(path: str | os.PathLike, **options: Any) -> HFSource:
    """Check `path` and the options of an `hf:` spec (`task`, `attn_implementation`); nothing is loaded yet."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise LayercritError(f"hf: models take the model arguments {', '.join(_OPTIONS)}; got {', '.join(unknown)}")
    task = options.get("task")
    if task is not None and task not in TASKS:
        raise LayercritError(f"Expected `task` to be one of {', '.join(TASKS)}, got {task!r}")
    path = Path(path).expanduser()
    _check_path(path)
    return HFSource(path, task, options.get("attn_implementation"))
