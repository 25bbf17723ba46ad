import pytest
import torch

# The shared assertions live in the library, `layercrit.testing` (importable by users' own tests too);
# they are re-exported here for tests that still import them from conftest.
from layercrit.testing import MEASURES, assert_no_hooks, assert_same_measures, assert_same_state, snapshot  # noqa: F401


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)
    yield
