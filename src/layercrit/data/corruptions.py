"""Distribution shift: the corruptions of ImageNet-C / CIFAR-10-C as a registry (`SHIFTS`, `create_shift`,
`parse_shifts`) and `shift_dataset`; `analyses.shifts` summarizes criticality on the corrupted data.

The corruptions are the common corruptions of ImageNet-C (Hendrycks & Dietterich 2019), under their
names and with their severities 1-5: `gaussian_noise`, `shot_noise`, `impulse_noise`,
`speckle_noise`, `gaussian_blur`, `defocus_blur`, `contrast`, `brightness`, `jpeg_compression`,
`pixelate`. Each follows the authors' code (`make_imagenet_c.py`, `make_cifar_c.py`) with its
parameter tables: ImageNet-C's table was made for 224-px images and CIFAR-10-C's for 32-px ones, so
`table="auto"` takes CIFAR-10-C's for images whose short side is at most 64 px (CIFAR, MNIST,
digits) and ImageNet-C's otherwise; `NAME:SEVERITY:imagenet` or `:cifar` forces one.

Implemented here rather than taken from `imagecorruptions` (the packaged ImageNet-C code): that
package needs OpenCV, scikit-image and numba (heavy, outside the core dependencies), draws from
numpy's global RNG (not seedable per shift without touching global state), and works on one
H×W×3 uint8 image at a time. These ten corruptions are a few lines each in torch, numpy and Pillow:
batched over (N, C, H, W) tensors of any size and channel count (JPEG: 1 or 3 channels), in
floating point; only `jpeg_compression` rounds to 8 bits, as it must. Where the reference used
scikit-image or OpenCV, the same arithmetic is written out and the tests compare it with an
independent computation (scipy.ndimage, colorsys, Pillow).

Pixels. Corruptions are defined on pixels in [0, 1], while datasets hold normalized inputs
`x = (pixels − mean) / std`. A shift un-normalizes with `Dataset.meta["normalization"]`
(`{"mean", "std"}`, scalars or one per channel; set by the digits, CIFAR-10, MNIST and image
folder loaders), corrupts, clips to [0, 1] and normalizes again. Data whose normalization is
unknown (`.npz` files, tensors) are refused unless it is stated (`normalization=` or the meta entry).

Seeds. The random corruptions draw from a numpy Generator per image, seeded from (seed, name,
severity, the image's position in the full data): an image is corrupted the same way whatever
subset or batch it is in, and nothing touches a global RNG. `layercrit.measure` uses its `data_seed`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from .._utils.registry import Registry
from ..errors import LayercritError
from ..results import CLEAN
from ..seeding import derive_seed

SEVERITIES = (1, 2, 3, 4, 5)


TABLES = ("auto", "imagenet", "cifar")


SMALL_SIDE = 64  # images with a short side up to this use CIFAR-10-C's table under table="auto"


_CHUNK_VALUES = 1 << 22  # values corrupted per chunk: bounds the memory of the float64 intermediates


SHIFTS: Registry[Callable[..., Corruption]] = Registry("shift")


class Corruption:
    """One corruption at one severity; call it on pixels in [0, 1].

    Subclasses set `name`, the parameter tables `imagenet` and `cifar` (one entry per severity) and
    `corrupt`; random ones set `random = True` and receive one numpy Generator per image.

    Args:
        severity: 1 (mildest) … 5.
        table: "auto" (by image size), "imagenet" (224-px table) or "cifar" (32-px table).
    """

    name: str = ""
    imagenet: tuple = ()
    cifar: tuple = ()
    random: bool = False

    def __init__(self, severity: int = 3, table: str = "auto") -> None:
        if not isinstance(severity, int) or isinstance(severity, bool) or severity not in SEVERITIES:
            raise LayercritError(f"Expected the severity of shift {self.name!r} to be 1, 2, 3, 4 or 5, got {severity!r}")
        if table not in TABLES:
            raise LayercritError(f"Expected the table of shift {self.name!r} to be auto, imagenet or cifar, got {table!r}")
        self.severity, self.table = severity, table

    @property
    def label(self) -> str:
        """`name:severity` (with `:table` when forced): the value of the `shift` column."""
        return f"{self.name}:{self.severity}" + ("" if self.table == "auto" else f":{self.table}")

    def table_for(self, height: int, width: int) -> str:
        if self.table != "auto":
            return self.table
        return "cifar" if min(height, width) <= SMALL_SIDE else "imagenet"

    def parameter(self, height: int, width: int):
        """The table's parameter at this severity for images of this size."""
        return getattr(self, self.table_for(height, width))[self.severity - 1]

    def generator(self, seed: int, index: int) -> np.random.Generator:
        """The Generator that corrupts the image at position `index` of the full data."""
        return np.random.Generator(np.random.PCG64(derive_seed(seed, "shift", self.name, self.severity, int(index))))

    def describe(self, height: int, width: int) -> dict:
        return {"shift": self.label, "name": self.name, "severity": self.severity,
                "table": self.table_for(height, width), "parameter": self.parameter(height, width)}

    def __call__(self, pixels: torch.Tensor, seed: int = 0, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Corrupt `pixels` (N, C, H, W) in [0, 1]; returns float32 in [0, 1].

        Args:
            pixels: the images.
            seed: the shift seed.
            indices: each image's position in the full data (default 0..N-1); seeds its Generator.
        """
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or not pixels.is_floating_point():
            what = f"shape {tuple(pixels.shape)}" if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise LayercritError(f"shift {self.label!r} needs float images of shape (N, C, H, W), got {what}")
        n, c, h, w = pixels.shape
        idx = np.arange(n) if indices is None else np.asarray(indices)
        if len(idx) != n:
            raise LayercritError(f"Expected one index per image ({n}), got {len(idx)}")
        param = self.parameter(h, w)
        step = max(1, _CHUNK_VALUES // max(1, c * h * w))
        out = []
        for i in range(0, n, step):
            # Clipped first: un-normalizing leaves rounding errors like −1e−8 just outside [0, 1].
            chunk = pixels[i : i + step].detach().to("cpu", torch.float64).clamp(0.0, 1.0)
            rngs = [self.generator(seed, k) for k in idx[i : i + step]] if self.random else []
            out.append(self.corrupt(chunk, param, rngs).clamp_(0.0, 1.0).to(torch.float32))
        return torch.cat(out) if out else pixels.detach().to("cpu", torch.float32).clone()

    def corrupt(self, p: torch.Tensor, param, rngs: list[np.random.Generator]) -> torch.Tensor:
        """Corrupt float64 pixels (n, C, H, W); the caller clips to [0, 1]."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(severity={self.severity}, table={self.table!r})"


def _per_image(p: torch.Tensor, rngs: list[np.random.Generator], fn) -> torch.Tensor:
    """`fn(image as float64 numpy (C, H, W), its Generator)` for each image."""
    arr = p.numpy()
    return torch.from_numpy(np.stack([fn(arr[k], rng) for k, rng in enumerate(rngs)]))


@SHIFTS.register("gaussian_noise")
class GaussianNoise(Corruption):
    """`x + N(0, c²)` per value; draws `rng.normal(0, c, size=(C, H, W))`."""

    name = "gaussian_noise"
    imagenet = (0.08, 0.12, 0.18, 0.26, 0.38)
    cifar = (0.04, 0.06, 0.08, 0.09, 0.10)
    random = True

    def corrupt(self, p, param, rngs):
        return _per_image(p, rngs, lambda x, rng: x + rng.normal(0.0, param, size=x.shape))


@SHIFTS.register("shot_noise")
class ShotNoise(Corruption):
    """Poisson photon noise `Poisson(x·c) / c`; draws `rng.poisson(x · c)`."""

    name = "shot_noise"
    imagenet = (60, 25, 12, 5, 3)
    cifar = (500, 250, 100, 75, 50)
    random = True

    def corrupt(self, p, param, rngs):
        return _per_image(p, rngs, lambda x, rng: rng.poisson(x * param) / param)


@SHIFTS.register("impulse_noise")
class ImpulseNoise(Corruption):
    """Salt and pepper: `round(c · C·H·W)` values of each image, drawn without replacement by
    `rng.choice(C·H·W, k, replace=False)` (flat index), the first ⌈k/2⌉ set to 1, the rest to 0.

    ImageNet-C used scikit-image's `random_noise(mode="s&p", amount=c)`, which flips a fraction c of
    the values with equal odds of salt and pepper; here the counts are exact.
    """

    name = "impulse_noise"
    imagenet = (0.03, 0.06, 0.09, 0.17, 0.27)
    cifar = (0.01, 0.02, 0.03, 0.05, 0.07)
    random = True

    def corrupt(self, p, param, rngs):
        def one(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            flat = x.reshape(-1).copy()
            k = round(param * flat.size)
            pos = rng.choice(flat.size, size=k, replace=False)
            flat[pos[: (k + 1) // 2]] = 1.0
            flat[pos[(k + 1) // 2 :]] = 0.0
            return flat.reshape(x.shape)

        return _per_image(p, rngs, one)


@SHIFTS.register("speckle_noise")
class SpeckleNoise(Corruption):
    """Multiplicative noise `x + x · N(0, c²)`; draws `rng.normal(0, c, size=(C, H, W))`."""

    name = "speckle_noise"
    imagenet = (0.15, 0.2, 0.35, 0.45, 0.6)
    cifar = (0.06, 0.1, 0.12, 0.16, 0.2)
    random = True

    def corrupt(self, p, param, rngs):
        return _per_image(p, rngs, lambda x, rng: x + x * rng.normal(0.0, param, size=x.shape))


def _reflect101(n: int, pad: int) -> torch.Tensor:
    """Indices of positions −pad … n+pad−1 reflected about the edge pixels (`dcb|abcd|cba`: OpenCV's
    BORDER_REFLECT_101, scipy's "mirror"), for any `pad`, also beyond the image."""
    i = np.arange(-pad, n + pad)
    if n == 1:
        return torch.zeros(len(i), dtype=torch.long)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return torch.from_numpy(np.where(i >= n, period - i, i))


def _edge(n: int, pad: int) -> torch.Tensor:
    """Indices of positions −pad … n+pad−1 repeating the edge pixels (scipy's "nearest")."""
    return torch.from_numpy(np.clip(np.arange(-pad, n + pad), 0, n - 1))


def _correlate(p: torch.Tensor, kernel: np.ndarray, border: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Each channel correlated with the odd-sized 2-D `kernel`, borders extended by `border`."""
    h, w = p.shape[2:]
    kh, kw = kernel.shape
    padded = p[:, :, border(h, kh // 2)][:, :, :, border(w, kw // 2)]
    # By FFT in float64: exact to ~1e-15 and, for ImageNet-C's 21×21 disks and 49-tap Gaussians on
    # 224-px images, tens of times faster than a direct convolution on the CPU. Convolving with the
    # flipped kernel is the correlation; the circular wrap only touches the border rows dropped here.
    size = padded.shape[2:]
    k = torch.zeros(size, dtype=torch.float64)
    k[:kh, :kw] = torch.from_numpy(np.ascontiguousarray(kernel[::-1, ::-1], dtype=np.float64))
    out = torch.fft.irfft2(torch.fft.rfft2(padded.double()) * torch.fft.rfft2(k), s=size)
    return out[:, :, kh - 1 :, kw - 1 :].to(p.dtype)


def _gaussian_1d(sigma: float, radius: int) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


@SHIFTS.register("gaussian_blur")
class GaussianBlur(Corruption):
    """Gaussian blur of standard deviation c px, as scikit-image's `gaussian` (scipy's
    `gaussian_filter`, truncated at 4σ, edges repeated)."""

    name = "gaussian_blur"
    imagenet = (1, 2, 3, 4, 6)
    cifar = (0.4, 0.6, 0.7, 0.8, 1.0)

    def corrupt(self, p, param, rngs):
        g = _gaussian_1d(param, int(4.0 * param + 0.5))
        return _correlate(p, np.outer(g, g), _edge)  # separable: the same as blurring rows, then columns


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """ImageNet-C's defocus kernel: a disk of `radius` on a 17×17 grid (larger for radius > 8),
    normalized to sum 1, then smoothed by a 3×3 (5×5) Gaussian of std `alias_blur` (OpenCV's
    `GaussianBlur`, BORDER_REFLECT_101)."""
    half, ksize = (8, 3) if radius <= 8 else (int(radius), 5)
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = _gaussian_1d(alias_blur, ksize // 2)
    r = ksize // 2
    n = len(grid)
    padded = disk[_reflect101(n, r).numpy()][:, _reflect101(n, r).numpy()]
    # Directly (not by FFT): exact zeros stay zeros.
    return sum(g[i] * g[j] * padded[i : i + n, j : j + n] for i in range(ksize) for j in range(ksize))


@SHIFTS.register("defocus_blur")
class DefocusBlur(Corruption):
    """Correlation with `disk_kernel(radius, alias_blur)` per channel, edges reflected (OpenCV's
    `filter2D`); parameters (radius, alias_blur)."""

    name = "defocus_blur"
    imagenet = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))
    cifar = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))

    def corrupt(self, p, param, rngs):
        return _correlate(p, disk_kernel(*param), _reflect101)


@SHIFTS.register("contrast")
class Contrast(Corruption):
    """`(x − m) · c + m` with m each image's per-channel mean over its pixels."""

    name = "contrast"
    imagenet = (0.4, 0.3, 0.2, 0.1, 0.05)
    cifar = (0.75, 0.5, 0.4, 0.3, 0.15)

    def corrupt(self, p, param, rngs):
        m = p.mean(dim=(2, 3), keepdim=True)
        return (p - m) * param + m


@SHIFTS.register("brightness")
class Brightness(Corruption):
    """HSV value `V ← min(V + c, 1)` with hue and saturation kept (ImageNet-C via scikit-image's
    `rgb2hsv`/`hsv2rgb`).

    Written in closed form: with V the largest channel, keeping H and S scales every channel by
    V'/V; a black pixel (V = 0, S = 0) becomes grey V'. For one channel that is `min(x + c, 1)`;
    other channel counts are treated alike (V = the largest channel).
    """

    name = "brightness"
    imagenet = (0.1, 0.2, 0.3, 0.4, 0.5)
    cifar = (0.05, 0.1, 0.15, 0.2, 0.3)

    def corrupt(self, p, param, rngs):
        v = p.amax(dim=1, keepdim=True)
        v_new = (v + param).clamp(max=1.0)
        return torch.where(v > 0, p * (v_new / torch.where(v > 0, v, 1.0)), v_new)


@SHIFTS.register("jpeg_compression")
class JpegCompression(Corruption):
    """A JPEG round trip through Pillow at quality c (Pillow's defaults otherwise: 4:2:0 chroma
    subsampling for colour). The pixels are rounded to 8 bits first; 1 (grey) or 3 (RGB) channels."""

    name = "jpeg_compression"
    imagenet = (25, 18, 15, 10, 7)
    cifar = (80, 65, 58, 50, 40)

    def corrupt(self, p, param, rngs):
        from PIL import Image

        n, c, h, w = p.shape
        if c not in (1, 3):
            raise LayercritError(f"shift {self.label!r} needs 1 (grey) or 3 (RGB) channels, got {c}")
        u8 = (p.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out = np.empty((n, h, w, c), dtype=np.uint8)
        for k in range(n):
            buf = io.BytesIO()
            Image.fromarray(u8[k, :, :, 0] if c == 1 else u8[k]).save(buf, format="JPEG", quality=param)
            with Image.open(buf) as img:
                out[k] = np.asarray(img).reshape(h, w, c)
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(torch.float64) / 255.0


def box_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Pillow's BOX resampling along one axis as an (n_out, n_in) matrix: output pixel j averages
    the input pixels whose centres fall in its box (Pillow's `precompute_coeffs`, box filter)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    m = np.zeros((n_out, n_in))
    for j in range(n_out):
        center = (j + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        for i in range(lo, hi):
            u = (i - center + 0.5) / filterscale
            m[j, i] = 1.0 if -0.5 < u <= 0.5 else 0.0
        total = m[j].sum()
        if total:
            m[j] /= total
    return m


@SHIFTS.register("pixelate")
class Pixelate(Corruption):
    """BOX-downsample to `int(size · c)` per side, BOX-upsample back (Pillow's arithmetic, in
    floating point rather than 8 bits)."""

    name = "pixelate"
    imagenet = (0.6, 0.5, 0.4, 0.3, 0.25)
    cifar = (0.95, 0.9, 0.85, 0.75, 0.65)

    def corrupt(self, p, param, rngs):
        h, w = p.shape[2:]
        sh, sw = max(1, int(h * param)), max(1, int(w * param))
        ph = torch.from_numpy(box_resize_matrix(sh, h) @ box_resize_matrix(h, sh))
        pw = torch.from_numpy(box_resize_matrix(sw, w) @ box_resize_matrix(w, sw))
        return ph @ p @ pw.T


def create_shift(spec: str, table: str = "auto") -> Corruption:
    """A corruption from `NAME:SEVERITY` or `NAME:SEVERITY:TABLE` (e.g. `gaussian_noise:3`)."""
    if not isinstance(spec, str) or not spec:
        raise LayercritError(f"Expected a shift such as 'gaussian_noise:3', got {spec!r}")
    name, _, rest = spec.partition(":")
    sev_text, _, table_text = rest.partition(":")
    SHIFTS.get(name)  # unknown name: one line listing the known ones
    try:
        severity = int(sev_text)
    except ValueError:
        raise LayercritError(f"Expected the severity of shift {name!r} to be 1, 2, 3, 4 or 5, got {sev_text!r}") from None
    return SHIFTS.create(name, severity=severity, table=table_text or table)


def list_shifts(pattern: str = "*") -> list[str]:
    """Registered corruption names."""
    return SHIFTS.list(pattern)


def parse_shifts(specs: str | Sequence[str | Corruption] | None) -> list[Corruption]:
    """Shifts from specs: `NAME:SEVERITY[:TABLE]`, or a bare `NAME` for all five severities (as
    ImageNet-C reports them). `none` (the clean data, always measured) is skipped; repeats are dropped."""
    if specs is None:
        return []
    out: dict[str, Corruption] = {}
    for s in [specs] if isinstance(specs, (str, Corruption)) else specs:
        if isinstance(s, Corruption):
            shifts = [s]
        elif s == CLEAN:
            continue
        elif isinstance(s, str) and ":" not in s:
            SHIFTS.get(s)
            shifts = [SHIFTS.create(s, severity=k) for k in SEVERITIES]
        else:
            shifts = [create_shift(s)]
        out |= {c.label: c for c in shifts if c.label not in out}
    return list(out.values())


def pixel_normalization(dataset, normalization: Mapping | tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) with `x = (pixels − mean) / std`, each shaped (1, C or 1, 1, 1), float64.

    Args:
        dataset: the `Dataset` (its `meta["normalization"]` is used when `normalization` is None).
        normalization: `{"mean": …, "std": …}` or `(mean, std)`, scalars or one value per channel.
    """
    norm = normalization if normalization is not None else dataset.meta.get("normalization")
    if norm is None:
        raise LayercritError(
            f"data {dataset.spec!r} does not say how its inputs relate to [0, 1] pixels, which corruptions "
            "need; state it (--normalization MEAN STD, or meta['normalization'] = {'mean': …, 'std': …} with "
            "x = (pixels − mean) / std; MEAN 0 STD 1 for raw [0, 1] pixels)"
        )
    mean, std = (norm["mean"], norm["std"]) if isinstance(norm, Mapping) else norm
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
    channels = dataset.x.shape[1] if isinstance(dataset.x, torch.Tensor) and dataset.x.ndim == 4 else None
    ok_len = {1, channels} if channels else {1}
    if len(mean) not in ok_len or len(std) not in ok_len or not bool((std > 0).all()):
        raise LayercritError(
            f"Expected the normalization of data {dataset.spec!r} as one mean and one positive std, or one per "
            f"channel ({channels}), got mean={mean.tolist()} std={std.tolist()}"
        )
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def parse_normalization(mean: str, std: str) -> dict:
    """`{"mean", "std"}` from command-line text: one number or one per channel, comma-separated."""
    try:
        values = [[float(v) for v in text.split(",")] for text in (mean, std)]
    except ValueError:
        raise LayercritError(f"Expected --normalization MEAN STD as numbers (comma-separated per channel), "
                             f"got {mean!r} {std!r}") from None
    if any(v <= 0 for v in values[1]):
        raise LayercritError(f"Expected a positive normalization STD, got {std!r}")
    return {"mean": values[0][0] if len(values[0]) == 1 else values[0],
            "std": values[1][0] if len(values[1]) == 1 else values[1]}


def shift_dataset(dataset, shift: str | Corruption, seed: int = 0, normalization: Mapping | tuple | None = None):
    """The dataset with every image corrupted: un-normalized, corrupted in [0, 1], clipped, normalized.

    Args:
        dataset: a `Dataset` of images (N, C, H, W).
        shift: a `Corruption` or its spec (`gaussian_noise:3`).
        seed: the shift seed (image k of the full data draws from `shift.generator(seed, k)`).
        normalization: how inputs relate to pixels (default: `dataset.meta["normalization"]`).

    Returns:
        A `Dataset` with the same labels, spec and indices; `meta["shift"]` names the shift and its
        seed, so `identity` differs from the clean data's.
    """
    shift = create_shift(shift) if isinstance(shift, str) else shift
    x = dataset.x
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        what = (f"dict inputs ({', '.join(x)})" if isinstance(x, dict)
                else f"inputs of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
        raise LayercritError(f"shift {shift.label!r} needs images of shape (N, C, H, W); data {dataset.spec!r} has {what}")
    mean, std = pixel_normalization(dataset, normalization)
    indices = dataset.indices if dataset.indices is not None else np.arange(len(x))
    step = max(1, _CHUNK_VALUES // max(1, x[0].numel()))
    out = torch.empty_like(x, dtype=torch.float32, device="cpu")
    for i in range(0, len(x), step):
        pixels = x[i : i + step].detach().to("cpu", torch.float64) * std + mean
        out[i : i + step] = ((shift(pixels, seed, indices[i : i + step]).double() - mean) / std).float()
    meta = dict(dataset.meta) | {"shift": shift.label, "shift_seed": int(seed),
                                 "shift_details": shift.describe(*x.shape[2:])}
    return replace(dataset, x=out.to(x.device), meta=meta)
