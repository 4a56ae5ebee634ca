"""kd.KDLoss and kd.KLDivLoss, the nn.Module forms: the same values and gradients as the
functions, and KLDivLoss as a drop-in for torch.nn.KLDivLoss."""

import warnings

import pytest
import torch
from _formulas import assert_error_model, upstream_grad

import kdkernels as kd

# tensors the tests create land on the device of the `device` fixture
pytestmark = pytest.mark.usefixtures("tensors_on_device")


def _grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    torch.manual_seed(1)
    out.backward(upstream_grad(out))
    return out.detach(), [x.grad for x in inputs]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"divergence": "reverse_kl", "temperature": 2.0, "reduction": "sum"},
     {"divergence": "jsd", "beta": 0.3, "ce_weight": 0.5, "reduction": "none"},
     {"divergence": "skew_forward_kl", "skew": 0.2, "teacher_temperature": 3.0,
      "temperature_scale": False, "kd_weight": 0.5, "reduction": "batchmean"}],
    ids=["defaults", "reverse", "jsd-ce", "skew"],
)
def test_kdloss_is_kd_loss(impl, kwargs):
    s, t = torch.randn(2, 3, 50), torch.randn(2, 3, 50)
    labels = torch.tensor([[1, -100, 3], [49, 0, -100]])
    module = kd.KDLoss(impl=impl, **kwargs)
    got = _grads(lambda s, t: module(s, t, labels), s, t)
    want = _grads(lambda s, t: kd.kd_loss(s, t, labels, impl=impl, **kwargs), s, t)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1], strict=True):
        assert torch.equal(a, b)


def test_kdloss_module_basics():
    module = kd.KDLoss(divergence="jsd", temperature=2.0)
    assert isinstance(module, torch.nn.Module)
    assert list(module.parameters()) == [] and module.state_dict() == {}
    assert "divergence='jsd'" in repr(module) and "temperature=2.0" in repr(module)


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logprob"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_kldivloss_matches_torch(impl, reduction, log_target):
    x = torch.log_softmax(torch.randn(4, 30), -1)
    y = torch.rand(4, 30) * 0.9 + 0.05
    if log_target:
        y = y.log()
    ours = kd.KLDivLoss(reduction=reduction, log_target=log_target, impl=impl)
    theirs = torch.nn.KLDivLoss(reduction=reduction, log_target=log_target)
    assert isinstance(ours, torch.nn.KLDivLoss)
    out, (gx, gy) = _grads(ours, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warning about 'mean'
        ref, (rx, ry) = _grads(theirs, x.double(), y.double())
        base, (bx, by) = _grads(theirs, x, y)
    assert out.dtype == base.dtype
    assert_error_model(out, ref, base, torch.float32, "KLDivLoss")
    assert_error_model(gx, rx, bx, torch.float32, "KLDivLoss input gradient")
    assert_error_model(gy, ry, by, torch.float32, "KLDivLoss target gradient")
    # and the module is the function
    assert torch.equal(out, kd.kl_div(x, y, reduction=reduction, log_target=log_target,
                                      impl=impl))


@pytest.mark.filterwarnings("ignore:size_average and reduce args")
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_kldivloss_legacy_arguments(impl):
    x = torch.log_softmax(torch.randn(4, 30), -1)
    y = torch.rand(4, 30)
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        ours = kd.KLDivLoss(size_average, reduce, impl=impl)
        theirs = torch.nn.KLDivLoss(size_average, reduce)
        assert ours.reduction == theirs.reduction
        assert_error_model(ours(x, y), theirs(x.double(), y.double()), theirs(x, y),
                           torch.float32, f"legacy size_average={size_average}")
