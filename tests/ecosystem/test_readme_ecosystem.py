"""The README blocks marked `<!-- readme-test: ecosystem -->` (they need torchvision, timm or
transformers), run in README order in one scratch folder, as tests/test_readme.py runs the others.

Runs in .venv-eco; the libraries' absence there is a failure, not a skip (CI runs this file).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_readme import Block, make_stand_ins, run_block, scratch_env, selected  # noqa: E402

BLOCKS = selected(ecosystem=True)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme-eco")
    make_stand_ins(folder)
    return folder


@pytest.fixture(scope="module")
def namespace() -> dict:
    return {"__name__": "__readme__"}


def test_ecosystem_libraries_are_installed() -> None:
    import timm  # noqa: F401
    import torchvision  # noqa: F401
    import transformers  # noqa: F401


@pytest.mark.parametrize("block", BLOCKS or [pytest.param(None, id="no-ecosystem-blocks")])
def test_readme_ecosystem_block(block: Block | None, scratch: Path, namespace: dict, monkeypatch) -> None:
    if block is None:
        return  # the README has no ecosystem block today; the parametrization stays valid
    for key, value in scratch_env(scratch).items():
        if key != "PATH":
            monkeypatch.setenv(key, value)
    run_block(block, scratch, namespace)
