"""`python -m bench sparse`: the loss from a sparse (top-k) teacher, forward + backward.

Providers, same inputs (student logits s (N, V) requiring grad; the teacher's top-K ids and
log-probabilities from kd.topk_logprobs, outside the measurement):
  eager     what distillation scripts write today (DistillKit's / axolotl's top-k losses):
            the full log_softmax(s / T) (an N x V tensor, and its N x V backward), gathered
            at the ids, then the tail mode's formula on the N x K values
  dense     kd.kd_loss forward_kl against the full N x V teacher logits with the same impl
            as kd-ext (or the --dense-impl), a reference point: what the sparse loss saves
            over distilling from dense logits
  kd-<impl> kd.sparse_kd_loss for each impl that has sparse kernels here

Peak extra memory: everything allocated during forward + backward above what was live
before (bench/measure.py), the student's N x V gradient included, in units of one N x V
float32 tensor. |loss - eager| compares the sparse providers with the eager formula (the
same loss); the dense provider computes another loss and shows '-'.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch
import torch.nn.functional as F

from .measure import measure_memory, pick_device, time_iterations
from .providers import DTYPES, dtype_name
from .report import _fmt_bytes, _fmt_s, machine_info, target_line

IMPLS = ("torch", "triton", "ext")
PROVIDERS = ("eager", "dense", *(f"kd-{i}" for i in IMPLS))
TARGET = dict(n=2048, v=128256, k=64, dtype=torch.float32, temperature=2.0, tail="bucket",
              divergence="forward_kl")
TARGET_TEXT = "CPU float32 N=2048 V=128256 K=64 bucket forward_kl T=2, forward+backward"


def make_inputs(n, v, k, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 2).to(device, dtype).requires_grad_()
    t = (torch.randn(n, v, generator=g) * 2).to(device, dtype)
    import kdkernels as kd

    ids, lp = kd.topk_logprobs(t, k)
    return {"s": s, "t": t, "ids": ids, "lp": lp}


def _eager_divergence(lp, lq, divergence, beta):
    """D(p || q) over the last dim from log-probabilities (eager, no masking)."""
    p, q = lp.exp(), lq.exp()
    if divergence == "forward_kl":
        return (p * (lp - lq)).sum(-1)
    if divergence == "reverse_kl":
        return (q * (lq - lp)).sum(-1)
    lm = torch.logaddexp(lp + np.log(beta), lq + np.log(1 - beta))
    return beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)


def eager_sparse(x, cfg):
    """The top-k loss as scripts write it: full log_softmax, gather, the tail's formula."""
    T = cfg["temperature"]
    lq = F.log_softmax(x["s"].float() / T, -1).gather(-1, x["ids"])  # (N, K) of an N x V
    lp = x["lp"]
    if cfg["tail"] == "renormalize":
        d = _eager_divergence(lp - lp.logsumexp(-1, keepdim=True),
                              lq - lq.logsumexp(-1, keepdim=True), cfg["divergence"],
                              cfg["beta"])
    elif cfg["tail"] == "none":
        d = (lp.exp() * (lp - lq)).sum(-1)
    else:  # bucket: the K ids plus one category for the rest of the vocabulary
        p_tail = (1 - lp.exp().sum(-1, keepdim=True)).clamp(min=0)
        q_tail = (1 - lq.exp().sum(-1, keepdim=True)).clamp(min=1e-7)
        d = _eager_divergence(torch.cat([lp, p_tail.clamp(min=1e-30).log()], -1),
                              torch.cat([lq, q_tail.log()], -1), cfg["divergence"],
                              cfg["beta"])
    return d.mean() * T * T


def kd_sparse(x, cfg, impl):
    import kdkernels as kd

    return kd.sparse_kd_loss(x["s"], x["ids"], x["lp"], tail=cfg["tail"],
                             divergence=cfg["divergence"], beta=cfg["beta"],
                             temperature=cfg["temperature"], reduction="batchmean", impl=impl)


def kd_dense(x, cfg, impl):
    import kdkernels as kd

    return kd.kd_loss(x["s"], x["t"], divergence="forward_kl", temperature=cfg["temperature"],
                      reduction="batchmean", impl=impl)


def available(impl, device, dtype):
    """(ok, why): the impl runs here and has sparse kernels."""
    from kdkernels import _dispatch

    try:
        backend = _dispatch.resolve(impl, device, (dtype,))
    except RuntimeError as e:
        return False, str(e)
    if not hasattr(backend, "sparse_partial"):
        return False, f"impl={impl!r} has no sparse kernels in this build"
    return True, ""


def make_step(provider, cfg, device, dtype, dense_impl):
    """(step x -> loss, or None; note)."""
    if provider == "eager":
        return functools.partial(eager_sparse, cfg=cfg), ""
    if provider == "dense":
        from kdkernels import _dispatch

        try:
            _dispatch.resolve(dense_impl, device, (dtype,))
        except RuntimeError as e:
            return None, f"dense: {e}"
        return functools.partial(kd_dense, cfg=cfg, impl=dense_impl), ""
    impl = provider[3:]
    ok, why = available(impl, device, dtype)
    if not ok:
        return None, f"{provider}: {why}, skipped"
    return functools.partial(kd_sparse, cfg=cfg, impl=impl), ""


def run(x, cfg, providers, reps, device, dtype, dense_impl, log=print):
    """Rows (provider, median s, (q20, q80), peak extra bytes, loss) and notes."""
    rows, notes = [], []

    def reset():
        x["s"].grad = None

    for p in providers:
        step, note = make_step(p, cfg, device, dtype, dense_impl)
        if note:
            notes.append(note)
        if step is None:
            continue
        log(f"  {p} ...", flush=True)

        def call(step=step):
            return step(x)

        reset()
        loss, mem = measure_memory(call, device, True)
        value = float(loss.detach())
        del loss
        times = [f + b for f, b in time_iterations(call, device, True, reps, reset)]
        reset()
        rows.append(dict(provider=p, median=float(np.median(times)),
                         q=tuple(float(q) for q in np.quantile(times, [0.2, 0.8])),
                         peak=mem.full, loss=value))
    return rows, notes


def table(rows, n, v):
    nv32 = n * v * 4
    eager = next((r for r in rows if r["provider"] == "eager"), None)
    out = [f"{'provider':<10} {'time':>10} {'q20-q80':>21} {'peak extra':>11} "
           f"{'x NV fp32':>9} {'|loss - eager|':>15}"]
    for r in rows:
        dl = "-" if eager is None or r["provider"] in ("eager", "dense") else \
            f"{abs(r['loss'] - eager['loss']):.1e}"
        q = f"{_fmt_s(r['q'][0])} - {_fmt_s(r['q'][1])}"
        out.append(f"{r['provider']:<10} {_fmt_s(r['median']):>10} {q:>21} "
                   f"{_fmt_bytes(r['peak']):>11} {r['peak'] / nv32:>9.2f} {dl:>15}")
    return "\n".join(out)


def targets(rows, shape: dict, device) -> list[str]:
    """The sparse loss's targets as ratios of this run's rows; verdicts at TARGET's shape."""
    at_target = device.type == "cpu" and all(shape.get(key) == value
                                              for key, value in TARGET.items())
    nv32 = shape["n"] * shape["v"] * 4

    def get(p, key):
        return next((r[key] for r in rows if r["provider"] == p), None)

    def ratio(a, b):
        return a / b if a is not None and b else None

    lines = [f"Targets (same run; stated for {TARGET_TEXT}):"]
    for name, formula, value, op, bound in (
        ("extension vs eager", "eager time / kd-ext time",
         ratio(get("eager", "median"), get("kd-ext", "median")), ">=", 5.0),
        ("extension vs dense kd_loss", "kd-ext time / dense time",
         ratio(get("kd-ext", "median"), get("dense", "median")), "<=", 0.8),
        ("extension memory", "kd-ext peak extra / one N x V fp32",
         ratio(get("kd-ext", "peak"), nv32), "<=", 1.05),
    ):
        lines.append(target_line(name, formula, value, op, bound, checked=at_target))
    return lines


def parser():
    p = argparse.ArgumentParser(
        prog="python -m bench sparse",
        description="The sparse (top-k) teacher loss kd.sparse_kd_loss against the eager "
                    "top-k loss of distillation scripts and the dense kd_loss. Forward + "
                    "backward.")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--n", type=int, default=None, help="rows (tokens), default 2048")
    p.add_argument("--v", type=int, default=None, help="vocabulary, default 128256")
    p.add_argument("--k", type=int, default=None, help="teacher ids per row, default 64")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--tail", choices=("renormalize", "bucket", "none"), default="bucket")
    p.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"),
                   default="forward_kl")
    p.add_argument("--beta", type=float, default=0.5, help="jsd mixture weight")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--dense-impl", default="ext",
                   help="impl of the dense kd_loss reference point (default ext)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a small shape for a smoke test: N=256 V=4096 K=16, 2 reps")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = pick_device(args.device)
    quick = dict(n=256, v=4096, k=16) if args.quick else TARGET
    n, v, k = (args.n or quick["n"]), (args.v or quick["v"]), (args.k or quick["k"])
    reps = 2 if args.quick and args.reps == 3 else args.reps
    for name, value in (("--n", n), ("--v", v), ("--k", k), ("--reps", reps)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    if k > v:
        raise SystemExit(f"--k must be <= --v={v}, got {k}")
    if args.tail == "none" and args.divergence != "forward_kl":
        raise SystemExit("--tail none supports --divergence forward_kl only")
    dtype = DTYPES[args.dtype]
    cfg = dict(tail=args.tail, divergence=args.divergence, beta=args.beta,
               temperature=args.temperature)
    shape = dict(n=n, v=v, k=k, dtype=dtype, **cfg)
    info = machine_info(device, argv)
    print(f"# kdkernels sparse-teacher loss on {device}: {info['cpu']} ({info['cpu_count']} "
          f"CPUs, {info['torch_threads']} torch threads); torch {info['torch']}")
    print(f"# N={n} V={v} K={k} {dtype_name(dtype)} tail={args.tail} {args.divergence} "
          f"T={args.temperature:g} reps={reps} forward+backward")
    t0 = time.perf_counter()
    x = make_inputs(n, v, k, dtype, device, args.seed)
    rows, notes = run(x, cfg, args.providers, reps, device, dtype, args.dense_impl)
    print()
    print(table(rows, n, v))
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print()
    for line in targets(rows, shape, device):
        print(line)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
