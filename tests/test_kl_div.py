"""kd.kl_div against torch.nn.functional.kl_div: values, gradients of both arguments, shapes,
reductions, log_target, legacy arguments, broadcasting and mixed dtypes.

Truth: F.kl_div in float64 on the same (already rounded) inputs; baseline: F.kl_div at the
inputs' own dtypes. The error model is _formulas.assert_error_model.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from _device import float64_device
from _formulas import assert_error_model, skip_unsupported, upstream_grad

import kdkernels as kd

# tensors the tests create land on the device of the `device` fixture
pytestmark = pytest.mark.usefixtures("tensors_on_device")


REDUCTIONS = ("none", "sum", "mean", "batchmean")
SHAPES = [(), (7,), (3, 11), (2, 3, 5), (2, 2, 3, 4)]


def make_pair(shape, log_target, dtype=torch.float32, target_dtype=None):
    """input: log-probabilities; target: probabilities bounded away from 0 (or their logs)."""
    x = torch.log_softmax(torch.randn(shape or (1,)) * 2, -1).reshape(shape)
    y = torch.rand(shape) * 0.9 + 0.05
    if log_target:
        y = y.log()
    return x.to(dtype), y.to(target_dtype or dtype)


def check_kl_div(impl, x, y, *, grad_target=True, **kwargs):
    """kd.kl_div(x, y, **kwargs) vs F.kl_div: value, dtype and both gradients."""
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_(grad_target)
    out = kd.kl_div(x, y, impl=impl, **kwargs)
    results = {}
    for name, cast in (("truth", lambda a: a.double()), ("baseline", lambda a: a)):
        x_, y_ = (cast(a.detach()).requires_grad_() for a in (x, y))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # F.kl_div's "mean" / legacy-argument warnings
            ref = F.kl_div(x_, y_, **kwargs)
        results[name] = (ref, x_, y_)
    (ref, x64, y64), (base, xb, yb) = results["truth"], results["baseline"]
    assert out.dtype == base.dtype == torch.result_type(x, y), (out.dtype, base.dtype)
    assert out.shape == base.shape
    g = upstream_grad(out)
    out.backward(g)
    ref.backward(g.double())
    base.backward(g)
    # the error model uses the lowest precision among the inputs
    low = max((x.dtype, y.dtype), key=lambda d: torch.finfo(d).eps)
    assert_error_model(out, ref, base, low, "kl_div")
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    assert_error_model(x.grad, x64.grad, xb.grad, x.dtype, "input gradient")
    if grad_target:
        assert y.grad.dtype == y.dtype and y.grad.shape == y.shape
        assert_error_model(y.grad, y64.grad, yb.grad, y.dtype, "target gradient")
    return out


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logprob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "0d")
def test_against_torch(impl, shape, reduction, log_target):
    x, y = make_pair(shape, log_target)
    check_kl_div(impl, x, y, reduction=reduction, log_target=log_target)


def test_default_reduction_is_mean(impl):
    x, y = make_pair((3, 11), False)
    check_kl_div(impl, x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_low_precision(impl, dtype, reduction):
    skip_unsupported(impl, dtype)
    x, y = make_pair((4, 33), False, dtype)
    check_kl_div(impl, x, y, reduction=reduction)


@pytest.mark.parametrize(
    "size_average,reduce",
    [(None, False), (True, None), (False, None), (None, True), (False, True), (True, False)],
)
@pytest.mark.filterwarnings("ignore:size_average and reduce args")
def test_legacy_arguments(impl, size_average, reduce):
    """size_average / reduce override reduction exactly as in F.kl_div."""
    x, y = make_pair((3, 11), False)
    check_kl_div(impl, x, y, size_average=size_average, reduce=reduce)


@pytest.mark.filterwarnings("ignore:size_average and reduce args")
@pytest.mark.parametrize("size_average,reduce", [(False, True), (None, False), (True, None)])
def test_legacy_arguments_with_batchmean(impl, size_average, reduce):
    # F.kl_div applies the legacy reduction, then still divides by input.size(0)
    x, y = make_pair((3, 11), False)
    check_kl_div(impl, x, y, size_average=size_average, reduce=reduce, reduction="batchmean")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(
    "x_shape,y_shape", [((3, 11), (11,)), ((11,), (3, 11)), ((2, 1, 5), (1, 4, 5))]
)
def test_broadcasting(impl, x_shape, y_shape, reduction):
    """Broadcast shapes give F.kl_div's values; each gradient has its argument's shape."""
    x = torch.log_softmax(torch.randn(x_shape), -1)
    y = torch.rand(y_shape) * 0.9 + 0.05
    check_kl_div(impl, x, y, reduction=reduction)


@pytest.mark.parametrize("x_shape,y_shape", [((11,), (3, 11)), ((1, 11), (3, 11)), ((), (3,))])
def test_broadcasting_batchmean(impl, x_shape, y_shape):
    """batchmean divides by input.size(0) of the input as given (none for a 0-d input), not
    by the broadcast shape's first dim."""
    x = torch.randn(x_shape)
    y = torch.rand(y_shape) * 0.9 + 0.05
    check_kl_div(impl, x, y, reduction="batchmean")


@pytest.mark.parametrize(
    "x_dtype,y_dtype",
    [(torch.float32, torch.float64), (torch.float64, torch.float32),
     (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
    ids=["f32-f64", "f64-f32", "bf16-f32", "f16-bf16"],
)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_mixed_dtypes(impl, x_dtype, y_dtype, reduction):
    """The result dtype is torch.result_type(input, target), as in F.kl_div."""
    skip_unsupported(impl, x_dtype, y_dtype)
    x, y = make_pair((3, 11), False, x_dtype, y_dtype)
    if torch.float64 in (x_dtype, y_dtype):
        x, y = x.to(float64_device(impl)), y.to(float64_device(impl))
    check_kl_div(impl, x, y, reduction=reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_large_scalar_reductions(impl, reduction):
    """8M float32 terms: a float32 running sum over one thread's share drifts by ~1e-4
    relative here (~1e-1 at 4096 x 32000); PyTorch's cascade sum is exact to ~1e-8. Every
    impl must keep the sum as exact as PyTorch's."""
    x = torch.log_softmax(torch.randn(256, 32768) * 2, -1)
    y = torch.softmax(torch.randn(256, 32768), -1)
    out = kd.kl_div(x, y, reduction=reduction, impl=impl)
    truth = F.kl_div(x.double(), y.double(), reduction=reduction)
    base = F.kl_div(x, y, reduction=reduction)
    assert_error_model(out, truth, base, torch.float32, f"kl_div {reduction}")


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
def test_target_zero(impl, reduction):
    """Documented difference: at target == 0 (log_target=False) the term is 0 in both, the
    input gradient is -target = 0 in both, and the target gradient is the true derivative of
    target * log(target), -inf, where PyTorch gives nan."""
    x = torch.log_softmax(torch.randn(3, 8), -1)
    y = torch.rand(3, 8) * 0.9 + 0.05
    zero = torch.zeros_like(y, dtype=torch.bool)
    zero[0, 1] = zero[2, 5] = zero[1, 0] = True
    y = torch.where(zero, 0.0, y)
    # F.kl_div gives a finite value and input gradient: compare those under the model
    out = check_kl_div(impl, x, y, grad_target=False, reduction=reduction)
    assert torch.isfinite(out)

    yk = y.clone().requires_grad_()
    kd.kl_div(x, yk, reduction=reduction, impl=impl).backward()
    yt = y.clone().requires_grad_()
    F.kl_div(x, yt, reduction=reduction).backward()
    assert torch.isneginf(yk.grad[zero]).all(), yk.grad[zero]
    assert torch.isnan(yt.grad[zero]).all(), "PyTorch's documented nan changed"
    assert_error_model(yk.grad[~zero], yt.grad[~zero].double(), yt.grad[~zero],
                       torch.float32, "target gradient off the zeros")


def test_non_contiguous(impl):
    x = torch.log_softmax(torch.randn(11, 6), 0).t()  # (6, 11), strided
    y = (torch.rand(11, 6) * 0.9 + 0.05).t()
    check_kl_div(impl, x, y, reduction="none")
    check_kl_div(impl, x, y, reduction="sum")


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_empty(impl):
    """Zero elements: none gives an empty tensor, sum 0, mean and batchmean as PyTorch."""
    x = torch.zeros(0, 5, requires_grad=True)
    y = torch.zeros(0, 5)
    out = kd.kl_div(x, y, reduction="none", impl=impl)
    assert out.shape == (0, 5)
    total = kd.kl_div(x, y, reduction="sum", impl=impl)
    assert total.shape == () and total.item() == 0.0
    total.backward()
    assert x.grad.shape == (0, 5)
    for reduction in ("mean", "batchmean"):  # 0 / 0 in PyTorch too
        torch.testing.assert_close(
            kd.kl_div(x, y, reduction=reduction, impl=impl),
            F.kl_div(x, y, reduction=reduction), equal_nan=True,
        )
