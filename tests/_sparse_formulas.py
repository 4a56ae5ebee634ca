"""The sparse-teacher backend contract (sparse_partial, sparse_grads) as float64 torch
formulas, written from the contract and nothing else, and the error model the kernels are
held to. Shared by tests/test_sparse_kernels.py and tests/test_gpu_sparse.py."""

import importlib

import torch

from kdkernels._stats import Col

BACKENDS = {"torch": "kdkernels.reference", "triton": "kdkernels.triton", "ext": "kdkernels.ext"}
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10,
       torch.float64: 2.0**-52}
STUDENT_COLS = [Col.MS, Col.LS, Col.M1, Col.L1, Col.LABEL]
ZERO_COLS = [Col.DIV, Col.B, Col.UQ, Col.UP, Col.ACC]


def backend(name: str):
    return importlib.import_module(BACKENDS[name])


def partial64(s, labels, spec, offset):
    """(N, 5) float64: MS, LS, M1, L1, LABEL of the columns [offset, offset + Vr) that s
    holds (rows with something finite; -inf entries are padding)."""
    x = s.double()
    ms = x.amax(1)
    ls = torch.logsumexp((x - ms[:, None]) * spec.inv_ts, 1)
    l1 = torch.logsumexp(x - ms[:, None], 1)
    label = torch.zeros_like(ms)
    if labels is not None:
        col = labels - offset
        inside = (col >= 0) & (col < x.shape[1]) & (labels != spec.ignore_index)
        label = torch.where(inside, x.gather(1, col.clamp(0, x.shape[1] - 1)[:, None])[:, 0],
                            0.0)
    return torch.stack([ms, ls, ms, l1, label], 1)


def grads64(s, labels, spec, stats, coef, ids, w, offset):
    """(N, Vr) float64: c_q q + c_1 (q1 - onehot) + the slots' weights at their columns;
    and the absolute sum of those terms (the scale of float32 arithmetic errors)."""
    x = s.double()
    st, coef, w = stats.double(), coef.double(), w.double()
    q = torch.exp((x - st[:, Col.MS, None]) * spec.inv_ts - st[:, Col.LS, None])
    g = coef[:, :1] * q
    terms = g.abs()
    if labels is not None and spec.ce_weight != 0:
        q1 = torch.exp((x - st[:, Col.M1, None]) - st[:, Col.L1, None])
        cols = torch.arange(x.shape[1], device=x.device) + offset
        onehot = (cols[None, :] == labels[:, None]).double()
        g = g + coef[:, 1:] * (q1 - onehot)
        terms = terms + coef[:, 1:].abs() * (q1 + onehot)
    col = ids - offset
    inside = (ids >= 0) & (col >= 0) & (col < x.shape[1])
    # slots outside the range (and -1) add 0 at a clamped column
    at = col.clamp(0, max(x.shape[1] - 1, 0))
    wk = torch.where(inside, w, 0.0)
    g = g.scatter_add(1, at, wk)
    terms = terms.scatter_add(1, at, wk.abs())
    return g, terms


def grad_tolerance(g64, terms, dtype):
    """The error model of sparse_grads: one rounding of the exact value to `dtype` (half an
    ulp, doubled as for plain PyTorch's 2x) plus float32 arithmetic on the terms (exp of an
    argument of size ~10 and a few adds: 64 float32 ulps of the terms' absolute sum). Below
    the dtype's smallest normal the rounding is absolute: the subnormal spacing."""
    sub = torch.finfo(dtype).smallest_normal * EPS[dtype]
    return EPS[dtype] * g64.abs() + sub + 64 * EPS[torch.float32] * terms
