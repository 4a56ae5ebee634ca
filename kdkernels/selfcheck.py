"""Self-check: is every implementation correct on this machine?

    python -m kdkernels.selfcheck              # CUDA when present, else CPU
    python -m kdkernels.selfcheck --device cpu --quick

Runs every implementation that can run on the device (torch, triton, ext; the others are
listed with the reason they cannot run) through the public API: kd.kd_loss for every
divergence (with temperatures, a hard-label term and ignored rows), kd.kl_div (elementwise
and summed) and kd.softmax / kd.log_softmax, on a small odd shape and a large-vocabulary
shape, in float32 and bfloat16 (and float16 on CUDA). Values and gradients (student and
teacher, input and target) are compared with a float64 truth computed here, directly from
the formulas, and printed as a table; the exit status is 1 when any check fails.

Error model (the test suite's): a result's error against the float64 truth may be at most
twice the error plain PyTorch makes on the same inputs, plus a floor of a few units in the
last place of the result's dtype:

    max|out - truth| <= 2 * max|baseline - truth| + atol + rtol * max|truth|

The baseline is plain PyTorch as it computes at a half-precision dtype: the math in float32
on the (exact) half-precision inputs, each result rounded once to its dtype. That is the
contract of every impl (math in float32; kd_loss returns float32, gradients and
probabilities come in the inputs' dtype), so a float32 loss from bfloat16 logits is held to
float32 accuracy, not to that of a formula evaluated in bfloat16 (whose loss can be off by
0.1). The factor 2 leaves room for a different order of floating-point operations, never
for a wrong formula or a missing factor. The one other allowance is named where it is
defined (APPROX_EXP): the approximate exp of two fused kernels, on kd_loss values.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (the real kernel code, executed by
numpy), which is slow: there they run on the small shape only, unless --all is given.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kdkernels as kd

from . import _dispatch

IMPLS = ("torch", "triton", "ext")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "soft_cross_entropy", "tvd", "forward_reverse_kl", "alpha_beta")

# One kd_loss setting that exercises every term: different student and teacher
# temperatures (both chain-rule factors), the T**2 scale, an asymmetric mixture weight, a
# hard-label cross-entropy at T = 1 (a third logsumexp) and ignored rows.
KD_KWARGS = dict(beta=0.3, skew=0.1, temperature=2.0, teacher_temperature=1.5,
                 ce_weight=0.5, ignore_index=-100)
SOFTMAX_TEMPERATURE = 2.0

SMALL = (37, 1271)  # odd sizes: partial tiles and masked lanes
LARGE = (16, 128256)  # a real vocabulary (Llama 3)
# --quick: fewer rows, the same vocabularies (seconds on a CPU, Triton interpreted included)
SMALL_QUICK = (13, 1271)
LARGE_QUICK = (2, 128256)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Floors of the error model per dtype (the test suite's table): a few units in the last
# place near 1. float32 results: 2**-23 ~ 1.2e-7, so 2e-6 allows ~16 ulps; bfloat16
# gradients are stored with 8 mantissa bits, one rounding of an O(0.1) entry is ~1e-3.
TOLERANCES = {
    torch.float32: dict(atol=2e-6, rtol=2e-6),
    torch.bfloat16: dict(atol=2e-3, rtol=8e-3),
    torch.float16: dict(atol=2e-4, rtol=1e-3),
}

# Two fused kernels trade exp accuracy for speed, an error source plain PyTorch does not
# have: the extension's CPU kernel uses ATen's 20-ulp exp_u20 (relative error up to ~1.2e-6,
# README "Known limits"), and Triton on CUDA compiles tl.exp to ex2.approx.f32(x * log2 e),
# whose product rounding alone costs |x| * 2**-24 relative (~1e-6 at |x| = 16, beyond which
# an exp no longer matters to a sum against the row's largest term). Named here, per (impl,
# device type): their kd_loss values get APPROX_EXP * exp_error_gain(...) on top of the bound.
# Seen without it on CPU: a reverse_kl row of bfloat16-valued logits, 16 x 128256, off by
# 4.7e-5 against a bound of 4.5e-5 (the exp errors of a grid of bfloat16 values do not
# average out). Everything else is unchanged: these errors are far below a wrong formula's.
APPROX_EXP = {("ext", "cpu"): 1.2e-6, ("triton", "cuda"): 1.2e-6}


# --------------------------------------------------------------------------------------
# the formulas (DESIGN.md §1), run in float64 for the truth and in float32 for
# the baseline; autograd gives their gradients
# --------------------------------------------------------------------------------------


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dim with an explicit max shift."""
    m = z.amax(-1, keepdim=True).detach()
    return z - m - torch.log(torch.exp(z - m).sum(-1, keepdim=True))


def _kl(p: torch.Tensor, lp: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """KL(p || r) = sum p (log p - log r) per row."""
    return (p * (lp - lr)).sum(-1)


def _log_mixture(w: float, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """log(w a + (1 - w) b) from log a and log b, in log space (no underflow to log 0)."""
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def _divergence(lq: torch.Tensor, lp: torch.Tensor, name: str, beta: float, skew: float):
    """D(p || q) per row; q = student, p = teacher (0 < beta < 1, 0 < skew here)."""
    q, p = lq.exp(), lp.exp()
    if name == "forward_kl":
        return _kl(p, lp, lq)
    if name == "reverse_kl":
        return _kl(q, lq, lp)
    if name == "jsd":  # m = beta p + (1 - beta) q
        lm = _log_mixture(beta, lp, lq)
        return beta * _kl(p, lp, lm) + (1.0 - beta) * _kl(q, lq, lm)
    if name == "skew_forward_kl":  # KL(p || skew p + (1 - skew) q)
        return _kl(p, lp, _log_mixture(skew, lp, lq))
    if name == "skew_reverse_kl":  # KL(q || skew q + (1 - skew) p)
        return _kl(q, lq, _log_mixture(skew, lq, lp))
    # the rest at kd_loss's defaults: alpha = 1/2, (ab_alpha, ab_beta) = (1/2, 1/2)
    if name == "soft_cross_entropy":  # -sum p log q
        return _kl(p, torch.zeros_like(lp), lq)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "forward_reverse_kl":
        return 0.5 * _kl(p, lp, lq) + 0.5 * _kl(q, lq, lp)
    if name == "alpha_beta":  # 4 (1 - sum sqrt(p q)), from the terms of the general formula
        x, y = torch.exp(0.5 * (lp + lq)), 0.5 * (p + q)
        return -4.0 * (x - y).sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {name!r}")


def kd_rows_formula(s, t, labels, divergence, *, beta, skew, temperature,
                    teacher_temperature, ce_weight, ignore_index):
    """kd.kd_loss(..., reduction="none") written out: Ts**2 D(p || q) + ce_weight CE(s),
    0 at ignored rows. Computed in the dtype of s and t."""
    lq = _log_softmax(s / temperature)
    lp = _log_softmax(t / teacher_temperature)
    row = _divergence(lq, lp, divergence, beta, skew) * (temperature * temperature)
    valid = labels != ignore_index
    picked = _log_softmax(s).gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0]
    row = row - ce_weight * picked
    return torch.where(valid, row, torch.zeros_like(row))


def exp_error_gain(s, t, *, temperature, teacher_temperature, ce_weight, **_) -> float:
    """How much a relative error e in every exp can move a kd_loss row value, per unit e.

    An exp off by e relative puts every probability off by at most 2e (its own exp and the
    normalizer) and every logsumexp off by at most e. Every divergence here is a sum of
    w_i * (log a_i - log b_i) with w in {p, q} and a, b in {p, q, m}; m lies between p and
    q, so |log a_i - log b_i| <= |lp_i - lq_i|. Hence a row moves by at most
    Ts**2 * 2e * (1 + sum_i (p_i + q_i) |lp_i - lq_i|) from the divergence, plus
    ce_weight * e from the cross-entropy's logsumexp. Returns the largest row's factor."""
    lq = _log_softmax(s.detach().double() / temperature)
    lp = _log_softmax(t.detach().double() / teacher_temperature)
    spread = ((lp.exp() + lq.exp()) * (lp - lq).abs()).sum(-1)
    return float((temperature**2 * 2.0 * (1.0 + spread)).max()) + ce_weight


def kl_div_formula(x, y, log_target: bool):
    """F.kl_div's elementwise terms: y (log y - x), or exp(y) (y - x) for a log-space y."""
    if log_target:
        return torch.exp(y) * (y - x)
    return y * (torch.log(y) - x)


def softmax_formula(x, temperature: float, log: bool):
    lp = _log_softmax(x / temperature)
    return lp if log else lp.exp()


# --------------------------------------------------------------------------------------
# error model
# --------------------------------------------------------------------------------------


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; nan counts as an infinite error."""
    d = (a.detach().double() - b.detach().double()).abs()
    if d.numel() == 0:
        return 0.0
    return float(torch.nan_to_num(d, nan=math.inf).max())


def error_bound(truth: torch.Tensor, baseline: torch.Tensor) -> float:
    """The largest error the model allows for a result of the baseline's dtype (see the top
    of this file); inf when the baseline is not finite, which the caller reports as a
    failure."""
    tol = TOLERANCES[baseline.dtype]
    scale = float(truth.detach().double().abs().max()) if truth.numel() else 0.0
    return 2.0 * max_err(baseline, truth) + tol["atol"] + tol["rtol"] * scale


# --------------------------------------------------------------------------------------
# the checks: one op, every quantity it produces (value and gradients)
# --------------------------------------------------------------------------------------


@dataclass
class Row:
    status: str  # pass | FAIL | skip | n/a
    impl: str
    what: str
    dtype: str = "-"
    shape: str = "-"
    err: float | None = None
    bound: float | None = None
    ms: float | None = None
    note: str = ""


@dataclass
class Op:
    """One public call checked against its formula.

    run(impl, leaves) calls the public function on `leaves` (tensors that require grad) and
    returns its output; formula(leaves) is the same thing written out. Both are
    differentiated with the upstream gradient `grad` (a tensor, or a scalar for a sum)."""

    name: str
    run: object
    formula: object
    inputs: tuple  # the input tensors, already in the dtype under test
    grad_names: tuple  # the quantity names of the inputs' gradients
    grad: torch.Tensor
    out_dtype: torch.dtype
    exp_gain: float = 0.0  # exp_error_gain of a kd_loss op (0: no named exp allowance)


def _forward_backward(fn, inputs, grad, dtype=None):
    """fn on fresh leaf copies of inputs (cast to `dtype` when given), backward with grad."""
    leaves = [x.detach().to(dtype or x.dtype).clone().requires_grad_() for x in inputs]
    out = fn(leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ops(shape, dtype, device, seed):
    """The checked calls on inputs of `shape` and `dtype`, generated from a seeded CPU
    generator (the same values on every device)."""
    n, v = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * scale).to(device)

    s, t = randn(n, v, scale=2.0).to(dtype), randn(n, v, scale=2.0).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[::5] = KD_KWARGS["ignore_index"]
    row_grad = randn(n).float()
    ops = []
    for div in DIVERGENCES:
        ops.append(Op(
            name=div,
            run=lambda impl, x, div=div: kd.kd_loss(
                x[0], x[1], labels, divergence=div, reduction="none", impl=impl, **KD_KWARGS),
            formula=lambda x, div=div: kd_rows_formula(x[0], x[1], labels, div, **KD_KWARGS),
            inputs=(s, t), grad_names=("d_student", "d_teacher"), grad=row_grad,
            out_dtype=torch.float32, exp_gain=exp_error_gain(s, t, **KD_KWARGS),
        ))

    # kl_div on flattened log-probabilities and probabilities; the target comes from a
    # flatter softmax so that no probability of the large vocabulary underflows in float16
    # (where target == 0, PyTorch's d/dtarget is nan and the baseline would be useless)
    x = _log_softmax(randn(n, v)).to(dtype).reshape(-1)
    y_logits = randn(n, v, scale=0.5)
    y = _log_softmax(y_logits).exp().to(dtype).reshape(-1)
    ly = _log_softmax(y_logits).to(dtype).reshape(-1)
    for red, log_target, target, grad in (
        ("none", False, y, randn(n * v).to(dtype)),
        ("sum", True, ly, torch.tensor(0.7, dtype=torch.float64, device=device)),
    ):
        def formula(a, red=red, log_target=log_target):
            terms = kl_div_formula(a[0], a[1], log_target)
            return terms if red == "none" else terms.sum()

        ops.append(Op(
            name=f"kl_div[{red}{',log_target' if log_target else ''}]",
            run=lambda impl, a, red=red, lt=log_target: kd.kl_div(
                a[0], a[1], reduction=red, log_target=lt, impl=impl),
            formula=formula,
            inputs=(x, target), grad_names=("d_input", "d_target"), grad=grad,
            out_dtype=dtype,
        ))

    x = randn(n, v, scale=2.0).to(dtype)
    for log in (False, True):
        fn = kd.log_softmax if log else kd.softmax
        ops.append(Op(
            name="log_softmax" if log else "softmax",
            run=lambda impl, a, fn=fn: fn(a[0], SOFTMAX_TEMPERATURE, impl=impl),
            formula=lambda a, log=log: softmax_formula(a[0], SOFTMAX_TEMPERATURE, log),
            inputs=(x,), grad_names=("d_x",), grad=randn(n, v).to(dtype),
            out_dtype=dtype,
        ))
    return ops


def _baselines(op: Op):
    """(truth, baseline), each as [value, *gradients]: the formula in float64, and plain
    PyTorch in float32 with each result rounded to the dtype an impl returns it in. For
    kl_div and softmax plain PyTorch is the library call itself."""
    out, grads = _forward_backward(op.formula, op.inputs, op.grad.double(), torch.float64)
    truth = [out, *grads]
    if op.name.startswith("kl_div"):
        red, log_target = ("none", False) if "none" in op.name else ("sum", True)
        plain = lambda a: F.kl_div(a[0], a[1], reduction=red, log_target=log_target)
    elif op.name.endswith("softmax"):
        log = op.name == "log_softmax"
        plain = lambda a: (F.log_softmax if log else F.softmax)(a[0] / SOFTMAX_TEMPERATURE, -1)
    else:
        plain = op.formula
    out, grads = _forward_backward(plain, op.inputs, op.grad.float(), torch.float32)
    baseline = [out.to(op.out_dtype), *(g.to(x.dtype) for g, x in zip(grads, op.inputs,
                                                                     strict=True))]
    return truth, baseline


def _check_op(impl, op, truth, baseline, dtype, shape_str, device) -> list[Row]:
    """dtype: the inputs' dtype, or a label for inputs of several dtypes."""
    rows = []
    dtype = dtype if isinstance(dtype, str) else str(dtype)[6:]
    _synchronize(device)
    start = time.perf_counter()
    try:
        out, grads = _forward_backward(lambda a: op.run(impl, a), op.inputs, op.grad)
        _synchronize(device)
    except Exception as e:  # a crash is a failed check, reported with its message
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:160]
        return [Row("FAIL", impl, f"{op.name}.value", dtype, shape_str, note=msg)]
    ms = (time.perf_counter() - start) * 1e3
    names = ("value", *op.grad_names)
    expect_dtypes = (op.out_dtype, *(x.dtype for x in op.inputs))
    for i, (name, got, want, base) in enumerate(
        zip(names, [out, *grads], truth, baseline, strict=True)
    ):
        row = Row("pass", impl, f"{op.name}.{name}", dtype, shape_str,
                  ms=ms if i == 0 else None)
        if got is None:
            row.status, row.note = "FAIL", "no gradient"
        elif got.shape != want.shape or got.dtype != expect_dtypes[i]:
            row.status = "FAIL"
            row.note = (f"got {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} "
                        f"{expect_dtypes[i]}")
        else:
            row.err, row.bound = max_err(got, want), error_bound(want, base)
            exp_error = APPROX_EXP.get((impl, device.type), 0.0)
            if i == 0 and op.exp_gain and exp_error:
                row.bound += exp_error * op.exp_gain
                row.note = f"bound + {exp_error * op.exp_gain:.1e} for the approximate exp"
            if not math.isfinite(row.bound):
                row.status, row.note = "FAIL", "plain PyTorch baseline is not finite"
            elif not row.err <= row.bound:  # also catches a nan error
                row.status = "FAIL"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# the plan: which impl runs at which dtype and shape on this device
# --------------------------------------------------------------------------------------


def checks(device: torch.device, *, quick: bool = False, run_all: bool = False,
           impls=IMPLS, dtypes=None, seed: int = 0):
    """Run every check on `device`, yielding the table's rows as they come."""
    if dtypes is None:
        dtypes = [torch.float32, torch.bfloat16]
        if device.type == "cuda":
            dtypes.append(torch.float16)
    small = SMALL_QUICK if quick else SMALL
    shapes = [small, LARGE_QUICK if quick else LARGE]
    usable = []
    for impl in impls:
        ok, why = _dispatch._BACKENDS[impl].is_available(device)
        if ok:
            usable.append(impl)
        else:
            yield Row("n/a", impl, "*", note=f"unavailable: {why}")
    interpreted = device.type == "cpu"  # Triton on CPU runs only under its interpreter
    for shape in shapes:
        shape_str = f"{shape[0]}x{shape[1]}"
        for dtype in dtypes:
            ops = _ops(shape, dtype, device, seed)
            for op in ops:
                truth, baseline = _baselines(op)
                for impl in usable:
                    ok, why = _dispatch._usable(impl, device, (dtype,))
                    if not ok:
                        yield Row("n/a", impl, f"{op.name}.*", str(dtype)[6:], shape_str,
                                  note=f"unavailable: {why}")
                    elif impl == "triton" and interpreted and shape != small and not run_all:
                        yield Row("skip", impl, f"{op.name}.*", str(dtype)[6:], shape_str,
                                  note="Triton interpreter on CPU: --all")
                    else:
                        yield from _check_op(impl, op, truth, baseline, dtype, shape_str,
                                             device)
    yield from readiness(device, usable, quick=quick, run_all=run_all, seed=seed)


# --------------------------------------------------------------------------------------
# new-machine checks: what a kernel gets wrong only on some hardware or layouts
# --------------------------------------------------------------------------------------

ODD_V = 50257  # GPT-2's vocabulary: rows not a multiple of a 16-byte vector


def _unaligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x whose data starts one element past an allocation's start, so
    no row is aligned to 16 bytes (as a slice of a larger buffer would be)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    return out


def readiness(device: torch.device, usable, *, quick: bool, run_all: bool, seed: int = 0):
    """Rows for: a bfloat16 student with a float32 teacher (each read in its own dtype),
    odd and misaligned rows, bitwise-reproducible kl_div sums, and tensors on a device that
    is not the current one (when the machine has two)."""
    n = 2 if quick else 8
    g = torch.Generator().manual_seed(seed + 1)

    def randn(*size, scale=2.0, dev=device):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * scale).to(dev)

    interpreted = device.type == "cpu"
    impls = [i for i in usable if not (i == "triton" and interpreted and not run_all)]
    labels = torch.randint(0, ODD_V, (n,), generator=g).to(device)
    labels[::3] = KD_KWARGS["ignore_index"]
    row_grad = randn(n, scale=1.0).float()

    def kd_op(name, s, t, div, lab):
        return Op(
            name=name,
            run=lambda impl, x: kd.kd_loss(x[0], x[1], lab, divergence=div, reduction="none",
                                           impl=impl, **KD_KWARGS),
            formula=lambda x: kd_rows_formula(x[0], x[1], lab, div, **KD_KWARGS),
            inputs=(s, t), grad_names=("d_student", "d_teacher"), grad=row_grad.to(s.device),
            out_dtype=torch.float32, exp_gain=exp_error_gain(s, t, **KD_KWARGS))

    ops = []
    for div in ("forward_kl", "jsd"):
        s = randn(n, ODD_V).to(torch.bfloat16)
        t = randn(n, ODD_V).float()
        ops.append(kd_op(f"{div}[s bf16, t f32]", s, t, div, labels))
        s, t = _unaligned(randn(n, ODD_V).float()), _unaligned(randn(n, ODD_V).float())
        ops.append(kd_op(f"{div}[unaligned]", s, t, div, labels))
    shape_str = f"{n}x{ODD_V}"
    for op in ops:
        truth, baseline = _baselines(op)
        for impl in impls:
            if not _dispatch._usable(impl, device, tuple(x.dtype for x in op.inputs))[0]:
                continue
            yield from _check_op(impl, op, truth, baseline, "mixed" if "s bf16" in op.name
                                 else torch.float32, shape_str, device)

    # kl_div sums: the same bits on every run (no float atomics)
    x = _log_softmax(randn(n, ODD_V)).float().reshape(-1)
    y = _log_softmax(randn(n, ODD_V)).exp().float().reshape(-1)
    for impl in impls:
        runs = [kd.kl_div(x, y, reduction="sum", impl=impl) for _ in range(3)]
        same = all(torch.equal(r, runs[0]) for r in runs)
        yield Row("pass" if same else "FAIL", impl, "kl_div[sum].reproducible", "float32",
                  f"{n * ODD_V}", note="" if same else f"runs differ: {runs}")

    # a device that is not the current one
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        other = torch.device("cuda", 1 if (device.index or 0) == 0 else 0)
        s, t = randn(n, 1271, dev=device).float(), randn(n, 1271, dev=device).float()
        lab = labels.clamp(max=1270)
        op = kd_op("forward_kl[other device]", s, t, "forward_kl", lab)
        truth, baseline = _baselines(op)
        for impl in impls:
            with torch.cuda.device(other):
                yield from _check_op(impl, op, truth, baseline, torch.float32, f"{n}x1271",
                                     device)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# fixed column widths, so that rows print as they come: (title, width, right-aligned)
COLUMNS = (("status", 6, False), ("impl", 6, False), ("what", 31, False), ("dtype", 8, False),
           ("shape", 9, False), ("max error", 9, True), ("bound", 9, True),
           ("time ms", 9, True), ("", 0, False))


def format_cells(cells) -> str:
    parts = [x.rjust(w) if right else x.ljust(w)
             for x, (_, w, right) in zip(cells, COLUMNS, strict=True)]
    return "  ".join(parts).rstrip()


def header() -> str:
    return format_cells([title for title, _, _ in COLUMNS])


def format_row(r: Row) -> str:
    return format_cells((r.status, r.impl, r.what, r.dtype, r.shape, _fmt(r.err, ".2e"),
                       _fmt(r.bound, ".2e"), _fmt(r.ms, ".1f"), r.note))


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{device} ({p.name}, sm_{p.major}{p.minor}, CUDA {torch.version.cuda})"
    return "cpu"


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m kdkernels.selfcheck",
        description="Check every kdkernels implementation on this machine against float64 "
                    "formulas (values and gradients); exit 1 on any failure.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to check (default: cuda when present, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help=f"fewer rows: shapes {SMALL_QUICK} and {LARGE_QUICK} instead of "
                        f"{SMALL} and {LARGE}")
    p.add_argument("--all", action="store_true", dest="run_all",
                   help="on CPU, run Triton (interpreted, slow) on the large shape too")
    p.add_argument("--impl", action="append", choices=IMPLS,
                   help="check only this impl (repeatable; default: all)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                   help="check only this dtype (repeatable; default: float32, bfloat16 and, "
                        "on CUDA, float16)")
    args = p.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda[:k], got {args.device}")
    if args.device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device")
        if (args.device.index or 0) >= torch.cuda.device_count():
            p.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA devices")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    device = args.device
    impls = tuple(i for i in IMPLS if args.impl is None or i in args.impl)
    shapes = (SMALL_QUICK, LARGE_QUICK) if args.quick else (SMALL, LARGE)
    print(f"kdkernels {kd.__version__} self-check on {_describe(device)}; "
          f"torch {torch.__version__}")
    print(f"shapes (rows x vocabulary): {', '.join(f'{n}x{v}' for n, v in shapes)}; "
          f"kd_loss with {', '.join(f'{k}={v}' for k, v in KD_KWARGS.items())}")
    print("truth: float64 formulas; bound: 2 x the error of plain PyTorch (float32 math, "
          "rounded to the result's dtype) + a floor; time: one forward + backward, first-call "
          "compilation included")
    if device.type == "cpu" and "triton" in impls and os.environ.get("TRITON_INTERPRET") == "1":
        where = "every shape (--all)" if args.run_all else "the small shape (--all: every shape)"
        print(f"triton runs under TRITON_INTERPRET=1 (slow): {where}")
    print()
    print(header(), flush=True)
    rows = []
    with warnings.catch_warnings():
        # the Triton interpreter evaluates masked-out lanes too (numpy overflow warnings)
        warnings.filterwarnings("ignore", category=RuntimeWarning,
                                module="triton.runtime.interpreter")
        dtypes = None if args.dtype is None else [DTYPES[d] for d in args.dtype]
        for row in checks(device, quick=args.quick, run_all=args.run_all, impls=impls,
                          dtypes=dtypes):
            rows.append(row)
            print(format_row(row), flush=True)
    checked = [r for r in rows if r.status in ("pass", "FAIL")]
    failed = [r for r in checked if r.status == "FAIL"]
    missing = sorted({r.impl for r in rows if r.status == "n/a"})
    print()
    print(f"{len(checked)} checks: {len(checked) - len(failed)} passed, {len(failed)} failed"
          + (f"; not run here: {', '.join(missing)} (see n/a rows)" if missing else ""))
    if failed:
        bad = sorted({r.impl for r in failed})
        print(f"FAILED: impl {', '.join(bad)} gave wrong results or errors on {device}. Pass "
              "impl= one that passed (impl='auto' may pick a failing one) and report the "
              "FAIL rows above.")
    return 1 if failed else 0


if __name__ == "__main__":
    # Without CUDA, the Triton kernels can still run on CPU in Triton's interpreter. Triton
    # reads the variable when a kernel is decorated; the kernel modules are imported on
    # first use, after this line.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
