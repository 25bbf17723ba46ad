import math

import pytest
import torch

from layercrit import MeasureSums, criticality, measure, sample_measures
from layercrit.testing import TinyLinear

LN3 = math.log(3.0)


def test_measures_by_hand():
    """p = softmax([ln3, 0]) = (3/4, 1/4); q = softmax([0, ln3]) = (1/4, 3/4).

    cos(p, q) = (3/16 + 3/16) / (10/16) = 0.6  -> criticality 0.4
    l1 = 1/2 + 1/2 = 1; l2 = sqrt(2 * 1/4) = 0.7071; KL(p||q) = 3/4 ln 3 - 1/4 ln 3 = ln(3)/2
    label 0: p correct, q wrong; loss of q = -ln(1/4) = ln 4.
    """
    p = torch.tensor([[LN3, 0.0]])
    q = torch.tensor([[0.0, LN3]])
    m = sample_measures(p, q, torch.tensor([0]))
    assert m["criticality"].item() == pytest.approx(0.4, abs=1e-7)
    assert m["l1"].item() == pytest.approx(1.0, abs=1e-7)
    assert m["l2"].item() == pytest.approx(math.sqrt(0.5), abs=1e-7)
    assert m["kl"].item() == pytest.approx(LN3 / 2, abs=1e-7)
    assert m["agreement"].item() == 0.0
    assert m["accuracy"].item() == 0.0
    assert m["top5"].item() == 1.0  # only two classes: always in the top 5
    assert m["loss"].item() == pytest.approx(math.log(4.0), abs=1e-7)
    assert criticality(p, q) == pytest.approx(0.4, abs=1e-7)


def test_identical_outputs_measure_zero():
    p = torch.randn(50, 7)
    m = sample_measures(p, p.clone())
    assert m["criticality"].abs().max() < 1e-12
    assert m["kl"].abs().max() < 1e-12
    assert (m["agreement"] == 1).all()


def test_top5_by_hand():
    """Scores 9 > 8 > ... : label 4 is in the top 5 (rank 5), label 5 is not (rank 6)."""
    q = torch.arange(9.0, -1.0, -1.0)[None].repeat(2, 1)
    m = sample_measures(q, q, torch.tensor([4, 5]))
    assert m["top5"].tolist() == [1.0, 0.0]


def test_accumulator_means_match_full_batch():
    p, q, y = torch.randn(100, 5), torch.randn(100, 5), torch.randint(0, 5, (100,))
    acc = MeasureSums()
    for i in range(0, 100, 30):
        acc.update(sample_measures(p[i : i + 30], q[i : i + 30], y[i : i + 30]))
    full = {k: v.mean().item() for k, v in sample_measures(p, q, y).items()}
    got = acc.compute()
    for k, v in full.items():
        assert got[k] == pytest.approx(v, abs=1e-7)


def test_measure_end_to_end_by_hand():
    """TinyLinear with W = I on x1 = (ln3, 0) [label 0] and x2 = (0, 0) [label 1].

    reinit to W' = [[0,1],[1,0]]: sample 1 swaps p = (3/4, 1/4) to q = (1/4, 3/4) -> criticality 0.4;
    sample 2 gives uniform p = q -> 0. Mean criticality 0.2. Original accuracy: x1 right, x2 a tie
    resolved to class 0 (wrong) -> 0.5; probed: x1 wrong, x2 wrong -> 0; drop 0.5.
    """
    model = TinyLinear()
    x = torch.tensor([[LN3, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    ref = {"fc.weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "fc.bias": torch.zeros(2)}
    result = measure(model, (x, y), probes="reinit", reference=ref, trials=3)
    t = result.table
    assert len(t) == 2  # the unmodified row + one (deterministic probe: one trial)
    row = t[t["probe"] == "reinit"].iloc[0]
    assert row["criticality"] == pytest.approx(0.2, abs=1e-7)
    assert row["accuracy"] == 0.0
    assert row["accuracy_drop"] == pytest.approx(0.5)
    assert row["agreement"] == pytest.approx(0.5)
    assert row["kl"] == pytest.approx(LN3 / 4, abs=1e-7)
    base = t[t["probe"] == "none"].iloc[0]
    assert base["accuracy"] == 0.5 and base["criticality"] == pytest.approx(0.0, abs=1e-7)
