"""Autograd edge cases of kd_loss for every impl: ignored rows with non-finite logits get a
gradient of exactly 0, double backward raises a clear error instead of a silently wrong
(or zero) Hessian-vector product, and a second backward after inplace_backward=True raises
a clear error."""

import math

import pytest
import torch

import kdkernels as kd

pytestmark = pytest.mark.usefixtures("tensors_on_device")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ignored_rows_get_zero_gradient(impl, divergence, inplace):
    """A row whose label is ignore_index contributes nothing, so its gradient is 0 even
    when its logits hold nan, +inf and -inf (0 * nan would leak nan)."""
    s, t = torch.randn(3, 9), torch.randn(3, 9)
    s[1, 2], s[1, 4], t[1, 3], t[1, 5] = math.nan, -math.inf, math.inf, math.nan
    labels = torch.tensor([1, -100, 2])
    ss = s.clone().requires_grad_()
    tt = t.clone().requires_grad_()
    x = ss * 1.0 if inplace else ss  # inplace_backward overwrites its input: a copy
    loss = kd.kd_loss(x, tt, labels, divergence=divergence, ce_weight=0.3, impl=impl,
                      reduction="sum", inplace_backward=inplace)
    assert torch.isfinite(loss)
    loss.backward()
    assert (ss.grad[1] == 0).all(), ss.grad[1]
    assert (tt.grad[1] == 0).all(), tt.grad[1]
    assert torch.isfinite(ss.grad).all() and torch.isfinite(tt.grad).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_double_backward_raises(impl, divergence):
    s = torch.randn(3, 9, requires_grad=True)
    t = torch.randn(3, 9, requires_grad=True)
    loss = kd.kd_loss(s, t, divergence=divergence, impl=impl)
    with pytest.raises(RuntimeError, match="first derivatives only|double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_second_backward_after_inplace_raises(impl):
    s = torch.randn(3, 9, requires_grad=True)
    t = torch.randn(3, 9)
    loss = kd.kd_loss(s * 1.0, t, impl=impl, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward|modified by an inplace"):
        loss.backward()


def test_forward_mode_ad_raises(impl):
    """No forward-mode rules: a dual tensor is a clear error for every impl, never a
    silently dropped (None) tangent."""
    import torch.autograd.forward_ad as fwAD

    s, t = torch.randn(3, 9), torch.randn(3, 9)
    calls = (
        lambda x: kd.kd_loss(x, t, impl=impl),
        lambda x: kd.kl_div(x.log_softmax(-1), t.softmax(-1), impl=impl),
        lambda x: kd.softmax(x, impl=impl),
    )
    for call in calls:
        with fwAD.dual_level():
            dual = fwAD.make_dual(s, torch.randn_like(s))
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                call(dual)
