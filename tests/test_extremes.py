"""Non-finite inputs and extreme logits, for every impl and divergence.

The policy (README, "Non-finite inputs"), as PyTorch users expect from log_softmax:
  - a NaN or a +inf logit in a row (student or teacher) makes that row's loss NaN;
  - a row whose student or teacher logits are all -inf has no softmax: its loss is NaN;
  - -inf entries of a row that has finite ones are exact: padding (-inf in both) adds 0, and
    q = 0 where p > 0 makes forward KL +inf (the true value; mixtures stay finite);
  - an ignored row (label == ignore_index) gives 0 and a gradient of exactly 0, whatever
    its logits;
  - softmax / log_softmax of a row with a NaN, a +inf, or nothing but -inf is NaN.

Extreme logits: |logit| ~ 1e4 at temperatures far from 1 (1e-3, 0.7, 3, 1e3). Every impl forms
a shifted logit as (x - max x) / T, so its error stays within 2x that of impl="torch" (which
forms it so) plus a floor; forming x / T first would carry a rounding of |x / T| into every
probability (10^3-10^4 x larger errors).
"""

import math

import pytest
import torch
from _device import DEVICE
from _formulas import TOLERANCES, kd_loss, max_err

import kdkernels as kd

pytestmark = pytest.mark.usefixtures("tensors_on_device")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "soft_cross_entropy", "tvd", "forward_reverse_kl", "alpha_beta")
NAN, INF = math.nan, math.inf


def _rows(kind):
    """(s, t) of 3 rows: row 1 holds the non-finite case, rows 0 and 2 are ordinary."""
    s, t = torch.randn(3, 11) * 2, torch.randn(3, 11) * 2
    if kind == "nan-student":
        s[1, 4] = NAN
    elif kind == "nan-teacher":
        t[1, 7] = NAN
    elif kind == "posinf-student":
        s[1, 2] = INF
    elif kind == "posinf-teacher":
        t[1, 0] = INF
    elif kind == "all-neginf-student":
        s[1] = -INF
    elif kind == "all-neginf-teacher":
        t[1] = -INF
    elif kind == "all-neginf-both":
        s[1] = t[1] = -INF
    return s, t


NAN_CASES = ("nan-student", "nan-teacher", "posinf-student", "posinf-teacher",
             "all-neginf-student", "all-neginf-teacher", "all-neginf-both")


@pytest.mark.parametrize("case", NAN_CASES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_finite_row_is_nan(impl, divergence, case):
    s, t = _rows(case)
    labels = torch.tensor([3, 5, 7])
    out = kd.kd_loss(s, t, labels, divergence=divergence, ce_weight=0.5, impl=impl,
                     reduction="none")
    assert out[1].isnan(), f"row with {case}: {out[1]}"
    assert torch.isfinite(out[[0, 2]]).all(), out
    want = kd_loss(s.double()[[0, 2]], t.double()[[0, 2]], labels[[0, 2]],
                   divergence=divergence, ce_weight=0.5, reduction="none")
    assert max_err(out[[0, 2]], want) < 1e-4


@pytest.mark.parametrize("case", NAN_CASES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_finite_ignored_row(impl, divergence, case):
    s, t = _rows(case)
    labels = torch.tensor([3, -100, 7])
    ss, tt = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = kd.kd_loss(ss, tt, labels, divergence=divergence, ce_weight=0.5, impl=impl,
                     reduction="none")
    assert out[1] == 0 and torch.isfinite(out).all(), out
    out.sum().backward()
    assert (ss.grad[1] == 0).all() and (tt.grad[1] == 0).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padding_columns_are_exact(impl, divergence):
    """-inf in both logits at some columns: the loss of the row without those columns."""
    s, t = torch.randn(3, 11), torch.randn(3, 11)
    s[:, 8:] = t[:, 8:] = -INF
    out = kd.kd_loss(s, t, divergence=divergence, impl=impl, reduction="none")
    want = kd.kd_loss(s[:, :8], t[:, :8], divergence=divergence, impl="torch",
                      reduction="none")
    torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("case", ["nan", "posinf", "all-neginf"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_non_finite_row_is_nan(impl, case, log):
    x = torch.randn(3, 9)
    if case == "nan":
        x[1, 3] = NAN
    elif case == "posinf":
        x[1, 3] = INF
    else:
        x[1] = -INF
    y = (kd.log_softmax if log else kd.softmax)(x, impl=impl)
    assert y[1].isnan().all(), y[1]
    torch.testing.assert_close(y[[0, 2]], (torch.log_softmax if log else torch.softmax)(
        x[[0, 2]], -1))


@pytest.mark.parametrize("temperature", [1e-3, 0.7, 3.0, 1e3])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_logits_any_temperature(impl, divergence, temperature):
    """Logits of magnitude ~1e4 with a spread of a few units near the maximum: the error
    against float64 is within 2x impl="torch"'s (+ 2 float32 ulps of the value's scale)."""
    g = torch.Generator().manual_seed(5)
    shape = (4, 67)
    # drawn on the CPU (the same values on every machine), then moved to the test device
    s = (1e4 + torch.randn(shape, generator=g, device="cpu") * 3 * temperature).to(DEVICE)
    t = (1e4 + torch.randn(shape, generator=g, device="cpu") * 3 * temperature).to(DEVICE)
    s[1] -= 2e4
    t[2] -= 2e4
    labels = torch.tensor([0, 3, -100, 66])
    kw = dict(divergence=divergence, temperature=temperature, ce_weight=0.5, reduction="none")
    results = {}
    for name, dtype, which in (("truth", torch.float64, "torch"), ("torch", torch.float32,
                                                                  "torch"),
                               ("impl", torch.float32, impl)):
        # copies: s.to(float32) would be s itself, one leaf whose .grad every run adds into
        a, b = s.to(dtype, copy=True).requires_grad_(), t.to(dtype, copy=True).requires_grad_()
        out = kd.kd_loss(a, b, labels, impl=which, **kw)
        out.backward(torch.linspace(0.5, 1.5, 4, dtype=dtype))
        results[name] = (out.detach(), a.grad, b.grad)
    for i, what in enumerate(("loss", "student gradient", "teacher gradient")):
        truth, ref, got = (results[k][i] for k in ("truth", "torch", "impl"))
        scale = float(truth.abs().max())
        bound = 2 * max_err(ref, truth) + 2 * TOLERANCES[torch.float32]["rtol"] * scale + 1e-6
        err = max_err(got, truth)
        assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (torch: " \
                             f"{max_err(ref, truth):.3g})"
