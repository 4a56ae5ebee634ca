"""The CUDA kernels of the extension against the reference on real shapes (needs a GPU;
skipped elsewhere). Tolerances: the float32 floor of _formulas.TOLERANCES scaled by the
size of the values, bfloat16 one rounding of the stored gradient."""

from __future__ import annotations

import pytest
import torch

import kdkernels as kd

pytestmark = pytest.mark.gpu

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "soft_cross_entropy", "tvd", "forward_reverse_kl", "alpha_beta")
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 5e-3)}


def _run(impl, s, t, labels, **kw):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = kd.kd_loss(s, t, labels, impl=impl, **kw)
    out.backward(torch.ones_like(out) * 0.7)
    return out, s.grad, t.grad


def _check(s, t, labels=None, **kw):
    dtype = s.dtype
    got = _run("ext", s, t, labels, **kw)
    ref = _run("torch", s, t, labels, **kw)
    atol, rtol = TOL[dtype]
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_many_rows(divergence, dtype):
    s = (torch.randn(256, 32000, device="cuda") * 2).to(dtype)
    t = (torch.randn(256, 32000, device="cuda") * 2).to(dtype)
    labels = torch.randint(0, 32000, (256,), device="cuda")
    labels[::5] = -100
    _check(s, t, labels, divergence=divergence, temperature=2.0, ce_weight=0.3,
           reduction="none")


@pytest.mark.parametrize("v", [128256, 50257, 262144])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "soft_cross_entropy",
                                        "forward_reverse_kl", "tvd", "alpha_beta"])
def test_few_rows_vocab_split(divergence, v):
    # 3 rows cannot fill the GPU: each row's vocabulary is split over many blocks whose
    # partial (max, sum, acc) triples are merged exactly; V = 50257 is not 16-byte aligned
    s = torch.randn(3, v, device="cuda") * 3
    t = torch.randn(3, v, device="cuda") * 3
    _check(s, t, divergence=divergence, temperature=1.5, teacher_temperature=1.0,
           reduction="sum")


def test_inplace_and_extremes():
    s = torch.randn(64, 4099, device="cuda")
    t = torch.randn(64, 4099, device="cuda")
    s[:, :3] += 1e4
    t[:, -3:] = float("-inf")
    s[:, -3:] = float("-inf")
    labels = torch.randint(0, 4096, (64,), device="cuda")
    a = _run("ext", s, t, labels, divergence="reverse_kl", ce_weight=0.5)
    s2 = s.clone().requires_grad_()
    t2 = t.clone().requires_grad_()
    b = kd.kd_loss(s2, t2, labels, divergence="reverse_kl", ce_weight=0.5, impl="ext",
                   inplace_backward=True)
    b.backward(torch.tensor(0.7, device="cuda"))
    torch.testing.assert_close(a[0], b)
    torch.testing.assert_close(a[1], s2.grad)
    torch.testing.assert_close(a[2], t2.grad)
    assert torch.all(s2.grad[:, -3:] == 0)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_and_kl_div(log):
    x = torch.randn(32, 50257, device="cuda", dtype=torch.bfloat16)
    fn = kd.log_softmax if log else kd.softmax
    torch.testing.assert_close(fn(x, 2.0, impl="ext"), fn(x, 2.0, impl="torch"))
    a = torch.randn(4096, 1000, device="cuda").log_softmax(-1)
    b = torch.randn(4096, 1000, device="cuda").softmax(-1)
    for red in ("none", "sum", "batchmean"):
        torch.testing.assert_close(kd.kl_div(a, b, reduction=red, impl="ext"),
                                   torch.nn.functional.kl_div(a, b, reduction=red),
                                   atol=1e-5, rtol=1e-4)
