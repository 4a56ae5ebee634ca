"""Triton kd_loss kernels (kdkernels/triton/kd.py), run on CPU under TRITON_INTERPRET=1 when
there is no GPU.

Error model (tests/_formulas.assert_error_model): the truth is the direct formula of
DESIGN.md in float64 on the same (already rounded) inputs; the baseline is the reference
implementation, impl="torch", on the same inputs. The Triton result may be off the truth by at
most 2x the reference's error (a different but no worse order of operations) plus a floor of
a few ulps of the output dtype (float32 results: 2e-6 absolute and relative; bfloat16
gradients: 2e-3 absolute, 8e-3 relative, one rounding of an O(0.1) entry to 8 mantissa bits).
Both backends accumulate in float32 from the same inputs, so for bfloat16 inputs the loss
errors are float32-sized and the gradient errors are dominated by the final rounding.

Shapes are small (the interpreter runs every program in Python). FORCE_BLOCK_V and
FORCE_SPLIT shrink the vocab tile and split rows so that the tile loop, the masking of a
ragged last tile, fully masked / fully -inf tiles and the merge kernels all run.
"""

import contextlib
import math
import warnings

import pytest
import torch
from _device import DEVICE
from _formulas import assert_error_model
from _formulas import kd_loss as formula_kd_loss
from _ranges import over_ranges

import kdkernels as kd
from kdkernels import _stats
from kdkernels._spec import TWO_PASS_KINDS, Divergence, LossSpec
from kdkernels.triton import kd as tkd

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "soft_cross_entropy", "tvd", "forward_reverse_kl", "alpha_beta")
# (temperature, teacher_temperature): T = 1, T = 2, a teacher at its own temperature
TEMPERATURES = {"T1": (1.0, None), "T2": (2.0, None), "Ts2-Tt1.5": (2.0, 1.5)}
# no labels; labels with ignored rows (skipped); the same with a CE term
LABELS = ("no-labels", "ignored", "ce0.5")
DIV_KW = dict(beta=0.3, skew=0.1)


@pytest.fixture(autouse=True)
def _quiet():
    # the interpreter evaluates masked lanes too (log 0, 0 / 0 on ignored rows) in numpy,
    # which warns; the kernels discard those lanes with a where
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@contextlib.contextmanager
def forced(block_v=None, split=None):
    old = tkd.FORCE_BLOCK_V, tkd.FORCE_SPLIT
    tkd.FORCE_BLOCK_V, tkd.FORCE_SPLIT = block_v, split
    try:
        yield
    finally:
        tkd.FORCE_BLOCK_V, tkd.FORCE_SPLIT = old


def make_labels(n, v, ignore_index=-100):
    labels = torch.randint(0, v, (n,))
    labels[1::3] = ignore_index  # ignored rows between valid ones
    return labels.to(DEVICE)


def run(impl, s, t, labels, g, teacher_grad, **kw):
    """Row losses (reduction='none') and gradients for the upstream gradient g."""
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_(teacher_grad)
    out = kd.kd_loss(s, t, labels, impl=impl, reduction="none", **kw)
    out.backward(g)
    return out.detach(), s.grad, t.grad


def truth(s, t, labels, g, teacher_grad, **kw):
    s = s.detach().double().requires_grad_()
    t = t.detach().double().requires_grad_(teacher_grad)
    out = formula_kd_loss(s, t, labels, reduction="none", **kw)
    out.backward(g.double())
    return out.detach(), s.grad, t.grad


def check(s, t, labels=None, teacher_grad=True, truth_from="formula", **kw):
    """Triton against the float64 truth, with impl='torch' as the error baseline.

    truth_from="reference": the truth is impl='torch' on float64 copies of the inputs, for
    inputs where the formula's probability-space mixture underflows even in float64
    (logits of 1e4, -inf padding: its gradient is nan there); the reference forms mixtures
    in log space."""
    g = torch.randn(s.shape[:-1], device=s.device)
    tri = run("triton", s, t, labels, g, teacher_grad, **kw)
    ref = run("torch", s, t, labels, g, teacher_grad, **kw)
    if truth_from == "formula":
        tru = truth(s, t, labels, g, teacher_grad, **kw)
    else:
        tru = run("torch", s.double(), t.double(), labels, g.double(), teacher_grad, **kw)
    assert tri[0].dtype == torch.float32
    for what, a, b, c in zip(("loss", "student gradient", "teacher gradient"), tri, ref, tru,
                             strict=True):
        if what == "teacher gradient" and not teacher_grad:
            assert a is None
            continue
        assert a.dtype == (s.dtype if what == "student gradient" else t.dtype
                           if what == "teacher gradient" else torch.float32)
        assert_error_model(a, c, b, s.dtype, what)
    return tri


def logits(n, v, dtype=torch.float32, scale=2.0):
    return (torch.randn(n, v) * scale).to(dtype).to(DEVICE)


# --------------------------------------------------------------------------------------
# values and gradients: the matrix
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("labels_mode", LABELS)
@pytest.mark.parametrize("temps", list(TEMPERATURES), ids=list(TEMPERATURES))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matrix(divergence, temps, labels_mode, dtype):
    n, v = (7, 257) if dtype == torch.float32 else (3, 1000)
    ts, tt = TEMPERATURES[temps]
    labels = None if labels_mode == "no-labels" else make_labels(n, v)
    kw = dict(ce_weight=0.5) if labels_mode == "ce0.5" else {}
    check(logits(n, v, dtype), logits(n, v, dtype), labels, teacher_grad=labels_mode != "ignored",
          divergence=divergence, temperature=ts, teacher_temperature=tt, **DIV_KW, **kw)


@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("weight", [0.5, 0.9, 1.0])
def test_mixture_weights(divergence, weight):
    # skew = 1 makes m = p (or q): u = 1 exactly and the HAS_U = False path runs
    check(logits(3, 33), logits(3, 33), divergence=divergence, beta=weight, skew=weight)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float16)], ids=["bf16-fp32", "fp32-fp16"])
def test_mixed_dtypes(dtypes):
    # the error model is taken at the lower precision of the two (the bound of its table)
    s, t = logits(3, 100, dtypes[0]), logits(3, 100, dtypes[1])
    g = torch.randn(3).to(DEVICE)
    loss, gs, gt = run("triton", s, t, None, g, True, divergence="jsd", temperature=2.0)
    ref = run("torch", s, t, None, g, True, divergence="jsd", temperature=2.0)
    tru = truth(s, t, None, g, True, divergence="jsd", temperature=2.0)
    assert gs.dtype == dtypes[0] and gt.dtype == dtypes[1]
    assert_error_model(loss, tru[0], ref[0], torch.float32, "loss")
    assert_error_model(gs, tru[1], ref[1], dtypes[0], "student gradient")
    assert_error_model(gt, tru[2], ref[2], dtypes[1], "teacher gradient")


def test_reduction_and_kd_weight():
    s, t, labels = logits(7, 64), logits(7, 64), make_labels(7, 64)
    for impl_out in ("token_mean", "sum", "batchmean"):
        kw = dict(divergence="reverse_kl", temperature=3.0, kd_weight=0.3, ce_weight=2.0,
                  temperature_scale=False, reduction=impl_out)
        a = kd.kd_loss(s, t, labels, impl="triton", **kw)
        b = formula_kd_loss(s.double(), t.double(), labels, **kw)
        torch.testing.assert_close(a.double(), b, rtol=2e-6, atol=2e-6)


# --------------------------------------------------------------------------------------
# tiles and the vocab split
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [None, 3, 1000], ids=["nosplit", "split3", "split-max"])
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["ce-shared", "ce-own"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_tiles_and_split(divergence, temperature, split):
    # V = 257 with 32-wide tiles: 9 tiles, the last one 1 column wide. split=1000 is clamped
    # to one tile per program.
    n, v = 4, 257
    with forced(block_v=32, split=split):
        check(logits(n, v), logits(n, v), make_labels(n, v), divergence=divergence,
              temperature=temperature, ce_weight=0.7, **DIV_KW)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_split_matches_unsplit(divergence):
    # the exact merge: split and unsplit agree to float32 rounding of a different sum order
    s, t, labels = logits(3, 300, scale=4.0), logits(3, 300, scale=4.0), make_labels(3, 300)
    g = torch.randn(3).to(DEVICE)
    kw = dict(divergence=divergence, temperature=1.5, ce_weight=0.3, **DIV_KW)
    with forced(block_v=16):
        a = run("triton", s, t, labels, g, True, **kw)
    with forced(block_v=16, split=5):
        b = run("triton", s, t, labels, g, True, **kw)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_launch_config():
    # automatic split only with fewer than SPLIT_ROWS_PER_SM rows per SM, and never on CPU
    assert tkd.launch_config(128256, 1, None).n_split == 1
    assert tkd.launch_config(128256, 2 * 132, 132).n_split == 1
    assert tkd.launch_config(128256, 4, 132).n_split > 1
    for v in (1, 33, 4096, 4097, 32000, 128256, 152064, 262144):
        for n in (1, 3, 64, 263, 100000):
            for n_sm in (None, 108, 132):
                c = tkd.launch_config(v, n, n_sm)
                assert c.block_v & (c.block_v - 1) == 0 and c.block_v <= tkd.MAX_BLOCK_V
                assert c.chunk % c.block_v == 0
                # the chunks tile [0, V): none empty, none missing
                assert (c.n_split - 1) * c.chunk < v <= c.n_split * c.chunk
                assert c.n_split <= c.split_block
                # aot_kernels lists this launch's tile width and warps
                ak = tkd.aot_kernels(v, torch.bfloat16)
                assert any(k.constexprs.get("BLOCK_V") == c.block_v
                           and k.num_warps == c.num_warps for k in ak)
                assert any(k.constexprs.get("SPLIT_BLOCK") == c.split_block for k in ak)


def test_aot_kernels_cover_every_launch():
    """Every (kernel, constexprs) the launchers use for each divergence / flag combination
    appears in aot_kernels: record the launches of a real run and look each one up."""
    v = 100
    listed = {(k.fn, tuple(sorted(k.constexprs.items())), k.num_warps)
              for k in tkd.aot_kernels(v, torch.float32)}
    seen = []

    class Rec:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, num_warps, **constexprs):
                seen.append((self.fn, tuple(sorted(constexprs.items())), num_warps))
                return self.fn[grid](*args, num_warps=num_warps, **constexprs)
            return launch

    names = ("_kd_fwd_kernel", "_kd_merge_kernel", "_kd_mix_kernel", "_kd_mix_merge_kernel",
             "_kd_bwd_kernel", "_kd_pw_kernel")
    orig = {n: getattr(tkd, n) for n in names}
    try:
        for n in names:
            setattr(tkd, n, Rec(orig[n]))
        for divergence in DIVERGENCES:
            for skew in (0.1, 1.0):
                for temperature, labels, ce in ((1.0, None, 0.0), (1.0, True, 0.0),
                                                (1.0, True, 1.0), (2.0, True, 1.0)):
                    for split in (None, 2):
                        lab = make_labels(2, v) if labels else None
                        with forced(split=split):
                            run("triton", logits(2, v), logits(2, v), lab,
                                torch.ones(2, device=DEVICE),
                                skew == 0.1, divergence=divergence, skew=skew,
                                temperature=temperature, ce_weight=ce)
                            # the row-statistics interface over a range
                            spec = LossSpec(Divergence.from_user(divergence, 0.3, skew),
                                            1 / temperature, 1.0, 1.0, ce)
                            s, t = logits(2, v), logits(2, v)
                            stats = tkd.partial(s, t, lab, spec, 3)
                            sums = (tkd.mix_partial(s, t, spec, stats, 3)
                                    if spec.div.kind in TWO_PASS_KINDS else None)
                            stats = _stats.finish(stats, lab, spec, sums)[1]
                            tkd.grads(s, t, lab, spec, stats, 3, torch.ones(2), skew == 0.1)
    finally:
        for n in names:
            setattr(tkd, n, orig[n])
    assert seen
    missing = [x for x in seen if x not in listed]
    assert not missing, f"launched but not in aot_kernels: {missing[:3]}"


# --------------------------------------------------------------------------------------
# extreme inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_huge_logits(divergence, dtype):
    # logits of +-1e4: lse is ~1e4, the divergence comes from the shifted differences
    n, v = 3, 70
    s = (torch.randint(-1, 2, (n, v)) * 1e4 + torch.randn(n, v)).to(dtype)
    t = (torch.randint(-1, 2, (n, v)) * 1e4 + torch.randn(n, v)).to(dtype)
    t[0] = s[0]  # a row with D = 0 exactly
    s[1] = t[1] + torch.randn(v).to(dtype) * 0  # and one with tiny shifts only
    t[1, :5] += 1.0
    s, t = s.to(DEVICE), t.to(DEVICE)
    with forced(block_v=16):
        loss, gs, gt = check(s, t, make_labels(n, v), divergence=divergence, ce_weight=0.1,
                             truth_from="reference", **DIV_KW)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_inf_padding(divergence, split):
    # -inf at the same positions in both: a whole 16-wide tile (and with split=3 a whole
    # chunk) and a ragged tail; they carry no mass, get zero gradients, give no nan
    n, v = 3, 90
    s, t = logits(n, v), logits(n, v)
    pad = torch.zeros(v, dtype=torch.bool)
    pad[:32] = True  # the first two tiles: the running maxima start at -inf
    pad[80:] = True
    s[:, pad] = -math.inf
    t[:, pad] = -math.inf
    with forced(block_v=16, split=split):
        loss, gs, gt = check(s, t, make_labels(n, v) % 40 + 40, divergence=divergence,
                             temperature=2.0, ce_weight=0.5, truth_from="reference", **DIV_KW)
    assert torch.isfinite(loss).all()
    assert (gs[:, pad] == 0).all() and (gt[:, pad] == 0).all()


def test_student_zero_where_teacher_positive():
    # q = 0 with p > 0: forward KL is +inf (the true value), not nan; reverse KL is finite
    s, t = logits(2, 40), logits(2, 40)
    s[0, 3] = -math.inf
    with forced(block_v=16):
        fwd = kd.kd_loss(s, t, impl="triton", reduction="none")
        rev = kd.kd_loss(s, t, impl="triton", reduction="none", divergence="reverse_kl")
        rev_ref = kd.kd_loss(s, t, impl="torch", reduction="none", divergence="reverse_kl")
    assert fwd[0] == math.inf and torch.isfinite(fwd[1])
    torch.testing.assert_close(rev, rev_ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_mixture_underflow(divergence):
    # most log-probabilities below -104 in both inputs: p and q underflow to 0 in float32
    # (exp(-104) < 2**-149); the log-space mixture keeps every term finite and correct
    n, v = 3, 50
    s = torch.randn(n, v) - 150.0
    t = torch.randn(n, v) - 150.0
    s[:, 7] = 0.0
    t[:, 7] = 1.0
    t[:, 9] = 0.5
    s, t = s.to(DEVICE), t.to(DEVICE)
    with forced(block_v=16):
        loss, gs, gt = check(s, t, divergence=divergence, beta=0.3, skew=0.25,
                             truth_from="reference")
    lq = torch.log_softmax(s, -1)
    assert (lq < -104).float().mean() > 0.9
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


NON_FINITE = ("nan-student", "nan-teacher", "posinf-student", "posinf-teacher",
              "all-neginf-student", "all-neginf-teacher", "all-neginf-both")


def _non_finite_rows(case, n=3, v=23):
    """(s, t) whose row 1 holds the case, at column 17: a later tile (block_v = 4) and the
    last chunk of a split row; the other rows are ordinary."""
    s, t = logits(n, v), logits(n, v)
    side = t if "teacher" in case else s
    if case.startswith("nan"):
        side[1, 17] = math.nan
    elif case.startswith("posinf"):
        side[1, 17] = math.inf
    else:
        side[1] = -math.inf
        if case.endswith("both"):
            t[1] = -math.inf
    return s, t


@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize("case", NON_FINITE)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_finite_rows_over_tiles_and_split(divergence, case, split):
    """The non-finite policy (top of kd.py) through the tile loop and the merge kernels: the
    row is NaN; ignored, it is 0 with a gradient of exactly 0; the other rows are exact."""
    s, t = _non_finite_rows(case)
    kw = dict(divergence=divergence, temperature=2.0, ce_weight=0.5, **DIV_KW)
    for labels in ([3, 5, 7], [3, -100, 7]):
        labels = torch.tensor(labels, device=DEVICE)
        with forced(block_v=4, split=split):
            out, gs, gt = run("triton", s, t, labels, torch.ones(3, device=DEVICE), True, **kw)
        want = kd.kd_loss(s, t, labels, impl="torch", reduction="none", **kw)
        torch.testing.assert_close(out[[0, 2]], want[[0, 2]], rtol=2e-6, atol=2e-6)
        if labels[1] == -100:
            assert out[1] == 0 and (gs[1] == 0).all() and (gt[1] == 0).all()
        else:
            assert out[1].isnan(), out


@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize("case", NON_FINITE)
def test_non_finite_maxima_in_the_table(case, split):
    """The table's maxima carry the row's state as torch.amax (what _stats.finish reads): NaN
    after a NaN, +inf after a +inf, -inf when nothing is finite; the other rows are exact."""
    s, t = _non_finite_rows(case)
    spec = _shard_spec("forward_kl", 0.5, 0.5)
    labels = torch.tensor([3, 5, 7], device=DEVICE)
    with forced(block_v=4, split=split):
        stats = tkd.partial(s, t, labels, spec)
    C = _stats.Col
    for c, x in ((C.MS, s), (C.MT, t), (C.M1, s)):
        torch.testing.assert_close(stats[:, c], x.amax(1), rtol=0, atol=0, equal_nan=True,
                                   msg=c.name)


@pytest.mark.parametrize("case", ["nan-teacher", "posinf-teacher", "all-neginf-teacher"])
@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_mix_partial_of_a_row_without_softmax_is_nan(divergence, case):
    """Given global statistics without a softmax on a side, a range's mixture sums are NaN
    (the p > 0 masks of the sums would otherwise drop the NaN and give a finite loss)."""
    s, t = _non_finite_rows(case)
    spec = LossSpec(Divergence.from_user(divergence, 0.3, 0.2), inv_ts=0.5, inv_tt=0.5,
                    kd_scale=4.0)
    _, stats = tkd.kd_fwd(s, t, None, *spec.as_args())
    with forced(block_v=4, split=2):
        sums = tkd.mix_partial(_cols(s, 5, 23), _cols(t, 5, 23), spec, stats, 5)
    assert sums[1].isnan().all() and torch.isfinite(sums[[0, 2]]).all()


def test_identical_inputs_give_zero():
    """q = p: every divergence is 0, except soft_cross_entropy, which is then H(p)."""
    s = logits(4, 100)
    entropy = -(s.softmax(-1) * s.log_softmax(-1)).sum(-1)
    for divergence in DIVERGENCES:
        out = kd.kd_loss(s, s.clone(), impl="triton", reduction="none", divergence=divergence)
        want = entropy if divergence == "soft_cross_entropy" else torch.zeros_like(out)
        assert ((out - want).abs() < 1e-5).all(), divergence


def test_empty_and_all_ignored():
    s = logits(0, 10).requires_grad_()
    out = kd.kd_loss(s, logits(0, 10), impl="triton", reduction="sum")
    out.backward()
    assert out.item() == 0 and s.grad.shape == (0, 10)
    s = logits(3, 10).requires_grad_()
    labels = torch.full((3,), -100, device=DEVICE)
    out = kd.kd_loss(s, logits(3, 10), labels, impl="triton", ce_weight=1.0)
    out.backward()
    assert out.item() == 0 and (s.grad == 0).all()


def test_bad_inputs():
    s = logits(3, 10)
    spec = kd.functional.LossSpec(kd.functional.Divergence("forward_kl"), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="stride 1 along V"):
        tkd.kd_rows(s.t().contiguous().t(), s, None, spec)
    with pytest.raises(TypeError, match="dtype"):
        tkd.kd_rows(s.double(), s.double(), None, spec)
    with pytest.raises(ValueError, match="labels"):
        tkd.kd_rows(s, s, torch.zeros(2, dtype=torch.int64), spec)
    with pytest.raises(ValueError, match="kind"):
        tkd.kd_fwd(s, s, None, "kl", 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, -100)


# --------------------------------------------------------------------------------------
# inplace_backward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_inplace_backward(divergence, teacher_grad, dtype):
    n, v = 5, 77
    s0, t0, labels = logits(n, v, dtype), logits(n, v, dtype), make_labels(n, v)
    kw = dict(divergence=divergence, temperature=2.0, ce_weight=0.5, reduction="sum", **DIV_KW)
    with forced(block_v=32, split=2):
        s = s0.clone().requires_grad_()
        t = t0.clone().requires_grad_(teacher_grad)
        ref = kd.kd_loss(s, t, labels, impl="triton", **kw)
        (ref * 0.7).backward()
        s2 = s0.clone().requires_grad_()
        t2 = t0.clone().requires_grad_(teacher_grad)
        ptr = s2.data_ptr()
        out = kd.kd_loss(s2, t2, labels, impl="triton", inplace_backward=True, **kw)
        assert not torch.equal(s2.detach(), s0)  # the logits were consumed
        (out * 0.7).backward()
    assert torch.equal(out, ref)
    # the same kernel computes both; in place, the gradient is rounded to the input dtype
    # before the upstream factor is applied: one extra rounding
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(s2.grad, s.grad, **tol)
    assert s2.grad.data_ptr() == ptr  # the student logits' buffer holds the gradient
    if teacher_grad:
        torch.testing.assert_close(t2.grad, t.grad, **tol)
    else:
        assert t2.grad is None


def test_inplace_backward_guards_other_uses():
    # another autograd use of the consumed logits fails loudly instead of reading gradients
    s = logits(3, 20).requires_grad_()
    other = (s * s).sum()  # saves s for its backward
    kd.kd_loss(s, logits(3, 20), impl="triton", inplace_backward=True).backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


# --------------------------------------------------------------------------------------
# torch.library ops and torch.compile
# --------------------------------------------------------------------------------------


def _spec_args(divergence, **kw):
    spec = kd.functional.LossSpec(
        kd.functional.Divergence.from_user(divergence, 0.3, 0.2),
        inv_ts=kw.get("inv_ts", 0.5), inv_tt=1.0, kd_scale=4.0,
        ce_weight=kw.get("ce_weight", 0.0), ignore_index=-100,
    )
    return spec.as_args()


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "skew_reverse_kl"])
def test_opcheck(divergence, labels):
    n, v = 3, 40
    s = logits(n, v).requires_grad_()
    t = logits(n, v).requires_grad_()
    lab = make_labels(n, v) if labels else None
    args = _spec_args(divergence, ce_weight=0.5 if labels else 0.0)
    with forced(block_v=16):
        torch.library.opcheck(tkd.kd_fwd, (s, t, lab, *args))
        _, stats = tkd.kd_fwd(s.detach(), t.detach(), lab, *args)
        g = torch.randn(n).to(DEVICE)
        for teacher_grad in (False, True):
            torch.library.opcheck(
                tkd.kd_bwd, (g, s.detach(), t.detach(), lab, stats, teacher_grad, *args))
        torch.library.opcheck(
            tkd.kd_fwd_inplace, (s.detach().clone(), t.detach(), lab, True, *args),
            test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    # the loss of a training step traced without graph breaks (fullgraph=True raises on
    # one); AOTAutograd traces the registered backward op into the backward graph, which
    # runs at .backward() (Tensor.backward itself is not traced by dynamo)
    torch._dynamo.reset()

    def loss_fn(s, t, labels):
        return kd.kd_loss(s, t, labels, divergence="jsd", beta=0.3, temperature=2.0,
                          ce_weight=0.5, impl="triton") * 1.5

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    n, v = 4, 50
    s0, t0, labels = logits(n, v), logits(n, v), make_labels(n, v)
    s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
    # inductor's on-disk graph cache keys do not cover a custom op's Python fake kernel:
    # after an edit of kd.py a cached graph could hold stale output shapes
    with torch._inductor.config.patch(force_disable_caches=True):
        out = compiled(s, t, labels)
        out.backward()
    s_ref, t_ref = s0.clone().requires_grad_(), t0.clone().requires_grad_()
    ref = loss_fn(s_ref, t_ref, labels)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s.grad, s_ref.grad)
    torch.testing.assert_close(t.grad, t_ref.grad)


def test_inplace_backward_compiles():
    # kd_rows(inplace_backward=True) traced without graph breaks. Under torch.compile the
    # graph is functionalized, so the gradient lands in a fresh buffer: the values are what
    # matters here. (kd.kd_loss itself compares data pointers for inplace_backward, which
    # dynamo cannot trace.)
    torch._dynamo.reset()
    spec = kd.functional.LossSpec(kd.functional.Divergence("reverse_kl"), 0.5, 0.5, 4.0)
    w = torch.arange(1.0, 4.0, device=DEVICE)

    def loss_fn(s, t):
        return (tkd.kd_rows(s, t, None, spec, True) * w).sum()

    s0, t0 = logits(3, 20), logits(3, 20)
    s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
    torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(s, t).backward()
    s_ref, t_ref = s0.clone().requires_grad_(), t0.clone().requires_grad_()
    loss_fn(s_ref, t_ref).backward()
    torch.testing.assert_close(s.grad, s_ref.grad)
    torch.testing.assert_close(t.grad, t_ref.grad)


def test_inplace_backward_twice_fails():
    # the gradient was rescaled in place by the first backward: a second one must not
    # rescale it again
    s = logits(3, 20).requires_grad_()
    out = kd.kd_loss(s, logits(3, 20), impl="triton", inplace_backward=True)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


# --------------------------------------------------------------------------------------
# the row-statistics interface (_stats.py): partial, mix_partial, grads over column ranges
# --------------------------------------------------------------------------------------

# V = 37 as three ranges and an empty one (the merge's identity)
SHARDS = ((0, 10), (10, 25), (25, 37), (37, 37))
SHARD_V = 37
# labels in every range, on its first column, and ignored rows between them
SHARD_LABELS = (3, -100, 15, 30, -100, 10, 36, 25)
SHARD_DIVS = {
    "forward_kl": Divergence("forward_kl"),
    "reverse_kl": Divergence("reverse_kl"),
    "jsd": Divergence.from_user("jsd", 0.3, 0.0),
    "skew_forward_kl": Divergence.from_user("skew_forward_kl", 0.0, 0.2),
    "soft_cross_entropy": Divergence("soft_cross_entropy"),
    "tvd": Divergence("tvd"),
    "forward_reverse_kl": Divergence.from_user("forward_reverse_kl", 0.0, 0.0, alpha=0.3),
    "alpha_beta": Divergence.from_user("alpha_beta", 0.0, 0.0, ab_alpha=0.3, ab_beta=0.8),
}
# (inverse temperature, labels, ce_weight, logits): own CE pair at T = 2, the student's at
# T = 1, no labels, and logits of +-1e4 (shifted differences only) at T = 2
SHARD_CASES = {
    "T2-ce": (0.5, True, 0.5, "normal"),
    "T1-ce": (1.0, True, 0.7, "normal"),
    "T1.5-nolabels": (1 / 1.5, False, 0.0, "normal"),
    "T2-huge": (0.5, True, 0.3, "huge"),
}


def _shard_inputs(case, dtype):
    inv_t, with_labels, ce_weight, kind = SHARD_CASES[case]
    n, v = len(SHARD_LABELS), SHARD_V
    if kind == "huge":
        s = torch.randint(-1, 2, (n, v)) * 1e4 + torch.randn(n, v)
        t = torch.randint(-1, 2, (n, v)) * 1e4 + torch.randn(n, v)
    else:
        s, t = torch.randn(n, v) * 2, torch.randn(n, v) * 2
    labels = torch.tensor(SHARD_LABELS).to(DEVICE) if with_labels else None
    return s.to(dtype).to(DEVICE), t.to(dtype).to(DEVICE), labels, inv_t, ce_weight


def _shard_spec(divergence, inv_t, ce_weight):
    return LossSpec(SHARD_DIVS[divergence], inv_ts=inv_t, inv_tt=inv_t, kd_scale=1 / inv_t**2,
                    ce_weight=ce_weight, ignore_index=-100)


def _cols(x, a, b):
    return x[:, a:b].contiguous()


def _sharded(s, t, labels, spec):
    """(row losses, finished table, mixture sums or None) from one partial per range,
    _stats.merge_all and _stats.finish: the vocab-parallel path without a process group."""
    return over_ranges(tkd, s, t, labels, spec, SHARDS)


SHARD_PARAMS = [
    pytest.mark.parametrize("inner", [None, (4, 2)], ids=["whole", "inner-split"]),
    pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"]),
    pytest.mark.parametrize("case", list(SHARD_CASES)),
    pytest.mark.parametrize("divergence", list(SHARD_DIVS)),
]


def _shard_params(fn):
    for mark in SHARD_PARAMS:
        fn = mark(fn)
    return fn


@_shard_params
def test_partials_merge_to_kd_rows(divergence, case, dtype, inner):
    """partial per range + merge_all + finish gives kd_rows's losses and its saved table.
    `inner` also splits each range inside the kernels (the merge kernels' partial mode)."""
    s, t, labels, inv_t, ce_weight = _shard_inputs(case, dtype)
    spec = _shard_spec(divergence, inv_t, ce_weight)
    loss, stats = tkd.kd_fwd(s, t, labels, *spec.as_args())
    with forced(*(inner or (None, None))):
        got, fin, _ = _sharded(s, t, labels, spec)
    valid = labels != -100 if labels is not None else torch.ones(len(s), dtype=torch.bool,
                                                                   device=DEVICE)
    # the same sums in another order (the order of ranges and tiles): float32 rounding
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
    assert (got[~valid] == 0).all()
    assert fin.shape == stats.shape == (len(s), _stats.NCOL)
    C = _stats.Col
    # the maxima are exact; ignored rows are the empty range in both
    for c in (C.MS, C.MT, C.M1):
        assert torch.equal(fin[:, c], stats[:, c]), c.name
    cols = [C.LS, C.LT, C.L1, C.LABEL]
    cols += list(_stats.MIX_COLS) if spec.div.kind == "mixture" else [C.DIV]
    for c in cols:
        torch.testing.assert_close(fin[valid, c], stats[valid, c], rtol=1e-5, atol=1e-6,
                                   msg=c.name)
    if labels is not None:
        # LABEL is the raw logit of the label, and M1 the maximum of s at T = 1
        lab = labels.clamp(min=0)
        assert torch.equal(fin[valid, C.LABEL], s.float().gather(1, lab[:, None])[valid, 0])
        if ce_weight:
            assert torch.equal(fin[valid, C.M1], s.float().amax(1)[valid])


@_shard_params
def test_grads_over_ranges(divergence, case, dtype, inner):
    """grads of each range, concatenated, is the unsharded backward: bit for bit given the
    same table (elementwise given the row scalars, labels rebased by offset), and to the
    rounding of the output dtype given the merged one."""
    s, t, labels, inv_t, ce_weight = _shard_inputs(case, dtype)
    spec = _shard_spec(divergence, inv_t, ce_weight)
    args = spec.as_args()
    _, stats = tkd.kd_fwd(s, t, labels, *args)
    g = torch.randn(len(s), device=DEVICE)
    ds, dt = tkd.kd_bwd(g, s, t, labels, stats, True, *args)
    with forced(*(inner or (None, None))):
        _, fin, _ = _sharded(s, t, labels, spec)
        same = [tkd.grads(_cols(s, a, b), _cols(t, a, b), labels, spec, stats, a, g, True)
                for a, b in SHARDS]
        merged = [tkd.grads(_cols(s, a, b), _cols(t, a, b), labels, spec, fin, a, g, b > 30)
                  for a, b in SHARDS]
    if DEVICE.type == "cpu":
        assert torch.equal(torch.cat([x for x, _ in same], 1), ds)
    else:
        # Compiled, the whole row and the ranges are different specializations of the kernel
        # (BLOCK_V), and LLVM contracts ds = cs gs + cce (q1 - onehot) into an FMA that keeps
        # either product unrounded: in the sm_90 PTX of jsd with CE, the whole row keeps
        # cs gs for one element of each thread's pair, the ranges keep cce (q1 - onehot).
        # Elementwise (no reduction): an element moves by an ulp of the larger product, at
        # most its own size plus |g| ce_weight, then one rounding to the output dtype.
        eps = torch.finfo(ds.dtype).eps
        bound = 4 * eps * (ds.float().abs() + (g.abs() * ce_weight)[:, None])
        err = (torch.cat([x for x, _ in same], 1).float() - ds.float()).abs()
        assert (err <= bound).all(), f"max error over bound {(err / bound).max().item():.3g}"
    # the teacher gradient has no such sum (dt = ct gt): the same arithmetic in both
    assert torch.equal(torch.cat([x for _, x in same], 1), dt)
    if labels is not None:
        ignored = labels == -100
        assert (torch.cat([x for x, _ in merged], 1)[ignored] == 0).all()
    # The merged table's D (A, B) is the whole row's to a few ulps of its size, which is
    # ~|z| for logits of 1e4; an entry p (lp - lq - D) carries that as an absolute error:
    # 4 ulps of |D| per row, times the row's factor. Then one rounding to the output dtype.
    C = _stats.Col
    size = 1 + stats[:, C.DIV].abs() + (stats[:, C.B].abs() if spec.div.kind == "mixture" else 0)
    row_atol = (g.abs() * spec.kd_scale * max(spec.inv_ts, spec.inv_tt) * 4 * 2.0**-23 * size)
    rtol = 1e-5 if dtype == torch.float32 else 2**-7

    def close(a, b):
        bound = row_atol[:, None] + 1e-6 + rtol * b.float().abs()
        err = (a.float() - b.float()).abs()
        assert (err <= bound).all(), f"max error over bound {(err / bound).max().item():.3g}"

    close(torch.cat([x for x, _ in merged], 1), ds)
    # need_teacher=False: no teacher gradient
    assert all((x is None) == (b <= 30) for (_, x), (_, b) in zip(merged, SHARDS, strict=True))
    close(merged[2][1], dt[:, 25:37])


@pytest.mark.parametrize("inner", [None, (4, 2)], ids=["whole", "inner-split"])
@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_mix_partial_sums_add_up(divergence, inner):
    """The ranges' (A, B, Uq, Up) add up to the whole row's, given the same global table;
    at u = 1 (jsd) Uq and Up are sum q, sum p: 1 over the row."""
    s, t, labels, inv_t, ce_weight = _shard_inputs("T2-ce", torch.float32)
    div = Divergence.from_user(divergence, 0.3, 0.2)
    spec = LossSpec(div, inv_ts=inv_t, inv_tt=inv_t, kd_scale=4.0, ce_weight=ce_weight)
    _, stats = tkd.kd_fwd(s, t, labels, *spec.as_args())
    valid = labels != -100
    with forced(*(inner or (None, None))):
        whole = tkd.mix_partial(s, t, spec, stats)
        parts = [tkd.mix_partial(_cols(s, a, b), _cols(t, a, b), spec, stats, a)
                 for a, b in SHARDS]
    assert torch.equal(parts[-1], torch.zeros(len(s), 4, device=DEVICE))  # the empty range
    torch.testing.assert_close(sum(parts)[valid], whole[valid], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole[valid], stats[valid][:, list(_stats.MIX_COLS)],
                               rtol=1e-5, atol=1e-6)
    if divergence == "jsd":
        torch.testing.assert_close(whole[valid, 2:], torch.ones(int(valid.sum()), 2, device=DEVICE))
    with pytest.raises(ValueError, match="mixture"):
        tkd.mix_partial(s, t, _shard_spec("forward_kl", 1.0, 0.0), stats)
    with pytest.raises(ValueError, match="stats"):
        tkd.mix_partial(s, t, spec, stats[:, :5].contiguous())


def test_partial_of_no_columns_is_the_identity():
    s = torch.empty(3, 0, device=DEVICE)
    labels = torch.tensor([0, -100, 5], device=DEVICE)
    spec = _shard_spec("forward_kl", 0.5, 1.0)
    out = tkd.partial(s, s, labels, spec, offset=4)
    assert torch.equal(out, _stats.empty(3, DEVICE, torch.float32))
    gs, gt = tkd.grads(s, s, labels, spec, out, 4, torch.ones(3), True)
    assert gs.shape == gt.shape == (3, 0)


def test_partial_is_exported():
    import kdkernels.triton as backend

    s, t = logits(2, 9), logits(2, 9)
    spec = _shard_spec("reverse_kl", 1.0, 0.0)
    assert torch.equal(backend.partial(s, t, None, spec), tkd.partial(s, t, None, spec))
    stats = _stats.finish(tkd.partial(s, t, None, spec), None, spec)[1]
    g = torch.ones(2)
    assert torch.equal(backend.grads(s, t, None, spec, stats, 0, g, False)[0],
                       tkd.grads(s, t, None, spec, stats, 0, g, False)[0])


# --------------------------------------------------------------------------------------
# device guard: every launcher runs on its input's device (and that device's stream)
# --------------------------------------------------------------------------------------


def test_device_guard_is_a_no_op_on_cpu(monkeypatch):
    """CPU tensors (the interpreter) never touch torch.cuda's device context; a CUDA tensor
    gets the guard of its own device (built here without a GPU: entering it is what needs
    one)."""
    from types import SimpleNamespace

    from kdkernels.triton._common import device_guard

    guard = device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    if DEVICE.type != "cpu":
        return

    def refuse(*args, **kwargs):
        raise AssertionError("torch.cuda.device entered for a CPU tensor")

    monkeypatch.setattr(torch.cuda, "device", refuse)
    assert isinstance(device_guard(torch.zeros(1)), contextlib.nullcontext)
    s, t, labels = logits(3, 20), logits(3, 20), make_labels(3, 20)
    s.requires_grad_()
    kd.kd_loss(s, t, labels, impl="triton", divergence="jsd", ce_weight=0.5).backward()
    spec = _shard_spec("forward_kl", 0.5, 0.5)
    stats = _stats.finish(tkd.partial(s.detach(), t, labels, spec), labels, spec)[1]
    tkd.grads(s.detach(), t, labels, spec, stats, 0, torch.ones(3), True)
    x = logits(3, 20).requires_grad_()
    kd.softmax(x, 2.0, impl="triton").sum().backward()
    y = torch.rand(3, 20)
    kd.kl_div(x.log_softmax(-1), y, impl="triton").backward()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_launches_on_the_tensors_device(divergence):
    """Tensors on cuda:1 while cuda:0 is current, on a side stream of cuda:1: the kernels
    run there (a launch on cuda:0 would fault on cuda:1's memory or read it unordered) and
    agree with impl='torch' on the same device."""
    dev = torch.device("cuda", 1)
    n, v = 6, 5000
    s0 = torch.randn(n, v, device=dev)
    t = torch.randn(n, v, device=dev)
    labels = torch.randint(0, v, (n,), device=dev)
    kw = dict(divergence=divergence, beta=0.3, temperature=2.0, ce_weight=0.5,
              reduction="none")
    g = torch.randn(n, device=dev)
    stream = torch.cuda.Stream(device=dev)
    # the stream first: entering it may make its device current
    with torch.cuda.stream(stream), torch.cuda.device(0):
        assert torch.cuda.current_device() == 0
        out = {}
        for impl in ("triton", "torch"):
            s = s0.clone().requires_grad_()
            loss = kd.kd_loss(s, t, labels, impl=impl, **kw)
            loss.backward(g)
            out[impl] = (loss, s.grad)
        x = s0.clone().requires_grad_()
        y = kd.softmax(x, 2.0, impl="triton")
        y.backward(torch.ones_like(y))
        ref_y = kd.softmax(s0, 2.0, impl="torch")
        kl = kd.kl_div(s0.log_softmax(-1), t.softmax(-1), impl="triton")
        ref_kl = kd.kl_div(s0.log_softmax(-1), t.softmax(-1), impl="torch")
        spec = _shard_spec(divergence, 0.5, 0.5)
        stats = tkd.partial(s0, t, labels, spec)
        sums = tkd.mix_partial(s0, t, spec, stats) if spec.div.kind == "mixture" else None
        stats = _stats.finish(stats, labels, spec, sums)[1]
        gs, _ = tkd.grads(s0, t, labels, spec, stats, 0, g, False)
    torch.cuda.synchronize(dev)
    for a, b in zip(out["triton"], out["torch"], strict=True):
        assert a.device == dev
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, ref_y)
    assert x.grad.device == dev and torch.isfinite(x.grad).all()
    torch.testing.assert_close(kl, ref_kl, rtol=1e-4, atol=1e-5)
    assert gs.device == dev and torch.isfinite(gs).all()
