import pytest
import torch

# The shared assertions live in the library, `layercrit.testing` (importable by users' own tests too);
# they are re-exported here for tests that still import them from conftest.
from layercrit.testing import MEASURES, assert_no_hooks, assert_same_measures, assert_same_state, snapshot  # noqa: F401


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)
    yield


# -- the docs tests (tests/test_docs.py, tests/ecosystem/test_readme_ecosystem.py): built once a session --


@pytest.fixture(scope="session")
def docs_stand_ins(tmp_path_factory):
    """A folder with the files the docs name as the reader's own (`mynet.py`, `mynet.pt`, `val.npz`, …)."""
    from test_docs import make_stand_ins

    folder = tmp_path_factory.mktemp("stand-ins")
    make_stand_ins(folder)
    return folder


@pytest.fixture(scope="session")
def docs_artifacts(tmp_path_factory, docs_stand_ins):
    """What a page's `needs` marker names (`runs/fcn`, `results.sqlite`, …), each built at most once."""
    from test_docs import Artifacts, copy_folder

    folder = tmp_path_factory.mktemp("artifacts")
    copy_folder(docs_stand_ins, folder)
    return Artifacts(folder)


@pytest.fixture(scope="session")
def docs_pages(tmp_path_factory, docs_stand_ins):
    """One scratch folder (with the stand-ins) and one namespace per docs page."""
    from test_docs import Pages

    return Pages(tmp_path_factory, docs_stand_ins)
