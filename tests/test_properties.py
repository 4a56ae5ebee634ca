"""Properties of kd.kd_loss that hold for every impl: gradcheck, special cases of the
divergences, symmetry, zero at equality, non-negativity, shift invariance, -inf vocab
padding, all-ignored and empty batches, extreme logits, the documented +inf, in-place
backward. Plus a small hypothesis search (impl="torch") for non-negativity and shift
invariance.
"""

import math

import numpy as np
import pytest
import torch
from _device import float64_device
from _formulas import (
    TOLERANCES,
    assert_error_model,
    check_kd_loss,
    kd_loss,
    skip_unsupported,
    upstream_grad,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import kdkernels as kd

# tensors the tests create land on the device of the `device` fixture
pytestmark = pytest.mark.usefixtures("tensors_on_device")


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "soft_cross_entropy", "tvd", "forward_reverse_kl", "alpha_beta")
REDUCTIONS = ("none", "sum", "mean", "batchmean", "token_mean")


def run(impl, s, t, labels=None, **kwargs):
    """Loss and gradients (d/ds, d/dt) for a non-unit upstream gradient."""
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = kd.kd_loss(s, t, labels, impl=impl, **kwargs)
    torch.manual_seed(1)  # the same upstream gradient for calls that are compared
    out.backward(upstream_grad(out))
    return out.detach(), s.grad, t.grad


def dyadic(shape, scale=4.0, bits=10):
    """Random logits that are exact multiples of 2**-bits: adding an integer or dividing by
    a power of two is then exact in float32, so shifted inputs are mathematically equal."""
    x = torch.randn(shape) * scale
    return torch.round(x * 2**bits) / 2**bits


# --------------------------------------------------------------------------------------
# gradcheck in float64
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(impl, divergence):
    skip_unsupported(impl, torch.float64)
    device = float64_device(impl)
    s = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([2, -100, 6], device=device)

    def fn(s, t):
        return kd.kd_loss(s, t, labels, divergence=divergence, beta=0.3, skew=0.4,
                          temperature=2.0, teacher_temperature=1.5, ce_weight=0.5,
                          reduction="none", impl=impl)

    assert torch.autograd.gradcheck(fn, (s, t))


@pytest.mark.parametrize("log_target", [False, True])
def test_gradcheck_kl_div(impl, log_target):
    skip_unsupported(impl, torch.float64)
    device = float64_device(impl)
    x = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    y = (torch.rand(3, 5, dtype=torch.float64, device=device) + 0.1).requires_grad_()
    if log_target:
        y = y.detach().log().requires_grad_()
    for reduction in ("none", "sum"):
        assert torch.autograd.gradcheck(
            lambda x, y, r=reduction: kd.kl_div(x, y, reduction=r, log_target=log_target,
                                                impl=impl),
            (x, y),
        )


@pytest.mark.parametrize("log", [False, True])
def test_gradcheck_softmax(impl, log):
    skip_unsupported(impl, torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, device=float64_device(impl), requires_grad=True)
    fn = kd.log_softmax if log else kd.softmax
    assert torch.autograd.gradcheck(lambda x: fn(x, 1.7, impl=impl), (x,))


# --------------------------------------------------------------------------------------
# special cases and symmetries of the divergences
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,same_as",
    [("jsd", {"beta": 0.0}, "forward_kl"), ("jsd", {"beta": 1.0}, "reverse_kl"),
     ("skew_forward_kl", {"skew": 0.0}, "forward_kl"),
     ("skew_reverse_kl", {"skew": 0.0}, "reverse_kl")],
)
def test_special_cases_are_exact(impl, name, kwargs, same_as):
    """GKD's convention: jsd(0) IS forward KL and jsd(1) IS reverse KL, bit for bit (values
    and gradients); so are the skews at 0."""
    s, t = torch.randn(4, 67) * 2, torch.randn(4, 67) * 2
    labels = torch.tensor([1, -100, 5, 66])
    common = dict(temperature=2.0, ce_weight=0.5, reduction="none")
    a = run(impl, s, t, labels, divergence=name, **kwargs, **common)
    b = run(impl, s, t, labels, divergence=same_as, **common)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "first,second",
    [(("jsd", 0.3, 0.1), ("jsd", 0.7, 0.1)),
     (("skew_forward_kl", 0.5, 0.3), ("skew_reverse_kl", 0.5, 0.3))],
    ids=["jsd", "skew"],
)
def test_swap_student_and_teacher(impl, first, second):
    """jsd_beta(p || q) = jsd_(1-beta)(q || p), and skew_forward_kl(lam) with student and
    teacher swapped is skew_reverse_kl(lam): values equal, d/ds of one is d/dt of the other.
    """
    s, t = torch.randn(4, 67) * 2, torch.randn(4, 67) * 2
    (d1, b1, k1), (d2, b2, k2) = first, second
    a = run(impl, s, t, divergence=d1, beta=b1, skew=k1, temperature=1.5, reduction="none")
    b = run(impl, t, s, divergence=d2, beta=b2, skew=k2, temperature=1.5, reduction="none")
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[2], **tol)
    torch.testing.assert_close(a[2], b[1], **tol)


def test_jsd_is_symmetric_at_half(impl):
    s, t = torch.randn(4, 67) * 2, torch.randn(4, 67) * 2
    a = kd.kd_loss(s, t, divergence="jsd", beta=0.5, reduction="none", impl=impl)
    b = kd.kd_loss(t, s, divergence="jsd", beta=0.5, reduction="none", impl=impl)
    torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])
    assert (a <= math.log(2) + 1e-6).all()  # JSD(1/2) is bounded by log 2


# --------------------------------------------------------------------------------------
# zero at equality, non-negativity, shift invariance
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_when_student_equals_teacher(impl, divergence):
    """D(p || p) = 0 with zero gradients. Tolerance: the mixtures recompute log m from lp
    and lq = lp in float32, a few ulps of O(1) log-probabilities away from lp."""
    x = torch.randn(5, 97) * 3
    loss, gs, gt = run(impl, x, x, divergence=divergence, temperature=2.0, reduction="none")
    if divergence == "soft_cross_entropy":
        # -sum p log p = H(p) at q = p (times T^2 = 4); the student's gradient q - p is 0,
        # the teacher's is the entropy's
        lp = torch.log_softmax(x.double() / 2.0, -1)
        entropy = -(lp.exp() * lp).sum(-1)
        torch.testing.assert_close(loss.double(), 4.0 * entropy, rtol=1e-5, atol=1e-6)
        assert gs.abs().max() <= 1e-6
        return
    assert loss.abs().max() <= 1e-6
    assert gs.abs().max() <= 1e-6 and gt.abs().max() <= 1e-6


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_negative(impl, divergence):
    """Many independent rows (each row is its own random draw): spreads from flat to
    peaked, and teachers from unrelated to nearly equal to the student."""
    rows, vocab = 48, 61
    scale = torch.logspace(-2, 1.3, rows)[:, None]
    s = torch.randn(rows, vocab) * scale
    closeness = torch.rand(rows, 1) ** 4  # many rows with a teacher close to the student
    t = s + closeness * torch.randn(rows, vocab) * scale
    loss = kd.kd_loss(s, t, divergence=divergence, reduction="none", impl=impl)
    # float32 sums of O(1) terms: a true 0 may come out a few ulps below it
    assert (loss >= -1e-6).all(), loss.min()
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_shift_invariance(impl, divergence):
    """Adding a per-row constant to either logits leaves the loss and gradients unchanged.
    The shifts are exact in float32 (dyadic logits + integers), so the shifted run must meet
    the error model against the float64 truth of the unshifted inputs: a backend that forms
    log p as z - logsumexp(z) with the logsumexp rounded at |z| ~ 500 fails it."""
    shape = (6, 97)
    s, t = dyadic(shape), dyadic(shape)
    labels = torch.tensor([0, 5, -100, 96, 7, 8])
    kwargs = dict(divergence=divergence, temperature=2.0, ce_weight=0.5, reduction="none")
    cs = torch.tensor([0.0, 1000.0, -1000.0, 250.0, -3.0, 64.0])[:, None]
    ct = torch.tensor([-500.0, 7.0, 1000.0, 0.0, -250.0, 2.0])[:, None]
    out, gs, gt = run(impl, s + cs, t + ct, labels, **kwargs)
    assert torch.equal(s + cs - cs, s)  # the shift really is exact
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    torch.manual_seed(1)
    ref = kd_loss(s64, t64, labels, **kwargs)
    ref.backward(upstream_grad(ref.float()).double())
    sb, tb = (s + cs).requires_grad_(), (t + ct).requires_grad_()
    torch.manual_seed(1)
    base = kd_loss(sb, tb, labels, **kwargs)
    base.backward(upstream_grad(base))
    assert_error_model(out, ref, base, torch.float32, "shifted loss")
    assert_error_model(gs, s64.grad, sb.grad, torch.float32, "shifted student gradient")
    assert_error_model(gt, t64.grad, tb.grad, torch.float32, "shifted teacher gradient")


# --------------------------------------------------------------------------------------
# -inf vocabulary padding, all-ignored and empty batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_vocab_padding(impl, divergence):
    """-inf at the same positions in both logits (padding at the end and holes inside) is the
    unpadded loss; the gradient of a padded entry is exactly 0, never nan."""
    rows, vocab, padded = 4, 50, 64
    keep = torch.zeros(padded, dtype=torch.bool)
    keep[torch.randperm(padded - 6)[:vocab].sort().values] = True  # holes + a padded tail
    s, t = torch.randn(rows, vocab) * 2, torch.randn(rows, vocab) * 2
    sp = torch.full((rows, padded), -math.inf)
    tp = torch.full((rows, padded), -math.inf)
    sp[:, keep], tp[:, keep] = s, t
    labels = torch.tensor([3, -100, 0, 49])
    labels_p = torch.where(labels >= 0, keep.nonzero()[:, 0][labels.clamp(min=0)], labels)
    kwargs = dict(divergence=divergence, temperature=2.0, ce_weight=0.5, reduction="none")
    out, gs, gt = run(impl, sp, tp, labels_p, **kwargs)
    assert torch.isfinite(out).all()
    assert torch.equal(gs[:, ~keep], torch.zeros_like(gs[:, ~keep]))
    assert torch.equal(gt[:, ~keep], torch.zeros_like(gt[:, ~keep]))
    # the padded run against the float64 truth of the unpadded inputs
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    torch.manual_seed(1)
    ref = kd_loss(s64, t64, labels, **kwargs)
    ref.backward(upstream_grad(ref.float()).double())
    sb, tb = s.clone().requires_grad_(), t.clone().requires_grad_()
    torch.manual_seed(1)
    base = kd_loss(sb, tb, labels, **kwargs)
    base.backward(upstream_grad(base))
    assert_error_model(out, ref, base, torch.float32, "padded loss")
    assert_error_model(gs[:, keep], s64.grad, sb.grad, torch.float32, "padded student grad")
    assert_error_model(gt[:, keep], t64.grad, tb.grad, torch.float32, "padded teacher grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_all_rows_ignored(impl, divergence, reduction):
    """Every label is ignore_index: the loss is 0 (not nan) and so are all gradients."""
    s, t = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    labels = torch.full((2, 3), -100)
    out, gs, gt = run(impl, s, t, labels, divergence=divergence, ce_weight=0.5,
                      temperature=2.0, reduction=reduction)
    assert out.shape == ((2, 3) if reduction == "none" else ())
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(gs, torch.zeros_like(gs))
    assert torch.equal(gt, torch.zeros_like(gt))


@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("shape", [(0, 40), (2, 0, 40)], ids=["0xV", "2x0xV"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(impl, reduction, shape, with_labels):
    """No rows: scalar reductions give 0, none an empty tensor; empty gradients, no error."""
    s = torch.randn(shape, requires_grad=True)
    t = torch.randn(shape, requires_grad=True)
    labels = torch.zeros(shape[:-1], dtype=torch.long) if with_labels else None
    extra = {"ce_weight": 0.5} if with_labels else {}
    out = kd.kd_loss(s, t, labels, reduction=reduction, impl=impl, **extra)
    if reduction == "none":
        assert out.shape == shape[:-1]
    else:
        assert out.shape == () and out.item() == 0.0
    out.sum().backward()
    assert s.grad.shape == shape and t.grad.shape == shape


# --------------------------------------------------------------------------------------
# extreme logits, the documented +inf, in-place backward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits(impl, divergence):
    """Logits of +-1e4 (one-hot softmaxes, exp underflows to 0 almost everywhere): finite
    and correct against float64 under the error model, no nan."""
    shape = (4, 67)
    s = torch.empty(shape).uniform_(-1e4, 1e4)
    t = torch.empty(shape).uniform_(-1e4, 1e4)
    s[1], t[1] = -1e4, -1e4
    s[1, 3] = t[1, 3] = 1e4  # the same one-hot in both
    t[1, 5] = 1e4 - 2.0  # ... almost: two nearly tied teacher entries
    s[2] = torch.where(torch.rand(67) < 0.5, 1e4, -1e4)  # ties at the maximum
    labels = torch.tensor([0, 3, -100, 66])
    kwargs = dict(divergence=divergence, ce_weight=0.5, reduction="none")
    s_, t_ = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = kd.kd_loss(s_, t_, labels, impl=impl, **kwargs)
    torch.manual_seed(1)
    out.backward(upstream_grad(out))
    assert torch.isfinite(out).all()
    assert torch.isfinite(s_.grad).all() and torch.isfinite(t_.grad).all()
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    sb, tb = s.clone().requires_grad_(), t.clone().requires_grad_()
    for a, b in ((s64, t64), (sb, tb)):
        ref = kd_loss(a, b, labels, **kwargs)
        torch.manual_seed(1)
        ref.backward(upstream_grad(ref.float()).to(ref.dtype))
        if a.dtype == torch.float64:
            truth = ref
        else:
            base = ref
    assert_error_model(out, truth, base, torch.float32, "loss")
    assert_error_model(s_.grad, s64.grad, sb.grad, torch.float32, "student grad")
    assert_error_model(t_.grad, t64.grad, tb.grad, torch.float32, "teacher grad")


def test_large_logits_precision(impl):
    """One row at |z| = 1e4 where a rounded teacher logsumexp would cost: the teacher's mass
    sits on entries where the student's log-probability is -2e4, so a relative error d of p
    (d ~ eps * 1e4 when p = exp(z - lse) with lse rounded) moves the loss by d * 2e4. Plain
    PyTorch (log_softmax subtracts the max first) is accurate to ~1e-7 relative here."""
    t = torch.tensor([[1e4 - 0.3 * k for k in range(8)]])
    s = torch.full((1, 8), -1e4)
    s[0, 7] = 1e4
    check_kd_loss(impl, s, t, divergence="forward_kl", reduction="none")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_support_mismatch_is_inf(impl, divergence):
    """q = 0 where p > 0 makes KL(p || q) = +inf: the true value, not nan (and symmetrically
    p = 0 where q > 0 for reverse KL). Other rows are unaffected."""
    s, t = torch.randn(3, 20), torch.randn(3, 20)
    if divergence == "forward_kl":
        s[1, 4] = -math.inf  # student gives 0 to a token the teacher does not
    else:
        t[1, 4] = -math.inf
    out = kd.kd_loss(s, t, divergence=divergence, reduction="none", impl=impl)
    assert out[1] == math.inf
    want = kd_loss(s.double(), t.double(), divergence=divergence, reduction="none")
    assert_error_model(out[[0, 2]], want[[0, 2]], None, torch.float32, "other rows")


@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_mixtures_finite_with_zero_probabilities(impl, divergence):
    """A mixture m > 0 wherever p or q is: a -inf logit on one side only stays finite."""
    s, t = torch.randn(3, 20) * 2, torch.randn(3, 20) * 2
    s[1, 4] = -math.inf
    t[2, 7] = -math.inf
    out, gs, gt = check_kd_loss(impl, s, t, divergence=divergence, skew=0.3, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("divergence", ["skew_forward_kl", "skew_reverse_kl"])
def test_full_skew_is_zero_with_one_sided_padding(impl, divergence):
    """skew = 1 mixes the skewed side with itself (KL(p || p), KL(q || q)): 0 with zero
    gradients, even where the other distribution has zeros (there the zero-weight terms are
    infinite and must be skipped, not multiplied by 0)."""
    s, t = torch.randn(3, 20), torch.randn(3, 20)
    s[:, 4] = -math.inf
    t[1, 7] = -math.inf
    s.requires_grad_()
    t.requires_grad_()
    out = kd.kd_loss(s, t, divergence=divergence, skew=1.0, reduction="none", impl=impl)
    out.backward(torch.randn_like(out))
    assert torch.equal(out.detach(), torch.zeros(3))
    for g in (s.grad, t.grad):
        assert torch.isfinite(g).all() and g.abs().max() < 1e-6


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_inplace_backward(impl, divergence):
    """inplace_backward=True: the same loss and gradients; the logits buffer is consumed."""
    s, t = torch.randn(4, 67) * 2, torch.randn(4, 67) * 2
    labels = torch.tensor([1, -100, 5, 66])
    kwargs = dict(divergence=divergence, temperature=2.0, ce_weight=0.5, reduction="sum")
    want = run(impl, s, t, labels, **kwargs)
    s2 = s.clone().requires_grad_()
    t2 = t.clone().requires_grad_()
    out = kd.kd_loss(s2, t2, labels, impl=impl, inplace_backward=True, **kwargs)
    torch.manual_seed(1)
    out.backward(upstream_grad(out))
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out.detach(), want[0], **tol)
    torch.testing.assert_close(s2.grad, want[1], **tol)
    torch.testing.assert_close(t2.grad, want[2], **tol)


# --------------------------------------------------------------------------------------
# hypothesis: non-negativity and shift invariance on generated logits (impl="torch")
# --------------------------------------------------------------------------------------

# Dyadic logits: integers / 16 in [-40, 40]; with integer shifts and power-of-two
# temperatures every transformation below is exact in float32.
_logit_rows = st.integers(1, 4).flatmap(
    lambda rows: st.integers(2, 40).flatmap(
        lambda vocab: st.tuples(
            arrays(np.int32, (rows, vocab), elements=st.integers(-640, 640)),
            arrays(np.int32, (rows, vocab), elements=st.integers(-640, 640)),
        )
    )
)


@settings(max_examples=25, deadline=None, database=None)
@given(
    pair=_logit_rows,
    divergence=st.sampled_from(DIVERGENCES),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    shift=st.integers(-1000, 1000),
    mix=st.sampled_from([0.1, 0.5, 0.9]),
)
def test_hypothesis_non_negative_and_shift_invariant(pair, divergence, temperature, shift, mix):
    s = torch.from_numpy(pair[0]).float() / 16
    t = torch.from_numpy(pair[1]).float() / 16
    kwargs = dict(divergence=divergence, beta=mix, skew=mix, temperature=temperature,
                  reduction="none", impl="torch")
    loss = kd.kd_loss(s, t, **kwargs)
    # float32 sum over V of terms |p (lp - lq)| <= |lp - lq| <= 80 / T, times T**2
    slack = 4 * s.shape[-1] * 2**-23 * (1 + 80 / temperature) * temperature**2
    assert (loss >= -slack).all(), (loss, slack)
    shifted = kd.kd_loss(s + shift, t - shift, **kwargs)
    formula = {k: v for k, v in kwargs.items() if k != "impl"}
    ref = kd_loss(s.double(), t.double(), **formula)
    # the floor of the error model is per unit of divergence; the loss is T**2 D (a student
    # equal to its teacher gives D = 0 to a few ulps, times T**2 = 16 at T = 4)
    floor = TOLERANCES[torch.float32]["atol"] * max(temperature**2 - 1.0, 0.0)
    assert_error_model(loss, ref, kd_loss(s, t, **formula), torch.float32, "loss", floor)
    base = kd_loss(s + shift, t - shift, **formula)
    assert_error_model(shifted, ref, base, torch.float32, "shifted loss", floor)
