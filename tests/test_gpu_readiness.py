"""What a new GPU machine must get right beyond the kernels' own tests (skipped without CUDA):
mixed student/teacher dtypes, bitwise-reproducible kl_div sums, tensors on a device that is
not the current one, odd vocabularies and misaligned rows, and the self-check itself.

Values and gradients are held to the error model of tests/_formulas.py: the truth is the
float64 formula, the baseline plain PyTorch on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _formulas import assert_error_model, kd_loss

import kdkernels as kd
from kdkernels import selfcheck

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
KW = dict(beta=0.3, skew=0.1, temperature=2.0, ce_weight=0.5, reduction="none")


def _logits(n, v, seed, dtype=torch.float32, scale=2.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(n, v, device=DEVICE, generator=g) * scale).to(dtype)


def _labels(n, v, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    labels = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    labels[::5] = -100
    return labels


def _exp_allowance(impl, s, t):
    """The self-check's named allowance for a kernel's approximate exp on kd_loss values
    (kdkernels/selfcheck.py APPROX_EXP: Triton's tl.exp is ex2.approx on CUDA); not for
    gradients, whose entries are too small for it to matter."""
    gain = selfcheck.exp_error_gain(s, t, temperature=KW["temperature"],
                                    teacher_temperature=KW["temperature"],
                                    ce_weight=KW["ce_weight"])
    return selfcheck.APPROX_EXP.get((impl, "cuda"), 0.0) * gain


def _formula_grads(s, t, labels, g, dtype, **kw):
    """kd_loss of tests/_formulas.py on copies of s, t in `dtype`: (loss, d/ds, d/dt)."""
    s_, t_ = (x.detach().to(dtype).requires_grad_() for x in (s, t))
    out = kd_loss(s_, t_, labels, **kw)
    out.backward(g.to(dtype))
    return out.detach(), s_.grad, t_.grad


# --------------------------------------------------------------------------------------
# bfloat16 student, float32 teacher
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("impl", ["ext", "triton"])
def test_mixed_dtypes_teacher_keeps_float32(impl, divergence):
    # The loss is float32 math on the exact input values, and the teacher's gradient is a
    # float32 tensor: both must be as accurate as float32 PyTorch on the same inputs. A
    # kernel that first rounds the teacher to bfloat16 (2**-9 relative per logit) fails the
    # teacher gradient's check (measured on CPU: off by 4.7e-6 against a bound of 2e-6; the
    # loss, off by 4e-5, against 2.4e-5 plus Triton's exp allowance).
    n, v = 64, 128256
    s = _logits(n, v, 0, torch.bfloat16).requires_grad_()
    t = _logits(n, v, 1, torch.float32).requires_grad_()
    labels = _labels(n, v, 2)
    kw = dict(KW, divergence=divergence)
    out = kd.kd_loss(s, t, labels, impl=impl, **kw)
    g = torch.randn(n, device=DEVICE)
    out.backward(g)
    assert out.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    assert t.grad.dtype == torch.float32

    truth = _formula_grads(s, t, labels, g, torch.float64, **kw)
    base = _formula_grads(s, t, labels, g, torch.float32, **kw)
    assert_error_model(out, truth[0], base[0], torch.float32, "loss", _exp_allowance(impl, s, t))
    assert_error_model(t.grad, truth[2], base[2], torch.float32, "teacher gradient")
    # the student's gradient is stored in bfloat16: float32 math rounded once
    assert_error_model(s.grad, truth[1], base[1].bfloat16(), torch.bfloat16,
                       "student gradient")


# --------------------------------------------------------------------------------------
# kl_div sums: no float atomics, so two runs agree to the bit
# --------------------------------------------------------------------------------------


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", "triton", "ext"])
def test_kl_div_sums_are_deterministic(impl, dtype):
    rows, cols = 1 << 12, 1 << 12  # 2**24 terms
    x = _logits(rows, cols, 3, scale=1.0).log_softmax(-1).to(dtype)
    y = _logits(rows, cols, 4, scale=1.0).softmax(-1).to(dtype)

    def run(reduction, copy):
        a = (x.clone() if copy else x.detach()).requires_grad_()
        b = (y.clone() if copy else y.detach()).requires_grad_()
        out = kd.kl_div(a, b, reduction=reduction, impl=impl)
        out.backward(torch.tensor(0.7, device=DEVICE, dtype=out.dtype))
        return out, a.grad, b.grad

    for reduction in ("sum", "mean", "batchmean"):
        first = run(reduction, False)
        # the same buffers again, then copies in new buffers: equal to the bit (bytes are
        # compared, so that -0.0 against 0.0 or two nan payloads would count)
        for other in (run(reduction, False), run(reduction, True)):
            for u, w in zip(first, other, strict=True):
                assert torch.equal(_bits(u), _bits(w)), (impl, reduction, dtype)


# --------------------------------------------------------------------------------------
# tensors on a device that is not the current one
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("impl", ["torch", "triton", "ext"])
def test_second_device(impl):
    # A kernel launched on the current device (cuda:0) with pointers to cuda:1 reads the
    # wrong memory or faults: every launch must follow its tensors' device.
    other = torch.device("cuda", 1)
    n, v = 48, 50257
    torch.cuda.set_device(0)
    try:
        g = torch.Generator(device=other).manual_seed(5)
        s = (torch.randn(n, v, device=other, generator=g) * 2).requires_grad_()
        t = (torch.randn(n, v, device=other, generator=g) * 2).requires_grad_()
        labels = torch.randint(0, v, (n,), device=other, generator=g)
        for divergence in ("forward_kl", "jsd"):
            kw = dict(KW, divergence=divergence)
            out = kd.kd_loss(s, t, labels, impl=impl, **kw)
            up = torch.randn(n, device=other, generator=g)
            gs, gt = torch.autograd.grad(out, (s, t), up)
            assert out.device == gs.device == gt.device == other
            truth = _formula_grads(s, t, labels, up, torch.float64, **kw)
            base = _formula_grads(s, t, labels, up, torch.float32, **kw)
            assert_error_model(out, truth[0], base[0], torch.float32, "loss",
                               _exp_allowance(impl, s, t))
            for what, got, want, b in zip(("student gradient", "teacher gradient"),
                                          (gs, gt), truth[1:], base[1:], strict=True):
                assert_error_model(got, want, b, torch.float32, what)

        x = s.detach().log_softmax(-1)
        y = t.detach().softmax(-1)
        for reduction in ("none", "sum"):
            got = kd.kl_div(x, y, reduction=reduction, impl=impl)
            torch.testing.assert_close(got, F.kl_div(x, y, reduction=reduction),
                                       rtol=1e-5, atol=1e-6)
        for log in (False, True):
            fn, ref = (kd.log_softmax, F.log_softmax) if log else (kd.softmax, F.softmax)
            torch.testing.assert_close(fn(s.detach(), 2.0, impl=impl),
                                       ref(s.detach() / 2.0, -1), rtol=1e-5, atol=1e-6)
        torch.cuda.synchronize(other)
        assert torch.cuda.current_device() == 0
    finally:
        torch.cuda.set_device(0)


# --------------------------------------------------------------------------------------
# the extension on odd vocabularies and rows that are not 16-byte aligned
# --------------------------------------------------------------------------------------


def _misaligned(n, v, offset, seed, dtype):
    """(n, v) contiguous logits starting `offset` elements into a fresh buffer, so that the
    first row is not 16-byte aligned (odd v makes every other row start misaligned too)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    buf = (torch.randn(n * v + offset, device=DEVICE, generator=g) * 2).to(dtype)
    x = buf[offset:].view(n, v)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [50257, 32001, 32000])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_ext_odd_vocab_and_misaligned_rows(divergence, v, dtype):
    n = 24
    s = _misaligned(n, v, 1, 6, dtype).requires_grad_()
    t = _misaligned(n, v, 3, 7, dtype).requires_grad_()
    labels = _labels(n, v, 8)
    kw = dict(KW, divergence=divergence)
    out = kd.kd_loss(s, t, labels, impl="ext", **kw)
    up = torch.randn(n, device=DEVICE)
    out.backward(up)
    truth = _formula_grads(s, t, labels, up, torch.float64, **kw)
    base = _formula_grads(s, t, labels, up, dtype, **kw)
    for what, got, want, b in zip(("loss", "student gradient", "teacher gradient"),
                                  (out, s.grad, t.grad), truth, base, strict=True):
        assert_error_model(got, want, b, dtype, what)

    # the in-place gradient is written into the misaligned student buffer itself
    s2 = _misaligned(n, v, 1, 6, dtype).requires_grad_()
    ptr = s2.data_ptr()
    loss = kd.kd_loss(s2, t.detach(), labels, impl="ext", inplace_backward=True,
                      **dict(kw, reduction="sum"))
    loss.backward(torch.tensor(0.7, device=DEVICE))
    assert s2.grad.data_ptr() == ptr
    assert_error_model(s2.grad, _sum_grad(s, t, labels, torch.float64, kw),
                       _sum_grad(s, t, labels, dtype, kw), dtype, "in-place student gradient")

    # softmax and kl_div read misaligned rows too
    x = _misaligned(n, v, 5, 9, dtype)
    assert_error_model(kd.softmax(x, 2.0, impl="ext"), F.softmax(x.double() / 2.0, -1),
                       F.softmax(x / 2.0, -1), dtype, "softmax")
    a = x.float().log_softmax(-1).to(dtype).reshape(-1)[1:]  # misaligned 1-D views
    b = s.detach().float().softmax(-1).to(dtype).reshape(-1)[1:]
    for reduction in ("none", "sum"):
        assert_error_model(kd.kl_div(a, b, reduction=reduction, impl="ext"),
                           F.kl_div(a.double(), b.double(), reduction=reduction),
                           F.kl_div(a, b, reduction=reduction), dtype, f"kl_div {reduction}")


def _sum_grad(s, t, labels, dtype, kw):
    """d/ds of 0.7 * the sum of the formula's row losses, computed in `dtype`."""
    s_ = s.detach().to(dtype).requires_grad_()
    out = kd_loss(s_, t.detach().to(dtype), labels, **dict(kw, reduction="sum"))
    out.backward(torch.tensor(0.7, device=DEVICE, dtype=dtype))
    return s_.grad


# --------------------------------------------------------------------------------------
# the self-check
# --------------------------------------------------------------------------------------


def test_selfcheck_on_cuda(capsys):
    code = selfcheck.main(["--device", "cuda"])
    out = capsys.readouterr().out
    assert code == 0, out
    # on a GPU every impl runs, in every dtype: nothing unavailable, nothing skipped
    table = out.split("status  impl", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert table and all(line.startswith("pass ") for line in table), out
    assert " 0 failed" in out
