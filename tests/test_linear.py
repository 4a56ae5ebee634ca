"""kd.linear_kd_loss against materialized logits: cap(h @ W^T + b) built in full and given to
kd.kd_loss(impl="torch"), in float64 as the truth and at the inputs' dtype as the baseline of
the error model (_formulas.assert_error_model). Every impl goes through the public API;
shapes are tiny because Triton runs under the interpreter on CPU.
"""

import math

import pytest
import torch
from _device import DEVICE, float64_device
from _formulas import assert_error_model, skip_unsupported, upstream_grad
from test_memory import AllocationRecorder

import kdkernels as kd
from kdkernels import linear

pytestmark = pytest.mark.usefixtures("tensors_on_device")

H, HT, V = 8, 6, 37  # student hidden, teacher hidden, vocabulary (odd: masking is exercised)


def make_inputs(lead, dtype, *, bias=True, teacher_bias=False, scale=3.0, seed=0, device=None):
    """Hidden states and heads whose logits have a spread of about `scale` (a softcap of a
    few units then bends them visibly); labels with every third row ignored. Drawn on the
    CPU (the same values on every machine), then moved to `device` (default: the default
    device, the test device under tensors_on_device)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cpu")

    x = {
        "student_hidden": randn(*lead, H),
        "student_weight": randn(V, H) * (scale / math.sqrt(H)),
        "teacher_hidden": randn(*lead, HT),
        "teacher_weight": randn(V, HT) * (scale / math.sqrt(HT)),
    }
    if bias:
        x["student_bias"] = randn(V)
    if teacher_bias:
        x["teacher_bias"] = randn(V)
    labels = torch.randint(0, V, lead, generator=g, device="cpu")
    labels.view(-1)[::3] = -100
    device = torch.get_default_device() if device is None else device
    return {k: v.to(device, dtype) for k, v in x.items()}, labels.to(device)


def cap(z, c):
    return z if c is None else c * torch.tanh(z / c)


def materialized_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                      labels=None, *, student_bias=None, teacher_bias=None,
                      teacher_logits=None, student_softcap=None, teacher_softcap=None,
                      chunk_size=None, **kw):
    """The loss the fused function replaces (same signature): full logits, then
    kd.kd_loss(impl="torch")."""
    s = student_hidden @ student_weight.T
    if student_bias is not None:
        s = s + student_bias
    if teacher_logits is None:
        t = teacher_hidden @ teacher_weight.T
        if teacher_bias is not None:
            t = t + teacher_bias
        teacher_logits = cap(t, teacher_softcap)
    kw.pop("impl", None)
    return kd.kd_loss(cap(s, student_softcap), teacher_logits, labels, impl="torch", **kw)


def run(fn, x, labels, grad_names, g=None, **kw):
    """fn(**x, labels, **kw) forward and backward with upstream gradient g (a non-unit one
    when None); returns (loss, {name: grad}, g)."""
    x = {k: v.detach().clone().requires_grad_(k in grad_names) for k, v in x.items()}
    out = fn(**x, labels=labels, **kw)
    if g is None:
        g = upstream_grad(out)
    out.backward(g.to(out.dtype))
    return out, {k: x[k].grad for k in grad_names}, g


def check_against_materialized(impl, x, labels, grad_names, **kw):
    """linear_kd_loss vs the float64 truth under the error model, loss and every gradient."""
    dtype = x["student_hidden"].dtype
    out, grads, g = run(kd.linear_kd_loss, x, labels, grad_names, impl=impl, **kw)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == want
    x64 = {k: v.double() for k, v in x.items()}
    truth, tgrads, _ = run(materialized_loss, x64, labels, grad_names, g, **kw)
    base, bgrads, _ = run(materialized_loss, x, labels, grad_names, g, **kw)
    if dtype == torch.float64:
        base, bgrads = truth, tgrads
    assert_error_model(out, truth, base, dtype, "loss")
    for name in grad_names:
        assert grads[name] is not None and grads[name].dtype == dtype, name
        assert_error_model(grads[name], tgrads[name], bgrads[name], dtype, f"grad {name}")
    return out, grads


STUDENT = ("student_hidden", "student_weight", "student_bias")
TEACHER = ("teacher_hidden", "teacher_weight")

# (divergence, reduction, CE weight, student softcap, teacher softcap, teacher gradients)
CASES = {
    "fkl-token_mean": ("forward_kl", "token_mean", 0.0, None, None, False),
    "rkl-sum-scap": ("reverse_kl", "sum", 0.0, 4.0, None, False),
    "jsd-none-caps-teacher": ("jsd", "none", 0.5, 4.0, 2.5, True),
    "sfkl-batchmean-ce": ("skew_forward_kl", "batchmean", 0.3, None, 3.0, False),
    "srkl-mean-teacher": ("skew_reverse_kl", "mean", 0.0, 5.0, None, True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_matches_materialized_logits(impl, dtype, case):
    skip_unsupported(impl, dtype)
    div, red, ce, scap, tcap, teacher = CASES[case]
    x, labels = make_inputs((2, 5), dtype)
    names = STUDENT + (TEACHER if teacher else ())
    check_against_materialized(impl, x, labels, names, divergence=div, reduction=red,
                               ce_weight=ce, temperature=2.0, student_softcap=scap,
                               teacher_softcap=tcap, chunk_size=3)


def test_default_chunk_and_teacher_bias(impl):
    """The default chunk size (one chunk here), a teacher bias with its gradient."""
    x, labels = make_inputs((9,), torch.float32, teacher_bias=True)
    check_against_materialized(impl, x, labels, STUDENT + TEACHER + ("teacher_bias",),
                               divergence="jsd", beta=0.3)


def test_teacher_logits_given(impl):
    """Precomputed teacher logits (frozen, then requiring grad: its gradient is the loss
    gradient of those logits)."""
    x, labels = make_inputs((7,), torch.float32)
    t = (x.pop("teacher_hidden") @ x.pop("teacher_weight").T).detach()
    for teacher_grad in (False, True):
        t_ = t.clone().requires_grad_(teacher_grad)
        out, grads, g = run(kd.linear_kd_loss, x, labels, STUDENT, teacher_logits=t_,
                            impl=impl, chunk_size=2, temperature=2.0)
        t64 = t.double().requires_grad_(teacher_grad)
        x64 = {k: v.double() for k, v in x.items()}
        truth, tgrads, _ = run(materialized_loss, x64, labels, STUDENT, g,
                               teacher_logits=t64, temperature=2.0)
        assert_error_model(out, truth, None, torch.float32, "loss")
        for name in STUDENT:
            assert_error_model(grads[name], tgrads[name], None, torch.float32, name)
        if teacher_grad:
            assert_error_model(t_.grad, t64.grad, None, torch.float32, "teacher_logits grad")
        else:
            assert t_.grad is None


# --------------------------------------------------------------------------------------
# float64: gradcheck, chunk-size invariance, reductions
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_gradcheck(impl, reduction):
    """Finite differences of every input, softcaps on both sides: the recomputed backward
    (reduction="none") and the gradients stored by the forward (scalar reductions)."""
    skip_unsupported(impl, torch.float64)
    device = float64_device(impl)
    g = torch.Generator().manual_seed(1)
    n, h, ht, v = 4, 3, 2, 5
    tensors = [torch.randn(*shape, generator=g, dtype=torch.float64, device="cpu")
               .to(device).requires_grad_()
               for shape in ((n, h), (v, h), (v,), (n, ht), (v, ht), (v,))]
    labels = torch.tensor([1, -100, 4, 0], device=device)

    def f(sh, sw, sb, th, tw, tb):
        return kd.linear_kd_loss(sh, sw, th, tw, labels, student_bias=sb, teacher_bias=tb,
                                 student_softcap=1.5, teacher_softcap=2.0, chunk_size=3,
                                 divergence="jsd", temperature=1.7, ce_weight=0.4,
                                 reduction=reduction, impl=impl)

    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_chunk_size_invariance(impl, divergence, monkeypatch):
    # the default rule (chunk_size=None) then splits 11 rows of H = 8 into 4 chunks of 3
    monkeypatch.setattr(linear, "MIN_CHUNK_BYTES", 1)
    assert linear.chunk_rows(11, H, V, torch.float64) == 3
    dtype = torch.float32 if impl == "triton" else torch.float64
    x, labels = make_inputs((11,), dtype, device=float64_device(impl))
    kw = dict(divergence=divergence, student_softcap=4.0, temperature=2.0, ce_weight=0.2,
              impl=impl)
    names = STUDENT + TEACHER
    ref, rgrads, g = run(kd.linear_kd_loss, x, labels, names, chunk_size=11, **kw)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6,
                                                                            rtol=1e-5)
    for chunk in (1, 2, 4, 100, None):
        out, grads, _ = run(kd.linear_kd_loss, x, labels, names, g, chunk_size=chunk, **kw)
        torch.testing.assert_close(out, ref, **tol)
        for name in names:
            torch.testing.assert_close(grads[name], rgrads[name], **tol, msg=name)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean", "token_mean"])
def test_reductions_float64(reduction):
    """Every reduction against the materialized logits, with the global token_mean count:
    a chunk of only ignored rows must not change the others' weights."""
    x, labels = make_inputs((3, 4), torch.float64)
    labels[0] = -100  # the first chunk (4 rows) is all ignored
    check_against_materialized("torch", x, labels, STUDENT + TEACHER, reduction=reduction,
                               chunk_size=4, student_softcap=3.0, ignore_index=-100)


@pytest.mark.parametrize("reduction", ["batchmean", "none", "token_mean"])
def test_single_row(reduction):
    """Hidden states (H,): logits (V,), a 0-d label; batchmean divides by V as kd_loss does
    for 1-D logits (F.kl_div's first dim)."""
    x, _ = make_inputs((), torch.float64)
    out, _ = check_against_materialized("torch", x, torch.tensor(5), STUDENT,
                                        reduction=reduction, ce_weight=0.5)
    assert out.shape == () and float(out.detach()) > 0


def test_custom_ignore_index_and_no_labels():
    x, labels = make_inputs((6,), torch.float64)
    labels[labels == -100] = 7
    check_against_materialized("torch", x, labels, STUDENT, ignore_index=7, chunk_size=2)
    check_against_materialized("torch", x, None, STUDENT, chunk_size=4)


def test_gradient_buffers_start_uninitialized(impl, monkeypatch):
    """The weight-gradient accumulator is not zeroed: the first chunk writes it, later ones
    add. With every fresh buffer filled with NaN, the gradients must still be exact."""
    x, labels = make_inputs((7,), torch.float32)
    _, want, g = run(kd.linear_kd_loss, x, labels, STUDENT, impl=impl, chunk_size=3)
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    _, got, _ = run(kd.linear_kd_loss, x, labels, STUDENT, g=g, impl=impl, chunk_size=3)
    monkeypatch.undo()
    for name in STUDENT:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_logits_gemm_paths_agree(monkeypatch):
    """On a CPU in float32 the chunk logits come from oneDNN (a fresh tensor per chunk);
    otherwise from torch.mm into reused buffers: the same loss and gradients up to float32
    GEMM rounding."""
    x, labels = make_inputs((7,), torch.float32)
    on_cpu = x["student_hidden"].device.type == "cpu"
    assert linear._fresh_logits(x["student_hidden"], x["student_weight"]) == (
        on_cpu and torch.backends.mkldnn.is_available())
    out, want, g = run(kd.linear_kd_loss, x, labels, STUDENT, impl="torch", chunk_size=3)
    monkeypatch.setattr(linear, "_fresh_logits", lambda h, w: False)
    out_mm, got, _ = run(kd.linear_kd_loss, x, labels, STUDENT, g=g, impl="torch",
                         chunk_size=3)
    torch.testing.assert_close(out_mm, out, rtol=1e-5, atol=1e-6)
    for name in STUDENT:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_all_ignored_and_empty_batch(impl):
    dtype = torch.float32
    x, labels = make_inputs((5,), dtype)
    out, grads, _ = run(kd.linear_kd_loss, x, torch.full_like(labels, -100), STUDENT,
                        impl=impl, chunk_size=2)
    assert out.item() == 0.0 and all(bool((g == 0).all()) for g in grads.values())
    x0, labels0 = make_inputs((0,), dtype)
    for reduction in ("token_mean", "sum", "none"):
        out, grads, _ = run(kd.linear_kd_loss, x0, labels0, STUDENT, impl=impl,
                            reduction=reduction)
        assert out.shape == ((0,) if reduction == "none" else ())
        assert float(out.detach().sum()) == 0.0
        assert grads["student_weight"].shape == (V, H)
        assert bool((grads["student_weight"] == 0).all())


# --------------------------------------------------------------------------------------
# softcap
# --------------------------------------------------------------------------------------


def test_softcap_values_and_gradient():
    """A cap changes the loss (it is applied), a huge cap is no cap, and the gradient of
    the capped logits is (1 - tanh^2) times the loss gradient of the capped logits."""
    x, labels = make_inputs((6,), torch.float64, scale=8.0)
    kw = dict(teacher_softcap=None, chunk_size=4)
    none = kd.linear_kd_loss(**x, labels=labels, **kw)
    capped = kd.linear_kd_loss(**x, labels=labels, student_softcap=2.0, **kw)
    huge = kd.linear_kd_loss(**x, labels=labels, student_softcap=1e9, **kw)
    assert abs(float(capped - none)) > 1e-2
    torch.testing.assert_close(huge, none, atol=1e-10, rtol=1e-10)
    # by hand: d loss / d z = (1 - tanh(z / c)^2) * d loss / d s at s = c tanh(z / c)
    z = (x["student_hidden"] @ x["student_weight"].T + x["student_bias"]).requires_grad_()
    s = (2.0 * torch.tanh(z / 2.0)).detach().requires_grad_()
    t = x["teacher_hidden"] @ x["teacher_weight"].T
    kd.kd_loss(s, t, labels, impl="torch").backward()
    dz = (1 - torch.tanh(z.detach() / 2.0) ** 2) * s.grad
    w = x["student_weight"].clone().requires_grad_()
    kd.linear_kd_loss(**{**x, "student_weight": w}, labels=labels, student_softcap=2.0,
                      **kw).backward()
    torch.testing.assert_close(w.grad, dz.T @ x["student_hidden"], atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------------------
# autograd details, module, memory, errors
# --------------------------------------------------------------------------------------


def test_second_backward_recomputes(impl):
    """retain_graph=True: the second backward (stored gradients already handed over)
    recomputes and gives the same gradients."""
    x, labels = make_inputs((5,), torch.float32)
    w = x["student_weight"].clone().requires_grad_()
    loss = kd.linear_kd_loss(**{**x, "student_weight": w}, labels=labels, chunk_size=2,
                             impl=impl)
    (g1,) = torch.autograd.grad(loss, w, torch.tensor(0.5), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, w, torch.tensor(0.5))
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="double backward"):
        out = kd.linear_kd_loss(**{**x, "student_weight": w}, labels=labels, impl=impl)
        torch.autograd.grad(out, w, create_graph=True)


def test_no_grad_forward():
    x, labels = make_inputs((5,), torch.float32)
    w = x["student_weight"].requires_grad_()
    with_grad = kd.linear_kd_loss(**x, labels=labels, chunk_size=2)
    with torch.no_grad():
        out = kd.linear_kd_loss(**x, labels=labels, chunk_size=2)
    assert not out.requires_grad and w.grad is None
    torch.testing.assert_close(out, with_grad.detach())


def test_module():
    x, labels = make_inputs((2, 3), torch.float32)
    mod = kd.LinearKDLoss(divergence="jsd", student_softcap=3.0, chunk_size=2)
    assert "jsd" in repr(mod)
    got = mod(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
              x["teacher_weight"], labels, student_bias=x["student_bias"])
    want = kd.linear_kd_loss(**x, labels=labels, divergence="jsd", student_softcap=3.0,
                             chunk_size=2)
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="unknown arguments.*inplace_backward"):
        kd.LinearKDLoss(inplace_backward=True)


def test_chunk_rule():
    """Fewer than H/2 rows, one buffer within [32 MiB, 512 MiB] of the dtype, equal chunks."""
    f32, bf16 = torch.float32, torch.bfloat16
    # 255 rows at most (2 x 255 < 512): 9 chunks of 228 (the last one 224); the two chunk
    # buffers then hold 0.22 of one N x V tensor, under the benchmark's bound of 0.25
    assert linear.chunk_rows(2048, 512, 128256, f32) == 228
    assert linear.chunk_rows(2048, 512, 128256, bf16) == 228
    assert linear.chunk_rows(2048, 512, 128256, f32) * 2 < 2048 / 4
    # a small head: 24 rows would be under 32 MiB; 65 rows -> 32 chunks of 64
    assert linear.chunk_rows(2048, 64, 128256, f32) == 64
    # a huge head: 512 MiB of bfloat16 is 1024 rows of 262144
    assert linear.chunk_rows(1 << 20, 65536, 262144, bf16) == 1024
    assert linear.chunk_rows(10, 4096, 1000, f32) == 10
    assert linear.chunk_rows(0, 8, 10, f32) == 1
    for n in (1, 254, 255, 256, 1000, 4097):
        c = linear.chunk_rows(n, 512, 128256, f32)
        k = -(-n // c)
        assert c <= 255 and n - (k - 1) * c > c - k, (n, c)


# Live chunk-sized float32 temporaries allowed at once: the loss kernel's own (impl="torch"
# keeps up to 17 for jsd, tests/test_memory.py allows 24) plus this function's buffers
# (student and teacher logits, their tanh for the softcaps' derivatives); row vectors (row
# losses, labels, masks) up to 16 of N 8-byte elements.
LINEAR_LIVE_CHUNKS = 24 + 4
LINEAR_LIVE_ROW_VECTORS = 16


@pytest.mark.parametrize("reduction", ["token_mean", "none"])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["frozen-teacher", "teacher-grad"])
def test_no_full_logits_allocation(impl, teacher_grad, reduction):
    """Forward + backward allocate no N x V tensor: besides the gradients every allocation
    fits one chunk's float32 logits, and the peak of live allocations minus the gradients
    is a fixed number of chunks (independent of N), here at most half of one N x V float32
    tensor (reduction="none": the backward recomputes the chunks, with the same bound)."""
    if impl == "triton" and reduction == "none":
        pytest.skip("the same Python chunk loop as token_mean; the interpreter is slow")
    n, v, chunk = 64, 512, 1
    chunk_bytes = chunk * v * 4
    nv32 = n * v * 4
    bound = LINEAR_LIVE_CHUNKS * chunk_bytes + LINEAR_LIVE_ROW_VECTORS * n * 8
    assert bound <= nv32 // 2  # the measurement can tell the bound from one N x V tensor
    g = torch.Generator().manual_seed(0)

    def randn(*shape):  # drawn on the CPU, the same values on every machine
        return torch.randn(*shape, generator=g, device="cpu").to(DEVICE)

    x = {"student_hidden": randn(n, H),
         "student_weight": randn(v, H),
         "student_bias": randn(v),
         "teacher_hidden": randn(n, HT),
         "teacher_weight": randn(v, HT)}
    names = STUDENT + (TEACHER if teacher_grad else ())
    x = {k: t.requires_grad_(k in names) for k, t in x.items()}
    labels = torch.randint(0, v, (n,), generator=g, device="cpu").to(DEVICE)
    labels[::3] = -100
    rec = AllocationRecorder(keep_above=chunk_bytes)
    with rec:
        loss = kd.linear_kd_loss(**x, labels=labels, divergence="jsd", student_softcap=3.0,
                                 teacher_softcap=3.0, chunk_size=chunk, impl=impl,
                                 reduction=reduction)
        loss.backward(torch.ones_like(loss) if loss.dim() else None)
    grads = [x[k].grad for k in names]
    grad_ids = {gr.untyped_storage()._cdata for gr in grads}
    big = [(op, st.nbytes()) for op, st in rec.big if st._cdata not in grad_ids]
    assert not big, f"allocations larger than one chunk ({chunk_bytes} B) besides grads: {big}"
    grad_bytes = sum(gr.numel() * gr.element_size() for gr in grads)
    assert rec.peak - grad_bytes <= bound, (
        f"peak live extra {rec.peak} B minus gradients {grad_bytes} B > {bound} B (one "
        f"chunk {chunk_bytes} B, one N x V float32 tensor {nv32} B)")


def test_recorder_sees_materialized_logits():
    """The memory test can fail: materializing the logits is seen as N x V allocations."""
    n, v = 64, 256
    h = torch.randn(n, H)
    w = torch.randn(v, H, requires_grad=True)
    rec = AllocationRecorder(keep_above=2 * v * 4)
    with rec:
        kd.kd_loss(h @ w.T, torch.randn(n, HT) @ torch.randn(v, HT).T, impl="torch").backward()
    assert any(nbytes >= n * v * 4 for _, nbytes in rec.allocations)


def _err_inputs():
    x, labels = make_inputs((4,), torch.float32)
    return x, labels


def _on_device(change):
    """The parametrized tensors (made on the CPU at collection) on the test device, so that
    each case meets the check it is about, not a device mismatch."""
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()}


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"student_weight": torch.randn(V, H + 1)}, ValueError, r"student_weight.*\(V, 8\)"),
        ({"student_weight": torch.randn(V)}, ValueError, "student_weight must be 2-d"),
        ({"student_bias": torch.randn(V + 1)}, ValueError, r"student_bias must have shape"),
        ({"teacher_weight": torch.randn(V + 2, HT)}, ValueError,
         "student_weight has vocabulary 37 and teacher_weight 39.*vocab_size=37"),
        ({"teacher_weight": torch.randn(V, HT + 1)}, ValueError, r"teacher_weight.*\(V, 6\)"),
        ({"teacher_hidden": torch.randn(5, HT)}, ValueError,
         "teacher_hidden must have student_hidden's leading shape"),
        ({"teacher_bias": torch.randn(3)}, ValueError, "teacher_bias must have shape"),
        ({"student_weight": torch.randn(V, H, dtype=torch.float64)}, TypeError,
         "student_weight and student_hidden must have the same dtype"),
        ({"student_hidden": torch.randint(0, 3, (4, H))}, TypeError,
         "student_hidden must be a floating-point"),
        ({"labels": torch.zeros(5, dtype=torch.int64)}, ValueError, "labels must have shape"),
        ({"student_softcap": 0.0}, ValueError, "student_softcap must be a finite number > 0"),
        ({"teacher_softcap": -1.0}, ValueError, "teacher_softcap must be a finite number > 0"),
        ({"student_softcap": "3"}, TypeError, "student_softcap must be a positive float"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be an int >= 1"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"divergence": "kl"}, ValueError, "divergence must be one of"),
        ({"teacher_weight": None}, ValueError, "teacher_weight is None"),
        ({"teacher_logits": torch.randn(4, V)}, ValueError, "either teacher_logits or"),
    ],
)
def test_errors(change, error, match):
    x, labels = _err_inputs()
    kw = {"labels": labels, **x, **_on_device(change)}
    with pytest.raises(error, match=match):
        kd.linear_kd_loss(**kw)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"teacher_logits": torch.randn(5, V)}, r"teacher_logits must have shape .*\(4, 37\)"),
        ({"teacher_logits": torch.randn(4, V + 1)},
         "student_weight has vocabulary 37 and teacher_logits 38.*vocab_size=37"),
        ({"teacher_logits": torch.randn(4, V), "teacher_softcap": 2.0},
         "teacher_softcap applies to teacher_hidden"),
        ({"teacher_logits": torch.randn(4, V), "teacher_bias": torch.randn(V)},
         "teacher_bias applies to teacher_hidden"),
    ],
)
def test_errors_teacher_logits(change, match):
    x, labels = _err_inputs()
    del x["teacher_hidden"], x["teacher_weight"]
    with pytest.raises(ValueError, match=match):
        kd.linear_kd_loss(**x, labels=labels, **_on_device(change))


# --------------------------------------------------------------------------------------
# the benchmark's plumbing, at a tiny shape
# --------------------------------------------------------------------------------------


def test_bench_linear_runs(capsys):
    pytest.importorskip("bench.linear")
    from bench import linear as bench_linear

    with torch.device("cpu"):  # as from its command line: the benchmark picks its device
        rc = bench_linear.main(["--n", "16", "--h", "8", "--v", "64", "--reps", "1",
                                "--divergence", "forward_kl", "jsd"])
    out = capsys.readouterr().out
    assert rc == 0
    table = [line.split() for line in out.splitlines()]
    providers = {(row[0], row[1]) for row in table if len(row) > 2}
    for p in ("gemm_floor", "eager", "kd"):
        for div in ("forward_kl", "jsd"):
            assert (p, div) in providers, out
    assert "|loss - eager|" in out and "time vs the four GEMMs" in out
    # the kd rows' loss and weight-gradient differences from eager (last two columns)
    kd_rows = [row for row in table if row and row[0] == "kd" and row[-1] != "..."]
    assert len(kd_rows) == 2 and all(float(r[-2]) < 1e-5 and float(r[-1]) < 1e-5
                                     for r in kd_rows), out
    assert "(not the target shape)" in out and "MISSED" not in out



def test_bench_linear_liger_provider(capsys, monkeypatch):
    """The Liger provider's plumbing with a stand-in module of the same interface (the real
    one is an optional extra): its row and the jsd targets against it are reported."""
    import sys
    import types

    from bench import linear as bench_linear
    from bench.providers import Config, eager_loss

    class FakeLigerJSD(torch.nn.Module):
        def __init__(self, weight_hard_loss, weight_soft_loss, beta, temperature):
            super().__init__()
            self.cfg = Config(0, 0, torch.float32, torch.device("cpu"), temperature, beta)

        def forward(self, student_input, student_weight, teacher_input, teacher_weight,
                    true_labels, student_bias, teacher_bias):
            with torch.no_grad():
                t = teacher_input @ teacher_weight.T
            return eager_loss(student_input @ student_weight.T, t, "jsd", self.cfg)

    fake = types.ModuleType("liger_kernel.chunked_loss")
    fake.LigerFusedLinearJSDLoss = FakeLigerJSD
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", fake)
    with torch.device("cpu"):  # as from its command line: the benchmark picks its device
        rc = bench_linear.main(["--n", "16", "--h", "8", "--v", "64", "--reps", "1",
                                "--divergence", "jsd", "--providers", "kd", "liger"])
    out = capsys.readouterr().out
    assert rc == 0
    liger_rows = [line.split() for line in out.splitlines() if line.startswith("liger ")]
    assert len(liger_rows) == 1 and liger_rows[0][1] == "jsd", out
    target = [line for line in out.splitlines() if "kd jsd time / liger jsd time" in line]
    assert len(target) == 1 and "n/a" not in target[0], out


# the newer divergences with non-default parameters reach every chunk's loss
NEW_DIVERGENCES = {
    "soft_cross_entropy": dict(divergence="soft_cross_entropy"),
    "forward_reverse_kl": dict(divergence="forward_reverse_kl", alpha=0.2),
    "tvd": dict(divergence="tvd", reduction="sum"),
    "alpha_beta": dict(divergence="alpha_beta", ab_alpha=0.3, ab_beta=0.8),
}


@pytest.mark.parametrize("case", list(NEW_DIVERGENCES))
def test_new_divergences_match_materialized_logits(impl, case):
    x, labels = make_inputs((2, 5), torch.float32)
    check_against_materialized(impl, x, labels, STUDENT + TEACHER, temperature=2.0,
                               chunk_size=3, **NEW_DIVERGENCES[case])
