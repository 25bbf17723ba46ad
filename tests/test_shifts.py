"""Distribution shift: ImageNet-C corruptions checked by hand on 4×4 images, seeds, normalization,
and criticality measured on clean and shifted data side by side."""

import colorsys
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage

from layercrit import LayercritError, MeasureConfig, load_data, measure
from layercrit.analyses.shifts import shift_correlations, shift_summary
from layercrit.cli.app import main
from layercrit.data import Dataset
from layercrit.data.corruptions import (
    SHIFTS,
    box_resize_matrix,
    create_shift,
    disk_kernel,
    list_shifts,
    parse_normalization,
    parse_shifts,
    shift_dataset,
)
from layercrit.models import factory_for_data
from layercrit.results import CLEAN, UNMODIFIED

IMAGENET_C = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "gaussian_blur", "contrast",
              "brightness", "jpeg_compression", "pixelate"]
# A 4×4 grey image with values strictly inside (0, 1), so every change is visible.
X4 = torch.tensor([[0.10, 0.20, 0.30, 0.40],
                   [0.50, 0.60, 0.70, 0.80],
                   [0.15, 0.25, 0.35, 0.45],
                   [0.55, 0.65, 0.75, 0.85]], dtype=torch.float64)[None, None]


def pixels(shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random(shape))


# --- registry and specs ---------------------------------------------------------------------------


def test_registry_holds_imagenet_c_names_and_tables():
    assert set(IMAGENET_C) <= set(list_shifts())
    assert list_shifts("*_noise") == ["gaussian_noise", "impulse_noise", "shot_noise", "speckle_noise"]
    # ImageNet-C's (224 px) and CIFAR-10-C's (32 px) tables, severity 1 and 5 (Hendrycks & Dietterich 2019).
    c = create_shift("gaussian_noise:5")
    assert c.parameter(224, 224) == 0.38 and c.parameter(32, 32) == 0.10 and c.parameter(8, 8) == 0.10
    assert create_shift("jpeg_compression:1").parameter(224, 224) == 25
    assert create_shift("contrast:3:imagenet").parameter(8, 8) == 0.2  # a forced table
    assert create_shift("contrast:3:imagenet").label == "contrast:3:imagenet"
    assert [s.label for s in parse_shifts(["contrast", "none", "contrast:2", "pixelate:1"])] == \
        [f"contrast:{k}" for k in range(1, 6)] + ["pixelate:1"]  # bare name: all five; repeats once


@pytest.mark.parametrize("spec, message", [
    ("fog:3", r"^unknown shift 'fog'; expected one of: brightness, contrast"),
    ("gaussian_noise:6", r"^Expected the severity of shift 'gaussian_noise' to be 1, 2, 3, 4 or 5, got 6$"),
    ("gaussian_noise:0", r"^Expected the severity of shift 'gaussian_noise' to be 1, 2, 3, 4 or 5, got 0$"),
    ("contrast:high", r"^Expected the severity of shift 'contrast' to be 1, 2, 3, 4 or 5, got 'high'$"),
    ("contrast:2:mnist", r"^Expected the table of shift 'contrast' to be auto, imagenet or cifar, got 'mnist'$"),
])
def test_bad_specs_one_line(spec, message):
    with pytest.raises(LayercritError, match=message) as e:
        parse_shifts([spec])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", list_shifts())
def test_any_size_shape_range_and_float32(name):
    x = pixels((2, 3, 7, 9))
    for severity in (1, 5):
        out = SHIFTS.create(name, severity=severity)(x, seed=1)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    big = SHIFTS.create(name, severity=2)(pixels((1, 1, 70, 66)))  # ImageNet-C's table above 64 px
    assert big.shape == (1, 1, 70, 66)


def test_not_images_or_wrong_channels_refused():
    with pytest.raises(LayercritError, match=r"needs float images of shape \(N, C, H, W\), got shape \(4, 4\)"):
        create_shift("contrast:1")(torch.rand(4, 4))
    with pytest.raises(LayercritError, match=r"needs 1 \(grey\) or 3 \(RGB\) channels, got 2"):
        create_shift("jpeg_compression:1")(torch.rand(1, 2, 4, 4))


# --- each corruption by hand on a 4×4 image ------------------------------------------------------


def test_deterministic_under_seed_per_image_and_independent_of_batching():
    s = create_shift("gaussian_noise:3")
    x = pixels((5, 1, 4, 4))
    a, b = s(x, seed=7), s(x, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, s(x, seed=8))
    # Image k draws from its own Generator: the same image gets the same noise in any batch or subset.
    idx = np.array([10, 11, 12, 13, 14])
    whole = s(x, seed=7, indices=idx)
    assert torch.equal(torch.cat([s(x[:2], 7, idx[:2]), s(x[2:], 7, idx[2:])]), whole)
    assert torch.equal(s(x[3:4], 7, [13]), whole[3:4])
    assert not torch.equal(whole[0], s(x[:1], 7, [99])[0])


def test_gaussian_noise_same_draws_as_its_generator():
    s = create_shift("gaussian_noise:4")  # 4×4: CIFAR-10-C's σ = 0.09
    rng = s.generator(3, 0)
    expected = np.clip(X4.numpy()[0] + rng.normal(0.0, 0.09, size=(1, 4, 4)), 0, 1)
    assert np.allclose(s(X4, seed=3).numpy()[0], expected, atol=1e-7)


def test_shot_noise_same_draws_as_its_generator():
    s = create_shift("shot_noise:5:imagenet")  # Poisson(x · 3) / 3
    rng = s.generator(0, 5)
    expected = np.clip(rng.poisson(X4.numpy()[0] * 3) / 3, 0, 1)
    assert np.allclose(s(X4, seed=0, indices=[5]).numpy()[0], expected, atol=1e-7)


def test_impulse_noise_counts():
    """ImageNet-C severity 5: round(0.27 · 16) = 4 values flipped, 2 to 1 (salt) and 2 to 0 (pepper)."""
    s = create_shift("impulse_noise:5:imagenet")
    out = s(X4, seed=2).numpy().ravel()
    x = X4.numpy().ravel()
    changed = np.flatnonzero(~np.isclose(out, x))
    assert len(changed) == 4 and (out == 1).sum() == 2 and (out == 0).sum() == 2
    pos = s.generator(2, 0).choice(16, size=4, replace=False)
    assert set(pos) == set(changed) and (out[pos[:2]] == 1).all() and (out[pos[2:]] == 0).all()
    big = create_shift("impulse_noise:3")(pixels((1, 3, 32, 32)) * 0.5 + 0.25)  # CIFAR: round(0.03 · 3072) = 92
    assert (big == 1).sum() == 46 and (big == 0).sum() == 46


def test_contrast_by_hand():
    """CIFAR-10-C severity 1: (x − mean) · 0.75 + mean, the mean over the image's pixels (0.475)."""
    out = create_shift("contrast:1")(X4)
    assert torch.allclose(out.double(), (X4 - 0.475) * 0.75 + 0.475, atol=1e-7)
    rgb = pixels((1, 3, 4, 4))
    means = rgb.mean(dim=(2, 3), keepdim=True)  # per channel
    assert torch.allclose(create_shift("contrast:2")(rgb).double(), ((rgb - means) * 0.5 + means).clamp(0, 1), atol=1e-7)


def test_brightness_as_hsv_value_shift():
    """ImageNet-C: V ← min(V + c, 1) in HSV with H, S kept; checked pixel by pixel with colorsys."""
    rgb = pixels((1, 3, 4, 4))
    rgb[0, :, 0, 0] = 0.0  # black: V = 0 becomes grey (c, c, c)
    rgb[0, :, 0, 1] = 0.4  # grey
    rgb[0, :, 0, 2] = torch.tensor([0.95, 0.5, 0.1])  # V + c > 1: clipped to 1
    for severity, c in ((1, 0.05), (5, 0.3)):
        out = create_shift(f"brightness:{severity}")(rgb).numpy()[0]
        for i in range(4):
            for j in range(4):
                h, s, v = colorsys.rgb_to_hsv(*rgb[0, :, i, j].tolist())
                assert np.allclose(out[:, i, j], colorsys.hsv_to_rgb(h, s, min(v + c, 1.0)), atol=1e-6)
    assert torch.allclose(create_shift("brightness:5")(X4).double(), (X4 + 0.3).clamp(max=1), atol=1e-7)  # grey


def test_pixelate_by_hand_and_as_pillow():
    """ImageNet-C severity 1 on 4×4: BOX down to int(4 · 0.6) = 2 px, up to 4: the 2×2 blocks' means."""
    out = create_shift("pixelate:1:imagenet")(X4).numpy()[0, 0]
    blocks = X4.numpy()[0, 0].reshape(2, 2, 2, 2).mean(axis=(1, 3))
    assert np.allclose(out, np.kron(blocks, np.ones((2, 2))), atol=1e-7)
    # Pillow's BOX resampling in float mode, any sizes, up and down.
    for n_in, n_out in ((9, 5), (7, 3), (3, 7), (30, 28), (224, 134)):
        a = np.random.default_rng(n_in).random((n_in, n_in)).astype(np.float32)
        pil = np.asarray(Image.fromarray(a, mode="F").resize((n_out, n_out), Image.BOX))
        m = box_resize_matrix(n_in, n_out)
        assert np.allclose(m @ a @ m.T, pil, atol=1e-6), (n_in, n_out)
    rgb = pixels((1, 3, 7, 9)).float()  # CIFAR-10-C severity 5: 9×7 → 5×4 → 9×7
    expected = np.stack([np.asarray(Image.fromarray(ch, mode="F").resize((5, 4), Image.BOX).resize((9, 7), Image.BOX))
                         for ch in rgb[0].numpy()])
    assert np.allclose(create_shift("pixelate:5")(rgb).numpy()[0], expected, atol=1e-6)


def test_jpeg_is_a_pillow_round_trip_at_the_tables_quality():
    u8 = np.random.default_rng(0).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    x = torch.from_numpy(u8).permute(2, 0, 1)[None].double() / 255
    for severity, quality in ((1, 80), (5, 40)):  # CIFAR-10-C's qualities for small images
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, format="JPEG", quality=quality)
        expected = np.asarray(Image.open(buf)).transpose(2, 0, 1) / 255
        assert np.allclose(create_shift(f"jpeg_compression:{severity}")(x).numpy()[0], expected, atol=1e-7)
    grey = (X4 * 255).round() / 255
    buf = io.BytesIO()
    Image.fromarray((grey[0, 0].numpy() * 255).round().astype(np.uint8)).save(buf, format="JPEG", quality=7)
    expected = np.asarray(Image.open(buf)) / 255
    assert np.allclose(create_shift("jpeg_compression:5:imagenet")(grey).numpy()[0, 0], expected, atol=1e-7)


def test_gaussian_blur_as_scipy():
    """scikit-image's `gaussian` (ImageNet-C's blur) is scipy's gaussian_filter, truncate 4, edges repeated."""
    for spec, sigma in (("gaussian_blur:1", 0.4), ("gaussian_blur:5", 1.0), ("gaussian_blur:5:imagenet", 6)):
        expected = ndimage.gaussian_filter(X4.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
        assert np.allclose(create_shift(spec)(X4).numpy(), expected, atol=1e-7)


def test_defocus_kernel_by_hand_and_blur_as_scipy():
    """Radius 0.3 (CIFAR-10-C severity 1) keeps only the disk's centre, which the 3×3 Gaussian of
    std 0.4 spreads: the kernel is that Gaussian's outer product, zero elsewhere on the 17×17 grid."""
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.4**2))
    g /= g.sum()
    k = disk_kernel(0.3, 0.4)
    assert k.shape == (17, 17)
    assert np.allclose(k[7:10, 7:10], np.outer(g, g)) and np.isclose(k.sum(), 1.0)
    assert np.count_nonzero(k) == 9
    big = disk_kernel(3, 0.1)  # a 29-point disk, normalized
    assert np.isclose(big.sum(), 1.0) and (big[8, 5:12] > 0).all() and big[8, 4] < 1e-6
    for spec, (r, a) in (("defocus_blur:1", (0.3, 0.4)), ("defocus_blur:5", (1.5, 0.1)),
                         ("defocus_blur:1:imagenet", (3, 0.1))):
        # OpenCV's filter2D (BORDER_REFLECT_101) is scipy's correlate in "mirror" mode, also beyond 4 px.
        expected = ndimage.correlate(X4.numpy()[0, 0], disk_kernel(r, a), mode="mirror")
        assert np.allclose(create_shift(spec)(X4).numpy()[0, 0], expected, atol=1e-7)


# --- datasets: normalization and identity -------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def test_shift_dataset_unnormalizes_corrupts_and_renormalizes(digits):
    d = digits.subset(30, seed=1)
    mean, std = digits.meta["normalization"]["mean"], digits.meta["normalization"]["std"]
    out = shift_dataset(d, "contrast:2", seed=0)
    p = d.x.double() * std + mean
    m = p.mean(dim=(2, 3), keepdim=True)
    expected = (((p - m) * 0.5 + m).clamp(0, 1) - mean) / std
    assert torch.allclose(out.x.double(), expected, atol=1e-5)
    assert torch.equal(out.y, d.y) and np.array_equal(out.indices, d.indices) and out.spec == d.spec
    assert out.meta["shift"] == "contrast:2" and out.meta["shift_details"]["parameter"] == 0.5
    assert out.identity != d.identity != shift_dataset(d, "contrast:3").identity
    assert shift_dataset(d, "gaussian_noise:1", seed=1).identity != shift_dataset(d, "gaussian_noise:1", seed=2).identity
    # Noise follows the sample, not its position in a subset.
    one = shift_dataset(digits, "gaussian_noise:2", seed=4)
    sub = shift_dataset(d, "gaussian_noise:2", seed=4)
    assert torch.equal(sub.x, one.x[torch.from_numpy(d.indices)])


def test_unknown_normalization_refused_unless_stated():
    d = Dataset(torch.rand(3, 1, 4, 4), None, spec="x.npz")
    with pytest.raises(LayercritError, match=r"^data 'x.npz' does not say how its inputs relate to \[0, 1\] pixels"):
        shift_dataset(d, "contrast:1")
    out = shift_dataset(d, "contrast:1", normalization=(0.0, 1.0))  # raw pixels, stated
    assert torch.allclose(out.x, create_shift("contrast:1")(d.x), atol=1e-7)
    d.meta["normalization"] = parse_normalization("0.5", "0.25")
    assert d.meta["normalization"] == {"mean": 0.5, "std": 0.25}
    assert torch.allclose(shift_dataset(d, "brightness:1").x, (d.x + 0.05 / 0.25).clamp(max=2.0), atol=1e-6)
    with pytest.raises(LayercritError, match=r"one per channel \(1\), got mean=\[0.1, 0.2\]"):
        shift_dataset(d, "contrast:1", normalization=([0.1, 0.2], [1.0, 1.0]))
    with pytest.raises(LayercritError, match=r"^Expected --normalization MEAN STD as numbers"):
        parse_normalization("a", "1")
    with pytest.raises(LayercritError, match=r"needs images of shape \(N, C, H, W\); data 'v' has inputs of shape \(3, 16\)"):
        shift_dataset(Dataset(torch.rand(3, 16), None, spec="v", meta={"normalization": (0, 1)}), "contrast:1")


def test_image_formats_state_their_normalization(digits):
    p = digits.x.double() * digits.meta["normalization"]["std"] + digits.meta["normalization"]["mean"]
    assert p.min() > -1e-6 and p.max() < 1 + 1e-6  # pixels /16 in [0, 1]
    assert torch.allclose(p * 16, (p * 16).round(), atol=1e-4)


# --- measuring under shift -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fcn(digits):
    factory = factory_for_data("fcn-3x64", {}, digits.num_classes, digits.input_shape)
    torch.manual_seed(0)
    return factory(), factory


def test_measure_with_shifts_is_one_run_per_shift_on_the_shifted_data(fcn, digits):
    model, factory = fcn
    kw = dict(factory=factory, trials=2, images=40, data_seed=3, layers=["fc1", "classifier"], executor="full")
    r = measure(model, digits, shift=["gaussian_noise:5", "contrast:5"], **kw)
    t = r.table
    assert list(t.columns[:2]) == ["model", "shift"]
    assert list(dict.fromkeys(t["shift"])) == [CLEAN, "gaussian_noise:5", "contrast:5"]
    assert (t.groupby("shift")["layer"].apply(lambda s: (s == UNMODIFIED).sum()) == 1).all()
    # Clean rows are a plain run; shifted rows are a plain run on the shifted subset, same numbers.
    plain = measure(model, digits, **kw).table
    pd.testing.assert_frame_equal(t[t["shift"] == CLEAN].drop(columns="shift").reset_index(drop=True), plain)
    shifted = shift_dataset(digits.subset(40, seed=3), "contrast:5", seed=3)
    direct = measure(model, shifted, **kw)
    got = t[t["shift"] == "contrast:5"].drop(columns="shift").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, direct.table)
    assert r.config["shifts"] == ["gaussian_noise:5", "contrast:5"]
    details = {d["shift"]: d for d in r.config["shift_details"]}
    assert details["contrast:5"]["data_identity"] == direct.config["data_identity"] != r.config["data_identity"]
    s = r.summary()
    assert len(s) == 3 * 3 and "shift" in s.columns  # (unmodified + 2 layers) per shift
    assert MeasureConfig(shifts="contrast").shifts == [f"contrast:{k}" for k in range(1, 6)]  # the config field


def test_measure_bad_shift_fails_before_compute(fcn, digits):
    model, factory = fcn
    with pytest.raises(LayercritError, match=r"^unknown shift 'snowfall'"):
        measure(model, digits, factory=factory, shifts=["snowfall:2"], images=10)
    with pytest.raises(LayercritError, match=r"to be 1, 2, 3, 4 or 5, got 9$"):
        measure(model, digits, factory=factory, shift="contrast:9", images=10)
    with pytest.raises(LayercritError, match=r"^give the shifts once"):
        measure(model, digits, factory=factory, shift="contrast:1", shifts=["contrast:2"], images=10)
    npz = Dataset(digits.x[:10], digits.y[:10], spec="val.npz")
    with pytest.raises(LayercritError, match=r"^data 'val.npz' does not say"):
        measure(model, npz, factory=factory, shifts=["contrast:2"])


def _table(rows):
    cols = ["model", "shift", "layer", "label", "probe", "target", "trial", "criticality", "accuracy"]
    return pd.DataFrame(rows, columns=cols)


def test_shift_summary_and_correlations_by_hand():
    clean = {"a": 0.9, "b": 0.5, "c": 0.1}
    shifted = {"a": 0.8, "b": 0.6, "c": 0.1}  # trials 0.7 and 0.9 for a: mean 0.8
    rows = [["m", CLEAN, UNMODIFIED, "unmodified", "none", "", 0, 0.0, 0.95],
            ["m", "contrast:3", UNMODIFIED, "unmodified", "none", "", 0, 0.0, 0.80]]
    rows += [["m", CLEAN, k, k, "rerandomize", "", 0, v, 0.1] for k, v in clean.items()]
    rows += [["m", "contrast:3", "a", "a", "rerandomize", "", t, v, 0.1] for t, v in ((0, 0.7), (1, 0.9))]
    rows += [["m", "contrast:3", k, k, "rerandomize", "", 0, shifted[k], 0.1] for k in ("b", "c")]
    t = _table(rows)
    s = shift_summary(t)
    assert s["layer"].tolist() == ["a", "b", "c"] and (s["severity"] == 3).all() and (s["corruption"] == "contrast").all()
    assert np.allclose(s["diff"], [-0.1, 0.1, 0.0])
    c = shift_correlations(t).iloc[0]
    x, y = np.array([0.9, 0.5, 0.1]), np.array([0.8, 0.6, 0.1])
    assert c["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert c["spearman_r"] == pytest.approx(1.0) and c["n_layers"] == 3
    assert c["mean_diff"] == pytest.approx(0.0) and c["max_abs_diff"] == pytest.approx(0.1) and c["max_layer"] == "a"
    assert c["clean_accuracy"] == 0.95 and c["shifted_accuracy"] == 0.80
    with pytest.raises(LayercritError, match=r"no `shift` column"):
        shift_summary(t.drop(columns="shift"))


def test_cli_measure_summarize_plot_and_errors(tmp_path, capsys):
    out = tmp_path / "shifted.csv"
    base = ["measure", "--model", "fcn-3x64", "--data", "digits", "--images", "30", "--trials", "1",
            "--layers", "fc1", "classifier", "--quiet", "--batch-size", "64"]
    assert main([*base, "--shift", "pixelate:5", "--shift", "brightness:2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clean data:" in printed and "pixelate:5" in printed and "profile r (Pearson)" in printed
    table = pd.read_csv(out)
    assert list(dict.fromkeys(table["shift"])) == [CLEAN, "pixelate:5", "brightness:2"]
    assert main(["summarize", "--results", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Clean vs shifted layer profiles" in printed and "brightness:2" in printed
    assert main(["plot", "shift", "--results", str(out), "--out", str(tmp_path / "shift.png")]) == 0
    assert (tmp_path / "shift.png").stat().st_size > 0
    capsys.readouterr()
    for args, message in ((["--shift", "fog:2"], "unknown shift 'fog'"),
                          (["--shift", "contrast:6"], "to be 1, 2, 3, 4 or 5, got 6")):
        assert main([*base, *args, "--out", str(tmp_path / "bad.csv")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("layercrit: error: ") and message in err and err.count("\n") == 1
        assert not (tmp_path / "bad.csv").exists()


def test_shift_plot_one_model(tmp_path):
    from layercrit.viz import PLOTS
    from layercrit.viz.shifts import shift_heatmaps

    assert PLOTS["shift"] is shift_heatmaps
    rows = [["m", sh, la, la, "rerandomize", "", 0, v, 0.5]
            for sh, off in ((CLEAN, 0.0), ("contrast:1", -0.1), ("contrast:5", -0.3)) for la, v in (("a", 0.9), ("b", 0.5))
            for v in [v + off]]
    fig, axes = shift_heatmaps(_table(rows))
    assert len(axes) == 2 and [t.get_text() for t in axes[0].get_yticklabels()][0] == "none (clean)"
    two = _table(rows + [["n", CLEAN, "a", "a", "rerandomize", "", 0, 0.1, 0.5]])
    with pytest.raises(LayercritError, match="shows one model"):
        shift_heatmaps(two)
