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
