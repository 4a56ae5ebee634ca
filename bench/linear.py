"""`python -m bench linear`: the distillation loss from hidden states and lm_head weights.

Providers, same shapes, same run (teacher frozen, forward + backward):
  gemm_floor   the four GEMMs alone: teacher logits, student logits, grad_hidden = G @ W,
               grad_W = G^T h (G: an N x V stand-in for the logit gradient), the logits
               written into buffers allocated once, outside the measurement. On a CPU they
               dominate any fused-linear loss: the floor of its time (its memory column
               does not count those buffers).
  gemm_chunks  the same four GEMMs chunk by chunk as kd runs them (its chunk size, its
               GEMM calls): the floor of kd's own design. Not a target; kd / gemm_chunks
               shows the fused loss's own cost (the loss kernel, bookkeeping), gemm_chunks /
               gemm_floor the cost of chunking (each chunk streams the (V, H) weights
               through three GEMMs and reads and writes the weight gradient once), net of
               the faster logits GEMM kd uses at chunk height on a CPU.
  eager        materialized logits and the F.kl_div line (bench/providers.py eager_loss)
  kd           kd.linear_kd_loss (impl=ext on CPU by default: --impl)
  liger        Liger-Kernel's chunked LigerFusedLinearJSDLoss (jsd only; when installed),
               hard-label weight 0: its loss follows its own scaling conventions (no T^2),
               so its |loss - eager| column shows that difference, not an error

Peak extra memory: the peak of everything allocated during forward + backward above what
was live before (bench/measure.py), minus the student's weight and hidden gradients (which
every provider must produce), shown in units of one N x V float32 tensor.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import time

import numpy as np
import torch

from .measure import measure_memory, pick_device, time_iterations
from .providers import DTYPES, Config, dtype_name, eager_loss
from .report import _fmt_bytes, _fmt_s, machine_info, target_line

PROVIDERS = ("gemm_floor", "gemm_chunks", "eager", "kd", "liger")
TARGET = dict(n=2048, h=512, v=128256, dtype=torch.float32, temperature=2.0)
TARGET_TEXT = "CPU float32 N=2048 H=512 V=128256 T=2 forward+backward, teacher frozen"


def make_inputs(n, h, v, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 / h ** 0.5  # logits of a few units

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device, dtype)

    return {
        "student_hidden": rnd(n, h).requires_grad_(),
        "student_weight": rnd(v, h, s=scale).requires_grad_(),
        "teacher_hidden": rnd(n, h),
        "teacher_weight": rnd(v, h, s=scale),
    }


class _FourGemms(torch.autograd.Function):
    """Only the GEMMs: forward the teacher and student logits into N x V buffers allocated
    once (no page faults of fresh buffers in the floor), backward grad_hidden and grad_W with
    the student logits standing in for their gradient (values do not matter)."""

    @staticmethod
    def forward(ctx, sh, sw, th, tw, bufs):
        torch.mm(th, tw.T, out=bufs[1])
        g = torch.mm(sh, sw.T, out=bufs[0])
        ctx.save_for_backward(sh, sw, g)
        return sh.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        sh, sw, g = ctx.saved_tensors
        return g @ sw, g.T @ sh, None, None, None


class _ChunkedGemms(torch.autograd.Function):
    """The same four GEMMs, chunk by chunk as kd runs them (its chunk rows, its logits GEMM:
    oneDNN into fresh tensors where kdkernels.linear._fresh_logits says so, else torch.mm
    into buffers allocated once): forward computes both logits of a chunk, then grad_hidden
    and the weight gradient of the chunk (the logits standing in for their gradient), as
    kd's forward does; backward hands them over."""

    @staticmethod
    def forward(ctx, sh, sw, th, tw, bufs):
        from kdkernels.linear import _capped_logits, _fresh_logits

        n, c = sh.shape[0], bufs[0].shape[0]
        fresh = _fresh_logits(sh, sw)
        grad_h, grad_w = torch.empty_like(sh), torch.empty_like(sw)
        for i in range(0, n, c):
            j = min(i + c, n)
            s_buf, t_buf = (None, None) if fresh else (bufs[0][: j - i], bufs[1][: j - i])
            t, _ = _capped_logits(th[i:j], tw, None, t_buf, None, None)
            s, _ = _capped_logits(sh[i:j], sw, None, s_buf, None, None)
            torch.mm(s, sw, out=grad_h[i:j])
            grad_w.addmm_(s.T, sh[i:j], beta=0.0 if i == 0 else 1.0)
        ctx.grads = grad_h, grad_w
        return sh.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.grads
        del ctx.grads
        return grad_h, grad_w, None, None, None


def _gemm_chunks(x, divergence, cfg, bufs):
    return _ChunkedGemms.apply(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                               x["teacher_weight"], bufs)


def _gemm_floor(x, divergence, cfg, bufs):
    return _FourGemms.apply(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                            x["teacher_weight"], bufs)


def _eager(x, divergence, cfg):
    with torch.no_grad():
        t = x["teacher_hidden"] @ x["teacher_weight"].T
    s = x["student_hidden"] @ x["student_weight"].T
    return eager_loss(s, t, divergence, cfg)


def _kd(x, divergence, cfg, impl, chunk_size):
    import kdkernels as kd

    return kd.linear_kd_loss(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
        divergence=divergence, beta=cfg.beta, skew=cfg.skew, temperature=cfg.temperature,
        reduction="batchmean", impl=impl, chunk_size=chunk_size)


def _liger_module(cfg):
    """Liger's chunked fused-linear JSD with its hard-label term off; None when absent."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=cfg.beta,
                                   temperature=cfg.temperature)


def make_step(provider, divergence, cfg, impl, chunk_size, h):
    """(step function x -> loss, or None, note)."""
    if provider == "gemm_floor":
        n, v = cfg.n, cfg.v
        bufs = [torch.empty(n, v, dtype=cfg.dtype, device=cfg.device) for _ in range(2)]
        return functools.partial(_gemm_floor, bufs=bufs), ""
    if provider == "gemm_chunks":
        from kdkernels.linear import chunk_rows

        c = min(chunk_size or chunk_rows(cfg.n, h, cfg.v, cfg.dtype), cfg.n)
        # (only their row count is used where kd's logits are fresh tensors)
        bufs = [torch.empty(c, cfg.v, dtype=cfg.dtype, device=cfg.device) for _ in range(2)]
        return functools.partial(_gemm_chunks, bufs=bufs), ""
    if provider == "eager":
        return _eager, ""
    if provider == "kd":
        return functools.partial(_kd, impl=impl, chunk_size=chunk_size), ""
    if divergence != "jsd":
        return None, ""
    module = _liger_module(cfg)
    if module is None:
        return None, "liger: not installed (pip install liger-kernel), skipped"

    # recent versions take (student_bias, teacher_bias) after the labels, without defaults
    biases = ((None, None) if "student_bias" in inspect.signature(module.forward).parameters
              else ())

    def liger(x, divergence, cfg):
        labels = torch.zeros(x["student_hidden"].shape[0], dtype=torch.long,
                             device=x["student_hidden"].device)
        return module(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                      x["teacher_weight"], labels, *biases)

    return liger, ""


def run(cfg, h, divergences, providers, reps, impl, chunk_size, seed, log=print):
    """Rows (provider, divergence, median s, (q20, q80), peak extra bytes, loss, grad_W),
    and notes."""
    x = make_inputs(cfg.n, h, cfg.v, cfg.dtype, cfg.device, seed)
    grad_bytes = sum(x[k].numel() * x[k].element_size()
                     for k in ("student_hidden", "student_weight"))
    rows, notes = [], []

    def reset():
        for k in ("student_hidden", "student_weight"):
            x[k].grad = None

    for div in divergences:
        for p in providers:
            step, note = make_step(p, div, cfg, impl, chunk_size, h)
            if note:
                notes.append(note)
            if step is None:
                continue
            log(f"  {p} {div} ...", flush=True)

            def call(step=step, div=div):
                return step(x, div, cfg)

            reset()
            loss, mem = measure_memory(call, cfg.device, True)
            value = float(loss.detach())
            del loss
            grad_w = x["student_weight"].grad.detach().clone()
            times = [f + b for f, b in time_iterations(call, cfg.device, True, reps, reset)]
            rows.append(dict(provider=p, divergence=div, median=float(np.median(times)),
                             q=tuple(float(q) for q in np.quantile(times, [0.2, 0.8])),
                             peak=mem.full - grad_bytes, loss=value, grad_w=grad_w))
    return rows, notes


def table(rows, cfg):
    nv32 = cfg.n * cfg.v * 4
    eager = {r["divergence"]: r for r in rows if r["provider"] == "eager"}
    out = [f"{'provider':<11} {'divergence':<11} {'time':>10} {'q20-q80':>21} "
           f"{'peak extra':>11} {'x NV fp32':>9} {'|loss - eager|':>15} "
           f"{'max|dW - eager dW|':>19}"]
    for r in rows:
        e = eager.get(r["divergence"])
        if r["provider"].startswith("gemm_") or e is None:
            dl = dw = "-"
        else:
            dl = f"{abs(r['loss'] - e['loss']):.1e}"
            dw = f"{float((r['grad_w'].float() - e['grad_w'].float()).abs().max()):.1e}"
        q = f"{_fmt_s(r['q'][0])} - {_fmt_s(r['q'][1])}"
        out.append(f"{r['provider']:<11} {r['divergence']:<11} {_fmt_s(r['median']):>10} "
                   f"{q:>21} {_fmt_bytes(r['peak']):>11} {r['peak'] / nv32:>9.2f} "
                   f"{dl:>15} {dw:>19}")
    return "\n".join(out)


def targets(rows, cfg, h):
    nv32 = cfg.n * cfg.v * 4
    at_target = (cfg.device.type == "cpu" and cfg.n == TARGET["n"] and h == TARGET["h"]
                 and cfg.v == TARGET["v"] and cfg.dtype == TARGET["dtype"]
                 and cfg.temperature == TARGET["temperature"])

    def get(p, div, key):
        for r in rows:
            if r["provider"] == p and r["divergence"] == div:
                return r[key]
        return None

    def ratio(a, b):
        return a / b if a is not None and b else None

    fkl = "forward_kl"
    lines = [f"Targets (same run; stated for {TARGET_TEXT}):"]

    def line(*args):
        lines.append(target_line(*args, checked=at_target))

    line("time vs the four GEMMs", "kd time / gemm_floor time",
         ratio(get("kd", fkl, "median"), get("gemm_floor", fkl, "median")), "<=", 1.2)
    line("time vs eager", "kd time / eager time",
         ratio(get("kd", fkl, "median"), get("eager", fkl, "median")), "<=", 1.0)
    def info(name, formula, value):  # a ratio shown without a target: where the time goes
        shown = "n/a" if value is None else f"{value:.2f}"
        lines.append(f"  {name:<42} {formula:<40} {shown:>8}   (information)")

    info("cost of chunking the GEMMs", "gemm_chunks time / gemm_floor time",
         ratio(get("gemm_chunks", fkl, "median"), get("gemm_floor", fkl, "median")))
    info("the fused loss over its chunked GEMMs", "kd time / gemm_chunks time",
         ratio(get("kd", fkl, "median"), get("gemm_chunks", fkl, "median")))
    line("peak extra memory", "kd peak extra / one N x V fp32",
         ratio(get("kd", fkl, "peak"), nv32), "<=", 0.25)
    line("jsd time vs Liger's chunked loss", "kd jsd time / liger jsd time",
         ratio(get("kd", "jsd", "median"), get("liger", "jsd", "median")), "<=", 0.85)
    line("jsd memory vs Liger's chunked loss", "kd jsd peak / liger jsd peak",
         ratio(get("kd", "jsd", "peak"), get("liger", "jsd", "peak")), "<", 1.0)
    return lines


def parser():
    p = argparse.ArgumentParser(
        prog="python -m bench linear",
        description="Fused linear distillation (hidden states + lm_head weights, no logits) "
                    "against the four GEMMs alone, eager materialized logits and Liger's "
                    "chunked fused-linear JSD. Forward + backward, teacher frozen.")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--n", type=int, default=None, help="rows (tokens), default 2048")
    p.add_argument("--h", type=int, default=None, help="hidden size, default 512")
    p.add_argument("--v", type=int, default=None, help="vocabulary, default 128256")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--divergence", nargs="+", default=["forward_kl", "jsd"],
                   choices=("forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                            "skew_reverse_kl"))
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--beta", type=float, default=0.5, help="jsd mixture weight")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--impl", default="auto", help="kdkernels impl (auto: ext on CPU)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="rows per chunk (default: linear.chunk_rows)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a small shape for a smoke test: N=256 H=64 V=4096, 2 reps")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = pick_device(args.device)
    quick = dict(n=256, h=64, v=4096) if args.quick else dict(TARGET)
    n, h, v = (args.n or quick["n"]), (args.h or quick["h"]), (args.v or quick["v"])
    reps = 2 if args.quick and args.reps == 3 else args.reps
    for name, value in (("--n", n), ("--h", h), ("--v", v), ("--reps", reps)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    cfg = Config(n, v, DTYPES[args.dtype], device, args.temperature, args.beta)
    info = machine_info(device, argv)
    print(f"# kdkernels fused linear loss on {device}: {info['cpu']} ({info['cpu_count']} "
          f"CPUs, {info['torch_threads']} torch threads); torch {info['torch']}")
    print(f"# N={n} H={h} V={v} {dtype_name(cfg.dtype)} T={args.temperature:g} "
          f"beta={args.beta:g} reps={reps} impl={args.impl} forward+backward, teacher frozen")
    from kdkernels.linear import chunk_rows

    chunk = args.chunk_size or chunk_rows(n, h, v, cfg.dtype)
    print(f"# kd: {-(-n // chunk)} chunks of {min(chunk, n)} rows (chunk x V buffers of "
          f"{_fmt_bytes(min(chunk, n) * v * cfg.dtype.itemsize)} each)")
    t0 = time.perf_counter()
    rows, notes = run(cfg, h, args.divergence, args.providers, reps, args.impl,
                      args.chunk_size, args.seed)
    print()
    print(table(rows, cfg))
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print()
    for line in targets(rows, cfg, h):
        print(line)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

