"""Every ```bash and ```python block of the README runs as written, in order, in one scratch folder.

Shell blocks run under `bash -e` with the installed `layercrit` (the one beside `sys.executable`)
first on PATH; Python blocks run in one shared namespace, so a later block sees an earlier one's
names. Small data only: the README's examples use scikit-learn's digits and the built-in models; the
files it names as the reader's own (`mynet.py`, `mynet.pt`, `val.npz`, `userfcn.py`, `a.pt`, `b.pt`,
`test.npz`) are stand-ins made here from digits.

An HTML comment on the line(s) right above a block's fence steers it (it does not show on GitHub):

    <!-- readme-test: skip REASON -->        not run here; the reason is in the test id
    <!-- readme-test: ecosystem -->          needs torchvision/timm/transformers: run by
                                             tests/ecosystem/test_readme_ecosystem.py in .venv-eco
    <!-- readme-test: write NAME -->         the block is a file: written to the scratch folder as NAME
    <!-- readme-test: files PATH … -->       repository-relative files copied into the scratch folder
                                             first (a missing one fails the block)

Nothing is skipped because layercrit gets it wrong: such a block fails until the code is fixed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = ("bash", "python")
BLOCK_TIMEOUT = 900  # seconds; a block near it is too slow for a README example
_MARK = re.compile(r"^<!--\s*readme-test:\s*(skip|ecosystem|write|files)\b\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass
class Block:
    """One fenced block of the README and what its markers say."""

    index: int
    line: int  # of the first line of code (1-based)
    lang: str
    code: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        name = f"{self.index:02d}-L{self.line}-{self.lang or 'text'}"
        if "write" in self.marks:
            name += f"-writes-{self.marks['write']}"
        if "skip" in self.marks:
            name += "-skip-" + _slug(self.marks["skip"])
        elif "ecosystem" in self.marks:
            name += "-ecosystem"
        return name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9'.]+", "-", text).strip("-")


def readme_blocks(path: Path = README) -> list[Block]:
    """The fenced blocks of `path` with their `readme-test` markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise AssertionError(f"README.md line {start + 1}: code fence never closed")
        marks: dict[str, str] = {}
        k = start - 1
        while k >= 0 and (not lines[k].strip() or _MARK.match(lines[k])):  # markers, maybe blank lines between
            mark = _MARK.match(lines[k])
            if mark:
                marks.setdefault(mark.group(1), mark.group(2))
            k -= 1
        blocks.append(Block(len(blocks), start + 2, m.group(1), "\n".join(lines[start + 1:end]) + "\n", marks))
        i = end + 1
    return blocks


def selected(ecosystem: bool) -> list:
    """pytest params for the blocks one of the two README tests handles, in README order."""
    params = []
    for b in readme_blocks():
        if b.lang not in RUNNABLE and "write" not in b.marks:
            continue  # output shown, TOML explained in prose, …
        eco = "ecosystem" in b.marks
        if ecosystem and not eco:
            continue  # a core block: tests/test_readme.py runs it
        marks = []
        if "skip" in b.marks:
            marks.append(pytest.mark.skip(reason=b.marks["skip"] or "marked skip in README.md"))
        elif eco and not ecosystem:
            marks.append(pytest.mark.skip(reason="needs the ecosystem libraries: tests/ecosystem/test_readme_ecosystem.py"))
        params.append(pytest.param(b, id=b.id, marks=marks))
    return params


# -- stand-ins for the reader's own files ----------------------------------------------------------

MYNET = '''
import torch.nn as nn


class Net(nn.Module):
    """A small CNN for 1x8x8 images with ResNet-like stage names (layer1 ... layer3, fc)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x):
        return self.fc(self.layer3(self.layer2(self.layer1(x))).flatten(1))


def build(num_classes: int = 10) -> nn.Module:
    return Net(num_classes)
'''

USERFCN = '''
import torch.nn as nn


def make(hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
'''


def make_stand_ins(folder: Path) -> None:
    """The files the README names as the reader's own, made from digits (seconds)."""
    import numpy as np
    import torch

    from layercrit import load_data
    from layercrit.models import resolve_factory

    (folder / "mynet.py").write_text(MYNET)
    (folder / "userfcn.py").write_text(USERFCN)
    test = load_data("digits")
    for name in ("val.npz", "test.npz"):
        np.savez(folder / name, x=test.x.numpy(), y=test.y.numpy())
    for name, file, fn, seed in (("mynet.pt", "mynet.py", "build", 0), ("a.pt", "userfcn.py", "make", 1),
                                 ("b.pt", "userfcn.py", "make", 2)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = resolve_factory(f"{folder / file}:{fn}")()
        torch.save(model.state_dict(), folder / name)


# -- running ---------------------------------------------------------------------------------------


def scratch_env(folder: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # the environment's own `layercrit`
    return os.environ | {
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "MPLBACKEND": "Agg",
        "LAYERCRIT_CACHE_DIR": str(folder / ".cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def run_block(block: Block, folder: Path, namespace: dict) -> None:
    """Run (or write) one block in `folder`; fail with its output if it fails."""
    for rel in block.marks.get("files", "").split():
        src = (ROOT / rel).resolve()
        if not src.is_file():
            pytest.fail(f"README.md line {block.line}: file {rel!r} needed by this block is missing ({src})")
        shutil.copy(src, folder / src.name)
    if "write" in block.marks:
        target = folder / block.marks["write"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.code)
        return
    if block.lang == "bash":
        r = subprocess.run(["bash", "-e", "-o", "pipefail", "-x", "-c", block.code], cwd=folder,
                           env=scratch_env(folder), capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
        if r.returncode != 0:
            out = (r.stdout + r.stderr)[-4000:]
            pytest.fail(f"README.md line {block.line}: the block exited {r.returncode}; output (last lines):\n{out}",
                        pytrace=False)
        return
    # Python: one namespace for all blocks; line numbers in tracebacks are the README's.
    code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    old = Path.cwd()
    os.chdir(folder)
    try:
        exec(code, namespace)
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    make_stand_ins(folder)
    return folder


@pytest.fixture(scope="module")
def namespace() -> dict:
    return {"__name__": "__readme__"}


@pytest.mark.parametrize("block", selected(ecosystem=False))
def test_readme_block(block: Block, scratch: Path, namespace: dict, monkeypatch) -> None:
    for key, value in scratch_env(scratch).items():
        if key != "PATH":
            monkeypatch.setenv(key, value)
    run_block(block, scratch, namespace)


def test_readme_documents_every_probe_and_data_spec() -> None:
    from layercrit import list_probes
    from layercrit.data import SPECS

    text = README.read_text(encoding="utf-8")
    for probe in list_probes():
        assert f"| `{probe}` |" in text, f"probe {probe!r} has no row in the README's probe table"
    formats = text.split("## Data formats", 1)[1].split("\n## ", 1)[0]
    for spec in SPECS:
        # `FILE.npz` is written `file.npz` there; the rest as the spec's name (`cifar10:DIR…`, `DIR`).
        key = "file.npz" if spec.endswith(".npz") else spec.split("[")[0]
        assert f"| `{key}" in formats, f"data spec {spec!r} is missing from the README's Data formats table"


def test_markers_are_understood() -> None:
    """A misspelt marker would silently run (or not run) a block: every `readme-test` comment is known."""
    text = README.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if "readme-test" in line:
            assert _MARK.match(line), f"README.md line {n}: unknown marker {line.strip()!r}"
            kind, arg = _MARK.match(line).groups()
            assert kind == "ecosystem" or arg, f"README.md line {n}: `{kind}` needs an argument"
    blocks = readme_blocks()
    assert any(b.lang == "bash" for b in blocks) and any(b.lang == "python" for b in blocks)
