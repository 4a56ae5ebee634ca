"""Student and teacher of different vocabulary widths (padded embedding rows): a clear error
naming both widths and the fix, and `vocab_size=` using the first columns of both, for every
implementation. The truth is the float64 formula of tests/_formulas.py on the explicitly
sliced logits, differentiated through the slice (zero gradient in the dropped columns)."""

from __future__ import annotations

import pytest
import torch
from _formulas import assert_error_model, upstream_grad
from _formulas import kd_loss as formula_kd_loss

import kdkernels as kd


def _pair(vs: int, vt: int, lead=(3, 5), dtype=torch.float32):
    s = (torch.randn(*lead, vs, dtype=torch.float64) * 2).to(dtype)
    t = (torch.randn(*lead, vt, dtype=torch.float64) * 2).to(dtype)
    return s, t


@pytest.mark.parametrize("vs, vt", [(301, 317), (317, 301), (300, 300)])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(divergence="forward_kl", temperature=2.0),
        dict(divergence="jsd", beta=0.3, ce_weight=0.5, reduction="sum"),
        dict(divergence="reverse_kl", reduction="mean"),
    ],
    ids=["forward_kl", "jsd+ce", "reverse_kl-mean"],
)
def test_vocab_size_uses_the_first_columns(impl, vs, vt, kwargs):
    v = 300
    s, t = _pair(vs, vt)
    labels = torch.randint(0, v, (3, 5))
    labels[0, 1] = -100
    s = s.requires_grad_()
    t = t.requires_grad_()
    out = kd.kd_loss(s, t, labels, vocab_size=v, impl=impl, **kwargs)
    g = upstream_grad(out)
    out.backward(g)

    results = {}
    for name, dt in (("truth", torch.float64), ("baseline", torch.float32)):
        s_, t_ = (x.detach().to(dt).requires_grad_() for x in (s, t))
        ref = formula_kd_loss(s_[..., :v], t_[..., :v], labels, **kwargs)
        ref.backward(g.to(ref.dtype))
        results[name] = (ref, s_.grad, t_.grad)
    (ref, gs, gt), (base, bgs, bgt) = results["truth"], results["baseline"]
    assert_error_model(out, ref, base, torch.float32, "loss")
    assert s.grad.shape == s.shape and t.grad.shape == t.shape
    assert_error_model(s.grad, gs, bgs, torch.float32, "student gradient")
    assert_error_model(t.grad, gt, bgt, torch.float32, "teacher gradient")
    # the padded columns take no part: exactly zero gradient there
    assert not s.grad[..., v:].any() and not t.grad[..., v:].any()


@pytest.mark.parametrize("vs, vt", [(151936, 152064), (152064, 151936)])
def test_mismatch_names_both_widths_and_the_fix(impl, vs, vt):
    s, t = torch.zeros(2, vs), torch.zeros(2, vt)
    with pytest.raises(ValueError) as e:
        kd.kd_loss(s, t, impl=impl)
    msg = str(e.value)
    assert str(vs) in msg and str(vt) in msg and "vocab_size=151936" in msg, msg


def test_mismatch_with_vocab_size_matches_the_sliced_call(impl):
    # the real padded-vocabulary widths, a few rows
    s, t = _pair(151936, 152064, lead=(2,))
    got = kd.kd_loss(s, t, vocab_size=151936, impl=impl, divergence="jsd")
    want = kd.kd_loss(s, t[:, :151936].contiguous(), impl="torch", divergence="jsd")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_labels_must_lie_below_vocab_size(impl):
    s, t = _pair(40, 48)
    labels = torch.zeros(3, 5, dtype=torch.int64)
    labels[1, 2] = 40  # a valid column of both tensors, but not of the first 40
    with pytest.raises(ValueError, match=r"labels must be in \[0, 40\)"):
        kd.kd_loss(s, t, labels, vocab_size=40, ce_weight=1.0, impl=impl)


@pytest.mark.parametrize("vocab_size", [49, 41, 0, -1])
def test_vocab_size_out_of_range(impl, vocab_size):
    s, t = _pair(40, 48)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 40\].*40.*48"):
        kd.kd_loss(s, t, vocab_size=vocab_size, impl=impl)


@pytest.mark.parametrize("vocab_size", [3.0, True, "40"])
def test_vocab_size_type(impl, vocab_size):
    s, t = _pair(40, 40)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        kd.kd_loss(s, t, vocab_size=vocab_size, impl=impl)


def test_other_shape_mismatch_is_still_a_shape_error(impl):
    s, t = torch.zeros(3, 40), torch.zeros(4, 48)
    with pytest.raises(ValueError, match="same shape"):
        kd.kd_loss(s, t, impl=impl)
    with pytest.raises(ValueError, match="same shape"):
        kd.kd_loss(s, t, vocab_size=40, impl=impl)


def test_inplace_backward_needs_the_full_student_width(impl):
    s, t = _pair(40, 48)
    with pytest.raises(ValueError, match="inplace_backward=True needs vocab_size"):
        kd.kd_loss(s, t, vocab_size=39, inplace_backward=True, impl=impl)
    # the student's full width: its buffer can receive the gradient (the teacher is sliced)
    s_ref = s.clone().requires_grad_()
    kd.kd_loss(s_ref, t[..., :40].contiguous(), impl=impl).backward()
    s_leaf = s.clone().requires_grad_()
    s_in = s_leaf * 1.0  # a non-leaf buffer the gradient may overwrite
    kd.kd_loss(s_in, t, vocab_size=40, inplace_backward=True, impl=impl).backward()
    torch.testing.assert_close(s_leaf.grad, s_ref.grad)
