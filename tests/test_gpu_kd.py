"""Triton kd_loss kernels on a GPU at real sizes (skipped without CUDA).

Same error model as tests/test_triton_kd.py: the truth is the reference (impl="torch") on
float64 copies of the inputs, the baseline the reference on the bfloat16 inputs; Triton may be
off the truth by 2x the baseline's error plus the bfloat16 floor of _formulas.TOLERANCES.
"""

import pytest
import torch
from _formulas import assert_error_model

import kdkernels as kd
from kdkernels.triton import kd as tkd

pytestmark = pytest.mark.gpu

N, V = 256, 128256


def _inputs(n, v, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = (torch.randn(n, v, device="cuda", generator=g) * 2).bfloat16()
    t = (torch.randn(n, v, device="cuda", generator=g) * 2).bfloat16()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::5] = -100
    return s, t, labels


def _run(impl, s, t, labels, g, **kw):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = kd.kd_loss(s, t, labels, impl=impl, reduction="none", **kw)
    out.backward(g)
    return out.detach(), s.grad, t.grad


def _check(s, t, labels, **kw):
    g = torch.randn(s.shape[0], device="cuda")
    tri = _run("triton", s, t, labels, g, **kw)
    ref = _run("torch", s, t, labels, g, **kw)
    tru = _run("torch", s.double(), t.double(), labels, g.double(), **kw)
    for what, a, b, c in zip(("loss", "student gradient", "teacher gradient"), tri, ref, tru,
                             strict=True):
        assert_error_model(a, c, b, s.dtype, what)
    return tri


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl",
                                        "soft_cross_entropy", "tvd", "forward_reverse_kl",
                                        "alpha_beta"])
def test_llama3_vocab_bf16(divergence):
    s, t, labels = _inputs(N, V)
    _check(s, t, labels, divergence=divergence, beta=0.3, temperature=2.0, ce_weight=0.5)


def test_auto_vocab_split():
    # 4 rows on a GPU with ~100 SMs: each row is split over several programs
    s, t, labels = _inputs(4, V, seed=1)
    n_sm = torch.cuda.get_device_properties(s.device).multi_processor_count
    cfg = tkd._config_for(s)
    assert cfg == tkd.launch_config(V, 4, n_sm)
    assert cfg.n_split > 1
    assert tkd._config_for(torch.empty(4 * n_sm, V, device="cuda")).n_split == 1
    for divergence in ("forward_kl", "jsd"):
        split = _check(s, t, labels, divergence=divergence, ce_weight=0.5)
        old = tkd.FORCE_SPLIT
        tkd.FORCE_SPLIT = 1
        try:
            g = torch.ones(4, device="cuda")
            whole = _run("triton", s, t, labels, g, divergence=divergence, ce_weight=0.5)
        finally:
            tkd.FORCE_SPLIT = old
        torch.testing.assert_close(split[0], whole[0], rtol=1e-5, atol=1e-5)


def test_no_host_sync_and_no_fp32_buffer():
    # forward + backward never synchronize with the host, and the only N x V allocation
    # is the gradient itself (bfloat16): no float32 N x V temporary
    s, t, labels = _inputs(N, V, seed=2)
    s.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = kd.kd_loss(s, t, labels, divergence="jsd", ce_weight=0.5, impl="triton")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < s.numel() * s.element_size() + (8 << 20), extra


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_inplace_backward_large(divergence):
    s, t, labels = _inputs(64, V, seed=3)
    kw = dict(divergence=divergence, ce_weight=0.5, reduction="sum")
    a = s.clone().requires_grad_()
    kd.kd_loss(a, t, labels, impl="triton", **kw).backward()
    b = s.clone().requires_grad_()
    ptr = b.data_ptr()
    kd.kd_loss(b, t, labels, impl="triton", inplace_backward=True, **kw).backward()
    assert b.grad.data_ptr() == ptr
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-2, atol=1e-3)
