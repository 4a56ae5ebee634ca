"""Triton softmax / log_softmax and kl_div kernels (impl="triton"), run on CPU under
TRITON_INTERPRET=1 when there is no GPU.

Truth: torch in float64 on the same (already rounded) inputs; baseline: plain PyTorch at the
inputs' dtype; the bound is _formulas.assert_error_model. Shapes are small (the interpreter
runs every program in Python) but cover one-tile rows, rows of several tiles (MAX_BLOCK is
lowered for those), odd widths, and a kl_div longer than the persistent grid.
"""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from _device import DEVICE
from _formulas import assert_error_model, max_err

import kdkernels as kd

# the kernel modules (kdkernels.triton.softmax / .kl_div as attributes are the entry points)
sm = importlib.import_module("kdkernels.triton.softmax")
kl = importlib.import_module("kdkernels.triton.kl_div")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def small_tiles(monkeypatch):
    """Force rows of several tiles at small V, to run the online-softmax loops."""
    monkeypatch.setattr(sm, "MAX_BLOCK", 128)


# --------------------------------------------------------------------------------------
# softmax / log_softmax
# --------------------------------------------------------------------------------------


def _softmax_truth(x, temperature, log, dim=-1):
    fn = torch.log_softmax if log else torch.softmax
    x64 = x.detach().double().requires_grad_()
    x_b = x.detach().clone().requires_grad_()
    return fn(x64 / temperature, dim), x64, fn(x_b / temperature, dim), x_b


def check_softmax(x, temperature=1.0, log=False, dim=-1):
    """kd.(log_)softmax(impl="triton") against float64 torch: value, dtype, gradient."""
    x = x.to(DEVICE).detach().clone().requires_grad_()
    fn = kd.log_softmax if log else kd.softmax
    y = fn(x, temperature, dim=dim, impl="triton")
    truth, x64, base, xb = _softmax_truth(x, temperature, log, dim)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_error_model(y, truth, base, x.dtype, "log_softmax" if log else "softmax")
    g = torch.randn_like(y)
    y.backward(g)
    truth.backward(g.double())
    base.backward(g)
    assert x.grad.dtype == x.dtype
    assert_error_model(x.grad, x64.grad, xb.grad, x.dtype, "softmax gradient")
    return y, x.grad


SHAPES = [(1, 1), (3, 7), (2, 5, 33), (4, 1000), (2, 1271)]


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_softmax_one_tile(shape, dtype, log):
    check_softmax(torch.randn(shape) * 3, temperature=0.7, log=log)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("v", [129, 1000, 1271])
def test_softmax_several_tiles(small_tiles, v, dtype, log):
    assert sm.launch_config(v)[2] is False  # really the multi-tile path
    check_softmax((torch.randn(3, v) * 4).to(dtype), temperature=2.0, log=log)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_real_vocab_row(log):
    # 20000 > MAX_BLOCK: the multi-tile path at its real tile width, ragged last tile
    check_softmax((torch.randn(2, 20000) * 5).to(torch.bfloat16), temperature=1.5, log=log)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_matches_reference_impl(log):
    x = torch.randn(3, 777, device=DEVICE)
    fn = kd.log_softmax if log else kd.softmax
    a = fn(x, 1.3, impl="triton")
    b = fn(x, 1.3, impl="torch")
    # same float32 math in a different order: a few ulps of the largest |value|
    assert max_err(a, b) <= 8 * 2**-23 * float(b.abs().max())


@pytest.mark.parametrize("tiles", ["one_tile", "several_tiles"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_extreme_logits(monkeypatch, tiles, log):
    """Logits of +-1e4, -inf padding, and a row that is -inf but for one entry."""
    if tiles == "several_tiles":
        monkeypatch.setattr(sm, "MAX_BLOCK", 128)
    x = torch.randn(4, 300)
    x[0, ::7] = 1e4
    x[0, 3::7] = -1e4
    x[1, 150:] = -float("inf")  # padding, including a whole tile at the end
    x[2, :] = -float("inf")
    x[2, 299] = 0.0  # everything in the last tile
    x[3, :200] = -float("inf")  # the first tiles entirely -inf (online max starts at -inf)
    y, g = check_softmax(x, temperature=0.5, log=log)
    assert torch.isfinite(g).all()
    if log:
        assert (y[1, 150:] == -float("inf")).all()
    else:
        assert (y[1, 150:] == 0).all() and torch.isfinite(y).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # -inf - -inf, numpy
def test_softmax_all_inf_row_is_nan_like_torch():
    x = torch.full((2, 50), -float("inf"))
    x[1] = torch.randn(50)
    x = x.to(DEVICE)
    for log in (False, True):
        fn = kd.log_softmax if log else kd.softmax
        y = fn(x, impl="triton")
        ref = (torch.log_softmax if log else torch.softmax)(x, -1)
        assert torch.isnan(y[0]).all() and torch.isnan(ref[0]).all()
        assert max_err(y[1], ref[1]) <= 1e-6


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf, numpy
@pytest.mark.parametrize("tiles", ["one_tile", "several_tiles"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_non_finite_rows_are_nan(monkeypatch, tiles, log):
    """A NaN or a +inf (in a later tile) or nothing but -inf: the whole row is NaN, the
    other rows are untouched."""
    if tiles == "several_tiles":
        monkeypatch.setattr(sm, "MAX_BLOCK", 128)
    x = torch.randn(5, 300)
    x[1, 250] = float("nan")
    x[2, 250] = float("inf")
    x[3] = -float("inf")
    y = (kd.log_softmax if log else kd.softmax)(x.to(DEVICE), 2.0, impl="triton")
    assert y[1:4].isnan().all()
    ref = (torch.log_softmax if log else torch.softmax)(x[[0, 4]] / 2.0, -1)
    assert max_err(y[[0, 4]].cpu(), ref) <= 1e-6


@pytest.mark.parametrize("temperature", [1e-3, 0.7, 3.0, 1e3])
@pytest.mark.parametrize("tiles", ["one_tile", "several_tiles"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_large_logits_any_temperature(monkeypatch, tiles, log, temperature):
    """Logits of ~1e4 spread over a few units of T: the shifted logit is formed as
    (x - max x) / T, exact near the maximum, so the error stays float32-sized for any T
    (x / T - max x / T would round at |x / T| ~ 1e7 for T = 1e-3)."""
    if tiles == "several_tiles":
        monkeypatch.setattr(sm, "MAX_BLOCK", 128)
    g = torch.Generator().manual_seed(3)
    x = 1e4 + torch.randn(3, 300, generator=g) * 3 * temperature
    x[1] -= 2e4
    y, _ = check_softmax(x, temperature=temperature, log=log)
    # a few float32 roundings of each value against float64: torch's own float32 baseline
    # (x / T first) is no such bound (1e-1 at T = 1e-3)
    fn = torch.log_softmax if log else torch.softmax
    truth = fn(x.double() / temperature, -1)
    err = (y.detach().cpu().double() - truth).abs()
    assert (err <= 4 * 2.0**-24 * (1 + truth.abs())).all(), err.max()


def test_softmax_other_dim_and_non_contiguous():
    x = torch.randn(5, 6, 7).transpose(0, 2)
    check_softmax(x, temperature=1.0, log=False, dim=1)
    check_softmax(x, temperature=3.0, log=True, dim=0)


def test_softmax_empty_batch():
    x = torch.randn(0, 9, requires_grad=True)
    y = kd.softmax(x, impl="triton")
    y.sum().backward()
    assert y.shape == (0, 9) and x.grad.shape == (0, 9)


def test_softmax_backward_expanded_gradient():
    """The upstream gradient of y.sum() is an expanded (stride-0) tensor."""
    x = torch.randn(3, 11).to(DEVICE).requires_grad_()
    y = kd.log_softmax(x, 2.0, impl="triton")
    y.sum().backward()
    refs = []
    for dt in (torch.float64, torch.float32):
        x_ = x.detach().to(dt).requires_grad_()
        torch.log_softmax(x_ / 2.0, -1).sum().backward()
        refs.append(x_.grad)
    assert_error_model(x.grad, refs[0], refs[1], torch.float32, "gradient")


@pytest.mark.parametrize("tiles", ["one_tile", "several_tiles"])
def test_softmax_shift_invariance(monkeypatch, tiles):
    """Logits on a 2**-12 grid shifted by 1024 stay exact in float32, and so does every
    z - max the kernel forms: the outputs must be identical, not merely close."""
    if tiles == "several_tiles":
        monkeypatch.setattr(sm, "MAX_BLOCK", 64)
    x = (torch.round(torch.randn(3, 257) * 4096) / 4096).to(DEVICE)
    for log in (False, True):
        fn = kd.log_softmax if log else kd.softmax
        a = fn(x, impl="triton")
        b = fn(x + 1024.0, impl="triton")
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# kl_div
# --------------------------------------------------------------------------------------


def _pair(n, log_target, dtype, zeros=False):
    x = torch.log_softmax(torch.randn(n) * 2, 0)
    y = torch.rand(n) * 0.9 + 0.05
    if zeros:
        y[::5] = 0.0
    if log_target:
        y = y.log()
    return x.to(dtype).to(DEVICE), y.to(dtype).to(DEVICE)


def check_kl_div(x, y, log_target, reduce_sum, need_x=True, need_y=True):
    """The backend function kt.kl_div against F.kl_div in float64 and at the input dtype."""
    x = x.detach().clone().requires_grad_(need_x)
    y = y.detach().clone().requires_grad_(need_y)
    out = kl.kl_div(x, y, log_target, reduce_sum)
    red = "sum" if reduce_sum else "none"
    res = {}
    for name, cast in (("truth", lambda a: a.double()), ("base", lambda a: a)):
        x_ = cast(x.detach()).requires_grad_(need_x)
        y_ = cast(y.detach()).requires_grad_(need_y)
        res[name] = (F.kl_div(x_, y_, reduction=red, log_target=log_target), x_, y_)
    (ref, x64, y64), (base, xb, yb) = res["truth"], res["base"]
    assert out.dtype == (torch.float32 if reduce_sum else torch.result_type(x, y))
    assert_error_model(out, ref, base.float() if reduce_sum else base, x.dtype, "kl_div")
    g = (torch.tensor(0.7) if reduce_sum else torch.randn(out.shape)).to(DEVICE)
    out.backward(g.to(out))
    ref.backward(g.double())
    base.backward(g.to(base))
    if need_x:
        assert x.grad.dtype == x.dtype
        assert_error_model(x.grad, x64.grad, xb.grad, x.dtype, "input gradient")
    else:
        assert x.grad is None
    if need_y:
        assert y.grad.dtype == y.dtype
        assert_error_model(y.grad, y64.grad, yb.grad, y.dtype, "target gradient")
    else:
        assert y.grad is None


@pytest.mark.parametrize("reduce_sum", [False, True], ids=["none", "sum"])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logprob"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 1000, 4097])
def test_kl_div_against_torch(n, dtype, log_target, reduce_sum):
    check_kl_div(*_pair(n, log_target, dtype), log_target, reduce_sum)


@pytest.mark.parametrize("reduce_sum", [False, True], ids=["none", "sum"])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logprob"])
def test_kl_div_longer_than_the_grid(log_target, reduce_sum):
    """More tiles than programs: every program loops over several tiles (grid stride)."""
    # the persistent grid: CPU_PROGRAMS under the interpreter, PROGRAMS_PER_SM per SM on CUDA
    n = kl.BLOCK * kl._programs(2**62, DEVICE) * 2 + 77
    check_kl_div(*_pair(n, log_target, torch.float32), log_target, reduce_sum)


@pytest.mark.parametrize("need", ["x", "y"])
@pytest.mark.parametrize("reduce_sum", [False, True], ids=["none", "sum"])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logprob"])
def test_kl_div_one_gradient(need, log_target, reduce_sum):
    x, y = _pair(999, log_target, torch.float32)
    check_kl_div(x, y, log_target, reduce_sum, need_x=need == "x", need_y=need == "y")


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0), numpy
@pytest.mark.parametrize("reduce_sum", [False, True], ids=["none", "sum"])
def test_kl_div_target_zero(reduce_sum):
    """xlogy semantics: a zero target contributes 0, its d/dx is 0 and d/dy is -inf."""
    x, y = _pair(101, False, torch.float32, zeros=True)
    x.requires_grad_()
    y.requires_grad_()
    out = kl.kl_div(x, y, False, reduce_sum)
    red = "sum" if reduce_sum else "none"
    ref = F.kl_div(x.detach().double(), y.detach().double(), reduction=red)
    base = F.kl_div(x.detach(), y.detach(), reduction=red)
    assert torch.isfinite(out).all()
    assert_error_model(out, ref, base, torch.float32, "kl_div with zero targets")
    out.backward(torch.ones_like(out))
    zero = y.detach() == 0
    assert (x.grad[zero] == 0).all()
    assert (y.grad[zero] == -float("inf")).all()
    assert torch.isfinite(y.grad[~zero]).all()


def test_kl_div_mixed_dtypes():
    x, _ = _pair(333, False, torch.bfloat16)
    _, y = _pair(333, False, torch.float32)
    out = kl.kl_div(x, y, False, False)
    assert out.dtype == torch.float32
    ref = F.kl_div(x.double(), y.double(), reduction="none")
    base = F.kl_div(x, y, reduction="none")
    assert_error_model(out, ref, base, torch.bfloat16, "mixed-dtype kl_div")


def test_kl_div_sum_equals_sum_of_terms():
    x, y = _pair(5000, True, torch.float32)
    total = kl.kl_div(x, y, True, True)
    terms = kl.kl_div(x, y, True, False)
    assert total.dim() == 0
    assert abs(float(total) - float(terms.double().sum())) <= 1e-6 * float(terms.abs().sum())


def test_kl_div_empty():
    x = torch.empty(0, requires_grad=True)
    y = torch.empty(0)
    out = kl.kl_div(x, y, False, True)
    out.backward()
    assert float(out.detach()) == 0.0 and x.grad.shape == (0,)
    assert kl.kl_div(x, y, False, False).shape == (0,)


def test_kl_div_public_api_scalar_reductions():
    x = torch.randn(4, 50).log_softmax(-1).to(DEVICE)
    y = torch.randn(4, 50).softmax(-1).to(DEVICE)
    for red in ("sum", "mean", "batchmean"):
        a = kd.kl_div(x, y, reduction=red, impl="triton")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # F.kl_div's note on "mean"
            b = F.kl_div(x.double(), y.double(), reduction=red)
        assert abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))


# --------------------------------------------------------------------------------------
# torch op registration: opcheck, torch.compile
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("log", [False, True])
def test_opcheck_softmax(log):
    x = torch.randn(3, 37, device=DEVICE, requires_grad=True)
    torch.library.opcheck(sm.softmax_fwd, (x, 0.5, log))
    y = sm.softmax_fwd(x.detach(), 0.5, log)
    torch.library.opcheck(sm.softmax_bwd, (torch.randn_like(y), y, 0.5, log))


@pytest.mark.parametrize("reduce_sum", [False, True])
@pytest.mark.parametrize("log_target", [False, True])
def test_opcheck_kl_div(log_target, reduce_sum):
    x, y = _pair(70, log_target, torch.float32)
    torch.library.opcheck(kl.kl_div_fwd, (x.requires_grad_(), y.requires_grad_(), log_target,
                                          reduce_sum))
    g = (torch.tensor(0.5) if reduce_sum else torch.randn(70)).to(DEVICE)
    for need_x, need_y in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(kl.kl_div_bwd, (x.detach(), y.detach(), g, log_target, need_x,
                                              need_y))


def _compiled(fn):
    torch._dynamo.reset()
    # aot_eager: Dynamo + AOTAutograd (fake tensors, the autograd registration) without
    # Inductor's C++ build; fullgraph=True turns any graph break into an error
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _softmax_step(call):
    """call(x) = log_softmax(x / 2) in one compiled graph: value and gradient vs float64."""

    def step(x):
        return (call(x) * 3).sum()

    x = torch.randn(3, 40).to(DEVICE).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = _compiled(step)(x)
    loss.backward()
    refs = []
    for dt in (torch.float64, torch.float32):  # truth, plain-PyTorch baseline
        x_ = x.detach().to(dt).requires_grad_()
        ref = (torch.log_softmax(x_ / 2.0, -1) * 3).sum()
        ref.backward()
        refs.append((ref, x_.grad))
    (ref, g64), (base, gb) = refs
    assert_error_model(loss, ref, base, torch.float32, "compiled log_softmax")
    assert_error_model(x.grad, g64, gb, torch.float32, "compiled log_softmax gradient")


def _kl_div_step(call):
    x = torch.randn(4, 30).log_softmax(-1).to(DEVICE).requires_grad_()
    y = torch.randn(4, 30).log_softmax(-1).to(DEVICE).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = _compiled(call)(x, y)
    loss.backward()
    refs = []
    for dt in (torch.float64, torch.float32):
        x_, y_ = (a.detach().to(dt).requires_grad_() for a in (x, y))
        ref = F.kl_div(x_, y_, reduction="batchmean", log_target=True)
        ref.backward()
        refs.append((ref, x_.grad, y_.grad))
    (ref, gx, gy), (base, bx, by) = refs
    assert_error_model(loss, ref, base, torch.float32, "compiled kl_div")
    assert_error_model(x.grad, gx, bx, torch.float32, "compiled kl_div input gradient")
    assert_error_model(y.grad, gy, by, torch.float32, "compiled kl_div target gradient")


def test_compile_fullgraph_softmax_op():
    """The registered ops trace into one graph, forward and backward."""
    _softmax_step(lambda x: sm.softmax(x, 0.5, True))


def test_compile_fullgraph_kl_div_op():
    _kl_div_step(lambda x, y: kl.kl_div(x.reshape(-1), y.reshape(-1), True, True) / 4)


# Through the public API the trace also crosses functional.py and _dispatch.py.
def test_compile_fullgraph_public_softmax():
    _softmax_step(lambda x: kd.log_softmax(x, 2.0, impl="triton"))


def test_compile_fullgraph_public_kl_div():
    _kl_div_step(lambda x, y: kd.kl_div(x, y, reduction="batchmean", log_target=True,
                                        impl="triton"))


# --------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [1, 7, 128, 1000, 8192, 8193, 32000, 262144])
def test_launch_config(v):
    block, num_warps, single = sm.launch_config(v)
    assert block & (block - 1) == 0 and block <= sm.MAX_BLOCK
    assert single == (v <= block)
    assert num_warps in (1, 2, 4, 8)
    assert single or block == sm.MAX_BLOCK
