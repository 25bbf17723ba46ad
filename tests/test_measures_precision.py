"""The float32 measures of vocabulary-wide rows against an exact float64 evaluation.

`measures.Reference` compares rows at least `FLOAT32_MIN_WIDTH` wide in float32 with a
cancellation-free formulation (see the module docstring of `layercrit.engine.measures`). The
reference (`layercrit.testing.exact_measures`) is written independently, in float64, from the same
logits (upcast exactly): log q − log p from the logits' differences, 1 − cos as
‖q⊥‖²/(‖q‖(‖q‖ + ⟨q, p̂⟩)) with q⊥ = q − ⟨q, p̂⟩p̂ from q − p = p·expm1(log q − log p), KL as
Σ p·(e^y − 1 − y) with the Taylor series where |y| is small. Where float64's own usual
formula (1 − ⟨p, q⟩/(‖p‖‖q‖), Σ p log p − Σ p log q) is the less precise one — nearly identical p
and q — the tests say so.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import layercrit.engine.measures as M
from layercrit.engine.measures import FLOAT32_MIN_WIDTH, Reference, sample_measures
from layercrit.testing import exact_measures as exact

V = 4096
TOLERANCE = 1e-6  # relative, per row


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() / b.abs()


def lm_logits(rows: int, scale: float, seed: int) -> torch.Tensor:
    """Peaked, language-model-like rows: a few large logits over a heavy tail."""
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(rows, V, generator=g)
    z[:, :3] += torch.tensor([6.0, 5.0, 4.0])  # two or three tokens carry most of the mass
    return z


@pytest.mark.parametrize("step", [1.0, 1e-2, 1e-4, 1e-6])
def test_float32_measures_hold_1e6_down_to_nearly_identical_rows(step):
    """q's logits = p's + step·noise: from unrelated rows (criticality ~ 0.5) to rows whose criticality
    is ~1e-13. Every row of every measure within 1e-6 of the exact value."""
    zp = lm_logits(64, 2.0, 0)
    zq = zp + step * torch.randn(64, V, generator=torch.Generator().manual_seed(1))
    got = sample_measures(zp, zq, which=("criticality", "kl", "l1", "l2"))
    want = exact(zp, zq)
    for k, v in want.items():
        assert float(relative(got[k], v).max()) < TOLERANCE, k


def test_float64s_own_formula_is_the_less_precise_one_for_nearly_identical_rows():
    """At criticality ~1e-13 the float64 formula 1 − ⟨p, q⟩/(‖p‖‖q‖) keeps no digit (round-off
    1e-16 against 1e-13), the float32 formulation all but one or two."""
    zp = lm_logits(32, 2.0, 2)
    zq = zp + 1e-6 * torch.randn(32, V, generator=torch.Generator().manual_seed(3))
    want = exact(zp, zq)["criticality"]
    assert float(want.max()) < 1e-10
    old = M._exact_chunk(zp.double(), zq.double(), None, {"criticality"}, True)["criticality"]
    new = sample_measures(zp, zq, which=("criticality",))["criticality"]
    assert float(relative(old, want).max()) > 1e-3
    assert float(relative(new, want).max()) < TOLERANCE


def test_mass_moving_between_the_top_tokens_keeps_its_precision():
    """q − p almost along p (a peaked p whose top probability changes): the part along p is
    removed exactly at p's argmax."""
    zp = lm_logits(32, 1.0, 4)
    zp[:, 0] += 6.0  # p_top ≈ 0.9+
    zq = zp.clone()
    zq[:, 0] -= torch.linspace(1e-4, 1.0, 32)  # only the top logit moves
    got = sample_measures(zp, zq, which=("criticality", "kl", "l1", "l2"))
    want = exact(zp, zq)
    for k, v in want.items():
        assert float(relative(got[k], v).max()) < TOLERANCE, k


def test_nearly_orthogonal_rows_keep_their_precision():
    """q far from p (criticality near 1): ⟨q, p̂⟩ from Σ p²·e^y, not from ‖p‖² + ⟨q − p, p⟩."""
    zp = lm_logits(16, 1.0, 5)
    zq = torch.roll(zp, 1, dims=1) + 3.0 * torch.randn(16, V, generator=torch.Generator().manual_seed(6))
    got = sample_measures(zp, zq, which=("criticality", "kl", "l1", "l2"))
    want = exact(zp, zq)
    assert float(want["criticality"].median()) > 0.9
    for k, v in want.items():
        assert float(relative(got[k], v).max()) < TOLERANCE, k


def test_q_far_more_confident_than_p_in_ps_top_token_keeps_its_precision():
    """A flat p (logits around 25, as a real model's on unfamiliar text) and a q whose probability at
    p's argmax t is 2 to 10^4 times p's: Σ p·expm1(x) = p_t/q_t − 1 then cancels, and q's normalizer
    comes from Σ p·e^x. The loss (log-normalizer of q minus the label's logit) too, to 1e-6 nats where
    it is below 1 (a log: its absolute error is what a perplexity sees)."""
    g = torch.Generator().manual_seed(9)
    zp = 25.0 + 0.5 * torch.randn(48, V, generator=g)
    zq = zp + 0.5 * torch.randn(48, V, generator=g)
    t = zp.argmax(1)
    zq[torch.arange(48), t] += torch.linspace(1.0, 18.0, 48)  # q_t / p_t from ~2 to ~10^4
    labels = torch.randint(0, V, (48,), generator=g)
    got = sample_measures(zp, zq, labels, which=("criticality", "kl", "l1", "l2", "loss"))
    want = exact(zp, zq)
    for k, v in want.items():
        assert float(relative(got[k], v).max()) < TOLERANCE, k
    loss = F.cross_entropy(zq.double(), labels, reduction="none")
    assert float(((got["loss"] - loss).abs() / loss.clamp_min(1.0)).max()) < TOLERANCE


def test_identical_rows_measure_exactly_zero():
    zp = lm_logits(8, 2.0, 7)
    got = sample_measures(zp, zp.clone(), torch.zeros(8, dtype=torch.long))
    for k in ("criticality", "kl", "l1", "l2"):
        assert torch.equal(got[k], torch.zeros(8, dtype=torch.float64)), k
    assert (got["agreement"] == 1).all()


def test_label_and_argmax_measures_equal_the_float64_reference():
    """agreement, accuracy, top5 and loss as the float64 formulation gives them, also with ties at the
    maximum and at the label's score (rows measured again in float64, where topk decides)."""
    g = torch.Generator().manual_seed(8)
    zp = lm_logits(40, 2.0, 8)
    zq = zp + 0.5 * torch.randn(40, V, generator=g)
    labels = torch.randint(0, V, (40,), generator=g)
    labels[::7] = -100
    zq[3] = 0.0  # every score tied
    zq[5, 10] = zq[5, 11] = zq[5].max() + 1  # two maxima
    zq[6, labels[6]] = zq[6, 100]  # a tie at the label's score
    got = sample_measures(zp, zq, labels)
    want = M._exact_chunk(zp.double(), zq.double(), labels, set(M.MEASURES), True)
    for k in ("agreement", "accuracy", "top5"):
        assert torch.equal(got[k], want[k]), k
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=0)


def test_nonfinite_and_minus_inf_rows_take_the_float64_reference():
    """NaN or +inf: NaN in every measure; −inf logits (probability 0) are legitimate: KL(p‖q) = +inf
    where q = 0 < p, and the row's other measures as float64 gives them."""
    zp = lm_logits(6, 2.0, 9)
    zq = zp + 0.1 * torch.randn(6, V, generator=torch.Generator().manual_seed(19))
    zq[0, 5] = math.nan
    zq[1, 5] = math.inf
    zq[2, 5] = -math.inf  # q = 0 where p > 0
    zp[3, 7] = -math.inf  # p = 0 where q > 0
    zp[4, 7] = zq[4, 7] = -math.inf  # both 0
    got = sample_measures(zp, zq)
    want = M._exact_chunk(zp.double(), zq.double(), None, set(M.PAIR_MEASURES) - {"rel_l2"}, True)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-12, equal_nan=True, msg=k)
    assert got["kl"][2] == math.inf and math.isfinite(float(got["criticality"][2]))
    assert math.isnan(float(got["criticality"][0])) and math.isnan(float(got["kl"][1]))


def test_a_probability_ratio_beyond_float32_is_measured_in_float64():
    """p ~ e^−95 where q is ~0.5: q/p overflows float32; the row is measured again in float64."""
    zp = lm_logits(4, 1.0, 10)
    zp[:, 9] = -100.0
    zq = zp.clone()
    zq[:, 9] = 10.0
    ref = Reference(zp, None)
    got = ref.compare(zq)
    assert ref.redone == 4
    want = exact(zp, zq)
    for k, v in want.items():
        assert float(relative(got[k], v).max()) < TOLERANCE, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_measured_from_their_exact_values(dtype):
    zp = lm_logits(16, 2.0, 11).to(dtype)
    zq = (zp.float() + 0.05 * torch.randn(16, V, generator=torch.Generator().manual_seed(12))).to(dtype)
    got = sample_measures(zp, zq, which=("criticality", "kl", "l1", "l2"))
    want = exact(zp, zq)  # from the upcast values: what the model returned
    for k, v in want.items():
        assert got[k].dtype == torch.float64
        assert float(relative(got[k], v).max()) < TOLERANCE, k


def test_results_do_not_depend_on_chunks_or_on_keeping_p(monkeypatch):
    """Rows per chunk (cache-sized or one) and p kept for the batch or computed per chunk: the same
    numbers (the float32 sums of a row do not depend on the other rows of its chunk)."""
    zp = lm_logits(24, 2.0, 13)
    zq = zp + 0.3 * torch.randn(24, V, generator=torch.Generator().manual_seed(14))
    labels = torch.randint(0, V, (24,), generator=torch.Generator().manual_seed(15))
    rows = torch.tensor([0, 2, 3, 5, 8, 13, 21, 23])
    base = sample_measures(zp, zq, labels[rows], rows=rows)
    monkeypatch.setattr(M, "CACHE_ELEMENTS", 1)  # one row per chunk
    one = sample_measures(zp, zq, labels[rows], rows=rows)
    recomputed = sample_measures(zp, zq, labels[rows], rows=rows, chunk_bytes=V * 16)  # p not kept
    direct = sample_measures(zp[rows], zq[rows], labels[rows])
    for k in base:
        assert torch.equal(base[k], one[k]), k
        assert torch.equal(base[k], direct[k]), k
        torch.testing.assert_close(recomputed[k], base[k], rtol=1e-6, atol=0, msg=k)
    # all rows but one (a sequence's last position): every row is compared in place, the selected returned
    most = torch.tensor([r for r in range(24) if r != 11])
    ref = Reference(zp, labels[most], rows=most)
    assert ref.select is not None and ref.n == 23
    in_place, direct = ref.compare(zq), sample_measures(zp[most], zq[most], labels[most])
    assert in_place.keys() == direct.keys()
    for k in in_place:
        assert torch.equal(in_place[k], direct[k]), k
    base = ref.unmodified()
    assert len(base["criticality"]) == 23 and len(base["loss"]) == 23


def test_the_careful_way_everywhere_as_off_the_cpu_holds_the_same_precision(monkeypatch):
    """Off the CPU every chunk takes the careful way (no rows chosen, no synchronization): the same
    precision on nearly identical rows, on q far more confident than p at p's argmax, on nearly
    orthogonal rows, and the same label measures."""
    monkeypatch.setattr(Reference, "careful_everywhere", lambda self: True)
    g = torch.Generator().manual_seed(20)
    zp = lm_logits(32, 2.0, 21)
    flat = 25.0 + 0.5 * torch.randn(16, V, generator=g)
    confident = flat + 0.5 * torch.randn(16, V, generator=g)
    confident[torch.arange(16), flat.argmax(1)] += torch.linspace(1.0, 18.0, 16)
    cases = [(zp, zp + 1e-5 * torch.randn(32, V, generator=g)), (zp, zp + 0.5 * torch.randn(32, V, generator=g)),
             (flat, confident), (zp, torch.roll(zp, 1, dims=1) + 3.0 * torch.randn(32, V, generator=g))]
    for zp, zq in cases:
        labels = torch.randint(0, V, (len(zp),), generator=g)
        got = sample_measures(zp, zq, labels)
        for k, v in exact(zp, zq).items():
            assert float(relative(got[k], v).max()) < TOLERANCE, k
        want = M._exact_chunk(zp.double(), zq.double(), labels, set(M.MEASURES), True)
        for k in ("agreement", "accuracy", "top5"):
            assert torch.equal(got[k], want[k]), k


def test_one_reference_serves_every_probe_of_a_batch():
    zp = lm_logits(16, 2.0, 16)
    labels = torch.randint(0, V, (16,), generator=torch.Generator().manual_seed(17))
    ref = Reference(zp, labels)
    for seed in range(3):
        zq = zp + 0.2 * torch.randn(16, V, generator=torch.Generator().manual_seed(seed))
        shared, alone = ref.compare(zq), sample_measures(zp, zq, labels)
        assert shared.keys() == alone.keys()
        for k in shared:
            assert torch.equal(shared[k], alone[k]), k
    base = ref.unmodified()
    want = M._exact_chunk(zp.double(), zp.double(), labels, set(M.MEASURES), True)
    for k in ("agreement", "accuracy", "top5"):
        assert torch.equal(base[k], want[k]), k
    for k in ("criticality", "kl", "l1", "l2"):
        assert torch.equal(base[k], torch.zeros(16, dtype=torch.float64)), k
    torch.testing.assert_close(base["loss"], want["loss"], rtol=1e-6, atol=0)


def test_narrow_rows_keep_the_float64_formulation():
    """Class logits narrower than FLOAT32_MIN_WIDTH: measured exactly as before, in float64."""
    g = torch.Generator().manual_seed(18)
    zp, zq = torch.randn(50, FLOAT32_MIN_WIDTH - 1, generator=g), torch.randn(50, FLOAT32_MIN_WIDTH - 1, generator=g)
    labels = torch.randint(0, FLOAT32_MIN_WIDTH - 1, (50,), generator=g)
    assert not Reference(zp, labels).float32
    got = sample_measures(zp, zq, labels)
    want = M._exact_chunk(zp.double(), zq.double(), labels, set(M.SOFTMAX_MEASURES), True)
    assert got.keys() == want.keys()
    for k in got:
        assert torch.equal(got[k], want[k]), k
