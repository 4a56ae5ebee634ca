"""The sparse-teacher backend contract (sparse_partial, sparse_grads) of every backend
against its float64 formula (tests/_sparse_formulas.py): column ranges with tails and
offsets, labels and slot ids inside and outside the range, empty (-1) slots, K in
{1, 7, V}, the CE term on and off, Ts = 1 and != 1, a row-strided view of wider logits,
float32 / bfloat16 (and float64 where a backend has it), the non-finite policy, and the
merge of two ranges equal to the whole row. Backends are taken by module name.

Triton runs on the test device (its compiled kernels on CUDA, the interpreter on the CPU);
torch and the extension run on the CPU, where the extension has every dtype (float64
included); its CUDA kernels are tested in tests/test_gpu_sparse.py. Inputs are drawn on the
CPU (the same values on every machine) and moved to the backend's device."""

import importlib
import math

import pytest
import torch
from _device import DEVICE
from _sparse_formulas import (
    EPS,
    STUDENT_COLS,
    ZERO_COLS,
    backend,
    grad_tolerance,
    grads64,
    partial64,
)

from kdkernels import _stats
from kdkernels._spec import Divergence, LossSpec
from kdkernels._stats import Col
from kdkernels.triton import kd as tkd

IMPLS = ("torch", "triton", "ext")
N, V = 6, 53  # the whole vocabulary
OFFSET, VR = 11, 37  # the range [11, 48): not a multiple of the forced 16-wide tiles
IGNORE = -100


@pytest.fixture(params=IMPLS)
def be(request, monkeypatch):
    """The backend module; Triton with 16-wide tiles, rows split over 2 programs and blocks
    of 16 slots, so the tile loop, its tail, the split-row merge and the slot loop run at
    these widths. `device`: where its inputs live (DEVICE for Triton, else the CPU)."""
    mod = backend(request.param)
    if request.param == "ext":
        ok, why = mod.is_available(torch.device("cpu"))
        assert ok, why
    if request.param == "triton":
        monkeypatch.setattr(tkd, "FORCE_BLOCK_V", 16)
        monkeypatch.setattr(tkd, "FORCE_SPLIT", 2)
        monkeypatch.setattr(importlib.import_module("kdkernels.triton.sparse"), "BLOCK_K", 16)
    mod.impl_name = request.param
    mod.device = DEVICE if request.param == "triton" else torch.device("cpu")
    return mod


def _dtypes(be):
    return [torch.float32, torch.bfloat16, torch.float16] + (
        [torch.float64] if be.impl_name != "triton" else [])


def _spec(ce: bool, inv_ts: float) -> LossSpec:
    return LossSpec(Divergence("forward_kl"), inv_ts=inv_ts, inv_tt=1.0, kd_scale=1.0,
                    ce_weight=0.7 if ce else 0.0, ignore_index=IGNORE)


def _logits(dtype, strided: bool, device, seed=0):
    """(N, V) logits and the range's (N, VR) view of them: a column slice of a wider tensor
    (row stride > VR) when strided, else a contiguous copy."""
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(N, V + 5, generator=g) * 3).to(device, dtype)
    s = full[:, :V]
    rng = s[:, OFFSET:OFFSET + VR]
    if not strided:
        rng = rng.contiguous()
    else:
        assert rng.stride(0) > VR and not rng.is_contiguous()
    return s, rng


def _labels(device):
    # inside the range, outside on both sides, ignored, at the range's edges
    return torch.tensor([OFFSET + 3, 2, IGNORE, V - 1, OFFSET, OFFSET + VR - 1], device=device)


def _ids(k, device, seed=0):
    """(N, k) duplicate-free GLOBAL ids over the whole vocabulary (inside and outside the
    range), with -1 slots, k <= V."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    if k > 1:
        ids[::2, -1] = -1
        ids[1, 0] = -1
    return ids.to(device)


def _check_partial(be, s, labels, spec, offset, got):
    """got (N, NCOL) against the formula on rows that count, and against the backend's dense
    `partial` (student columns) on ignored rows."""
    assert got.shape == (N, _stats.NCOL)
    assert got.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    want = partial64(s, labels, spec, offset)
    rows = torch.ones(N, dtype=torch.bool, device=s.device) if labels is None else labels != IGNORE
    cols = [0, 1]  # MS, LS
    if spec.ce_weight and labels is not None:
        cols += [2, 3, 4]  # M1, L1, LABEL
    elif labels is not None:
        # without CE a backend fills LABEL as its `partial` does: s[label] or 0
        lab = got[rows, Col.LABEL].double()
        assert ((lab == want[rows, 4]) | (lab == 0)).all()
    tol = 4 * EPS[got.dtype] * (VR + 2)
    for c in cols:
        col = STUDENT_COLS[c]
        torch.testing.assert_close(got[rows, col].double(), want[rows, c], rtol=tol, atol=tol,
                                   msg=lambda m, col=col: f"{col.name}: {m}")
    assert (got[rows][:, [Col.MT, Col.LT]] == -math.inf).all()
    assert (got[rows][:, ZERO_COLS] == 0).all()
    if not rows.all():
        dense = be.partial(s.contiguous(), torch.zeros_like(s.contiguous()), labels, spec, offset)
        ign = ~rows
        cols = [Col.MS, Col.LS, Col.LABEL] + ([Col.M1, Col.L1] if spec.ce_weight else [])
        torch.testing.assert_close(got[ign][:, cols], dense[ign][:, cols], equal_nan=True)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("inv_ts", [1.0, 0.5], ids=["T1", "T2"])
@pytest.mark.parametrize("ce", [False, True], ids=["kd", "ce"])
def test_sparse_partial(be, ce, inv_ts, strided):
    spec = _spec(ce, inv_ts)
    for dtype in _dtypes(be):
        _, s = _logits(dtype, strided, be.device)
        for labels in (_labels(be.device), None) if not ce else (_labels(be.device),):
            got = be.sparse_partial(s, labels, spec, OFFSET)
            _check_partial(be, s, labels, spec, OFFSET, got)


def test_merge_of_two_ranges_is_the_whole_row(be):
    spec = _spec(True, 0.5)
    s, _ = _logits(torch.float32, False, be.device)
    labels = _labels(be.device)
    a = be.sparse_partial(s[:, :20], labels, spec, 0)
    b = be.sparse_partial(s[:, 20:], labels, spec, 20)
    whole = be.sparse_partial(s, labels, spec, 0)
    merged = _stats.merge(a, b, spec)
    rows = labels != IGNORE
    torch.testing.assert_close(merged[rows], whole[rows])
    _check_partial(be, s, labels, spec, 0, whole)


def _global_stats(s_full, labels, spec):
    """The merged table of the whole rows, as sparse_grads receives it (float32, or
    float64 for float64 logits)."""
    acc = torch.float64 if s_full.dtype == torch.float64 else torch.float32
    st = _stats.empty(N, s_full.device, acc)
    st[:, STUDENT_COLS] = partial64(s_full, labels, spec, 0).to(acc)
    return st


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("inv_ts", [1.0, 0.5], ids=["T1", "T2"])
@pytest.mark.parametrize("ce", [False, True], ids=["kd", "ce"])
@pytest.mark.parametrize("k", [1, 7, V], ids=["K1", "K7", "KV"])
def test_sparse_grads(be, k, ce, inv_ts, strided):
    spec = _spec(ce, inv_ts)
    labels = _labels(be.device)
    ids = _ids(k, be.device)
    for dtype in _dtypes(be):
        s_full, s = _logits(dtype, strided, be.device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        g = torch.Generator().manual_seed(3)
        coef = torch.randn(N, 2, generator=g, dtype=acc).to(be.device)
        w = torch.randn(N, k, generator=g, dtype=acc).to(be.device)
        if not ce:
            coef[:, 1] = 0
        # the caller zeroes the row scalars of ignored rows
        ignored = labels == IGNORE
        coef[ignored] = 0
        w[ignored] = 0
        stats = _global_stats(s_full, labels, spec)
        gs = be.sparse_grads(s, labels, spec, stats, coef, ids, w, OFFSET)
        assert gs.dtype == dtype and gs.shape == (N, VR) and gs.is_contiguous()
        want, terms = grads64(s, labels, spec, stats, coef, ids, w, OFFSET)
        err = (gs.double() - want).abs()
        tol = grad_tolerance(want, terms, dtype)
        assert (err <= tol).all(), (
            f"{dtype}: max error {err.max():.3g}, worst excess {(err - tol).max():.3g}")
        assert (gs[ignored] == 0).all()


def test_sparse_grads_can_fail(be):
    """The comparison above sees a slot's weight dropped or added twice (w's scale is the
    smallest term it must resolve)."""
    spec = _spec(True, 0.5)
    labels = _labels(be.device)
    ids = _ids(7, be.device)
    _, s = _logits(torch.bfloat16, False, be.device)
    s_full, _ = _logits(torch.bfloat16, False, be.device)
    stats = _global_stats(s_full, labels, spec)
    coef = torch.ones(N, 2, device=be.device)
    w = torch.full((N, 7), 0.25, device=be.device)
    gs = be.sparse_grads(s, labels, spec, stats, coef, ids, w, OFFSET)
    for wrong in (torch.zeros_like(w), 2 * w):
        want, terms = grads64(s, labels, spec, stats, coef, ids, wrong, OFFSET)
        err = (gs.double() - want).abs()
        assert not (err <= grad_tolerance(want, terms, torch.bfloat16)).all()


def test_non_finite_rows(be):
    """The maxima carry a row's state (NaN, +inf, -inf when nothing is finite); -inf entries
    of a row with finite ones are padding, exact in both functions; an ignored row's
    gradient is 0 whatever its logits."""
    spec = _spec(True, 0.5)
    _, s = _logits(torch.float32, False, be.device)
    s = s.clone()
    s[0, 5] = math.nan
    s[1, 2] = math.inf
    s[2, :] = -math.inf
    s[3, ::3] = -math.inf  # padding
    s[4, 7] = math.nan  # and row 4 is ignored below
    labels = torch.tensor([OFFSET + 1, OFFSET + 2, OFFSET + 3, OFFSET + 1, IGNORE, OFFSET + 4],
                          device=be.device)
    got = be.sparse_partial(s, labels, spec, OFFSET)
    assert got[0, Col.MS].isnan() and got[1, Col.MS] == math.inf
    assert got[2, Col.MS] == -math.inf and got[2, Col.LS] == -math.inf
    finite = torch.tensor([3, 5], device=be.device)
    want = partial64(s, labels, spec, OFFSET)
    torch.testing.assert_close(got[finite][:, STUDENT_COLS].double(), want[finite])
    # a NaN row merged with a finite range stays NaN
    clean = be.sparse_partial(torch.zeros(N, 4, device=be.device), labels, spec, OFFSET + VR)
    assert _stats.merge(got, clean, spec)[0, Col.MS].isnan()

    coef = torch.randn(N, 2).to(be.device)
    coef[4] = 0
    ids = _ids(7, be.device)
    w = torch.randn(N, 7).to(be.device)
    w[4] = 0
    gs = be.sparse_grads(s, labels, spec, got, coef, ids, w, OFFSET)
    want, terms = grads64(s, labels, spec, got, coef, ids, w, OFFSET)
    err = (gs[finite].double() - want[finite]).abs()
    assert (err <= grad_tolerance(want[finite], terms[finite], torch.float32)).all()
    assert gs[3, ::3][want[3, ::3] == 0].eq(0).all()
    # every backend's promise (beyond the contract, which zeroes an ignored row's
    # coefficients and weights): an ignored row gets exactly 0 whatever its logits
    assert (gs[4] == 0).all()


def test_empty_inputs(be):
    spec = _spec(True, 0.5)
    dev = be.device
    s = torch.zeros(0, 5, device=dev)
    assert be.sparse_partial(s, torch.zeros(0, dtype=torch.int64, device=dev), spec,
                             0).shape == (0, 12)
    st = be.sparse_partial(torch.zeros(3, 0, device=dev),
                           torch.tensor([0, 1, IGNORE], device=dev), spec, 0)
    assert (st[:2][:, [Col.MS, Col.LS, Col.MT, Col.LT]] == -math.inf).all()
    gs = be.sparse_grads(torch.zeros(3, 0, device=dev), None, _spec(False, 1.0),
                         _stats.empty(3, dev, torch.float32), torch.zeros(3, 2, device=dev),
                         torch.zeros(3, 2, dtype=torch.int64, device=dev),
                         torch.zeros(3, 2, device=dev), 0)
    assert gs.shape == (3, 0)


def test_triton_traffic_bf16():
    """Forward + backward of the Triton sparse kernels move at most 6.5 bytes per student
    element in bfloat16 (read s twice, write gs once, O(N K) besides)."""
    import os
    import sys
    from pathlib import Path

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts bytes through the Triton interpreter (TRITON_INTERPRET=1)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import traffic as tr

    ts = backend("triton")
    n, v, k = 4, 4096, 64
    spec = _spec(True, 0.5)
    s = torch.randn(n, v).bfloat16()
    labels = torch.randint(0, v, (n,))
    ids = torch.stack([torch.randperm(v)[:k] for _ in range(n)])
    with tr.count_traffic() as fwd:
        stats = ts.sparse_partial(s, labels, spec, 0)
    coef, w = torch.randn(n, 2), torch.randn(n, k)
    with tr.count_traffic() as bwd:
        ts.sparse_grads(s, labels, spec, stats, coef, ids, w, 0)
    per_elem = (fwd.total + bwd.total) / (n * v)
    print(f"sparse fwd {fwd.total / (n * v):.3f} + bwd {bwd.total / (n * v):.3f} "
          f"= {per_elem:.3f} B/elem (bf16, K={k})")
    assert fwd.read >= n * v * 2 and bwd.read >= n * v * 2 and bwd.write >= n * v * 2
    assert per_elem <= 6.5


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_ext_ops_opcheck(strided):
    """The extension's ops against their schemas and fake kernels."""
    ext = backend("ext")
    ok, why = ext.is_available(torch.device("cpu"))
    assert ok, why
    spec = _spec(True, 0.5)
    cpu = torch.device("cpu")
    s_full, s = _logits(torch.bfloat16, strided, cpu)
    labels = _labels(cpu)
    args = spec.as_args()
    torch.library.opcheck(torch.ops.kdkernels.kd_sparse_partial, (s, labels, *args, OFFSET))
    stats = _global_stats(s_full, labels, spec)
    ids = _ids(7, cpu)
    coef, w = torch.randn(N, 2), torch.randn(N, 7)
    torch.library.opcheck(torch.ops.kdkernels.kd_sparse_grads,
                          (s, labels, stats, coef, ids, w, *args, OFFSET))



@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_triton_ops_opcheck(strided):
    """The Triton launchers run as torch.library ops (what torch.compile sees): against
    their schemas and fake kernels."""
    from kdkernels.triton import sparse as tsp

    spec = _spec(True, 0.5)
    s_full, s = _logits(torch.float32, strided, DEVICE)
    labels = _labels(DEVICE)
    student = (float(spec.inv_ts), float(spec.ce_weight), int(spec.ignore_index))
    torch.library.opcheck(tsp.sparse_partial_op, (s, labels, *student, OFFSET))
    torch.library.opcheck(tsp.sparse_partial_op, (s, None, *student, OFFSET))
    stats = _global_stats(s_full, labels, spec)
    ids = _ids(7, DEVICE)
    coef, w = torch.randn(N, 2).to(DEVICE), torch.randn(N, 7).to(DEVICE)
    torch.library.opcheck(tsp.sparse_grads_op,
                          (s, labels, *student, stats, coef, ids, w, OFFSET))

def test_bad_input_names_the_argument(be):
    if be.impl_name == "torch":
        pytest.skip("the kernels' own checks")
    errors = (RuntimeError, ValueError, TypeError)
    spec = _spec(False, 1.0)
    dev = be.device
    s = torch.randn(N, VR).to(dev)
    with pytest.raises(errors, match="unit column stride"):
        be.sparse_partial(s.t().contiguous().t(), None, spec, 0)
    stats = _stats.empty(N, dev, torch.float32)
    with pytest.raises(errors, match="w must be"):
        be.sparse_grads(s, None, spec, stats, torch.zeros(N, 2, device=dev),
                        torch.zeros(N, 3, dtype=torch.int64, device=dev),
                        torch.zeros(N, 2, device=dev), 0)
    with pytest.raises(errors, match="ids must be"):
        be.sparse_grads(s, None, spec, stats, torch.zeros(N, 2, device=dev),
                        torch.zeros(N, 3, device=dev), torch.zeros(N, 3, device=dev), 0)
