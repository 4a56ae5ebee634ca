"""kd.sparse_kd_loss (a top-k teacher) against the float64 formula of tests/_formulas.py.

Every impl goes through the public API; values and gradients (student, and teacher
log-probabilities when they require grad) follow the error model of _formulas. Teacher ids
are random distinct columns (not only the top-k), some slots are empty (-1, with a garbage
log-probability that must be ignored), one row has no id at all, and K runs from 1 to the
whole vocabulary (a bucket row whose ids cover every column has no tail).
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile
import traceback

import pytest
import torch
from _device import DEVICE
from _formulas import assert_error_model, max_err, skip_unsupported, upstream_grad
from _formulas import sparse_kd_loss as formula

import kdkernels as kd
from kdkernels import _dispatch, reference, sparse
from kdkernels._common import acc_dtype

pytestmark = pytest.mark.usefixtures("tensors_on_device")

V = 80
LEAD = (2, 3)
KS = (1, 7, 64, V)
# (tail, divergence): every combination the loss accepts
MODES = [("renormalize", "forward_kl"), ("renormalize", "reverse_kl"), ("renormalize", "jsd"),
         ("bucket", "forward_kl"), ("bucket", "reverse_kl"), ("bucket", "jsd"),
         ("none", "forward_kl")]
EPS32 = torch.finfo(torch.float32).eps
MODE_IDS = [f"{t}-{d}" for t, d in MODES]


def dtype_for(impl):
    """float64 where the backend takes it on the test device (the sharpest check), else
    float32 (the extension's CUDA kernels take no float64)."""
    return torch.float64 if torch.float64 in _dispatch.supported_dtypes(impl, DEVICE) \
        else torch.float32


def teacher(lead, v, k, seed=0, pad=True, scale=2.0, device=DEVICE):
    """(ids, logprobs) of a random teacher: k distinct random ids per row with their
    log-softmax values. pad: row 1 loses its last two slots (when k > 2), the last row has
    no id at all; empty slots hold -1 and a log-probability of 7 (garbage to ignore).
    Drawn on the CPU (the same values on every machine), returned on `device`."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    t = torch.randn(n, v, generator=g, dtype=torch.float64, device="cpu") * scale
    lp_full = torch.log_softmax(t, -1)
    ids = torch.stack([torch.randperm(v, generator=g, device="cpu")[:k] for _ in range(n)])
    lp = lp_full.gather(1, ids)
    if pad and n > 2:
        if k > 2:
            ids[1, -2:] = -1
        ids[-1] = -1
        lp = torch.where(ids >= 0, lp, 7.0)
    return ids.reshape(*lead, k).to(device), lp.reshape(*lead, k).to(device)


def student(lead, v, dtype=torch.float64, seed=1, scale=2.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, v, generator=g, dtype=torch.float64, device="cpu") * scale
    return s.to(device, dtype)


def make_labels(lead, v, seed=2, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, lead, generator=g, device="cpu")
    labels.view(-1)[::3] = -100
    return labels.to(device)


def check(impl, s, ids, lp, labels=None, *, teacher_grad=True, extra=0.0, **kwargs):
    """kd.sparse_kd_loss forward and backward against the float64 formula (the baseline:
    the formula at the inputs' dtype)."""
    skip_unsupported(impl, s.dtype)
    dtype = s.dtype
    s = s.detach().clone().requires_grad_()
    lp = lp.detach().clone().requires_grad_(teacher_grad)
    out = kd.sparse_kd_loss(s, ids, lp, labels, impl=impl, **kwargs)
    want = torch.float64 if torch.float64 in (dtype, lp.dtype) else torch.float32
    assert out.dtype == want
    g = upstream_grad(out)
    out.backward(g)
    results = {}
    for name, dt in (("truth", torch.float64), ("baseline", dtype)):
        s_ = s.detach().to(dt).requires_grad_()
        lp_ = lp.detach().to(dt).requires_grad_()
        # the baseline forms the bucket tail as 1 - sum_S q (see the formula)
        ref = formula(s_, ids, lp_, labels, tail_from_complement=name == "truth", **kwargs)
        ref.backward(g.to(ref.dtype))
        results[name] = (ref, s_.grad, lp_.grad)
    (ref, gs, gl), (base, bgs, bgl) = results["truth"], results["baseline"]
    if dtype == torch.float64:
        base, bgs, bgl = ref, gs, gl
    extras = [extra] * 3
    if kwargs.get("tail") == "bucket" and dtype != torch.float64:
        # q_tail = 1 - sum_S q carries the rounding of the float32 log-sum LS, an absolute
        # error of a few eps32 (kdkernels/sparse.py, _bucket_tail): allow what 4 eps32 on
        # q_tail changes in the float64 truth
        for shift in (-4 * EPS32, 4 * EPS32):
            s_ = s.detach().double().requires_grad_()
            lp_ = lp.detach().double().requires_grad_()
            moved = formula(s_, ids, lp_, labels, q_tail_shift=shift, **kwargs)
            moved.backward(g.double())
            for i, (a, b) in enumerate(((moved, ref), (s_.grad, gs), (lp_.grad, gl))):
                extras[i] = max(extras[i], extra + max_err(a, b))
    assert_error_model(out, ref, base, dtype, "loss", extras[0])
    assert s.grad.dtype == dtype and s.grad.shape == s.shape
    assert_error_model(s.grad, gs, bgs, dtype, "student gradient", extras[1])
    if teacher_grad:
        assert_error_model(lp.grad, gl.to(lp.dtype), bgl, dtype, "teacher gradient",
                           extras[2])
    else:
        assert lp.grad is None
    return out, s.grad


# --------------------------------------------------------------------------------------
# values and gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("tail,divergence", MODES, ids=MODE_IDS)
def test_matches_formula(impl, tail, divergence, k):
    """Every tail mode and divergence, K from 1 to V, padding, ignored rows, CE, T = 2
    (float64 logits where the backend takes them)."""
    dt = dtype_for(impl)
    ids, lp = teacher(LEAD, V, k)
    labels = make_labels(LEAD, V)
    check(impl, student(LEAD, V, dt), ids, lp.to(dt), labels, tail=tail, divergence=divergence,
          beta=0.3, temperature=2.0, ce_weight=0.5)


@pytest.mark.parametrize("options", [
    dict(temperature=1.0), dict(temperature=0.7, ce_weight=0.3),
    dict(temperature=2.0, temperature_scale=False, kd_weight=0.4),
    dict(temperature=1.5, no_labels=True),
], ids=["T1", "T0.7-ce", "T2-unscaled", "T1.5-no-labels"])
@pytest.mark.parametrize("tail,divergence", MODES, ids=MODE_IDS)
def test_matches_formula_float32(impl, tail, divergence, options):
    options = dict(options)
    labels = None if options.pop("no_labels", False) else make_labels(LEAD, V)
    ids, lp = teacher(LEAD, V, 7)
    check(impl, student(LEAD, V, torch.float32), ids, lp.float(), labels, tail=tail,
          divergence=divergence, **options)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_bfloat16_logits(impl, tail):
    ids, lp = teacher(LEAD, V, 7)
    check(impl, student(LEAD, V, torch.bfloat16), ids, lp.float(), make_labels(LEAD, V),
          tail=tail, temperature=2.0, ce_weight=0.2)


@pytest.mark.parametrize("tt", [0.5, 2.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_teacher_temperature_renormalize(impl, divergence, tt):
    dt = dtype_for(impl)
    ids, lp = teacher(LEAD, V, 7)
    check(impl, student(LEAD, V, dt), ids, lp.to(dt), tail="renormalize", divergence=divergence,
          temperature=2.0, teacher_temperature=tt)


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_jsd_ends_are_the_kls(impl, tail, beta):
    dt = dtype_for(impl)
    ids, lp = teacher(LEAD, V, 7)
    s, lp = student(LEAD, V, dt), lp.to(dt)
    jsd = kd.sparse_kd_loss(s, ids, lp, tail=tail, divergence="jsd", beta=beta, impl=impl)
    kl = kd.sparse_kd_loss(s, ids, lp, tail=tail, impl=impl,
                           divergence="forward_kl" if beta == 0.0 else "reverse_kl")
    assert torch.equal(jsd, kl)


@pytest.mark.parametrize("tail,divergence", MODES, ids=MODE_IDS)
def test_whole_vocabulary_teacher_is_the_dense_loss(impl, tail, divergence):
    """K = V, every id present, teacher log-probabilities at the temperature: every tail mode
    is kd_loss on the dense logits (renormalize and bucket have nothing outside S; none's
    p sums to 1), value and student gradient."""
    dt = dtype_for(impl)
    t = student(LEAD, V, dt, seed=7)
    g = torch.Generator().manual_seed(8)
    ids = torch.argsort(torch.rand(*LEAD, V, generator=g, device="cpu"), -1).to(DEVICE)
    s = student(LEAD, V, dt).requires_grad_()
    labels = make_labels(LEAD, V)
    kw = dict(divergence=divergence, beta=0.3, temperature=2.0, ce_weight=0.4)
    dense = kd.kd_loss(s, t, labels, impl=impl, **kw)
    (gd,) = torch.autograd.grad(dense, s)
    lp = torch.log_softmax(t.double() / 2.0, -1).gather(-1, ids).to(dt)
    extra = dict(teacher_temperature=2.0) if tail == "renormalize" else {}
    if tail == "renormalize":
        lp = torch.log_softmax(t.double(), -1).gather(-1, ids).to(dt)  # rescaled by Tt
    sparse = kd.sparse_kd_loss(s, ids, lp, labels, tail=tail, impl=impl, **kw, **extra)
    (gs,) = torch.autograd.grad(sparse, s)
    tol = 1e-10 if dt == torch.float64 else 2e-5
    torch.testing.assert_close(sparse, dense, rtol=tol, atol=tol)
    torch.testing.assert_close(gs, gd, rtol=tol, atol=tol)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean", "token_mean"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket", "none"])
def test_reductions(impl, tail, reduction):
    dt = dtype_for(impl)
    ids, lp = teacher(LEAD, V, 7)
    check(impl, student(LEAD, V, dt), ids, lp.to(dt), make_labels(LEAD, V), tail=tail,
          reduction=reduction, temperature=2.0)


@pytest.mark.parametrize("tail", ["renormalize", "bucket", "none"])
def test_all_ignored_rows(impl, tail):
    """Every row ignored: token_mean is 0 (not nan) and every gradient is exactly 0."""
    dt = dtype_for(impl)
    ids, lp = teacher(LEAD, V, 7)
    s = student(LEAD, V, dt).requires_grad_()
    lp = lp.to(dt).requires_grad_()
    labels = torch.full(LEAD, -100)
    out = kd.sparse_kd_loss(s, ids, lp, labels, tail=tail, ce_weight=0.5, impl=impl)
    out.backward()
    assert out.item() == 0.0
    assert torch.count_nonzero(s.grad) == 0 and torch.count_nonzero(lp.grad) == 0


def test_empty_batch(impl):
    s = torch.zeros(0, V, requires_grad=True)
    ids = torch.zeros(0, 5, dtype=torch.int64)
    out = kd.sparse_kd_loss(s, ids, torch.zeros(0, 5), tail="bucket", impl=impl)
    out.backward()
    assert out.item() == 0.0 and s.grad.shape == (0, V)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_vocab_size(impl, tail, monkeypatch):
    """The first vocab_size columns of padded logits: the same loss and gradient as the
    sliced tensor, read in place (the kernels get a row-strided view, no copy), a zero
    gradient in the padding columns, ids >= vocab_size rejected."""
    backend = _dispatch._BACKENDS[impl]
    strides = []

    def recording(kernel):
        def run(s, *args):
            strides.append(s.stride(0))
            return kernel(s, *args)
        return run

    for name in ("sparse_partial", "sparse_grads"):
        monkeypatch.setattr(backend, name, recording(getattr(backend, name)))
    dt = dtype_for(impl)
    ids, lp = teacher(LEAD, V, 7)
    lp = lp.to(dt)
    wide = torch.cat([student(LEAD, V, dt), torch.full((*LEAD, 6), 3.0, dtype=dt)], -1)
    labels = make_labels(LEAD, V)
    kw = dict(tail=tail, ce_weight=0.5, temperature=2.0, impl=impl)
    a = wide.clone().requires_grad_()
    out = kd.sparse_kd_loss(a, ids, lp, labels, vocab_size=V, **kw)
    out.backward()
    assert strides == [V + 6, V + 6]  # forward and backward read the wide rows in place
    b = wide[..., :V].clone().requires_grad_()
    ref = kd.sparse_kd_loss(b, ids, lp, labels, **kw)
    ref.backward()
    # the same numbers read through a row stride: the same result up to summation order
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.grad[..., :V], b.grad, rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(a.grad[..., V:]) == 0
    check(impl, wide, ids, lp, labels, vocab_size=V, tail=tail, temperature=2.0)
    # the ids' range is checked on the host for CPU tensors (on CUDA it is a device-side
    # assert, kdkernels/sparse.py _host_checks): the error is raised before any kernel runs
    bad = ids.cpu().clone()
    bad[0, 0, 0] = V + 2
    with pytest.raises(ValueError, match=rf"teacher_ids.*< {V}.*vocab_size={V}.*{V + 6}"):
        kd.sparse_kd_loss(wide.cpu(), bad, lp.cpu(), labels.cpu(), vocab_size=V, **kw)


def test_renormalize_reads_only_the_gathered_logits(monkeypatch):
    """renormalize without cross-entropy needs no full-row statistics: the backend's
    N x V kernels are not called, and the gradient lives in the K teacher columns."""
    def boom(*args, **kwargs):
        raise AssertionError("an N x V kernel was called")

    monkeypatch.setattr(reference, "sparse_partial", boom)
    monkeypatch.setattr(reference, "sparse_grads", boom)
    ids, lp = teacher(LEAD, V, 7)
    s = student(LEAD, V).requires_grad_()
    kd.sparse_kd_loss(s, ids, lp, make_labels(LEAD, V), impl="torch").backward()
    outside = torch.ones_like(s, dtype=torch.bool)
    outside.scatter_(-1, ids.clamp(min=0), False)
    assert torch.count_nonzero(s.grad[outside]) == 0
    assert torch.count_nonzero(s.grad) > 0


def test_bucket_tail_below_resolution_stays_finite(impl):
    """A student whose mass sits on the teacher's ids to within 1e-25: q_tail = 1 - sum_S q
    rounds to 0 or below in float32; the tail's own log-sum gives it (log q_tail ~ -57),
    with finite loss and gradients in every divergence. A row whose ids cover every column
    has no tail at all."""
    k = 5
    ids = torch.stack([torch.arange(k), torch.arange(k, 2 * k)])
    s = torch.full((2, V), -30.0)
    s.scatter_(1, ids, 30.0)
    lp = torch.log_softmax(torch.randn(2, k), -1) - 1e-3  # tail mass ~ 1e-3
    full_ids = torch.randperm(V)[None]
    lpf = torch.log_softmax(torch.randn(1, V), -1)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        x = s.clone().requires_grad_()
        lpg = lp.clone().requires_grad_()
        out = kd.sparse_kd_loss(x, ids, lpg, tail="bucket", divergence=divergence, impl=impl)
        out.backward()
        assert out.isfinite() and x.grad.isfinite().all() and lpg.grad.isfinite().all()
        if divergence == "forward_kl":
            want = _bucket_forward_kl64(s.double(), ids, lp.double(), 1.0).mean()
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0.0)
        y = torch.randn(1, V, requires_grad=True)
        out = kd.sparse_kd_loss(y, full_ids, lpf, tail="bucket", divergence=divergence,
                                impl=impl)
        out.backward()
        assert out.isfinite() and y.grad.isfinite().all()
        want = formula(y.detach().double(), full_ids, lpf.double(), tail="bucket",
                       divergence=divergence)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail,divergence", MODES, ids=MODE_IDS)
def test_nan_reaches_the_row_loss(impl, tail, divergence):
    """A NaN in a teacher log-probability of a valid slot, or in a student logit the loss
    reads, makes that row's loss NaN in every mode, as kd_loss does: a divergence term is
    dropped only where its weight is exactly 0, never where it is NaN. A NaN in an empty
    slot (-1) is garbage and ignored."""
    dtype = dtype_for(impl)
    ids, lp = teacher((4,), V, 7, pad=False)
    s = student((4,), V, dtype)
    lp[0, 3] = math.nan          # row 0: the teacher
    s[1, ids[1, 2]] = math.nan   # row 1: a gathered student logit
    ids[2, 4] = -1               # row 2: NaN in an empty slot only
    lp[2, 4] = math.nan
    out = kd.sparse_kd_loss(s, ids, lp, tail=tail, divergence=divergence, impl=impl,
                            reduction="none")
    assert out[:2].isnan().all(), out
    assert out[2:].isfinite().all(), out


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_renormalize_side_without_mass_is_nan(impl, divergence):
    """renormalize: a row whose valid teacher log-probabilities are all -inf, or whose
    student logits at the ids are all -inf, has no distribution over S on that side: its
    loss is NaN, as kd_loss's for an all -inf side; the other rows are unaffected. bucket
    stays defined there (p_tail = 1): finite, except reverse KL, +inf (q > 0 where p = 0)."""
    dtype = dtype_for(impl)
    ids, lp = teacher((3,), V, 7, pad=False)
    s = student((3,), V, dtype)
    lp[0] = -math.inf
    s[1, ids[1]] = -math.inf
    out = kd.sparse_kd_loss(s, ids, lp, tail="renormalize", divergence=divergence,
                            impl=impl, reduction="none")
    assert out[:2].isnan().all() and out[2].isfinite(), out
    out = kd.sparse_kd_loss(s[:1], ids[:1], lp[:1], tail="bucket", divergence=divergence,
                            impl=impl, reduction="none")
    assert out == math.inf if divergence == "reverse_kl" else out.isfinite(), out


@pytest.mark.parametrize("tail,divergence", MODES, ids=MODE_IDS)
def test_ignored_row_with_nan_has_zero_gradients(impl, tail, divergence):
    """An ignored row contributes 0 and gets exactly 0 gradients, whatever it holds (as in
    kd_loss): a NaN teacher log-probability or gathered student logit there reaches neither
    the loss nor the gradient of either input."""
    dtype = dtype_for(impl)
    ids, lp = teacher((3,), V, 7, pad=False)
    s = student((3,), V, dtype)
    labels = torch.tensor([1, -100, 2])
    lp[1, 0] = math.nan
    s[1, ids[1, 1]] = math.nan
    s.requires_grad_()
    lp.requires_grad_()
    out = kd.sparse_kd_loss(s, ids, lp, labels, tail=tail, divergence=divergence, impl=impl,
                            ce_weight=0.5)
    out.backward()
    assert out.isfinite()
    assert s.grad.isfinite().all() and lp.grad.isfinite().all()
    assert torch.count_nonzero(s.grad[1]) == 0 and torch.count_nonzero(lp.grad[1]) == 0
    assert torch.count_nonzero(lp.grad[0]) > 0


def _bucket_reverse_kl64(s, ids, lp):
    """Reverse KL over S + tail in float64 with the tail masses summed directly: q_tail over
    the columns not in S, p_tail = 1 - sum_S exp(lp) as -expm1(logsumexp(lp))."""
    lq = torch.log_softmax(s.double(), -1)
    lq_s = lq.gather(1, ids)
    rest = torch.ones_like(lq, dtype=torch.bool).scatter_(1, ids, False)
    lq_tail = torch.where(rest, lq, -math.inf).logsumexp(-1)
    lp = lp.double()
    lp_tail = torch.log(-torch.expm1(lp.logsumexp(-1)))
    return (lq_s.exp() * (lq_s - lp)).sum(-1) + lq_tail.exp() * (lq_tail - lp_tail)


def test_bucket_teacher_tail_from_its_log_probabilities(impl):
    """A teacher that puts all but 1e-20 of its mass on one id: p_tail = 1 - sum_S exp(lp)
    is 1e-20, far below the rounding of a sum of probabilities near 1 (which gives 0 and an
    infinite reverse KL). Formed as -expm1(logsumexp(lp)) it keeps the relative precision of
    the log-probabilities, so the reverse KL is finite and right."""
    dtype = dtype_for(impl)
    ids = torch.tensor([[3, 7, 11], [0, 1, 2]])
    lp = torch.tensor([[-1e-20, -60.0, -61.0], [-1e-12, -40.0, -70.0]], dtype=dtype)
    s = student((2,), V, dtype)
    x = s.clone().requires_grad_()
    out = kd.sparse_kd_loss(x, ids, lp, tail="bucket", divergence="reverse_kl", impl=impl,
                            reduction="none")
    out.sum().backward()
    want = _bucket_reverse_kl64(s, ids, lp)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0.0)
    assert x.grad.isfinite().all()


def _bucket_forward_kl64(s, ids, lp, temperature):
    """Forward KL over S + tail in float64, T^2-scaled, with the student's tail summed over
    the columns not in S (never 1 - sum_S q) and p_tail = -expm1(logsumexp(lp))."""
    lq = torch.log_softmax(s / temperature, -1)
    lq_s = lq.gather(1, ids)
    rest = torch.ones_like(lq, dtype=torch.bool).scatter_(1, ids, False)
    lq_tail = torch.where(rest, lq, -math.inf).logsumexp(-1)
    p_tail = -torch.expm1(lp.logsumexp(-1))
    d = (lp.exp() * (lp - lq_s)).sum(-1) + p_tail * (p_tail.log() - lq_tail)
    return d * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_bucket_student_tail_below_resolution_is_exact(impl, temperature):
    """Students sure of the teacher's ids. Row 0: a gap of 7000 nats to the best column
    outside S, so log q_tail ~ -7000 and the teacher's tail mass 0.4 adds ~ 2800 (1 - sum_S q
    rounds to 0: the loss would read a few hundred, with no gradient through the tail).
    Row 1: q_tail ~ 1e-7, at the float32 rounding of 1 - sum_S q. Row 2: an ordinary row.
    Row 3: an ignored confident row (0, no gradient). Values and gradients against float64
    with the tail summed over its own columns."""
    dtype = dtype_for(impl)
    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, V, generator=g, dtype=torch.float64, device="cpu").to(DEVICE)
    s[0] = 0.0
    s[0, 3] = 7000.0
    s[1, [3, 5]] += 20.0 * temperature
    s[3, [3, 5]] += 7000.0
    ids = torch.tensor([[3, 5, -1], [3, 5, -1], [10, 20, 30], [3, 5, -1]])
    lp = torch.log(torch.tensor([[0.5, 0.1, 1.0], [0.5, 0.1, 1.0], [0.3, 0.2, 0.1],
                                 [0.5, 0.1, 1.0]], dtype=torch.float64))
    labels = torch.tensor([1, 1, 1, -100])
    x = s.to(dtype).requires_grad_()
    out = kd.sparse_kd_loss(x, ids, lp.to(dtype), labels, tail="bucket", impl=impl,
                            temperature=temperature, reduction="none")
    out.sum().backward()
    s64 = x.detach().double().requires_grad_()
    want = torch.stack([_bucket_forward_kl64(s64[i:i + 1], ids[i:i + 1, :k], lp[i:i + 1, :k],
                                             temperature)[0]
                        for i, k in enumerate((2, 2, 3))] + [s64.sum() * 0.0])
    want.sum().backward()
    # row 1 in float64 takes 1 - sum_S q: its error, a few eps64 / q_tail ~ 1e-9 relative
    # to the tail, reaches the loss times p_tail
    rtol = 1e-8 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), want.detach(), rtol=rtol, atol=rtol)
    # gradients: float32 to the rounding of log-probabilities of |log q| up to 7000 / T;
    # float64's row 1 carries that 1e-9 relative error of q_tail into d log q_tail / ds
    atol = 1e-9 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(x.grad.double(), s64.grad, rtol=10 * rtol, atol=atol)
    assert (x.grad[3] == 0).all()
    # the tail's own columns carry its gradient: -p_tail T (qt - q), qt uniform on row 0
    assert x.grad[0, 0] < -0.4 * temperature / (V - 2) * 0.99


def test_bucket_student_without_tail_logits_keeps_the_floor(impl):
    """A student that is -inf on every column outside S has no tail to sum: the row keeps
    1 - sum_S q, clamped at eps of the statistics' dtype, so its loss lies between the
    formula's with q_tail = TAIL_RESOLUTION eps and with q_tail = eps (the teacher's tail mass
    is 0.4), finite, with finite gradients and none outside S. Next to it a confident row
    that does take its tail's own log-sum."""
    dtype = dtype_for(impl)
    temperature = 2.0
    s = torch.full((2, V), -math.inf, dtype=torch.float64, device=DEVICE)
    s[:, [3, 5]] = torch.tensor([1.0, -0.5], dtype=torch.float64)
    s[1, 0] = -1000.0  # row 1: one tail logit, 1000 nats below S
    ids = torch.tensor([[3, 5], [3, 5]])
    lp = torch.log(torch.tensor([[0.5, 0.1], [0.5, 0.1]], dtype=torch.float64))
    x = s.to(dtype, copy=True).requires_grad_()
    out = kd.sparse_kd_loss(x, ids, lp.to(dtype), tail="bucket", impl=impl,
                            temperature=temperature, reduction="none")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all(), (out, x.grad)
    assert (x.grad[0, 6:] == 0).all() and x.grad[0, 0] == 0

    lq_s = torch.log_softmax(s[0, [3, 5]] / temperature, -1)
    p_tail = 0.4

    def row0(lq_tail):
        d = (lp[0].exp() * (lp[0] - lq_s)).sum() + p_tail * (math.log(p_tail) - lq_tail)
        return float(d) * temperature**2

    eps = torch.finfo(acc_dtype(dtype)).eps
    lo, hi = row0(math.log(sparse.TAIL_RESOLUTION * eps)), row0(math.log(eps))
    got = float(out[0].detach())
    assert lo * (1 - 1e-5) <= got <= hi * (1 + 1e-5), (lo, got, hi)
    s64 = s[1:].clone()
    want = _bucket_forward_kl64(s64, ids[1:], lp[1:], temperature)[0]
    torch.testing.assert_close(out[1].double(), want, rtol=1e-5, atol=1e-5)


def test_module_reads_the_function_options():
    ids, lp = teacher(LEAD, V, 7)
    s = student(LEAD, V)
    m = kd.SparseKDLoss(tail="bucket", divergence="jsd", temperature=2.0, impl="torch")
    assert "tail='bucket'" in repr(m)
    torch.testing.assert_close(m(s, ids, lp), kd.sparse_kd_loss(
        s, ids, lp, tail="bucket", divergence="jsd", temperature=2.0, impl="torch"))
    with pytest.raises(TypeError, match="unknown arguments.*'tails'"):
        kd.SparseKDLoss(tails="bucket")


# --------------------------------------------------------------------------------------
# topk_logprobs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_logprobs(temperature):
    t = student((3, 4), 301, torch.float32, seed=5) * 3
    ids, lp = kd.topk_logprobs(t, 9, temperature)
    full = torch.log_softmax(t.double() / temperature, -1)
    want_lp, want_ids = full.topk(9, -1)
    assert ids.shape == lp.shape == (3, 4, 9) and ids.dtype == torch.int64
    assert lp.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=2e-6)
    assert (lp <= 0).all()
    with pytest.raises(ValueError, match="k must be in"):
        kd.topk_logprobs(t, 302)
    with pytest.raises(ValueError, match="temperature"):
        kd.topk_logprobs(t, 3, 0.0)


# --------------------------------------------------------------------------------------
# bad input: a clear error naming the argument
# --------------------------------------------------------------------------------------


def _args(device=DEVICE):
    ids, lp = teacher(LEAD, V, 7, device=device)
    return student(LEAD, V, device=device), ids, lp


@pytest.mark.parametrize("mutate,kwargs,exc,pattern", [
    (lambda s, i, lp: (s, i.float(), lp), {}, TypeError, "teacher_ids must be an integer"),
    (lambda s, i, lp: (s, i, lp.long()), {}, TypeError, "teacher_logprobs must be a float"),
    (lambda s, i, lp: (s, i[..., :3], lp), {}, ValueError, "teacher_logprobs must have"),
    (lambda s, i, lp: (s, i[:1], lp[:1]), {}, ValueError, r"teacher_ids must have shape"),
    (lambda s, i, lp: (s, i.index_fill(-1, torch.tensor([0]), V), lp), {}, ValueError,
     rf"teacher_ids must be < {V} \(the vocabulary width {V}"),
    (lambda s, i, lp: (s, i.index_fill(-1, torch.tensor([0]), -2), lp), {}, ValueError,
     "teacher_ids must be in"),
    (lambda s, i, lp: (s, torch.cat([i[..., :1], i[..., :1]], -1), lp[..., :2]), {},
     ValueError, "teacher_ids must not repeat an id within a row: row 0"),
    (lambda s, i, lp: (s, i, lp.index_fill(-1, torch.tensor([0]), 0.5)), {}, ValueError,
     "teacher_logprobs must be log-probabilities"),
    (lambda s, i, lp: (s, i[..., :0], lp[..., :0]), {}, ValueError, "K=0"),
    (None, dict(tail="bucket", teacher_temperature=2.0), ValueError,
     "teacher_temperature=2.0 needs tail='renormalize'"),
    (None, dict(tail="none", teacher_temperature=0.5), ValueError, "teacher_temperature"),
    (None, dict(tail="none", divergence="jsd"), ValueError, "tail='none' supports"),
    (None, dict(tail="top"), ValueError, "tail must be one of"),
    (None, dict(divergence="skew_forward_kl"), ValueError, "divergence must be one of"),
    (None, dict(ce_weight=0.5), ValueError, "needs labels"),
    (None, dict(temperature=0.0), ValueError, "temperature"),
    (None, dict(beta=1.5), ValueError, "beta"),
    (None, dict(reduction="avg"), ValueError, "reduction"),
    (None, dict(vocab_size=V + 1), ValueError, "vocab_size must be in"),
    (None, dict(impl="cuda"), ValueError, "impl must be one of"),
], ids=["float-ids", "int-logprobs", "K-mismatch", "rows-mismatch", "id-too-large",
        "id-negative", "duplicate", "logprob-positive", "K0", "bucket-Tt", "none-Tt",
        "none-jsd", "unknown-tail", "unknown-divergence", "ce-no-labels", "temperature",
        "beta", "reduction", "vocab-size", "impl"])
def test_bad_input(mutate, kwargs, exc, pattern):
    # CPU tensors: the value checks (ids, log-probabilities) raise on the host only there
    # (on CUDA they are device-side asserts, kdkernels/sparse.py _host_checks)
    with torch.device("cpu"):
        s, ids, lp = _args("cpu")
        if mutate is not None:
            s, ids, lp = mutate(s, ids, lp)
        with pytest.raises(exc, match=pattern):
            kd.sparse_kd_loss(s, ids, lp, **{"impl": "torch", **kwargs})


def test_logprob_rounding_above_zero_is_accepted():
    s, ids, lp = _args()
    lp = lp.clone()
    lp[0, 0, 0] = 1e-6  # a top log-probability of 0 that rounded up
    assert kd.sparse_kd_loss(s, ids, lp, impl="torch").isfinite()


# --------------------------------------------------------------------------------------
# vocab-parallel: 2 gloo ranks against the unsharded loss
# --------------------------------------------------------------------------------------

WIDTHS = (43, 37)  # V = 80, uneven


def _sharded_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    fails = []
    try:
        lo = sum(WIDTHS[:rank])
        # the ranks run on the CPU (gloo)
        labels = make_labels(LEAD, V, device="cpu")
        cases = [dict(tail=t, divergence=d, ce_weight=c, temperature=2.0, reduction=r)
                 for (t, d), c, r in ((MODES[0], 0.0, "none"), (MODES[2], 0.5, "sum"),
                                      (MODES[3], 0.5, "token_mean"), (MODES[5], 0.0, "mean"),
                                      (MODES[6], 0.3, "batchmean"))]
        for k in (7, V):
            ids, lp = teacher(LEAD, V, k, device="cpu")
            full = student(LEAD, V, device="cpu")
            # row 1's student sure of the teacher's ids (q_tail ~ e^-100): the bucket
            # tail's own log-sum, merged over the ranks
            row = ids.reshape(-1, k)[1]
            full.reshape(-1, V)[1, row[row >= 0]] += 200.0
            for kw in cases:
                lpa = lp.clone().requires_grad_()
                a = full[..., lo:lo + WIDTHS[rank]].clone().requires_grad_()
                out = kd.sparse_kd_loss(a, ids, lpa, labels, impl="torch",
                                        process_group=dist.group.WORLD, **kw)
                g = upstream_grad(out) if out.dim() else torch.tensor(0.7, dtype=out.dtype)
                torch.manual_seed(k)
                g = torch.randn_like(out) if out.dim() else g
                out.backward(g)
                lpb = lp.clone().requires_grad_()
                b = full.clone().requires_grad_()
                ref = kd.sparse_kd_loss(b, ids, lpb, labels, impl="torch", **kw)
                ref.backward(g)
                for what, x, y in (("loss", out, ref), ("student grad", a.grad,
                                   b.grad[..., lo:lo + WIDTHS[rank]]),
                                   ("teacher grad", lpa.grad, lpb.grad)):
                    if not torch.allclose(x, y, rtol=1e-10, atol=1e-12):
                        fails.append(f"K={k} {kw} {what}: {(x - y).abs().max():.3g}")
        # a bad id makes every rank raise the same error (ids are the same on every rank)
        ids, lp = teacher(LEAD, V, 7, device="cpu")
        ids[0, 0, 0] = V
        try:
            kd.sparse_kd_loss(student(LEAD, WIDTHS[rank], device="cpu"), ids, lp,
                              process_group=dist.group.WORLD)
            fails.append("an id >= V passed")
        except ValueError as e:
            if "process_group" not in str(e):
                fails.append(f"unclear error: {e}")
    except Exception:
        fails.append(traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(fails))
        dist.destroy_process_group()


def test_process_group_two_ranks():
    """Each rank holds a column shard of the student; teacher ids, log-probabilities and
    labels are global. Loss, the rank's student gradient and the teacher gradient equal the
    unsharded loss's (float64, to 1e-10), for every tail mode, K < V and K = V, with a row
    whose bucket tail is below the statistics' resolution."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.spawn(_sharded_worker, args=(2, os.path.join(d, "init"), d), nprocs=2,
                       join=False)
        ctx.join(timeout=300)
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for r in range(2):
            path = os.path.join(d, f"rank{r}.txt")
            assert os.path.exists(path), f"rank {r} did not finish"
            text = open(path).read()
            assert text == "", f"rank {r}:\n{text}"


# --------------------------------------------------------------------------------------
# the backend contract: sparse_partial / sparse_grads over column ranges
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("inv_ts", [1.0, 0.5])
def test_backend_kernels_over_column_ranges(impl, inv_ts):
    """sparse_partial of two column ranges (row-strided views of one wider tensor), merged,
    equals the whole row's statistics; sparse_grads of the two ranges side by side equal
    the whole row's gradient, which is the contract's formula
        c_q q + c_1 (q1 - onehot(label)) + sum_k [id_k = j] w_k      (float64 truth)."""
    from kdkernels import _stats
    from kdkernels._spec import Divergence, LossSpec
    from kdkernels._stats import Col

    backend = _dispatch._BACKENDS[impl]
    n, v, split = 6, 50, 21
    # drawn on the CPU (the same values on every machine), moved to the test device
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(n, v + 5, generator=g, dtype=torch.float64, device="cpu") * 3
    s = wide.to(DEVICE, dtype_for(impl))[:, :v]  # row stride v + 5
    labels = torch.randint(0, v, (n,), generator=g, device="cpu").to(DEVICE)
    labels[2] = -100
    spec = LossSpec(Divergence("forward_kl"), inv_ts=inv_ts, inv_tt=1.0, kd_scale=1.0,
                    ce_weight=0.5)
    whole = backend.sparse_partial(s, labels, spec, 0)
    parts = [backend.sparse_partial(s[:, :split], labels, spec, 0),
             backend.sparse_partial(s[:, split:], labels, spec, split)]
    merged = _stats.merge(parts[0], parts[1], spec)
    cols = [Col.MS, Col.LS, Col.M1, Col.L1, Col.LABEL]
    keep = labels != -100  # an ignored row's statistics are not read
    torch.testing.assert_close(merged[keep][:, cols], whole[keep][:, cols])

    ids = torch.stack([torch.randperm(v, generator=g, device="cpu")[:7] for _ in range(n)])
    ids = ids.to(DEVICE)
    ids[1, 3:] = -1
    dt = whole.dtype
    coef = torch.randn(n, 2, generator=g, dtype=torch.float64, device="cpu").to(DEVICE, dt)
    w = torch.randn(n, 7, generator=g, dtype=torch.float64, device="cpu").to(DEVICE, dt)
    coef[~keep] = 0.0
    w[~keep] = 0.0
    gs = backend.sparse_grads(s, labels, spec, whole, coef, ids, w, 0)
    halves = torch.cat([backend.sparse_grads(s[:, :split], labels, spec, whole, coef, ids, w, 0),
                        backend.sparse_grads(s[:, split:], labels, spec, whole, coef, ids, w,
                                             split)], 1)
    assert gs.shape == (n, v) and gs.dtype == s.dtype and gs.is_contiguous()
    torch.testing.assert_close(halves, gs)
    x = s.double()
    q = torch.softmax(x * inv_ts, -1)
    q1 = torch.softmax(x, -1)
    onehot = torch.zeros(n, v, dtype=torch.float64)
    onehot[keep, labels[keep]] = 1.0
    want = coef[:, :1].double() * q + coef[:, 1:].double() * (q1 - onehot)
    want.scatter_add_(1, ids.clamp(min=0), torch.where(ids >= 0, w.double(), 0.0))
    tol = 1e-12 if s.dtype == torch.float64 else 2e-6
    torch.testing.assert_close(gs.double(), want, rtol=tol, atol=tol)
