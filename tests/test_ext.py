"""The C++ extension (impl="ext") on CPU: its ops through torch.library.opcheck, and values and
gradients through the public API against the float64 formulas of tests/_formulas.py under the
shared error model (an impl may err at most ~2x plain PyTorch at the same dtype, plus a floor
of a few ulps; see _formulas.TOLERANCES), plus float64 gradcheck through the CPU kernel.

The CPU kernel runs the math of csrc/kd_math.h, the header the CUDA kernels compile too, so
these tests are also the executed check of the CUDA kernels' formulas.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from _device import DEVICE
from _formulas import check_kd_loss
from _ranges import over_ranges

import kdkernels as kd
from kdkernels import _stats as stats_mod
from kdkernels import ext
from kdkernels._spec import Divergence, LossSpec
from kdkernels._stats import MIX_COLS, Col

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "soft_cross_entropy", "tvd", "forward_reverse_kl", "alpha_beta")
TEMPS = {"T1": (1.0, None), "T2": (2.0, None), "Ts2-Tt0.7": (2.0, 0.7)}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


@pytest.fixture(scope="module", autouse=True)
def _built():
    ok, why = ext.is_available(torch.device("cpu"))
    assert ok, why  # a failed build fails these tests: CI has a compiler


def logits(shape, dtype=torch.float32, scale=2.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def labels_for(n, v, mode):
    if mode == "none":
        return {}
    lab = torch.randint(0, v, (n,))
    lab[::3] = -100  # every third row ignored
    if mode == "ignored":
        return {"labels": lab}
    return {"labels": lab, "ce_weight": 0.5}


# --------------------------------------------------------------------------------------
# ops: schema, fake kernels, autograd registration
# --------------------------------------------------------------------------------------

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def spec_args(kind="forward_kl", mix=0.0, cp=0.0, cq=0.0, ts=2.0, tt=2.0, ce=0.0):
    div = Divergence(kind, mix=mix, coef_p=cp, coef_q=cq)
    return LossSpec(div, 1 / ts, 1 / tt, ts * ts, ce_weight=ce).as_args()


OP_SPECS = {
    "forward_kl": spec_args(),
    "reverse_kl-ce": spec_args("reverse_kl", ce=0.3),
    "jsd": spec_args("mixture", 0.3, 0.3, 0.7, ts=1.0, tt=1.5),
}


@pytest.mark.parametrize("name", list(OP_SPECS))
def test_opcheck_kd_ops(name):
    args = OP_SPECS[name]
    s = logits((5, 37)).requires_grad_()
    t = logits((5, 37)).requires_grad_()
    lab = torch.tensor([3, -100, 0, 36, 7])
    ops = torch.ops.kdkernels
    torch.library.opcheck(ops.kd_forward, (s, t, lab, *args), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(ops.kd_forward, (s, t, None, *args[:7], 0.0, args[8]),
                          test_utils=OPCHECK_TESTS)
    loss, stats = ops.kd_forward(s.detach(), t.detach(), lab, *args)
    assert stats.shape == (5, ext.NSTAT)
    g = torch.randn(5)
    for need_t in (False, True):
        torch.library.opcheck(ops.kd_backward, (g, s.detach(), t.detach(), lab, stats, *args,
                                                0, need_t), test_utils=OPCHECK_TESTS)
    # the range ops, on the columns [10, 37) (labels stay global)
    torch.library.opcheck(ops.kd_partial, (s.detach()[:, 10:].contiguous(),
                                           t.detach()[:, 10:].contiguous(), lab, *args, 10),
                          test_utils=OPCHECK_TESTS)
    if args[0] == "mixture":
        torch.library.opcheck(ops.kd_mix_partial, (s.detach(), t.detach(), stats, *args, 0),
                              test_utils=OPCHECK_TESTS)
    torch.library.opcheck(ops.kd_fused_, (s.detach().clone(), t.detach(), lab, *args, True),
                          test_utils=("test_schema", "test_faketensor"))
    # column slices of wider rows (row strides 45, 50), the gradients written into the
    # first columns of wider buffers: kd_backward's values, nothing else written
    ws, wt = torch.randn(5, 45), torch.randn(5, 50)
    ws[:, :37], wt[:, :37] = s.detach(), t.detach()
    gs, gt = torch.full((5, 41), 7.0), torch.full((5, 40), 7.0)
    torch.library.opcheck(ops.kd_backward_out, (g, ws[:, :37], wt[:, :37], lab, stats, *args,
                                                0, gs[:, :37], gt[:, :37]),
                          test_utils=("test_schema", "test_faketensor"))
    ops.kd_backward_out(g, ws[:, :37], wt[:, :37], lab, stats, *args, 0, gs[:, :37],
                        gt[:, :37])
    want_s, want_t = ops.kd_backward(g, s.detach(), t.detach(), lab, stats, *args, 0, True)
    torch.testing.assert_close(gs[:, :37], want_s)
    torch.testing.assert_close(gt[:, :37], want_t)
    assert (gs[:, 37:] == 7).all() and (gt[:, 37:] == 7).all()


def test_opcheck_kl_div_and_softmax_ops():
    ops = torch.ops.kdkernels
    x = torch.randn(50).log_softmax(0).requires_grad_()
    y = torch.rand(50).requires_grad_()
    for lt in (False, True):
        torch.library.opcheck(ops.kl_div, (x, y, lt), test_utils=OPCHECK_TESTS)
        torch.library.opcheck(ops.kl_div_sum, (x, y, lt), test_utils=OPCHECK_TESTS)
        torch.library.opcheck(ops.kl_div_backward, (torch.tensor(0.7), x.detach(), y.detach(),
                                                    lt, True, True), test_utils=OPCHECK_TESTS)
    z = torch.randn(4, 33).requires_grad_()
    for log in (False, True):
        torch.library.opcheck(ops.softmax, (z, 0.5, log), test_utils=OPCHECK_TESTS)
        y2 = ops.softmax(z.detach(), 0.5, log)
        torch.library.opcheck(ops.softmax_backward, (torch.randn(4, 33), y2, 0.5, log),
                              test_utils=OPCHECK_TESTS)


def test_op_errors_name_the_argument():
    ops = torch.ops.kdkernels
    s, t = logits((3, 8)), logits((3, 8))
    args = spec_args()
    with pytest.raises(RuntimeError, match="t must have s's shape"):
        ops.kd_forward(s, logits((3, 9)), None, *args)
    with pytest.raises(RuntimeError, match="kind must be"):
        ops.kd_forward(s, t, None, "jsd", *args[1:])
    with pytest.raises(RuntimeError, match="labels"):
        ops.kd_forward(s, t, torch.tensor([1, 2]), *args)
    with pytest.raises(RuntimeError, match="stats"):
        ops.kd_backward(torch.ones(3), s, t, None, torch.zeros(3, 2), *args, 0, False)
    with pytest.raises(RuntimeError, match="needs labels"):
        ops.kd_forward(s, t, None, *args[:7], 0.5, args[8])
    # label values: whole rows know V; a column range only knows ids are >= 0
    with pytest.raises(RuntimeError, match=r"labels\[1\] = 8 is outside \[0, 8\)"):
        ops.kd_forward(s, t, torch.tensor([1, 8, -100]), *args)
    with pytest.raises(RuntimeError, match=r"labels\[2\] = -1 is outside \[0, V\)"):
        ops.kd_partial(s, t, torch.tensor([1, 80, -1]), *args, 0)
    ops.kd_partial(s, t, torch.tensor([1, 80, -100]), *args, 0)  # 80: another range's
    with pytest.raises(RuntimeError, match="mix must be in"):
        ops.kd_forward(s, t, None, "mixture", 1.5, *args[2:])


# --------------------------------------------------------------------------------------
# the row-statistics interface: column ranges, merged and finished, equal whole rows
# --------------------------------------------------------------------------------------

# column splits of V = 37 (the last one has an empty range); labels below fall in each part
RANGES = {"3-parts": ((0, 10), (10, 25), (25, 37)), "with-empty": ((0, 10), (10, 10), (10, 37))}
RANGE_LABELS = [3, -100, 12, 36, 30, -100, 0, 24]
RANGE_DIVS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "soft_cross_entropy", "tvd",
              "forward_reverse_kl", "alpha_beta")
RANGE_TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-12},
             torch.float32: {"rtol": 2e-6, "atol": 2e-6}}


def range_spec(divergence, ts, tt, ce_weight=0.5):
    div = Divergence.from_user(divergence, beta=0.3, skew=0.3, alpha=0.3, ab_alpha=0.3,
                               ab_beta=0.8)
    return LossSpec(div, 1 / ts, 1 / tt, ts * ts, ce_weight=ce_weight)


def ranged_stats(s, t, lab, spec, ranges):
    """The statistics through the interface: a partial per range, merged, finished."""
    return over_ranges(ext, s, t, lab, spec, ranges)[:2]


@pytest.mark.parametrize("temps", [(1.0, 1.0), (2.0, 0.7)], ids=["T1", "Ts2-Tt0.7"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("split", list(RANGES))
@pytest.mark.parametrize("divergence", RANGE_DIVS)
def test_partial_merge_finish_equals_whole_rows(divergence, split, dtype, temps):
    n, v = len(RANGE_LABELS), 37
    s, t = logits((n, v), dtype, scale=3.0), logits((n, v), dtype, scale=3.0)
    lab = torch.tensor(RANGE_LABELS)
    spec = range_spec(divergence, *temps)
    ref_loss, ref_stats = torch.ops.kdkernels.kd_forward(s, t, lab, *spec.as_args())
    loss, fin = ranged_stats(s, t, lab, spec, RANGES[split])
    tol = RANGE_TOL[dtype]
    torch.testing.assert_close(loss, ref_loss, **tol)
    keep = lab != -100
    # every column a backward reads is the whole row's (UQ, UP of jsd: sums of q, p, ~1)
    torch.testing.assert_close(fin[keep], ref_stats[keep], **tol)

    # gradients of the ranges, concatenated, are the whole rows'
    g = torch.rand(n, dtype=dtype) + 0.5
    gs_ref, gt_ref = torch.ops.kdkernels.kd_backward(g, s, t, lab, ref_stats, *spec.as_args(),
                                                     0, True)
    pieces = [ext.grads(s[:, a:b], t[:, a:b], lab, spec, fin, a, g, True)
              for a, b in RANGES[split]]
    torch.testing.assert_close(torch.cat([p[0] for p in pieces], 1), gs_ref, **tol)
    torch.testing.assert_close(torch.cat([p[1] for p in pieces], 1), gt_ref, **tol)
    assert all(p[1] is None for p in (ext.grads(s, t, lab, spec, fin, 0, g, False),))
    assert torch.all(gs_ref[~keep] == 0) and torch.all(gt_ref[~keep] == 0)


@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "tvd", "alpha_beta"])
def test_mix_partial_sums_add_up(divergence):
    n, v = 5, 37
    s, t = logits((n, v), torch.float64), logits((n, v), torch.float64)
    spec = range_spec(divergence, 2.0, 0.7, ce_weight=0.0)
    _, ref = torch.ops.kdkernels.kd_forward(s, t, None, *spec.as_args())
    parts = [ext.mix_partial(s[:, a:b], t[:, a:b], spec, ref, a) for a, b in RANGES["3-parts"]]
    torch.testing.assert_close(sum(parts), ref[:, list(MIX_COLS)], rtol=1e-12, atol=1e-12)
    assert all(p.shape == (n, 4) for p in parts)
    # the whole row in one range is the same sum
    torch.testing.assert_close(ext.mix_partial(s, t, spec, ref), ref[:, list(MIX_COLS)],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("divergence", RANGE_DIVS)
def test_partial_of_empty_range_is_the_identity(divergence):
    spec = range_spec(divergence, 2.0, 1.0)
    lab = torch.tensor([5, 40])
    part = ext.partial(torch.zeros(2, 0), torch.zeros(2, 0), lab, spec, 12)
    torch.testing.assert_close(part, stats_mod.empty(2, "cpu", torch.float32))


def test_partial_label_column_and_ce_statistics():
    s, t = logits((3, 20)), logits((3, 20))
    spec = range_spec("forward_kl", 2.0, 1.0)
    lab = torch.tensor([13, 2, -100])
    part = ext.partial(s[:, 10:].contiguous(), t[:, 10:].contiguous(), lab, spec, 10)
    assert part[0, Col.LABEL] == s[0, 13] and part[1, Col.LABEL] == 0
    # CE's T = 1 pair is taken for every row with CE, its label in range or not
    s1 = s[:2, 10:]
    lse1 = part[:2, Col.M1] + part[:2, Col.L1]
    torch.testing.assert_close(lse1, torch.logsumexp(s1, 1))
    assert torch.all(part[2] == 0)  # ignored
    with pytest.raises(RuntimeError, match="labels"):
        ext.partial(s, t, torch.tensor([1, -3, 2]), spec, 0)
    with pytest.raises(RuntimeError, match="mixture"):
        ext.mix_partial(s, t, spec, part, 0)


@pytest.mark.parametrize("divergence", RANGE_DIVS)
def test_partial_of_padding_and_of_zero_probability_columns(divergence):
    # a shard of vocabulary padding (-inf in both logits) contributes exactly nothing; a
    # shard where the student is -inf and the teacher finite gives forward KL its true +inf
    v = 40
    s, t = logits((3, v)), logits((3, v))
    s[:, 30:] = t[:, 30:] = -math.inf
    s[2, 20:30] = -math.inf
    lab = torch.tensor([4, 25, 3])
    spec = range_spec(divergence, 2.0, 1.0)
    ref_loss, _ = torch.ops.kdkernels.kd_forward(s, t, lab, *spec.as_args())
    loss, _ = ranged_stats(s, t, lab, spec, ((0, 20), (20, 30), (30, v)))
    torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=2e-6)
    assert torch.isfinite(loss[:2]).all()
    # (+inf wherever KL(p || q) or -sum p log q is a term)
    infinite = divergence in ("forward_kl", "soft_cross_entropy", "forward_reverse_kl")
    assert loss[2] == math.inf if infinite else math.isfinite(loss[2])


def test_partial_maxima_are_raw():
    # the table's maxima are those of the RAW logits at any temperature (kdkernels/_stats.py),
    # the log-sums those of the scaled differences (x - m) / T
    s, t = logits((3, 50), scale=3.0), logits((3, 50), scale=3.0)
    spec = range_spec("forward_kl", 2.0, 0.7)
    part = ext.partial(s, t, torch.tensor([1, 2, 3]), spec, 0)
    ms, mt = s.amax(1), t.amax(1)
    for col, want in ((Col.MS, ms), (Col.MT, mt), (Col.M1, ms)):
        assert torch.equal(part[:, col], want)
    torch.testing.assert_close(part[:, Col.LS], torch.logsumexp((s - ms[:, None]) / 2.0, 1))
    torch.testing.assert_close(part[:, Col.LT], torch.logsumexp((t - mt[:, None]) / 0.7, 1))
    torch.testing.assert_close(part[:, Col.L1], torch.logsumexp(s - ms[:, None], 1))


@pytest.mark.parametrize("case", ["nan", "posinf", "neginf-row"])
@pytest.mark.parametrize("divergence", RANGE_DIVS)
def test_partial_carries_non_finite_rows(divergence, case):
    # a NaN or a +inf logit in one range, or a student row that is -inf in every range: the
    # ranges' maxima carry it through the merge, and the row is NaN (kd_math.h's policy), as
    # the whole-row op says; the NaN sits in the second of four 1024-column tiles
    v = 4096
    s, t = logits((3, v)), logits((3, v))
    if case == "nan":
        t[1, 1500] = math.nan
    elif case == "posinf":
        s[1, 1500] = math.inf
    else:
        s[1] = -math.inf
    lab = torch.tensor([4, 25, 3000])
    spec = range_spec(divergence, 2.0, 0.7)
    whole, _ = torch.ops.kdkernels.kd_forward(s, t, lab, *spec.as_args())
    part = ext.partial(s, t, lab, spec, 0)
    assert not (part[1, Col.MS].isfinite() and part[1, Col.MT].isfinite())
    ranged, _ = ranged_stats(s, t, lab, spec, ((0, 1000), (1000, 2000), (2000, v)))
    for loss in (whole, ranged):
        assert loss[1].isnan() and torch.isfinite(loss[[0, 2]]).all(), loss
    torch.testing.assert_close(ranged[[0, 2]], whole[[0, 2]], rtol=2e-6, atol=2e-6)


# The merge of a range whose accumulator is +inf (q = 0 where p > 0) into one whose maximum
# is far larger: the factor e^(m - M) underflows and the range must contribute 0 (its
# probabilities underflow to 0 in the unsplit sum), never 0 * inf = NaN, in any order.
NONFINITE_V = 4096  # four 1024-column tiles of the ext CPU kernel


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("impl", ["torch", "triton", "ext"])
@pytest.mark.parametrize("order", ["inf-first", "max-first"])
def test_inf_accumulator_merged_under_a_larger_maximum(kind, impl, order, monkeypatch):
    v = NONFINITE_V
    low, high = torch.zeros(1, v), torch.zeros(1, v)
    # the weighting side (teacher for forward KL) has a maximum of 200; the other side is
    # -inf in one column, far from it
    inf_col, max_col = (5, v - 1) if order == "inf-first" else (v - 1 - 5, 0)
    low[0, inf_col] = -math.inf
    high[0, max_col] = 200.0
    s, t = (low, high) if kind == "forward_kl" else (high, low)
    if impl == "triton":
        from kdkernels.triton import kd as tkd

        monkeypatch.setattr(tkd, "FORCE_BLOCK_V", 1024)
        monkeypatch.setattr(tkd, "FORCE_SPLIT", 2)
        # Triton runs CUDA tensors, or CPU ones under the interpreter
        s, t = s.to(DEVICE), t.to(DEVICE)
    out = kd.kd_loss(s, t, divergence=kind, impl=impl).cpu()
    s, t = s.cpu(), t.cpu()
    # float32: p at the -inf column is e^-200 / ... = 0, so the term is 0 and the loss is
    # that of the finite columns: log(V - 1) + ... as the float64 truth says
    s64, t64 = s.double(), t.double()
    lq, lp = s64.log_softmax(-1), t64.log_softmax(-1)
    w, lw, lo = (lp.exp(), lp, lq) if kind == "forward_kl" else (lq.exp(), lq, lp)
    w32 = w.float().double()  # weights that underflow in float32 are 0
    truth = torch.where(w32 > 0, w32 * (lw - lo), 0.0).sum()
    assert torch.isfinite(out), out
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# values and gradients against the float64 truth
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels_mode", ["none", "ignored", "ce"])
@pytest.mark.parametrize("temps", list(TEMPS), ids=list(TEMPS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matrix_f32(divergence, temps, labels_mode):
    ts, tt = TEMPS[temps]
    s, t = logits((6, 301)), logits((6, 301))
    check_kd_loss("ext", s, t, divergence=divergence, beta=0.3, temperature=ts,
                  teacher_temperature=tt, reduction="none", **labels_for(6, 301, labels_mode))


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_low_precision(divergence, dtype):
    d = DTYPES[dtype]
    s, t = logits((5, 263), d), logits((5, 263), d)
    check_kd_loss("ext", s, t, divergence=divergence, temperature=2.0, reduction="sum",
                  **labels_for(5, 263, "ce"))


@pytest.mark.parametrize("shape", [(41, 1271), (3, 33), (2, 1), (1, 15), (4, 1024), (2, 2049)])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_odd_shapes(shape, divergence):
    # V not a multiple of the vector width (16 floats) nor of the 1024-element tile
    s, t = logits(shape), logits(shape)
    check_kd_loss("ext", s, t, divergence=divergence, temperature=2.0, reduction="none")


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_mixture_forward_across_tiles(divergence, offset):
    """The whole-row mixture forward keeps pass 1's exps and differences of shifted logits,
    each against its 1024-column tile's running maximum, and corrects them per tile in pass
    2: maxima that grow tile by tile, a side whose first tiles hold no finite logit, and
    logits near +-1e4 give the float64 formula's loss and gradients."""
    v = 5000
    ramp = torch.linspace(0.0, 30.0, v)
    s = ramp + torch.randn(4, v) + offset
    t = 0.7 * ramp + torch.randn(4, v) - offset
    t[1, :2000] = -math.inf
    s[2, :1500] = -math.inf
    check_kd_loss("ext", s, t, divergence=divergence, temperature=2.0, reduction="none")


def test_student_and_teacher_dtypes_differ():
    s, t = logits((4, 100), torch.bfloat16), logits((4, 100), torch.float32)
    ref_s, ref_t = s.float().requires_grad_(), t.clone().requires_grad_()
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = kd.kd_loss(s1, t1, divergence="jsd", temperature=2.0, impl="ext", reduction="sum")
    ref = kd.kd_loss(ref_s, ref_t, divergence="jsd", temperature=2.0, impl="torch",
                     reduction="sum")
    out.backward()
    ref.backward()
    assert s1.grad.dtype == torch.bfloat16 and t1.grad.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1.grad.float(), ref_s.grad, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(t1.grad, ref_t.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits(divergence):
    # logits of +-1e4: the kernel sums shifted differences ((zt - mt) - (zs - ms)) and keeps
    # log-probabilities as (z - m) - log S, never z - lse with lse rounded to an ulp of 1e4
    # (~1e-3). What float32 cannot avoid: log-ratios of ~5e3 carry an ulp of ~5e-4.
    s, t = logits((4, 300), scale=1.0), logits((4, 300), scale=1.0)
    s[:, :5] += 1e4
    t[:, 2:7] -= 1e4
    t[:, 7:9] += 1e4
    s[1] -= 1e4
    lab = torch.tensor([0, 4, -100, 8])
    kw = dict(divergence=divergence, temperature=2.0, reduction="none", ce_weight=0.3)
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = kd.kd_loss(s1, t1, lab, impl="ext", **kw)
    g = torch.randn(4, dtype=torch.float64)
    out.backward(g.float())
    # truth: the log-space reference in float64 (the probability-space formulas of
    # _formulas underflow here even in float64); baseline: the same reference in float32
    res = {}
    for dt in (torch.float64, torch.float32):
        s2, t2 = s.to(dt).requires_grad_(), t.to(dt).requires_grad_()
        ref = kd.kd_loss(s2, t2, lab, impl="torch", **kw)
        ref.backward(g.to(dt))
        res[dt] = (ref, s2.grad, t2.grad)
    for k, what in enumerate(("loss", "d/ds", "d/dt")):
        a, truth, base = (out, s1.grad, t1.grad)[k], res[torch.float64][k], res[torch.float32][k]
        err = (a.double() - truth).abs().max().item()
        base_err = (base.double() - truth).abs().max().item()
        # 2x plain PyTorch (whose lse rounding dominates at this size) + float32's floor
        bound = 2 * base_err + 2e-6 * (1 + truth.abs().max().item())
        assert err <= bound, f"{what}: error {err:.2e} > {bound:.2e} (reference {base_err:.2e})"


@pytest.mark.parametrize("divergence", ["forward_kl", "skew_reverse_kl"])
def test_weights_keep_their_relative_accuracy_down_to_the_smallest_normals(divergence):
    # The CPU kernel's exp of an element weight (x <= 0, kd_cpu_simd.h kd_exp_nonpos) read out
    # over its whole range: against a teacher sure of entry 0 at T = 1, the forward KL's
    # gradient off that entry is q itself, and skew reverse KL's is q times a function of
    # the log-ratio alone, equal for every entry the teacher gives 0 (one ratio to entry 1).
    # Relative error: the exp's own (3.5e-7) plus float32's rounding of the argument lq
    # (|lq| 2^-24). Weights below 2.4e-38 (lq < -86.6) may be flushed to 0.
    v = 5000
    s = torch.linspace(0.0, -90.0, v).unsqueeze(0).requires_grad_()
    t = torch.full((1, v), -math.inf)
    t[0, 0] = 0.0
    kd.kd_loss(s, t, divergence=divergence, reduction="sum", impl="ext").backward()
    lq = torch.log_softmax(s.detach().double(), -1)[0, 1:]
    q = lq.exp()
    g = s.grad[0, 1:].double()
    if divergence != "forward_kl":
        g = g * (q[0] / g[0])
    normal = q > 2.5e-38
    rel = ((g - q).abs() / q)[normal]
    bound = 5e-7 + lq[normal].abs() * 2.0**-23
    assert torch.all(rel <= bound), f"max relative error {rel.max():.2e}"
    assert torch.all((g - q)[~normal].abs() <= 2.5e-38)
    assert normal.sum() > 0.9 * v


@pytest.mark.parametrize(
    "divergence, mix",
    [("jsd", 0.5), ("jsd", 0.1), ("skew_reverse_kl", 0.1), ("skew_reverse_kl", 0.5)],
)
def test_mixture_gradient_reads_its_log_ratio_function_everywhere(divergence, mix):
    # jsd's and skew reverse KL's student gradients are q (R - C f(d)), R and C row constants
    # and f a function of the log-ratio d = lp - lq + logit of m's parts: softplus(d) for
    # jsd, softplus(d) + sigmoid(-d) for skew reverse KL (kd_math.h kd_softplus; on AVX-512
    # tables of unit intervals on [-16, 16], clamped past them). s = -x/2 and t = x/2 give
    # d = x + logit, here over [-40, 40] in steps of 1/150: every interval, both sides of each
    # boundary and both clamped ends. Bound of each entry's error in g / q: a few ulps of f
    # and of R, the rounding of lp and lq (in d and, through q, in the whole bracket) and the
    # weight's exp.
    x = torch.linspace(-40.0, 40.0, 12001, dtype=torch.float64)
    s, t = (-x / 2).float().unsqueeze(0).requires_grad_(), (x / 2).float().unsqueeze(0)
    if divergence == "jsd":
        kw, a = dict(beta=mix), mix  # m = beta p + (1 - beta) q
    else:
        kw, a = dict(skew=mix), 1 - mix  # m = skew q + (1 - skew) p
    kw.update(divergence=divergence, reduction="sum")
    kd.kd_loss(s, t, impl="ext", **kw).backward()
    s64 = s.detach().double().requires_grad_()
    kd.kd_loss(s64, t.double(), impl="torch", **kw).backward()
    lq = torch.log_softmax(s64.detach(), -1)[0]
    lp = torch.log_softmax(t.double(), -1)[0]
    d = lp - lq + math.log(a / (1 - a))
    f = torch.nn.functional.softplus(d)
    if divergence != "jsd":
        f = f + torch.sigmoid(-d)
    g, truth = s.grad[0].double() / lq.exp(), s64.grad[0] / lq.exp()
    fit = torch.stack([torch.ones_like(f), -f], 1)
    r, c = torch.linalg.lstsq(fit, truth.unsqueeze(1)).solution[:, 0].tolist()
    assert (r - c * f - truth).abs().max() < 1e-6 * c  # the form above holds
    assert d.min() < -17 and d.max() > 17
    ulp = 2.0 ** (torch.floor(torch.log2(f.clamp_min(2.0**-126))) - 23)
    bound = (
        c * (2 * ulp + (lp.abs() + lq.abs()) * 2.0**-24)
        + abs(r) * 2.0**-22
        + truth.abs() * (lq.abs() * 2.0**-23 + 4e-7)
    )
    err = (g - truth).abs()
    assert torch.all(err <= bound), f"max error / bound {(err / bound).max():.2f}"


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padding_is_exact_zero(divergence):
    # vocabulary padding (-inf in both logits) contributes exactly nothing
    s, t = logits((5, 100)), logits((5, 100))
    sp = torch.cat([s, torch.full((5, 37), -math.inf)], 1).requires_grad_()
    tp = torch.cat([t, torch.full((5, 37), -math.inf)], 1).requires_grad_()
    s0, t0 = s.clone().requires_grad_(), t.clone().requires_grad_()
    kw = dict(divergence=divergence, temperature=2.0, reduction="none", impl="ext")
    a, b = kd.kd_loss(sp, tp, **kw), kd.kd_loss(s0, t0, **kw)
    g = torch.randn(5)
    (a * g).sum().backward()
    (b * g).sum().backward()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert torch.all(sp.grad[:, 100:] == 0) and torch.all(tp.grad[:, 100:] == 0)
    torch.testing.assert_close(sp.grad[:, :100], s0.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tp.grad[:, :100], t0.grad, atol=1e-6, rtol=1e-5)


def test_zero_student_probability_gives_inf():
    # q = 0 where p > 0: forward KL is +inf (the true value), never nan
    s, t = logits((2, 50)), logits((2, 50))
    s[0, 3] = -math.inf
    out = kd.kd_loss(s, t, divergence="forward_kl", reduction="none", impl="ext")
    assert out[0] == math.inf and math.isfinite(out[1])
    rev = kd.kd_loss(s, t, divergence="reverse_kl", reduction="none", impl="ext")
    assert torch.isfinite(rev).all()


def test_all_ignored_and_empty():
    s, t = logits((3, 40)).requires_grad_(), logits((3, 40))
    lab = torch.full((3,), -100)
    out = kd.kd_loss(s, t, lab, ce_weight=1.0, impl="ext")
    out.backward()
    assert out.item() == 0 and torch.all(s.grad == 0)
    e = torch.zeros(0, 40, requires_grad=True)
    kd.kd_loss(e, torch.zeros(0, 40), impl="ext", reduction="sum").backward()
    assert e.grad.shape == (0, 40)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_inplace_backward_matches(divergence):
    s, t = logits((5, 333)), logits((5, 333))
    lab = torch.tensor([1, -100, 5, 7, 332])
    kw = dict(divergence=divergence, temperature=2.0, ce_weight=0.4, impl="ext")
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    a = kd.kd_loss(s1, t1, lab, **kw)
    a.backward()
    s2, t2 = s.clone().requires_grad_(), t.clone().requires_grad_()
    b = kd.kd_loss(s2, t2, lab, inplace_backward=True, **kw)
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(s1.grad, s2.grad)
    torch.testing.assert_close(t1.grad, t2.grad)


# Gradients at peaked logits (N(0, 20^2), T = 2) against float64, relative to each
# gradient's largest element. The side whose formula holds q (lq - lm - B) or p (lp - lm - A)
# cancels in float32: up to 1e-2 over seeds, as much as the float32 reference loses (Known
# limits). The other sides keep float32 accuracy (below 3e-6 over seeds), which a rewrite of
# their row sums that cancels (an exact identity evaluated in float32) would lose.
PEAKED_TOLERANCES = {  # divergence: (student, teacher)
    "forward_kl": (2e-5, 2e-5),
    "jsd": (3e-2, 3e-2),
    "skew_forward_kl": (2e-5, 3e-2),
    "skew_reverse_kl": (3e-2, 2e-5),
}


@pytest.mark.parametrize("divergence", list(PEAKED_TOLERANCES))
def test_gradients_at_peaked_logits(divergence):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 4000, generator=g, dtype=torch.float64) * 20
    t = torch.randn(16, 4000, generator=g, dtype=torch.float64) * 20
    grads = {}
    for impl, dtype in (("ext", torch.float32), ("torch", torch.float64)):
        s1 = s.to(dtype, copy=True).requires_grad_()
        t1 = t.to(dtype, copy=True).requires_grad_()
        kd.kd_loss(s1, t1, divergence=divergence, temperature=2.0, impl=impl,
                   reduction="sum").backward()
        grads[impl] = (s1.grad.double(), t1.grad.double())
    for got, want, tol in zip(grads["ext"], grads["torch"], PEAKED_TOLERANCES[divergence],
                              strict=True):
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= tol, (divergence, err, tol)


# the mixture's element paths (with_mix_mode, kd_cpu.cpp): jsd (u = 1), skew forward and
# reverse KL (one side), a general mixture (both sides and u), and one whose weight is beyond
# the fast path's range (a = 1e-12)
FUSED_MIXTURES = {
    "jsd": (0.3, 0.3, 0.7),
    "skew_forward_kl": (0.1, 1.0, 0.0),
    "skew_reverse_kl": (0.9, 0.0, 1.0),
    "general": (0.3, 0.6, 0.2),
    "outside_fast_path": (1e-12, 0.0, 1.0),
}


@pytest.mark.parametrize("ce", [0.0, 0.4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", list(FUSED_MIXTURES))
def test_fused_mixture_matches_forward_and_backward(name, dtype, ce):
    """kd_fused_ (inplace_backward) forms the mixture's gradient from the exps its forward
    kept, without reading the logits again; it must give kd_forward + kd_backward's loss and
    gradients: rows of three tiles, maxima that move from tile to tile, -inf logits on
    either side and on both, a row with a whole -inf tile of the student, ignored rows."""
    mix, cp, cq = FUSED_MIXTURES[name]
    args = spec_args("mixture", mix, cp, cq, ts=2.0, tt=1.5, ce=ce)
    n, v = 5, 2500
    ramp = torch.linspace(0, 6, v, dtype=torch.float64)  # growing maxima across tiles
    s = (logits((n, v), torch.float64) + ramp).to(dtype)
    t = (logits((n, v), torch.float64) + ramp.flip(0)).to(dtype)
    s[1, :1024] = float("-inf")
    t[2, 1800:] = float("-inf")
    s[3, 5] = t[3, 9] = float("-inf")
    s[4, 77] = t[4, 77] = float("-inf")
    lab = torch.tensor([3, -100, 1200, 2499, 77])
    ops = torch.ops.kdkernels
    loss, stats = ops.kd_forward(s, t, lab, *args)
    g = torch.ones(n, dtype=loss.dtype)
    want_s, want_t = ops.kd_backward(g, s, t, lab, stats, *args, 0, True)
    fused = s.clone()
    got_loss, got_t = ops.kd_fused_(fused, t, lab, *args, True)
    torch.testing.assert_close(got_loss, loss)
    # relative to the gradient's largest element: 16 ulps of the accumulation type; bfloat16
    # outputs one ulp (the two paths' float32 values may round to adjacent bfloat16s)
    ulps = {torch.float32: 16 * 2**-24, torch.float64: 16 * 2**-53, torch.bfloat16: 2**-7}
    for got, want in ((fused, want_s), (got_t, want_t)):
        scale = want.double().abs().max()
        torch.testing.assert_close(got.double() / scale, want.double() / scale,
                                   atol=ulps[dtype], rtol=0.0)


# --------------------------------------------------------------------------------------
# gradcheck in float64 through the CPU kernel
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_f64(divergence):
    s = logits((3, 11), torch.float64).requires_grad_()
    t = logits((3, 11), torch.float64).requires_grad_()
    lab = torch.tensor([2, -100, 10])

    def f(s, t):
        return kd.kd_loss(s, t, lab, divergence=divergence, beta=0.3, skew=0.2,
                          temperature=1.7, teacher_temperature=0.9, ce_weight=0.4,
                          reduction="none", impl="ext")

    assert torch.autograd.gradcheck(f, (s, t))


# --------------------------------------------------------------------------------------
# kl_div, softmax, log_softmax
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div(reduction, log_target):
    x = torch.randn(7, 33, dtype=torch.float64).log_softmax(-1)
    y = torch.rand(7, 33, dtype=torch.float64)
    y[0, :3] = 0  # 0 log 0 = 0
    if log_target:
        y = y.clamp_min(1e-3).log()
    for dtype in (torch.float64, torch.float32):
        xi, yi = (a.to(dtype).clone().requires_grad_() for a in (x, y))
        xr, yr = (a.to(dtype).clone().requires_grad_() for a in (x, y))
        out = kd.kl_div(xi, yi, reduction=reduction, log_target=log_target, impl="ext")
        ref = torch.nn.functional.kl_div(xr, yr, reduction=reduction, log_target=log_target)
        tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else {}
        torch.testing.assert_close(out, ref, **tol)
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(xi.grad, xr.grad, **tol)
        keep = (y != 0) if not log_target else torch.ones_like(y, dtype=torch.bool)
        torch.testing.assert_close(yi.grad[keep], yr.grad[keep], **tol)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f64"])
def test_softmax(log, dtype):
    d = {"f64": torch.float64, **DTYPES}[dtype]
    x = logits((5, 1100), d, scale=3.0)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fn = kd.log_softmax if log else kd.softmax
    y = fn(x1, 2.0, impl="ext")
    ref = fn(x2, 2.0, impl="torch")
    assert y.dtype == d
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    tol = {} if d != torch.float64 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)


def test_compile_fullgraph():
    s, t = logits((4, 70)).requires_grad_(), logits((4, 70))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(s, t):
        return kd.kd_loss(s, t, divergence="jsd", temperature=2.0, impl="ext")

    out = f(s, t)
    out.backward()
    s2 = s.detach().clone().requires_grad_()
    ref = kd.kd_loss(s2, t, divergence="jsd", temperature=2.0, impl="ext")
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s.grad, s2.grad)


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
    # a fresh process whose C++ compiler does not exist and whose build cache is empty:
    # is_available says why, impl="auto" warns once and uses the PyTorch path, impl="ext"
    # raises with the same message
    code = """
import warnings, torch, kdkernels as kd
from kdkernels import ext
ok, why = ext.is_available(torch.device("cpu"))
assert not ok and "no C++ compiler" in why, why
s, t = torch.randn(3, 10), torch.randn(3, 10)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    a = kd.kd_loss(s, t)
    b = kd.kd_loss(s, t)
assert sum("falls back" in str(x.message) for x in w) <= 1, [str(x.message) for x in w]
torch.testing.assert_close(a, kd.kd_loss(s, t, impl="torch"))
try:
    kd.kd_loss(s, t, impl="ext")
    raise SystemExit("impl='ext' did not raise")
except RuntimeError as e:
    assert "no C++ compiler" in str(e), e
print("OK")
"""
    env = dict(os.environ, CXX="kdkernels-no-such-compiler",
               KDKERNELS_CACHE_DIR=str(tmp_path), KDKERNELS_IMPL="")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_failed_check_raises_in_a_fresh_process():
    # The ops' own checks (TORCH_CHECK in csrc/kd_checks.h) raise RuntimeError naming the
    # argument, after other kernels ran and with both libraries loaded. In a child process so
    # that a crash in the error path (seen once on a GPU machine: SIGSEGV where a check threw,
    # on CPU tensors too) is this test's failure, with the child's stack, not a lost worker.
    code = """
import faulthandler, torch, kdkernels as kd
from kdkernels import ext
from kdkernels._spec import Divergence, LossSpec
faulthandler.enable()
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
args = LossSpec(Divergence("forward_kl"), 0.5, 0.5, 4.0).as_args()
for dev in devices:
    assert ext.is_available(torch.device(dev))[0], dev
    s, t = torch.randn(3, 8, device=dev), torch.randn(3, 8, device=dev)
    kd.kd_loss(s, t, impl="ext")  # a kernel runs first
    for call, words in (
        (lambda: torch.ops.kdkernels.kd_forward(s, t[:, :7], None, *args), "t must have"),
        (lambda: torch.ops.kdkernels.kd_forward(
            s, t, torch.tensor([1, 8, -100], device=dev), *args), "labels[1] = 8"),
    ):
        try:
            call()
            raise SystemExit(f"{dev}: no error ({words})")
        except RuntimeError as e:
            assert words in str(e), (dev, str(e))
print("OK", devices)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, (
        f"exit status {r.returncode} (-11: segmentation fault)\n{r.stdout}{r.stderr}")


# --------------------------------------------------------------------------------------
# the CUDA kernels against the CPU kernel (marked gpu: the root conftest skips them without a
# CUDA device)
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("divergence", RANGE_DIVS)
@pytest.mark.parametrize("v", [4099, 50257])  # not a multiple of the pack: scalar heads/tails
def test_cuda_ranges_match_cpu(divergence, v):
    n = 6
    s, t = logits((n, v), scale=3.0), logits((n, v), scale=3.0)
    lab = torch.tensor([3, -100, 1010, v - 1, 2000, 17])
    spec = range_spec(divergence, 2.0, 0.7)
    ranges = ((0, 1003), (1003, 1003), (1003, v))
    cpu = ranged_stats(s, t, lab, spec, ranges)
    gpu = ranged_stats(s.cuda(), t.cuda(), lab.cuda(), spec, ranges)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-5, atol=1e-5)
    fin = cpu[1]
    g = torch.rand(n) + 0.5
    for a, b in ranges:
        want = ext.grads(s[:, a:b], t[:, a:b], lab, spec, fin, a, g, True)
        got = ext.grads(s[:, a:b].cuda(), t[:, a:b].cuda(), lab.cuda(), spec, fin.cuda(), a,
                        g.cuda(), True)
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x.cpu(), y, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                    (torch.bfloat16, torch.float16)], ids=str)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_cuda_teacher_in_its_own_dtype(divergence, dtypes):
    # the teacher is read in its dtype (float32: no rounding to the student's), so the CUDA
    # op matches the CPU op, which reads each tensor in its own dtype; rows start at every
    # misalignment (one row more than needed, then sliced off)
    ds, dt = dtypes
    n, v = 5, 50257
    s, t = logits((n + 1, v), ds), logits((n + 1, v), dt)
    lab = torch.tensor([3, -100, 5000, v - 1, 7])
    kw = dict(divergence=divergence, temperature=2.0, ce_weight=0.3, impl="ext")
    res = {}
    for dev in ("cpu", "cuda"):
        # the leaves hold one row more; the loss sees rows 1.. (V odd: rows start at every
        # misalignment, and the first one 2 or 4 bytes past the allocation's alignment)
        sd = s.clone().to(dev).requires_grad_()
        td = t.clone().to(dev).requires_grad_()
        out = kd.kd_loss(sd[1:], td[1:], lab.to(dev), **kw)
        out.backward()
        assert sd.grad.dtype == ds and td.grad.dtype == dt
        res[dev] = (out.cpu(), sd.grad[1:].cpu().float(), td.grad[1:].cpu().float())
    torch.testing.assert_close(res["cuda"][0], res["cpu"][0], rtol=1e-5, atol=1e-5)
    for x, y, d in zip(res["cuda"][1:], res["cpu"][1:], (ds, dt), strict=True):
        # one rounding of the stored gradient apart at most (gradients are ~1e-5 here:
        # an absolute floor of 1e-7, below float16's subnormal spacing doubled)
        rtol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[d]
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-7)


@pytest.mark.gpu
def test_cuda_empty_range_labels_and_mix():
    ops = torch.ops.kdkernels
    spec = range_spec("forward_kl", 2.0, 1.0)
    z = torch.zeros(3, 0, device="cuda")
    lab = torch.tensor([1, 5, -100], device="cuda")
    torch.testing.assert_close(ext.partial(z, z, lab, spec, 4).cpu(),
                               ext.partial(z.cpu(), z.cpu(), lab.cpu(), spec, 4))
    s, t = logits((3, 8)).cuda(), logits((3, 8)).cuda()
    with pytest.raises(RuntimeError, match=r"labels\[1\] = 8 is outside \[0, 8\)"):
        ops.kd_forward(s, t, torch.tensor([1, 8, -100], device="cuda"), *spec.as_args())
    with pytest.raises(RuntimeError, match="mix must be in"):
        ops.kd_forward(s, t, None, "mixture", 1.5, *spec.as_args()[2:])
