"""kd.softmax / kd.log_softmax as drop-ins for torch.softmax / torch.log_softmax on the
shapes PyTorch accepts beyond (rows, V): 0-d tensors, empty tensors, an empty vocabulary."""

import pytest
import torch

import kdkernels as kd

pytestmark = pytest.mark.usefixtures("tensors_on_device")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 4), (2, 0, 5)],
                         ids=lambda s: "x".join(map(str, s)) or "0d")
def test_degenerate_shapes(impl, shape, log):
    x = torch.randn(shape, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    fn, ref_fn = (kd.log_softmax, torch.log_softmax) if log else (kd.softmax, torch.softmax)
    y = fn(x, 2.0, impl=impl)
    want = ref_fn(xr / 2.0, -1)
    assert y.shape == want.shape and y.dtype == want.dtype
    torch.testing.assert_close(y, want)
    y.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_dtype_argument(impl, log):
    """dtype= casts the input first, as torch.softmax's does: a float16 input with
    dtype=float32 gets float32 math, result and gradient accuracy (PyTorch's own samples
    include this case)."""
    from _formulas import skip_unsupported

    x = (torch.randn(5, 10, 7) * 3).half()
    g = torch.randn(5, 10, 7)
    fn, ref_fn = (kd.log_softmax, torch.log_softmax) if log else (kd.softmax, torch.softmax)
    dtype = torch.float64 if impl == "torch" else torch.float32
    skip_unsupported(impl, dtype)
    xk, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = fn(xk, dim=1, dtype=dtype, impl=impl)
    want = ref_fn(xr, 1, dtype=dtype)
    assert y.dtype == dtype
    torch.testing.assert_close(y, want)
    y.backward(g.to(dtype))
    want.backward(g.to(dtype))
    assert xk.grad.dtype == torch.float16
    torch.testing.assert_close(xk.grad, xr.grad)
    with pytest.raises(TypeError, match="dtype must be"):
        fn(x, dtype=torch.int64, impl=impl)
