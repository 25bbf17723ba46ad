"""The blocks of README.md and docs/*.md marked `<!-- readme-test: ecosystem -->` (they need
torchvision, timm or transformers), run page by page as tests/test_docs.py runs the others: each page
in a scratch folder and namespace of its own, its blocks in page order, `needs` artifacts built once.

Runs in .venv-eco; the libraries' absence there is a failure, not a skip (CI runs this file).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_docs import Artifacts, Block, Pages, run_page_block, selected  # noqa: E402

# The session fixtures docs_pages and docs_artifacts come from tests/conftest.py.

BLOCKS = selected(ecosystem=True)


def test_ecosystem_libraries_are_installed() -> None:
    import timm  # noqa: F401
    import torchvision  # noqa: F401
    import transformers  # noqa: F401


@pytest.mark.parametrize(("page", "block"), BLOCKS or [pytest.param(None, None, id="no-ecosystem-blocks")])
def test_readme_ecosystem_block(page: str | None, block: Block | None, docs_pages: Pages,
                                docs_artifacts: Artifacts, monkeypatch) -> None:
    if block is None:
        return  # no page has an ecosystem block today; the parametrization stays valid
    run_page_block(page, block, docs_pages, docs_artifacts, monkeypatch)
