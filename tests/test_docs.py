"""Every ```bash and ```python block of README.md and docs/*.md runs as written, page by page.

Each page runs in a scratch folder of its own, its blocks in page order: shell blocks under `bash -e`
with the installed `layercrit` (the one beside `sys.executable`) first on PATH; Python blocks in one
namespace per page, so a later block of a page sees an earlier one's names, and no page sees
another's. Small data only: the examples use scikit-learn's digits and the built-in models; the
files the pages name as the reader's own (`mynet.py`, `mynet.pt`, `val.npz`, `userfcn.py`, `a.pt`,
`b.pt`, `test.npz`) are stand-ins made here from digits and copied into every page's folder.

What a page takes from the work of another (a training run, a results store, a Python variable) it
says with a `needs` marker; session fixtures build each such artifact once, from the commands of
`ARTIFACTS` and `VARIABLES` below (the pages' own commands), and copy it in, so the pages do not
depend on each other's order.

An HTML comment on the line(s) right above a block's fence steers it (it does not show on GitHub):

    <!-- readme-test: skip REASON -->        not run here; the reason is in the test id
    <!-- readme-test: ecosystem -->          needs torchvision/timm/transformers: run by
                                             tests/ecosystem/test_readme_ecosystem.py in .venv-eco
    <!-- readme-test: write NAME -->         the block is a file: written to the scratch folder as NAME
    <!-- readme-test: files PATH … -->       repository-relative files copied into the scratch folder
                                             first (a missing one fails the block)
    <!-- readme-test: needs NAME … -->       artifacts of `ARTIFACTS` (`runs/fcn`, `results.sqlite`, …)
                                             copied in, and Python variables of `VARIABLES` (`comparison`,
                                             …) made in the page's namespace, where not there already

Nothing is skipped because layercrit gets it wrong: such a block fails until the code is fixed.
Besides running the blocks, the tests check that every docs page is linked from the README, that
every relative link and `#anchor` resolves, and that every page has a runnable block or says why not.
"""

from __future__ import annotations

import copy
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
DOCS = ROOT / "docs"
README_MAX_LINES = 300
RUNNABLE = ("bash", "python")
BLOCK_TIMEOUT = 900  # seconds; a block near it is too slow for a docs example
_MARK = re.compile(r"^<!--\s*readme-test:\s*(skip|ecosystem|write|files|needs)\b\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^```(\S*)\s*$")


# The pages that make the artifacts others need run first, so that those are taken from their runs
# (`Artifact.made_by`) rather than built again; the README, which only takes, runs last.
FIRST = ("docs/robustness.md", "docs/models-and-data.md", "docs/measures.md", "docs/modcrit.md", "docs/zoos.md")


def doc_pages() -> list[Path]:
    """Every docs page (the artifacts' makers first, then by name), then README.md."""
    pages = sorted(DOCS.glob("*.md"), key=lambda p: (FIRST.index(page_name(p)) if page_name(p) in FIRST
                                                    else len(FIRST), p.name))
    return [*pages, README]


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@dataclass
class Block:
    """One fenced block of a page and what its markers say."""

    index: int
    line: int  # of the first line of code (1-based)
    lang: str
    code: str
    marks: dict[str, str] = field(default_factory=dict)
    page: Path = README

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

    @property
    def where(self) -> str:
        return f"{page_name(self.page)} line {self.line}"


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
            raise AssertionError(f"{page_name(path)} line {start + 1}: code fence never closed")
        marks: dict[str, str] = {}
        k = start - 1
        while k >= 0 and (not lines[k].strip() or _MARK.match(lines[k])):  # markers, maybe blank lines between
            mark = _MARK.match(lines[k])
            if mark:
                marks.setdefault(mark.group(1), mark.group(2))
            k -= 1
        code = "\n".join(lines[start + 1:end]) + "\n"
        blocks.append(Block(len(blocks), start + 2, m.group(1), code, marks, path))
        i = end + 1
    return blocks


def _runnable(block: Block) -> bool:
    return block.lang in RUNNABLE or "write" in block.marks


def selected(ecosystem: bool) -> list:
    """pytest params `(page, block)` for the blocks one of the two docs tests handles, in page order."""
    params = []
    for page in doc_pages():
        for b in readme_blocks(page):
            if not _runnable(b):
                continue  # output shown, TOML explained in prose, …
            eco = "ecosystem" in b.marks
            if ecosystem and not eco:
                continue  # a core block: tests/test_docs.py runs it
            marks = []
            if "skip" in b.marks:
                marks.append(pytest.mark.skip(reason=b.marks["skip"] or f"marked skip in {page_name(page)}"))
            elif eco and not ecosystem:
                marks.append(pytest.mark.skip(reason="needs the ecosystem libraries: tests/ecosystem/test_readme_ecosystem.py"))
            params.append(pytest.param(page_name(page), b, id=f"{page_name(page)}:{b.id}", marks=marks))
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
    """The files the docs name as the reader's own, made from digits (seconds)."""
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


# -- what a page may need from another: built once per session --------------------------------------


@dataclass(frozen=True)
class Artifact:
    """Files (globs, relative to the folder) that shell `commands` make there from the `needs` first.

    `made_by`: the page whose blocks make the same files with the same commands; once its blocks
    have made them, they are taken from its folder instead of being built again.
    """

    commands: str
    outputs: tuple[str, ...]
    needs: tuple[str, ...] = ()
    made_by: str = ""


def _written_file(page: str, name: str) -> str:
    """The text of the block of docs page `page` marked `write NAME`: one source for the zoo file."""
    for b in readme_blocks(ROOT / page):
        if b.marks.get("write") == name:
            return b.code
    raise AssertionError(f"{page} has no block marked `write {name}`")


_FCN_RUN = "layercrit train --model fcn-3x256 --data digits:train --epochs 40 --save-epochs 0,1,2,5,10,20,40 --out runs/fcn"
_MODCRIT = "--alphas 6 --noise-draws 2 --train-subset 500"
# The commands are those of the page that makes each artifact (named beside it), plus `--quiet`.
ARTIFACTS: dict[str, Artifact] = {
    "runs/fcn": Artifact(_FCN_RUN + " --quiet", ("runs/fcn",), made_by="docs/robustness.md"),
    "runs/fcn-10": Artifact(  # robustness.md makes it from Python, with the same settings
        "layercrit train --model fcn-3x256 --data digits:train --epochs 10 --save-epochs 0,1,10 --out runs/fcn-10 --quiet",
        ("runs/fcn-10",), made_by="docs/robustness.md"),
    "runs/resnet": Artifact(
        "layercrit train --model resnet18 --model-arg width=8 --data digits:train --epochs 2 --out runs/resnet --quiet",
        ("runs/resnet",), made_by="docs/robustness.md"),
    "results.csv": Artifact(
        "layercrit measure --model mynet.py:build --weights mynet.pt --data val.npz --trials 3 --images 10000"
        " --out results.csv --quiet", ("results.csv", "results.config.json"), made_by="docs/models-and-data.md"),
    "results.sqlite": Artifact(  # with the zoo file of zoos.md
        "layercrit sweep zoo.toml --store results.sqlite --quiet", ("results.sqlite*",), made_by="docs/zoos.md"),
    "robustness.csv": Artifact(
        "layercrit robustness runs/fcn --trials 3 --out robustness.csv --quiet", ("robustness.*",), ("runs/fcn",),
        made_by="docs/robustness.md"),
    "distances.csv": Artifact(
        "layercrit distances runs/fcn --out distances.csv", ("distances.*",), ("runs/fcn",),
        made_by="docs/robustness.md"),
    "modcrit.csv": Artifact(
        f"layercrit modcrit runs/fcn --epsilon 0.05 0.1 {_MODCRIT} --out modcrit.csv --quiet", ("modcrit.*",),
        ("runs/fcn",), made_by="docs/modcrit.md"),
    "rank.csv": Artifact(
        "for arch in fcn-1x256 fcn-3x64; do layercrit train --model $arch --epochs 20 --out runs/$arch --quiet; done\n"
        f"layercrit rank runs/fcn runs/fcn-1x256 runs/fcn-3x64 --epsilon 0.1 {_MODCRIT} --out rank.csv --quiet",
        ("rank.*",), ("runs/fcn",), made_by="docs/modcrit.md"),
    "probes.csv": Artifact(
        "layercrit measure --model fcn-3x256 --weights runs/fcn/epoch_0040.pt --data digits --out probes.csv --quiet"
        " --probe rerandomize --probe reinit --probe zero --probe interpolate --reference runs/fcn/epoch_0000.pt"
        " --alpha 0.5", ("probes.*",), ("runs/fcn",), made_by="docs/measures.md"),
}
# Python variables a page's blocks use from another page's: (artifacts copied in first, the code, the
# page whose namespace has the same variable once its blocks ran: then a copy of that one is taken).
VARIABLES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "comparison": (("results.sqlite",), (
        "from layercrit.zoo.compare import summarize\nfrom layercrit.zoo.store import Store\n"
        "with Store('results.sqlite') as store:\n"
        "    comparison = summarize(store, by='accuracy', exclude_categories='adversarial training', baseline='fcn-a')\n"),
        "docs/zoos.md"),
    "rob": (("runs/fcn-10",), "import layercrit\nrob = layercrit.robustness('runs/fcn-10', trials=3)\n",
            "docs/robustness.md"),
    "mc": (("runs/fcn",), (
        "import layercrit\nmc = layercrit.run_module_criticality('runs/fcn', epsilon=[0.05, 0.1],"
        " layers=['fc1', 'classifier'], alphas=6, noise_draws=2, train_subset=500)\n"), "docs/modcrit.md"),
}


def _run_shell(code: str, folder: Path, where: str) -> None:
    r = subprocess.run(["bash", "-e", "-o", "pipefail", "-x", "-c", code], cwd=folder,
                       env=scratch_env(folder), capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    if r.returncode != 0:
        out = (r.stdout + r.stderr)[-4000:]
        pytest.fail(f"{where}: the block exited {r.returncode}; output (last lines):\n{out}", pytrace=False)


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copy2(src, dest)


def copy_folder(src: Path, dest: Path) -> None:
    """Copy what `src` holds into `dest`."""
    for item in src.iterdir():
        _copy(item, dest / item.name)


class Artifacts:
    """The `ARTIFACTS`, each built (or taken from its page) at most once, in one folder that holds the
    stand-ins; and the `VARIABLES` taken from their pages."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.built: set[str] = set()
        self.variables: dict[str, object] = {}

    def adopt(self, page: str, folder: Path, namespace: dict) -> None:
        """After a block of `page` passed: take the artifacts and variables it has now made."""
        for name, art in ARTIFACTS.items():
            if art.made_by != page or name in self.built:
                continue
            found = [sorted(folder.glob(pattern)) for pattern in art.outputs]
            if all(found):
                for src in (s for matches in found for s in matches):
                    target = self.folder / src.relative_to(folder)
                    if target.exists():
                        shutil.rmtree(target) if target.is_dir() else target.unlink()
                    _copy(src, target)
                self.built.add(name)
        for name, (_, _, made_by) in VARIABLES.items():
            if made_by == page and name in namespace and name not in self.variables:
                self.variables[name] = copy.deepcopy(namespace[name])

    def build(self, name: str) -> None:
        if name in self.built:
            return
        art = ARTIFACTS[name]
        for dep in art.needs:
            self.build(dep)
        if name == "results.sqlite":
            (self.folder / "zoo.toml").write_text(_written_file("docs/zoos.md", "zoo.toml"))
        _run_shell(art.commands, self.folder, f"artifact {name!r} (tests/test_docs.py ARTIFACTS)")
        self.built.add(name)

    def copy_into(self, name: str, dest: Path) -> None:
        """Copy artifact `name` into `dest`, where the page has not made its own."""
        self.build(name)
        for pattern in ARTIFACTS[name].outputs:
            matches = sorted(self.folder.glob(pattern))
            assert matches, f"artifact {name!r} made no {pattern!r}"
            for src in matches:
                target = dest / src.relative_to(self.folder)
                if not target.exists():
                    _copy(src, target)


@dataclass
class PageState:
    folder: Path
    namespace: dict


def provide(needs: str, state: PageState, artifacts: Artifacts) -> None:
    """Put what a `needs` marker names into the page's folder and namespace."""
    for name in needs.split():
        if name in ARTIFACTS:
            artifacts.copy_into(name, state.folder)
        elif name in VARIABLES:
            deps, code, _ = VARIABLES[name]
            for dep in deps:
                artifacts.copy_into(dep, state.folder)
            if name in state.namespace:
                continue
            if name in artifacts.variables:
                state.namespace[name] = copy.deepcopy(artifacts.variables[name])
            else:
                _exec_in(state.folder, compile(code, f"<needs {name}>", "exec"), state.namespace)
        else:
            pytest.fail(f"unknown `needs` name {name!r}: not in ARTIFACTS or VARIABLES of tests/test_docs.py")


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


def _exec_in(folder: Path, code, namespace: dict) -> None:
    old = Path.cwd()
    os.chdir(folder)
    try:
        exec(code, namespace)
    finally:
        os.chdir(old)


def run_block(block: Block, folder: Path, namespace: dict) -> None:
    """Run (or write) one block in `folder`; fail with its output if it fails."""
    for rel in block.marks.get("files", "").split():
        src = (ROOT / rel).resolve()
        if not src.is_file():
            pytest.fail(f"{block.where}: file {rel!r} needed by this block is missing ({src})")
        shutil.copy(src, folder / src.name)
    if "write" in block.marks:
        target = folder / block.marks["write"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.code)
        return
    if block.lang == "bash":
        _run_shell(block.code, folder, block.where)
        return
    # Python: one namespace per page; line numbers in tracebacks are the page's.
    _exec_in(folder, compile("\n" * (block.line - 1) + block.code, str(block.page), "exec"), namespace)


class Pages:
    """One scratch folder (with the stand-ins) and one namespace per page, made when first asked for."""

    def __init__(self, tmp_path_factory, stand_ins: Path) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.stand_ins = stand_ins
        self.states: dict[str, PageState] = {}

    def __call__(self, page: str) -> PageState:
        if page not in self.states:
            folder = self.tmp_path_factory.mktemp(_slug(page))
            copy_folder(self.stand_ins, folder)
            self.states[page] = PageState(folder, {"__name__": "__readme__"})
        return self.states[page]


# The session fixtures `docs_stand_ins`, `docs_artifacts` and `docs_pages` are in tests/conftest.py.


def run_page_block(page: str, block: Block, pages: Pages, artifacts: Artifacts, monkeypatch) -> None:
    """Run `block` in its page's folder and namespace, with what its `needs` marker names."""
    state = pages(page)
    for key, value in scratch_env(state.folder).items():
        if key != "PATH":
            monkeypatch.setenv(key, value)
    if "needs" in block.marks:
        provide(block.marks["needs"], state, artifacts)
    run_block(block, state.folder, state.namespace)
    artifacts.adopt(page, state.folder, state.namespace)


@pytest.mark.parametrize(("page", "block"), selected(ecosystem=False))
def test_docs_block(page: str, block: Block, docs_pages: Pages, docs_artifacts: Artifacts, monkeypatch) -> None:
    run_page_block(page, block, docs_pages, docs_artifacts, monkeypatch)


# -- what the pages must say -----------------------------------------------------------------------


def test_measures_page_documents_every_probe() -> None:
    from layercrit import list_probes

    text = (DOCS / "measures.md").read_text(encoding="utf-8")
    for probe in list_probes():
        assert f"| `{probe}` |" in text, f"probe {probe!r} has no row in the probe table of docs/measures.md"


def test_models_and_data_page_documents_every_data_spec() -> None:
    from layercrit.data import SPECS

    text = (DOCS / "models-and-data.md").read_text(encoding="utf-8")
    formats = text.split("## Data formats", 1)[1].split("\n## ", 1)[0]
    for spec in SPECS:
        # `FILE.npz` is written `file.npz` there; the rest as the spec's name (`cifar10:DIR…`, `DIR`).
        key = "file.npz" if spec.endswith(".npz") else spec.split("[")[0]
        assert f"| `{key}" in formats, f"data spec {spec!r} is missing from the Data formats table of docs/models-and-data.md"


@pytest.mark.parametrize("page", doc_pages(), ids=page_name)
def test_markers_are_understood(page: Path) -> None:
    """A misspelt marker would silently run (or not run) a block: every `readme-test` comment is known."""
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if "readme-test" in line and line.lstrip().startswith("<!--"):
            mark = _MARK.match(line)
            assert mark, f"{page_name(page)} line {n}: unknown marker {line.strip()!r}"
            kind, arg = mark.groups()
            assert kind == "ecosystem" or arg, f"{page_name(page)} line {n}: `{kind}` needs an argument"
            if kind == "needs":
                unknown = [a for a in arg.split() if a not in ARTIFACTS and a not in VARIABLES]
                assert not unknown, f"{page_name(page)} line {n}: `needs` names no artifact or variable: {unknown}"


def test_the_pages_have_shell_and_python_examples() -> None:
    blocks = [b for page in doc_pages() for b in readme_blocks(page)]
    assert any(b.lang == "bash" for b in blocks) and any(b.lang == "python" for b in blocks)


def test_readme_is_short() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES}: move sections to docs/"


@pytest.mark.parametrize("page", doc_pages(), ids=page_name)
def test_every_page_has_a_runnable_block_or_says_skip(page: Path) -> None:
    blocks = [b for b in readme_blocks(page) if _runnable(b)]
    if any("skip" not in b.marks for b in blocks):
        return  # run here or in tests/ecosystem
    text = page.read_text(encoding="utf-8")
    skips = [m.group(2) for m in map(_MARK.match, text.splitlines()) if m and m.group(1) == "skip"]
    assert skips and all(skips), (f"{page_name(page)} has no runnable block: add one, or say why not with "
                                  "`<!-- readme-test: skip REASON -->`")


def test_every_docs_page_is_linked_from_the_readme() -> None:
    targets = {Path(t.split("#", 1)[0]) for _, t in markdown_links(README)}
    for page in sorted(DOCS.glob("*.md")):
        rel = page.relative_to(ROOT)
        assert rel in targets, f"README.md has no link to {rel.as_posix()} (add it to the docs table)"


# -- links and anchors -----------------------------------------------------------------------------

_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")


def _prose_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside code fences."""
    out, fenced = [], False
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def markdown_links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link and image of `page`, outside code."""
    return [(n, m.group(1)) for n, line in _prose_lines(page) for m in _LINK.finditer(_CODE_SPAN.sub("", line))]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(page):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_anchor(m.group(2))
        k = seen.get(slug, 0)
        seen[slug] = k + 1
        out.add(slug if k == 0 else f"{slug}-{k}")
    return out


@pytest.mark.parametrize("page", doc_pages(), ids=page_name)
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    problems = []
    for n, target in markdown_links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, …
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"line {n}: {target!r}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"line {n}: {target!r}: {dest.name} has no heading with anchor #{anchor}")
    assert not problems, f"{page_name(page)}:\n" + "\n".join(problems)
