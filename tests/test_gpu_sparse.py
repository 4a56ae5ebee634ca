"""The sparse-teacher kernels (Triton and the CUDA extension) on a GPU at a real vocabulary
(skipped without CUDA): bfloat16 student logits read as a row-strided column slice, the
vocabulary in two ranges merged with _stats.merge, a top-64 slot set per row, against the
float64 formulas of tests/_sparse_formulas.py with the same error model as the CPU tests."""

import pytest
import torch
from _sparse_formulas import (
    STUDENT_COLS,
    backend,
    grad_tolerance,
    grads64,
    partial64,
)

from kdkernels import _stats
from kdkernels._spec import Divergence, LossSpec
from kdkernels._stats import Col

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N, V, K = 64, 128256, 64
SPLIT = 50000  # the second range starts here: not a multiple of any tile


def _inputs(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # a padded vocabulary, as models keep it: the student is the slice s_full[:, :V]
    s_full = (torch.randn(N, V + 128, device="cuda", generator=g) * 3).bfloat16()
    s = s_full[:, :V]
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    labels[::7] = -100
    ids = torch.topk(s.float() + torch.rand(N, V, device="cuda", generator=g), K).indices
    ids[::3, -5:] = -1
    return s, labels, ids


@pytest.mark.parametrize("impl", ["triton", "ext"])
@pytest.mark.parametrize("inv_ts", [1.0, 0.5], ids=["T1", "T2"])
def test_sparse_kernels_llama3_vocab_bf16(impl, inv_ts):
    be = backend(impl)
    if impl == "ext":
        ok, why = be.is_available(torch.device("cuda"))
        assert ok, why
    spec = LossSpec(Divergence("forward_kl"), inv_ts=inv_ts, inv_tt=1.0, kd_scale=1.0,
                    ce_weight=0.5, ignore_index=-100)
    s, labels, ids = _inputs()
    ranges = ((0, SPLIT), (SPLIT, V))
    parts = [be.sparse_partial(s[:, a:b], labels, spec, a) for a, b in ranges]
    stats = _stats.merge(*parts, spec)
    rows = labels != -100
    want = partial64(s, labels, spec, 0)
    torch.testing.assert_close(stats[rows][:, STUDENT_COLS].double(), want[rows],
                               rtol=1e-5, atol=1e-5)
    assert (stats[:, [Col.MT, Col.LT]] == -torch.inf).all()

    g = torch.Generator(device="cuda").manual_seed(1)
    coef = torch.randn(N, 2, device="cuda", generator=g)
    w = torch.randn(N, K, device="cuda", generator=g)
    coef[~rows] = 0
    w[~rows] = 0
    for a, b in ranges:
        gs = be.sparse_grads(s[:, a:b], labels, spec, stats, coef, ids, w, a)
        assert gs.shape == (N, b - a) and gs.dtype == torch.bfloat16 and gs.is_contiguous()
        ref, terms = grads64(s[:, a:b], labels, spec, stats, coef, ids, w, a)
        err = (gs.double() - ref).abs()
        tol = grad_tolerance(ref, terms, torch.bfloat16)
        assert (err <= tol).all(), f"max error {err.max():.3g}"
        assert (gs[~rows] == 0).all()
