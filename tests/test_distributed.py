"""Vocab-parallel kd_loss / softmax (kdkernels/distributed.py) on 2 and 4 gloo processes.

Every rank builds the same full (rows, V) logits from a seeded generator, keeps its column
shard, and compares the sharded result against the unsharded kd.kd_loss(impl="torch") of
the full tensors (the oracle, itself checked against float64 formulas in test_kd_loss.py):
the loss (and that it is bitwise identical on every rank), the gradient of the rank's
student shard and of its teacher shard. The matrix runs in float64, so any error in the
shard merge shows up far above the 1e-10 tolerance; float32 and bfloat16 cases check the
dtype handling with an error-model tolerance.

Spawning processes is the expensive part (~5 s each on a small machine), so one spawn per
world size runs every case in sequence. Cases never raise in the middle of their
collectives: failures are collected (the `Checks` object) and reported at the end, so the
ranks stay in step. Each rank writes one JSON line per case; a case that hangs is caught by
the process group's timeout and by the harness's deadline, which kills the workers and fails
the unfinished cases (a hang fails, it never blocks CI).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdkernels as kd
from kdkernels import distributed as kdd
from kdkernels._stats import NCOL

VOCAB = 37  # not a multiple of 2 or 4: uneven shards
# uneven column widths per world size (sum = VOCAB); 4 ranks include a 1-column shard
WIDTHS = {2: (20, 17), 4: (9, 14, 1, 13)}
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "soft_cross_entropy", "tvd", "forward_reverse_kl", "alpha_beta")
DIV_KWARGS = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"skew": 0.2},
              "skew_reverse_kl": {"skew": 0.35}, "forward_reverse_kl": {"alpha": 0.3},
              "alpha_beta": {"ab_alpha": 0.3, "ab_beta": 0.8}}
PG_TIMEOUT_S = 60  # a desynchronized collective errors out after this
DEADLINE_S = 600  # the whole spawn group (~40 s on an idle 2-core machine); past it the
# workers are killed and the unfinished cases fail


# --------------------------------------------------------------------------------------
# helpers that run inside the workers
# --------------------------------------------------------------------------------------


class Checks:
    """Soft assertions: collect failures and raise once the case's collectives are done."""

    def __init__(self):
        self.fails: list[str] = []

    def close(self, what, got, want, rtol, atol):
        if got is None or want is None:
            if got is not want:
                self.fails.append(f"{what}: got {got is not None}, want {want is not None}")
            return
        if got.shape != want.shape:
            self.fails.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        g, w = got.double(), want.double()
        if not torch.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True):
            err = (g - w).abs().nan_to_num(nan=float("inf")).max().item()
            self.fails.append(f"{what}: max abs err {err:.3g} (rtol={rtol}, atol={atol})")

    def true(self, what, cond):
        if not cond:
            self.fails.append(what)

    def done(self):
        if self.fails:
            raise AssertionError(f"{len(self.fails)} failed checks:\n" + "\n".join(self.fails[:30]))


TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}


def offsets(widths):
    out = [0]
    for w in widths:
        out.append(out[-1] + w)
    return out


def local(x, widths, rank, dim=-1, grad=True):
    """This rank's column shard of the full tensor x, as a fresh leaf."""
    o = offsets(widths)
    y = x.narrow(dim, o[rank], widths[rank]).detach().clone()
    return y.requires_grad_(grad)


def gen_logits(shape, seed, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def labels_on_every_shard(lead, widths, seed, ignore_index=-100):
    """Labels hitting the first or last column of every shard, random ones, ignored rows."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, sum(widths), lead, generator=g)
    flat = lab.view(-1)
    o = offsets(widths)
    for r in range(len(widths)):
        flat[r] = o[r] if r % 2 == 0 else o[r + 1] - 1
    flat[len(widths) :: 3] = ignore_index
    return lab


def same_on_every_rank(x, group=None):
    """True when x is bitwise identical on every rank (a test-side all_gather)."""
    x = x.detach().reshape(-1).double().contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return all(torch.equal(o.nan_to_num(), out[0].nan_to_num()) for o in out)


def upstream(reduction, lead, seed):
    """A non-unit upstream gradient, identical on every rank."""
    if reduction == "none":
        return gen_logits(lead, seed, scale=1.0)
    return torch.tensor(0.7, dtype=torch.float64)


def compare_kd(chk, tag, S, T, labels, widths, rank, group, *, reduction="none",
               teacher_grad=True, tol=None, impl="torch", **kwargs):
    """Sharded kd_loss on this rank's shards of S, T against the unsharded reference
    (group None: the default group)."""
    rtol, atol = tol or TOL[S.dtype]
    group = group or dist.group.WORLD
    Sf = S.clone().requires_grad_(True)
    Tf = T.clone().requires_grad_(teacher_grad)
    want = kd.kd_loss(Sf, Tf, labels, reduction=reduction, impl="torch", **kwargs)
    up = upstream(reduction, want.shape, 7).to(want.dtype)
    (want * up).sum().backward()

    s = local(S, widths, rank)
    t = local(T, widths, rank, grad=teacher_grad)
    got = kd.kd_loss(s, t, labels, reduction=reduction, impl=impl, process_group=group,
                     **kwargs)
    (got * up).sum().backward()
    o = offsets(widths)
    a, b = o[rank], o[rank + 1]
    chk.true(f"{tag}: loss dtype {got.dtype} != {want.dtype}", got.dtype == want.dtype)
    chk.close(f"{tag}: loss", got.detach(), want.detach(), rtol, atol)
    chk.true(f"{tag}: loss differs across ranks", same_on_every_rank(got, group))
    chk.close(f"{tag}: grad student", s.grad, Sf.grad[..., a:b], rtol, atol)
    want_t = Tf.grad[..., a:b] if teacher_grad else None
    chk.close(f"{tag}: grad teacher", t.grad, want_t, rtol, atol)
    return got


def expect_error(fn, exc_type, pattern):
    """The error's 'Type: message', or a failure marker; never raises (ranks stay in step)."""
    try:
        fn()
    except exc_type as e:
        msg = f"{type(e).__name__}: {e}"
        return msg if re.search(pattern, str(e)) else f"WRONG MESSAGE {msg}"
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return f"WRONG TYPE {type(e).__name__}: {e}"
    return "NO ERROR"


# --------------------------------------------------------------------------------------
# cases: each runs on every rank of the world; returns an observation compared across ranks
# --------------------------------------------------------------------------------------

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _divergence_matrix(divergence, rank, world):
    """Every reduction x (no labels, ignored rows, CE on any shard) x temperatures."""
    chk = Checks()
    widths = WIDTHS[world]
    lead = (2, 3 * world)  # rows = 6 W: room for a label on every shard + ignored rows
    S = gen_logits((*lead, VOCAB), 1)
    T = gen_logits((*lead, VOCAB), 2)
    labels = labels_on_every_shard(lead, widths, 3)
    kw = DIV_KWARGS.get(divergence, {})
    for reduction in ("none", "sum", "batchmean", "token_mean"):
        for mode in ("no-labels", "ignored", "ce"):
            for temps in ((1.0, None), (2.0, 0.7)):
                lab = None if mode == "no-labels" else labels
                extra = {"ce_weight": 0.5, "kd_weight": 0.8} if mode == "ce" else {}
                compare_kd(
                    chk, f"{reduction}/{mode}/T={temps}", S, T, lab, widths, rank, None,
                    reduction=reduction, divergence=divergence, temperature=temps[0],
                    teacher_temperature=temps[1], **kw, **extra,
                )
    chk.done()


for _div in DIVERGENCES:
    CASES[f"matrix_{_div}"] = (lambda d: lambda rank, world: _divergence_matrix(d, rank, world))(
        _div
    )


@case
def reduction_mean(rank, world):
    """F.kl_div's 'mean': sum / numel of the (GLOBAL) logits."""
    chk = Checks()
    S, T = gen_logits((4, VOCAB), 11), gen_logits((4, VOCAB), 12)
    compare_kd(chk, "mean", S, T, None, WIDTHS[world], rank, None, reduction="mean")
    chk.done()


@case
def teacher_frozen(rank, world):
    chk = Checks()
    S, T = gen_logits((5, VOCAB), 21), gen_logits((5, VOCAB), 22)
    labels = labels_on_every_shard((5,), WIDTHS[world], 23)
    for div in DIVERGENCES:
        compare_kd(chk, div, S, T, labels, WIDTHS[world], rank, None, teacher_grad=False,
                   divergence=div, ce_weight=0.3, temperature=2.0)
    chk.done()


def _padded(rank, world, real, widths):
    """Logits with -inf in both student and teacher past column `real` (vocab padding)."""
    chk = Checks()
    v = sum(widths)
    S, T = gen_logits((6, v), 31), gen_logits((6, v), 32)
    S[:, real:] = -torch.inf
    T[:, real:] = -torch.inf
    labels = torch.tensor([0, real - 1, -100, 5, real // 2, 1])
    for div in DIVERGENCES:
        got = compare_kd(chk, f"{div}", S, T, labels, widths, rank, None, divergence=div,
                         ce_weight=0.5, temperature=1.5, **DIV_KWARGS.get(div, {}))
        # and the padding changes nothing: the unpadded loss is the same
        want = kd.kd_loss(S[:, :real], T[:, :real], labels, divergence=div, ce_weight=0.5,
                          temperature=1.5, reduction="none", impl="torch",
                          **DIV_KWARGS.get(div, {}))
        chk.close(f"{div}: padded vs unpadded", got.detach(), want, *TOL[torch.float64])
    chk.done()


@case
def padding_last_shard(rank, world):
    """V = 37 padded up to a multiple of W, the pad at the end of the last shard."""
    v = -(-VOCAB // world) * world
    _padded(rank, world, VOCAB, (v // world,) * world)


@case
def padding_whole_shard(rank, world):
    """The last rank holds only padding: its shard has no mass in either softmax."""
    widths = (*WIDTHS[world][:-1], 4)
    _padded(rank, world, sum(widths) - 4, widths)


@case
def dtypes(rank, world):
    chk = Checks()
    widths = WIDTHS[world]
    labels = labels_on_every_shard((8,), widths, 43)
    for div in ("forward_kl", "jsd"):
        S, T = gen_logits((8, VOCAB), 41), gen_logits((8, VOCAB), 42)
        compare_kd(chk, f"f32 {div}", S.float(), T.float(), labels, widths, rank, None,
                   divergence=div, ce_weight=0.5)
        # bfloat16: math in float32 on both paths; gradients are rounded to bfloat16, so a
        # float32 difference of a few ulp may move the result by one bfloat16 ulp (2**-8).
        compare_kd(chk, f"bf16 {div}", S.bfloat16(), T.bfloat16(), labels, widths, rank,
                   None, divergence=div, ce_weight=0.5, tol=(2**-7, 1e-6))
    chk.done()


def _max_err(a, b):
    return (a.double() - b.double()).abs().nan_to_num(nan=float("inf")).max().item()


@case
def precision_at_1e4(rank, world):
    """Logits offset by +-1e4 in float32: the sharded loss and gradients are as accurate
    against float64 as the unsharded ones of the same impl (within 2x, plus 2 float32 ulps
    of the value's scale). A global logsumexp crossing the collective as one rounded number
    would lose ~1e-3 relative here; the (max, log-sum) pairs lose nothing."""
    chk = Checks()
    widths = WIDTHS[world]
    S, T = gen_logits((6, VOCAB), 61), gen_logits((6, VOCAB), 62)
    S[0::2] += 1e4
    S[1::2] -= 1e4
    T[0::3] -= 1e4
    T[1::3] += 1e4
    T[2, 3] += 5.0  # one spiky teacher row
    labels = labels_on_every_shard((6,), widths, 63)
    o = offsets(widths)
    a, b = o[rank], o[rank + 1]
    for impl in ("torch", "triton", "ext"):
        for div in DIVERGENCES:
            for temperature in (1.0, 2.0):
                kw = dict(divergence=div, temperature=temperature, ce_weight=0.5,
                          reduction="none", **DIV_KWARGS.get(div, {}))
                S64, T64 = S.clone().requires_grad_(), T.clone().requires_grad_()
                want = kd.kd_loss(S64, T64, labels, impl="torch", **kw)
                up = upstream("none", want.shape, 9)
                (want * up).sum().backward()
                Sf, Tf = S.float().requires_grad_(), T.float().requires_grad_()
                whole = kd.kd_loss(Sf, Tf, labels, impl=impl, **kw)
                (whole * up.float()).sum().backward()
                s, t = local(S.float(), widths, rank), local(T.float(), widths, rank)
                got = kd.kd_loss(s, t, labels, impl=impl, process_group=dist.group.WORLD, **kw)
                (got * up.float()).sum().backward()
                tag = f"{impl} {div} T={temperature}"
                pairs = ((got, whole, want, "loss"),
                         (s.grad, Sf.grad[:, a:b], S64.grad[:, a:b], "grad student"),
                         (t.grad, Tf.grad[:, a:b], T64.grad[:, a:b], "grad teacher"))
                for x_got, x_whole, x_want, what in pairs:
                    scale = x_want.abs().max().item()
                    bound = 2 * _max_err(x_whole, x_want) + 4e-7 * scale + 1e-7
                    err = _max_err(x_got, x_want)
                    chk.true(f"{tag}: {what} error {err:.3g} > bound {bound:.3g} (unsharded "
                             f"{_max_err(x_whole, x_want):.3g})", err <= bound)
    chk.done()


@case
def backend_kernels_per_shard(rank, world):
    """The per-shard work runs in the resolved backend: one partial, one mix_partial (the
    mixture) and one grads call per step for every impl, and under impl="ext" no torch op
    outside the extension's own ops produces a tensor of the shard's N x V_r size."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from kdkernels import _dispatch

    class BigOps(TorchDispatchMode):
        def __init__(self, size):
            super().__init__()
            self.size, self.seen = size, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            inputs = {x.untyped_storage().data_ptr() for x in tree_flatten((args, kwargs))[0]
                      if isinstance(x, torch.Tensor)}
            outs = out if isinstance(out, (tuple, list)) else (out,)
            # a new tensor (not a view of an input) of the shard's N x V_r size or more
            if any(isinstance(x, torch.Tensor) and x.numel() >= self.size
                   and x.untyped_storage().data_ptr() not in inputs for x in outs):
                self.seen.append(str(func))
            return out

    chk = Checks()
    # shards far wider than the gathered (W, N, NCOL) table, so only N x V_r work is flagged
    widths = {2: (250, 230), 4: (120, 150, 60, 150)}[world]
    S, T = gen_logits((5, 480), 71).float(), gen_logits((5, 480), 72).float()
    labels = labels_on_every_shard((5,), widths, 73)
    for impl in ("torch", "triton", "ext"):
        backend = _dispatch._BACKENDS[impl]
        calls = {"partial": 0, "mix_partial": 0, "grads": 0}
        saved = {name: getattr(backend, name) for name in calls}

        def counting(name, calls=calls, saved=saved):
            def wrapper(*args, **kwargs):
                calls[name] += 1
                return saved[name](*args, **kwargs)
            return wrapper

        try:
            for name in calls:
                setattr(backend, name, counting(name))
            s, t = local(S, widths, rank), local(T, widths, rank)
            mode = BigOps(s.numel())
            with mode:
                loss = kd.kd_loss(s, t, labels, impl=impl, divergence="jsd", ce_weight=0.5,
                                  process_group=dist.group.WORLD)
                loss.backward()
        finally:
            for name, fn in saved.items():
                setattr(backend, name, fn)
        chk.true(f"{impl}: backend calls {calls}",
                 calls == {"partial": 1, "mix_partial": 1, "grads": 1})
        if impl == "ext":
            torch_ops = [op for op in mode.seen if not op.startswith("kdkernels.")]
            chk.true(f"ext: N x V_r torch ops ran: {torch_ops}", not torch_ops)
    chk.done()


@case
def impls(rank, world):
    """Every impl takes the same sharded path: the backend is resolved, then its own kernels
    compute each shard's statistics and gradients. As in conftest.py, an impl that cannot
    run here fails (the extension is built by the parent before the spawn, see _results)."""
    chk = Checks()
    S, T = gen_logits((4, VOCAB), 51).float(), gen_logits((4, VOCAB), 52).float()
    for impl in ("torch", "triton", "ext", "auto"):
        compare_kd(chk, impl, S, T, None, WIDTHS[world], rank, None, impl=impl,
                   divergence="reverse_kl")
    chk.done()


@case
def empty_batch(rank, world):
    chk = Checks()
    widths = WIDTHS[world]
    for reduction in ("none", "sum", "token_mean"):
        s = torch.zeros(0, widths[rank], dtype=torch.float64, requires_grad=True)
        t = torch.zeros(0, widths[rank], dtype=torch.float64, requires_grad=True)
        lab = torch.zeros(0, dtype=torch.int64)
        loss = kd.kd_loss(s, t, lab, process_group=dist.group.WORLD, reduction=reduction,
                          divergence="jsd", ce_weight=0.5)
        loss.sum().backward()
        chk.true(f"{reduction}: loss {loss}", loss.numel() == 0 or float(loss.detach()) == 0)
        chk.true(f"{reduction}: grads", s.grad.shape == s.shape and t.grad.shape == t.shape)
    chk.done()


@case
def chunked_rows(rank, world):
    """Several row chunks with a ragged last one (_common.CHUNK_ELEMENTS made tiny), so the
    chunk loops of forward, backward and softmax are exercised."""
    from kdkernels import _common

    chk = Checks()
    widths = WIDTHS[world]
    saved = _common.CHUNK_ELEMENTS
    _common.CHUNK_ELEMENTS = 3 * max(widths)  # 3 rows per chunk: 11 rows = 3 + 3 + 3 + 2
    try:
        S, T = gen_logits((11, VOCAB), 121), gen_logits((11, VOCAB), 122)
        labels = labels_on_every_shard((11,), widths, 123)
        for div in ("forward_kl", "reverse_kl", "skew_forward_kl"):
            compare_kd(chk, div, S, T, labels, widths, rank, None, divergence=div,
                       ce_weight=0.5, temperature=2.0)
        x = local(S, widths, rank)
        xf = S.clone().requires_grad_(True)
        want = torch.log_softmax(xf, -1)
        (want * T).sum().backward()
        got = kd.log_softmax(x, process_group=dist.group.WORLD)
        o = offsets(widths)
        (got * T[:, o[rank] : o[rank + 1]]).sum().backward()
        chk.close("log_softmax", got.detach(), want.detach()[:, o[rank] : o[rank + 1]],
                  *TOL[torch.float64])
        chk.close("log_softmax grad", x.grad, xf.grad[:, o[rank] : o[rank + 1]],
                  *TOL[torch.float64])
    finally:
        _common.CHUNK_ELEMENTS = saved
    chk.done()


@case
def empty_shard(rank, world):
    """A rank holding no column (DTensor's torch.chunk layout gives one when V < W ranks'
    chunk sizes add up, e.g. V = 5 on 4 ranks). Through distributed.kd_rows directly:
    functional.py rejects an empty vocabulary dimension before dispatch."""
    from kdkernels._spec import Divergence, LossSpec
    from kdkernels.reference import kd_rows as reference_rows

    chk = Checks()
    widths = (0, *WIDTHS[world][1:-1], WIDTHS[world][-1] + WIDTHS[world][0])
    o = offsets(widths)
    S, T = gen_logits((5, VOCAB), 111), gen_logits((5, VOCAB), 112)
    labels = torch.tensor([0, VOCAB - 1, -100, 3, 20])
    for div in (Divergence("forward_kl"), Divergence("mixture", 0.3, 0.3, 0.7)):
        spec = LossSpec(div, inv_ts=0.5, inv_tt=0.8, kd_scale=4.0, ce_weight=0.5)
        Sf, Tf = S.clone().requires_grad_(True), T.clone().requires_grad_(True)
        want = reference_rows(Sf, Tf, labels, spec)
        want.sum().backward()
        s, t = local(S, widths, rank), local(T, widths, rank)
        got = kdd.kd_rows(s, t, labels, spec, dist.group.WORLD)
        got.sum().backward()
        chk.close(f"{div.kind}: rows", got.detach(), want.detach(), *TOL[torch.float64])
        chk.close(f"{div.kind}: grad s", s.grad, Sf.grad[:, o[rank] : o[rank + 1]],
                  *TOL[torch.float64])
        chk.close(f"{div.kind}: grad t", t.grad, Tf.grad[:, o[rank] : o[rank + 1]],
                  *TOL[torch.float64])
    chk.done()


@case
def softmax(rank, world):
    chk = Checks()
    widths = WIDTHS[world]
    o = offsets(widths)
    X = gen_logits((3, VOCAB), 61)
    U = gen_logits((3, VOCAB), 62, scale=1.0)
    for log in (False, True):
        for dim in (-1, 0):
            full = X if dim == -1 else X.T.contiguous()  # vocabulary along `dim`
            up = U if dim == -1 else U.T.contiguous()
            xf = full.clone().requires_grad_(True)
            fn = torch.log_softmax if log else torch.softmax
            want = fn(xf / 2.0, dim)
            (want * up).sum().backward()
            x = local(full, widths, rank, dim=dim)
            kfn = kd.log_softmax if log else kd.softmax
            got = kfn(x, 2.0, dim=dim, process_group=dist.group.WORLD)
            (got * up.narrow(dim, o[rank], widths[rank])).sum().backward()
            tag = f"log={log} dim={dim}"
            chk.close(f"{tag}: value", got.detach(), want.narrow(dim, o[rank], widths[rank]),
                      *TOL[torch.float64])
            chk.close(f"{tag}: grad", x.grad, xf.grad.narrow(dim, o[rank], widths[rank]),
                      *TOL[torch.float64])
    chk.done()


@case
def collective_count(rank, world):
    """The documented number of collectives and their payloads (none of N x V size)."""
    chk = Checks()
    widths = WIDTHS[world]
    group = dist.new_group(list(range(world)))
    n = 6
    S, T = gen_logits((n, VOCAB), 71), gen_logits((n, VOCAB), 72)
    labels = labels_on_every_shard((n,), widths, 73)

    def run(**kw):
        s, t = local(S, widths, rank), local(T, widths, rank)
        with kdd.count_collectives() as fwd:
            loss = kd.kd_loss(s, t, labels, process_group=group, **kw)
        with kdd.count_collectives() as bwd:
            loss.backward()
        return [(c.op, c.payload_bytes) for c in fwd], [(c.op, c.payload_bytes) for c in bwd]

    f8 = 8  # float64 bytes
    header = ("all_gather", len(kdd._HEADER) * f8)  # the call header, float64
    table = ("all_gather", n * NCOL * f8)  # the statistics table
    for kw in ({"divergence": "forward_kl"}, {"divergence": "reverse_kl", "ce_weight": 0.5}):
        fwd, bwd = run(**kw)
        chk.true(f"{kw} fwd {fwd}", fwd == [header, table])
        chk.true(f"{kw} bwd {bwd}", bwd == [])
    # the mixture: + the all_reduce of its (n, 4) sums
    for kw in ({"divergence": "jsd"}, {"divergence": "skew_reverse_kl", "ce_weight": 0.5}):
        fwd, bwd = run(**kw)
        chk.true(f"{kw} fwd {fwd}", fwd == [header, table, ("all_reduce", n * 4 * f8)])
        chk.true(f"{kw} bwd {bwd}", bwd == [])
    x = local(S, widths, rank)
    with kdd.count_collectives() as fwd:
        y = kd.softmax(x, process_group=group)
    with kdd.count_collectives() as bwd:
        y.sum().backward()
    chk.true(f"softmax fwd {fwd}", [(c.op, c.payload_bytes) for c in fwd] == [
        header, ("all_gather", n * 2 * f8)])
    chk.true(f"softmax bwd {bwd}", [(c.op, c.payload_bytes) for c in bwd] == [
        ("all_reduce", n * f8)])
    dist.destroy_process_group(group)
    chk.done()


@case
def dtensor(rank, world):
    """DTensor logits (Shard(-1), uneven like torch.chunk) through unwrap_dtensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    chk = Checks()
    mesh = init_device_mesh("cpu", (world,))
    S, T = gen_logits((2, 3, VOCAB), 81), gen_logits((2, 3, VOCAB), 82)
    labels = labels_on_every_shard((2, 3), (10, 10, 10, 7), 83)
    kw = {"divergence": "jsd", "ce_weight": 0.5, "temperature": 2.0, "reduction": "sum"}
    Sf, Tf = S.clone().requires_grad_(True), T.clone().requires_grad_(True)
    want = kd.kd_loss(Sf, Tf, labels, impl="torch", **kw)
    want.backward()

    SD = distribute_tensor(S, mesh, [Shard(-1)]).requires_grad_(True)
    TD = distribute_tensor(T, mesh, [Shard(-1)]).requires_grad_(True)
    LD = distribute_tensor(labels, mesh, [Replicate()])
    s, t, lab, group = kdd.unwrap_dtensor(SD, TD, LD)
    got = kd.kd_loss(s, t, lab, process_group=group, **kw)
    got.backward()
    chk.close("loss", got.detach(), want.detach(), *TOL[torch.float64])
    chk.close("grad student", SD.grad.full_tensor(), Sf.grad, *TOL[torch.float64])
    chk.close("grad teacher", TD.grad.full_tensor(), Tf.grad, *TOL[torch.float64])
    chk.true("plain tensors give None", kdd.unwrap_dtensor(S, T, labels) is None)
    rep = kdd.unwrap_dtensor(distribute_tensor(S, mesh, [Replicate()]),
                             distribute_tensor(T, mesh, [Replicate()]), labels)
    chk.true("Replicate logits: no group", rep[3] is None and rep[0].shape == S.shape)
    bad = expect_error(lambda: kdd.unwrap_dtensor(distribute_tensor(S, mesh, [Shard(0)]),
                                                  distribute_tensor(T, mesh, [Shard(0)]),
                                                  None), ValueError, "Shard\\(-1\\)")
    chk.true(f"Shard(0) logits: {bad}", bad.startswith("ValueError"))
    bad = expect_error(lambda: kdd.unwrap_dtensor(SD, T, None), TypeError, "both be DTensors")
    chk.true(f"mixed DTensor/Tensor: {bad}", bad.startswith("TypeError"))

    # softmax over the sharded dim, and over a dim that is not sharded (rows are local)
    U = gen_logits((2, 3, VOCAB), 84, scale=1.0)
    for dim in (-1, 1):
        xf = S.clone().requires_grad_(True)
        ref = torch.log_softmax(xf / 2.0, dim)
        (ref * U).sum().backward()
        XD = distribute_tensor(S, mesh, [Shard(-1)]).requires_grad_(True)
        x, g, rewrap = kdd.unwrap_dtensor_input(XD, dim)
        chk.true(f"softmax dim={dim} group", (g is not None) == (dim == -1))
        y = rewrap(kd.log_softmax(x, 2.0, dim=dim, process_group=g))
        (y.full_tensor() * U).sum().backward()
        chk.close(f"log_softmax dim={dim}", y.full_tensor().detach(), ref.detach(),
                  *TOL[torch.float64])
        chk.close(f"log_softmax dim={dim} grad", XD.grad.full_tensor(), xf.grad,
                  *TOL[torch.float64])
    chk.done()


@case
def dtensor_public_api(rank, world):
    """kd.kd_loss / kd.log_softmax on DTensors directly, no group passed: needs the
    functional.py hooks (unwrap_dtensor, unwrap_dtensor_input)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    chk = Checks()
    mesh = init_device_mesh("cpu", (world,))
    S, T = gen_logits((4, VOCAB), 91), gen_logits((4, VOCAB), 92)
    Sf = S.clone().requires_grad_(True)
    want = kd.kd_loss(Sf, T, impl="torch", reduction="mean")
    want.backward()
    SD = distribute_tensor(S, mesh, [Shard(-1)]).requires_grad_(True)
    TD = distribute_tensor(T, mesh, [Shard(-1)])
    try:
        with kdd.count_collectives() as calls:
            got = kd.kd_loss(SD, TD, impl="torch", reduction="mean")
        got.backward()
        chk.true(f"went through distributed.kd_rows: {calls}", any(calls))
        chk.close("loss", got.detach(), want.detach(), *TOL[torch.float64])
        chk.close("grad", SD.grad.full_tensor(), Sf.grad, *TOL[torch.float64])
        y = kd.log_softmax(SD, 2.0)
        chk.true("log_softmax returns a DTensor", kdd.is_dtensor(y))
        chk.close("log_softmax", y.full_tensor(), torch.log_softmax(S / 2.0, -1),
                  *TOL[torch.float64])
        # V = 3: torch.chunk gives 4 ranks the widths 1, 1, 1, 0 (an empty local shard)
        S3, T3 = S[:, :3].contiguous(), T[:, :3].contiguous()
        lab3 = torch.tensor([0, 2, -100, 1])
        want3 = kd.kd_loss(S3, T3, lab3, impl="torch", ce_weight=0.5, reduction="none")
        got3 = kd.kd_loss(distribute_tensor(S3, mesh, [Shard(-1)]),
                          distribute_tensor(T3, mesh, [Shard(-1)]), lab3, impl="torch",
                          ce_weight=0.5, reduction="none")
        chk.close("V=3", got3, want3, *TOL[torch.float64])
    except Exception as e:  # noqa: BLE001 - the same on every rank; reported below
        chk.true(f"raised {type(e).__name__}: {str(e)[:300]}", False)
    chk.done()


# ---- bad input: the same clear error on every rank, and the group still works after ----


def _bad_case(rank, world, make, exc_type, pattern, **kw):
    widths = WIDTHS[world]
    group = dist.new_group(list(range(world)))
    S, T = gen_logits((5, VOCAB + 1), 101), gen_logits((5, VOCAB + 1), 102)
    s, t, labels = make(S, T, widths)
    msg = expect_error(lambda: kd.kd_loss(s, t, labels, process_group=group, **kw),
                       exc_type, pattern)
    # every rank raised after the same collectives: a valid call on the same group works
    chk = Checks()
    compare_kd(chk, "after the error", S[:, :VOCAB], T[:, :VOCAB], None, widths, rank, group,
               divergence="jsd")
    dist.destroy_process_group(group)
    chk.done()
    return msg


@case
def bad_width_on_one_rank(rank, world):
    """Rank 0's teacher shard is one column wider, rank 1's one narrower (same total V)."""

    def make(S, T, widths):
        tw = list(widths)
        tw[0] += 1
        tw[1] -= 1
        return local(S[:, :VOCAB], widths, rank), local(T[:, :VOCAB], tw, rank), None

    return _bad_case(rank, world, make, ValueError,
                     r"same shard width on every rank: rank 0 holds 20|rank 0 holds 9")


@case
def bad_total_vocab(rank, world):
    """The last rank's teacher shard has one extra column: shards add up to V and V + 1."""

    def make(S, T, widths):
        tw = (*widths[:-1], widths[-1] + 1)
        return local(S[:, :VOCAB], widths, rank), local(T, tw, rank), None

    return _bad_case(rank, world, make, ValueError, r"add up to V=37 but teacher_logits .* V=38")


@case
def bad_label_too_large(rank, world):
    def make(S, T, widths):
        lab = torch.tensor([0, 3, VOCAB, -100, 1])
        return local(S[:, :VOCAB], widths, rank), local(T[:, :VOCAB], widths, rank), lab

    return _bad_case(rank, world, make, ValueError, r"labels must be in \[0, 37\).*row 2 holds 37",
                     divergence="jsd", ce_weight=0.5)


@case
def bad_label_negative(rank, world):
    def make(S, T, widths):
        lab = torch.tensor([0, -5, 1, -100, 1])
        return local(S[:, :VOCAB], widths, rank), local(T[:, :VOCAB], widths, rank), lab

    return _bad_case(rank, world, make, ValueError, r"labels must be in \[0, 37\).*row 1 holds -5")


@case
def bad_label_on_last_rank_only(rank, world):
    """Labels that differ across ranks (a user bug): only the last rank's are out of range,
    yet every rank raises."""

    def make(S, T, widths):
        lab = torch.tensor([0, 3, 4, -100, VOCAB + 5 if rank == world - 1 else 1])
        return local(S[:, :VOCAB], widths, rank), local(T[:, :VOCAB], widths, rank), lab

    return _bad_case(rank, world, make, ValueError, r"labels must be in \[0, 37\).*row 4 holds",
                     ce_weight=0.5)


def _disagreeing(rank, world, make, pattern):
    """Ranks that make different calls: every rank raises the same ValueError from the call
    header (no abort inside gloo, no rank left waiting), then a valid call works."""
    widths = WIDTHS[world]
    group = dist.new_group(list(range(world)))
    S, T = gen_logits((5, VOCAB), 141), gen_logits((5, VOCAB), 142)
    labels = labels_on_every_shard((5,), widths, 143)
    s, t = local(S, widths, rank), local(T, widths, rank)
    msg = expect_error(lambda: make(s, t, labels, group), ValueError, pattern)
    chk = Checks()
    compare_kd(chk, "after the error", S, T, labels, widths, rank, group, divergence="jsd",
               ce_weight=0.5)
    dist.destroy_process_group(group)
    chk.done()
    return msg


def _last(rank, world):
    return rank == world - 1


@case
def disagree_rows(rank, world):
    return _disagreeing(rank, world, lambda s, t, lab, g: kd.kd_loss(
        s[: 4 if _last(rank, world) else 5], t[: 4 if _last(rank, world) else 5],
        lab[: 4 if _last(rank, world) else 5], process_group=g), r"rows differs")


@case
def disagree_empty_batch_on_one_rank(rank, world):
    def call(s, t, lab, g):
        rows = 0 if rank == 0 else 5
        return kd.kd_loss(s[:rows], t[:rows], lab[:rows], process_group=g)

    return _disagreeing(rank, world, call, r"rows differs")


@case
def disagree_ce_weight(rank, world):
    return _disagreeing(rank, world, lambda s, t, lab, g: kd.kd_loss(
        s, t, lab, ce_weight=0.5 if _last(rank, world) else 0.0, process_group=g),
        r"ce_weight differs")


@case
def disagree_labels_given(rank, world):
    return _disagreeing(rank, world, lambda s, t, lab, g: kd.kd_loss(
        s, t, lab if _last(rank, world) else None, process_group=g), r"labels given differs")


@case
def disagree_divergence(rank, world):
    return _disagreeing(rank, world, lambda s, t, lab, g: kd.kd_loss(
        s, t, divergence="jsd" if _last(rank, world) else "forward_kl", process_group=g),
        r"divergence differs")


@case
def disagree_dtype(rank, world):
    return _disagreeing(rank, world, lambda s, t, lab, g: kd.kd_loss(
        s.float() if _last(rank, world) else s, t.float() if _last(rank, world) else t,
        process_group=g), r"student dtype differs")


@case
def disagree_softmax_rows(rank, world):
    return _disagreeing(rank, world, lambda s, t, lab, g: kd.softmax(
        s[: 3 if _last(rank, world) else 5], process_group=g), r"rows differs")


def _sparse_call(rank, world, k, bump):
    """sparse_kd_loss on this rank's shard with global teacher ids (4 or 5 per row, spaced 7
    apart: unique in a row); bump: the last rank moves one id to a column no other id of its
    row holds."""
    ids = (torch.arange(k) * 7 + torch.arange(5)[:, None] * 3) % VOCAB
    if bump and _last(rank, world):
        ids[2, 1] = (ids[2, -1] + 1) % VOCAB
    lp = torch.log_softmax(torch.linspace(0.0, 1.0, k, dtype=torch.float64), -1)
    return lambda s, t, lab, g: kd.sparse_kd_loss(s, ids, lp.expand(5, k).float(), lab,
                                                  process_group=g)


@case
def disagree_teacher_ids_per_row(rank, world):
    return _disagreeing(rank, world, _sparse_call(rank, world, 5 if _last(rank, world) else 4,
                                                  False), r"teacher ids per row differs")


@case
def disagree_teacher_ids(rank, world):
    return _disagreeing(rank, world, _sparse_call(rank, world, 4, True),
                        r"teacher_ids differ across ranks")


# message identical on every rank (the last-rank-only case names the value only where seen)
SAME_MESSAGE = {"bad_width_on_one_rank", "bad_total_vocab", "bad_label_too_large",
                "bad_label_negative", "bad_label_on_last_rank_only", "disagree_rows",
                "disagree_empty_batch_on_one_rank", "disagree_ce_weight", "disagree_labels_given",
                "disagree_divergence", "disagree_dtype", "disagree_softmax_rows",
                "disagree_teacher_ids_per_row", "disagree_teacher_ids"}


# --------------------------------------------------------------------------------------
# the harness: one spawn per world size, results as JSON lines per rank
# --------------------------------------------------------------------------------------


# the Triton backend's kernel modules, imported on first use (kdkernels/triton/__init__.py)
TRITON_KERNEL_MODULES = tuple(f"kdkernels.triton.{m}" for m in ("kd", "kl_div", "softmax",
                                                                  "sparse"))


def _worker(rank, world, init, outdir, names):
    # The ranks compute on CPU tensors over gloo (W processes on one machine: NCCL would need
    # a GPU per rank), where impl="triton" runs under the Triton interpreter, as in CPU-only
    # CI. On a CUDA machine tests/conftest.py leaves TRITON_INTERPRET unset, so the workers
    # set it. Triton reads it when a kernel is decorated, at the first import of a kernel
    # module, which neither the forkserver's preloads nor a spawned worker's start make; a
    # kernel module imported before, without it, would fail on CPU tensors: an error here.
    early = [m for m in TRITON_KERNEL_MODULES if m in sys.modules]
    if early and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{early} imported before TRITON_INTERPRET=1 was set")
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    with open(os.path.join(outdir, f"rank{rank}.jsonl"), "a") as f:
        for name in names:
            f.write(json.dumps({"case": name, "status": "started"}) + "\n")
            f.flush()
            t0 = time.perf_counter()
            try:
                torch.manual_seed(0)
                rec = {"status": "ok", "obs": CASES[name](rank, world)}
            except Exception:  # noqa: BLE001 - reported to the parent
                rec = {"status": "error", "tb": traceback.format_exc()}
            rec.update(case=name, seconds=round(time.perf_counter() - t0, 3))
            f.write(json.dumps(rec) + "\n")
            f.flush()
    dist.destroy_process_group()


_RESULTS: dict[int, dict] = {}

# A fresh interpreter per worker ("spawn") pays torch's import in every process (seconds each
# on a busy 2-core machine). A forkserver imports torch, kdkernels and this module once and
# forks the workers from that single-threaded process: fast, and no fork of the threaded test
# process itself (OpenMP pools are not fork-safe).
_START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
if _START_METHOD == "forkserver":
    mp.set_forkserver_preload(["torch", "torch.distributed", "kdkernels", __name__])


def _results(world):
    if world in _RESULTS:
        return _RESULTS[world]
    names = list(CASES)
    # Load (build, the first time) the extension once here rather than in W workers at once.
    kd.kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), impl="auto")
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(_worker, args=(world, init, tmp, names), nprocs=world,
                                 join=False, start_method=_START_METHOD)
        deadline = time.monotonic() + DEADLINE_S
        crash = None
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    crash = f"killed after {DEADLINE_S} s (hang)"
                    break
        except Exception as e:  # noqa: BLE001 - a worker died; its cases fail below
            crash = f"a worker failed: {e}"
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        per_case = {n: {} for n in names}
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.jsonl")
            lines = open(path).read().splitlines() if os.path.exists(path) else []
            for line in lines:
                rec = json.loads(line)
                per_case[rec["case"]][r] = rec
        for n in names:
            for r in range(world):
                rec = per_case[n].get(r)
                if rec is None or rec["status"] == "started":
                    per_case[n][r] = {"status": "error",
                                      "tb": f"rank {r} did not finish {n!r}: {crash}"}
    _RESULTS[world] = per_case
    return per_case


def _params():
    return [pytest.param(world, name, id=f"W{world}-{name}")
            for world in (2, 4) for name in CASES]


@pytest.mark.parametrize(("world", "name"), _params())
def test_sharded(world, name):
    recs = _results(world)[name]
    errors = [f"rank {r}:\n{rec['tb']}" for r, rec in sorted(recs.items())
              if rec["status"] != "ok"]
    assert not errors, "\n".join(errors)
    obs = [recs[r]["obs"] for r in range(world)]
    if name.startswith(("bad_", "disagree_")):
        for o in obs:
            assert o.startswith("ValueError"), obs
    if name in SAME_MESSAGE:
        assert len(set(obs)) == 1, f"the ranks raised different errors: {obs}"
