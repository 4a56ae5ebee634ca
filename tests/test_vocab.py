"""Student and teacher of different vocabulary widths (padded embedding rows): a clear error
naming both widths and the fix, and `vocab_size=` using the first columns of both, for every
implementation. The truth is the float64 formula of tests/_formulas.py on the explicitly
sliced logits, differentiated through the slice (zero gradient in the dropped columns)."""

from __future__ import annotations

import pytest
import torch
from _device import DEVICE
from _formulas import assert_error_model, upstream_grad
from _formulas import kd_loss as formula_kd_loss

import kdkernels as kd
from kdkernels import _dispatch

pytestmark = pytest.mark.usefixtures("tensors_on_device")


def _pair(vs: int, vt: int, lead=(3, 5), dtype=torch.float32, device=DEVICE):
    """Student and teacher logits drawn on the CPU (the same values on every machine), then
    moved to `device`."""
    s = (torch.randn(*lead, vs, dtype=torch.float64, device="cpu") * 2).to(device, dtype)
    t = (torch.randn(*lead, vt, dtype=torch.float64, device="cpu") * 2).to(device, dtype)
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
    # the ValueError is the check of CPU labels (on CUDA an out-of-range label is a
    # device-side assert, which would end the process's CUDA context): CPU tensors
    if impl == "triton" and DEVICE.type == "cuda":
        pytest.skip("the labels' range check raises on the CPU only, and with CUDA present "
                    "impl='triton' runs on CUDA only (no TRITON_INTERPRET)")
    s, t = _pair(40, 48, device=torch.device("cpu"))
    labels = torch.zeros(3, 5, dtype=torch.int64, device="cpu")
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


# ---- vocab_size reads the first columns in place -------------------------------------------

KINDS = [
    dict(divergence="forward_kl", temperature=2.0),
    dict(divergence="reverse_kl", reduction="sum"),
    dict(divergence="jsd", beta=0.3, ce_weight=0.5, reduction="none"),
    dict(divergence="skew_reverse_kl", skew=0.2, teacher_temperature=0.5),
    dict(divergence="soft_cross_entropy", temperature=2.0),
    dict(divergence="forward_reverse_kl", alpha=0.3, reduction="none"),
    dict(divergence="tvd", ce_weight=0.5),
    dict(divergence="alpha_beta", ab_alpha=0.4, ab_beta=0.7, reduction="sum"),
]
KIND_IDS = ["forward_kl", "reverse_kl-sum", "jsd+ce-none", "skew_reverse_kl",
            "soft_cross_entropy", "forward_reverse_kl-none", "tvd+ce", "alpha_beta-sum"]


def _run(impl, s, t, labels, g=None, **kwargs):
    """(loss, d s, d t) of kd_loss on leaves copied from s, t."""
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = kd.kd_loss(s, t, labels, impl=impl, **kwargs)
    out.backward(upstream_grad(out) if g is None else g)
    return out.detach(), s.grad, t.grad


@pytest.mark.parametrize("vs, vt", [(37, 45), (45, 37)])
@pytest.mark.parametrize("vocab", [30, 37])
@pytest.mark.parametrize("kwargs", KINDS, ids=KIND_IDS)
def test_vocab_size_equals_copying_the_slice_first(impl, vs, vt, vocab, kwargs):
    """The same values and gradients as the same impl on explicitly copied slices, and an
    exactly zero gradient in the padding columns of both (full-width) tensors."""
    torch.manual_seed(0)
    s, t = _pair(vs, vt, lead=(4, 3))
    labels = torch.randint(0, vocab, (4, 3))
    labels[1, 2] = -100
    g = upstream_grad(torch.zeros(4, 3) if kwargs.get("reduction") == "none" else
                      torch.zeros(()))
    out, gs, gt = _run(impl, s, t, labels, g, vocab_size=vocab, **kwargs)
    want, wgs, wgt = _run(impl, s[..., :vocab].contiguous(), t[..., :vocab].contiguous(),
                          labels, g, **kwargs)
    torch.testing.assert_close(out, want)
    assert gs.shape == s.shape and gt.shape == t.shape
    torch.testing.assert_close(gs[..., :vocab], wgs)
    torch.testing.assert_close(gt[..., :vocab], wgt)
    assert not gs[..., vocab:].any() and not gt[..., vocab:].any()


@pytest.mark.parametrize("vs, vt", [(37, 45), (45, 37)])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["frozen-teacher", "teacher-grad"])
def test_inplace_backward_with_a_narrower_vocab_size(impl, vs, vt, teacher_grad):
    """inplace_backward writes the full-width student gradient over the student's buffer,
    padding columns 0, also when vocab_size is narrower than the student."""
    vocab = 30
    s, t = _pair(vs, vt, lead=(4, 3))
    labels = torch.randint(0, vocab, (4, 3))
    kwargs = dict(divergence="jsd", temperature=2.0, ce_weight=0.3)
    want, wgs, wgt = _run(impl, s[..., :vocab].contiguous(), t[..., :vocab].contiguous(),
                          labels, torch.tensor(0.7), **kwargs)
    s_leaf = s.clone().requires_grad_()
    t_in = t.clone().requires_grad_(teacher_grad)
    s_in = s_leaf * 1.0  # a non-leaf buffer the gradient may overwrite
    out = kd.kd_loss(s_in, t_in, labels, vocab_size=vocab, inplace_backward=True,
                     impl=impl, **kwargs)
    out.backward(torch.tensor(0.7))
    torch.testing.assert_close(out.detach(), want)
    torch.testing.assert_close(s_leaf.grad[..., :vocab], wgs)
    assert not s_leaf.grad[..., vocab:].any()
    if teacher_grad:
        assert t_in.grad.shape == t.shape
        torch.testing.assert_close(t_in.grad[..., :vocab], wgt)
        assert not t_in.grad[..., vocab:].any()


@pytest.mark.parametrize("vs, vt", [(96, 112), (112, 96)])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_vocab_size_copies_nothing(impl, monkeypatch, vs, vt, divergence):
    """No copy of either logits: the kernels receive views of the user's storage (data_ptr
    and row stride of what the backend's partial and grads are given), and the only
    allocations of N x vocab size or more in forward + backward are the two full-width
    gradients (autograd through a copied slice allocates the copies, their gradients and a
    zero full-width tensor for each)."""
    from test_memory import AllocationRecorder

    from kdkernels import _common

    vocab, rows = 80, 64
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 2 * vocab)  # the torch path's chunks
    backend = _dispatch.resolve(impl, DEVICE, (torch.float32,))
    seen = []

    def spy(name):
        run = getattr(backend, name)

        def wrapped(s, t, *args, **kwargs):
            seen.append((name, s, t, kwargs.get("out"), kwargs.get("out_t")))
            return run(s, t, *args, **kwargs)

        monkeypatch.setattr(backend, name, wrapped)

    spy("partial")
    spy("grads")
    s = torch.randn(rows, vs, requires_grad=True)
    t = torch.randn(rows, vt, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    rec = AllocationRecorder(keep_above=rows * vocab * 4 - 1)
    with rec:
        kd.kd_loss(s, t, labels, vocab_size=vocab, divergence=divergence, ce_weight=0.5,
                   impl=impl).backward()
    grads = {s.grad.untyped_storage()._cdata, t.grad.untyped_storage()._cdata}
    # new tensors over the inputs' own memory (the Triton interpreter's set_) are no copies
    inputs = {s.data_ptr(), t.data_ptr()}
    big = [(op, st) for op, st in rec.big if st.data_ptr() not in inputs]
    assert len(big) == 2 and all(st._cdata in grads for _, st in big), [
        (op, st.nbytes()) for op, st in big]
    assert [x[0] for x in seen] == ["partial", "grads"]
    for _, sv, tv, *_ in seen:
        assert sv.data_ptr() == s.data_ptr() and sv.stride() == (vs, 1) and sv.shape[1] == vocab
        assert tv.data_ptr() == t.data_ptr() and tv.stride() == (vt, 1) and tv.shape[1] == vocab
    gs_out, gt_out = seen[1][3:]
    assert gs_out.data_ptr() == s.grad.data_ptr() and gs_out.stride() == (vs, 1)
    assert gt_out.data_ptr() == t.grad.data_ptr() and gt_out.stride() == (vt, 1)


@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
def test_strided_rows_are_read_in_place(impl, inplace):
    """Logits that are themselves column slices (rows apart, stride 1 along V) are read in
    place without vocab_size too: the values and gradients of the copied slices, and an
    in-place gradient lands in the student's own columns only."""
    s, t = _pair(45, 45, lead=(6,))
    labels = torch.randint(0, 37, (6,))
    kwargs = dict(ce_weight=0.5, divergence="jsd", impl=impl)
    want, wgs, wgt = _run(impl, s[:, :37].contiguous(), t[:, 3:40].contiguous(), labels,
                          torch.tensor(0.7), **{k: v for k, v in kwargs.items() if k != "impl"})
    s_base = s.clone().requires_grad_()
    t_base = t.clone().requires_grad_()
    sv, tv = s_base[:, :37], t_base[:, 3:40]
    buf = s.clone()
    if inplace:  # the gradient overwrites a column slice of a wider buffer
        sv = buf[:, :37].requires_grad_()
    assert not sv.is_contiguous() and not tv.is_contiguous()
    out = kd.kd_loss(sv, tv, labels, inplace_backward=inplace, **kwargs)
    out.backward(torch.tensor(0.7))
    torch.testing.assert_close(out.detach(), want)
    torch.testing.assert_close(t_base.grad[:, 3:40], wgt)
    if inplace:
        torch.testing.assert_close(sv.grad, wgs)
        torch.testing.assert_close(buf[:, :37], wgs)  # written over the student's columns
        assert torch.equal(buf[:, 37:], s[:, 37:])  # and nowhere else
    else:
        torch.testing.assert_close(s_base.grad[:, :37], wgs)


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_vocab_size_one_row_divides_by_the_columns_used(impl, reduction):
    """1-D logits: batchmean and mean divide by vocab_size (the first dim and numel of the
    logits used), as on the sliced logits."""
    s, t = _pair(45, 37, lead=())
    got = kd.kd_loss(s, t, vocab_size=30, reduction=reduction, impl=impl)
    want = kd.kd_loss(s[:30].clone(), t[:30].clone(), reduction=reduction, impl=impl)
    torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_vocab_size_compiles(impl):
    """torch.compile(fullgraph=True) of kd_loss with a narrower vocab_size: the eager values
    and full-width gradients."""
    torch._dynamo.reset()
    s, t = _pair(45, 37, lead=(6,))
    labels = torch.randint(0, 30, (6,))

    def loss_fn(s, t):
        return kd.kd_loss(s, t, labels, vocab_size=30, ce_weight=0.5, impl=impl)

    results = [_run(impl, s, t, labels, torch.tensor(0.7), vocab_size=30, ce_weight=0.5)]
    s_, t_ = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = torch.compile(loss_fn, fullgraph=True)(s_, t_)
    (out * 0.7).backward()
    for eager, comp in zip(results[0], (out.detach(), s_.grad, t_.grad), strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


# ---- the fused linear form ----------------------------------------------------------------


def _heads(vs, vt, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, h, ht = 10, 8, 6

    def randn(*shape):  # drawn on the CPU, the same values on every machine
        return torch.randn(*shape, generator=g, device="cpu").to(DEVICE)

    return {
        "student_hidden": randn(n, h),
        "student_weight": randn(vs, h),
        "student_bias": randn(vs),
        "teacher_hidden": randn(n, ht),
        "teacher_weight": randn(vt, ht),
        "teacher_bias": randn(vt),
    }


def _linear(impl, x, labels, **kw):
    x = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    out = kd.linear_kd_loss(**x, labels=labels, impl=impl, chunk_size=4, **kw)
    out.backward(upstream_grad(out) if out.dim() == 0 else torch.ones_like(out) * 0.7)
    return out.detach(), {k: v.grad for k, v in x.items()}


ROWS_OF = {"student_weight": 0, "student_bias": 0, "teacher_weight": 0, "teacher_bias": 0,
           "teacher_logits": 1}


def _check_linear(impl, x, vocab, labels, **kw):
    """linear_kd_loss(vocab_size=vocab) against the same call on copies of the first rows
    (columns of teacher_logits): equal loss and gradients, exactly 0 past vocab."""
    out, grads = _linear(impl, x, labels, vocab_size=vocab, **kw)
    cut = {k: (v[:vocab] if ROWS_OF.get(k) == 0 else v[:, :vocab] if k in ROWS_OF else v)
           .contiguous() for k, v in x.items()}
    want, wgrads = _linear(impl, cut, labels, **kw)
    torch.testing.assert_close(out, want)
    for k, g in grads.items():
        assert g.shape == x[k].shape, k
        if k not in ROWS_OF:
            torch.testing.assert_close(g, wgrads[k])
        elif ROWS_OF[k] == 0:
            torch.testing.assert_close(g[:vocab], wgrads[k])
            assert not g[vocab:].any(), k
        else:
            torch.testing.assert_close(g[:, :vocab], wgrads[k])
            assert not g[:, vocab:].any(), k


@pytest.mark.parametrize("vs, vt", [(37, 45), (45, 37)])
@pytest.mark.parametrize("vocab", [30, 37])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_vocab_size_uses_the_first_rows(impl, vs, vt, vocab, reduction):
    x = _heads(vs, vt)
    labels = torch.randint(0, vocab, (10,))
    labels[3] = -100
    _check_linear(impl, x, vocab, labels, divergence="jsd", ce_weight=0.5, temperature=2.0,
                  reduction=reduction)


@pytest.mark.parametrize("vs, vt", [(37, 45), (45, 37)])
def test_linear_vocab_size_with_teacher_logits(impl, vs, vt):
    x = _heads(vs, vt)
    x["teacher_logits"] = x.pop("teacher_hidden") @ x.pop("teacher_weight").T
    del x["teacher_bias"]
    labels = torch.randint(0, 30, (10,))
    _check_linear(impl, x, 30, labels, divergence="forward_kl", reduction="mean")


@pytest.mark.parametrize("teacher", ["teacher_weight", "teacher_logits"])
def test_linear_mismatch_names_both_widths_and_the_fix(teacher):
    x = _heads(45, 37)
    if teacher == "teacher_logits":
        x["teacher_logits"] = x.pop("teacher_hidden") @ x.pop("teacher_weight").T
        del x["teacher_bias"]
    with pytest.raises(ValueError, match=f"student_weight has vocabulary 45 and {teacher} 37.*"
                                         "vocab_size=37"):
        kd.linear_kd_loss(**x)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 37\]"):
        kd.linear_kd_loss(**x, vocab_size=38)
