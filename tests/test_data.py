import numpy as np
import pytest
import torch

from layercrit import LayercritError, load_data
from layercrit.data.digits import N_TRAIN


def test_digits_split_is_fixed_and_normalized_with_train_stats():
    train, test, full = load_data("digits:train"), load_data("digits"), load_data("digits:all")
    assert (len(train), len(test), len(full)) == (N_TRAIN, 360, 1797)
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.float32
    assert abs(float(train.x.mean())) < 1e-5 and abs(float(train.x.std()) - 1) < 1e-3
    assert torch.equal(torch.cat([train.x, test.x]), full.x)
    assert sorted(set(test.y.tolist())) == list(range(10))
    assert train.meta["mean"] == pytest.approx(full.meta["mean"])


def test_subset_is_seeded_sorted_and_without_replacement():
    d = load_data("digits")
    a, b, c = d.subset(100, 0), d.subset(100, 0), d.subset(100, 1)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert len(set(a.indices.tolist())) == 100 and np.all(np.diff(a.indices) > 0)
    assert a.identity == b.identity != c.identity != d.identity
    assert torch.equal(a.x, d.x[torch.from_numpy(a.indices)])


def test_npz(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 1, 8, 8)).astype(np.float64)
    y = np.arange(20) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_data(str(tmp_path / "d.npz"))
    assert d.x.dtype == torch.float32 and torch.allclose(d.x, torch.from_numpy(x).float())
    assert d.y.tolist() == y.tolist() and d.num_classes == 3
    np.savez(tmp_path / "nolabels.npz", x=x)
    assert load_data(str(tmp_path / "nolabels.npz")).y is None


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": np.zeros(3, dtype=int)}, "has no array 'x' and no named inputs"),  # other arrays are named model inputs
        ({"x": np.zeros(3)}, "expected numbers of shape"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(2, dtype=int)}, "expected integer labels of shape"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3)}, "expected integer labels"),
        ({"x": np.array([[object()], [1]], dtype=object)}, "pickled objects"),
    ],
)
def test_bad_npz(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(LayercritError, match=message):
        load_data(str(tmp_path / "bad.npz"))


def test_bad_specs(tmp_path):
    with pytest.raises(LayercritError, match="does not exist"):
        load_data(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(LayercritError, match="not a readable .npz"):
        load_data(str(tmp_path / "junk.npz"))
    with pytest.raises(LayercritError, match="unknown digits split 'val'"):
        load_data("digits:val")
    with pytest.raises(LayercritError, match="unknown data spec"):
        load_data("imagenet")


def test_subset_above_the_data_size_uses_all_of_it_with_a_warning_or_fails_when_strict():
    d = load_data("digits")
    with pytest.warns(UserWarning, match=f"asked for 10000 images but data '{d.spec}' has only {len(d)}; using all"):
        assert d.subset(10_000, 0) is d
    with pytest.raises(LayercritError, match=f"asked for 10000 images but data '{d.spec}' has only {len(d)}"):
        d.subset(10_000, 0, strict=True)


def test_non_finite_inputs_are_refused_naming_how_many_samples_and_the_first(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 1, 4, 4)).astype(np.float32)
    x[13, 0, 2, 1] = np.nan  # one NaN pixel in one sample...
    x[17, 0, 0, 0] = np.inf  # ...and an inf in another
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(20) % 3)
    with pytest.raises(LayercritError, match=r"non-finite values \(NaN or inf\) in 2 of 20 samples \(first: sample 13\)"):
        load_data(str(tmp_path / "nan.npz"))
    from layercrit import Dataset

    with pytest.raises(LayercritError, match=r"in 1 of 3 samples \(first: sample 2\)"):  # every format ends in a Dataset
        Dataset(torch.tensor([[0.0], [1.0], [float("-inf")]]), None, spec="t")
    Dataset(torch.arange(3).reshape(3, 1), None, spec="ints")  # integer inputs cannot hold NaN
