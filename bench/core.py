"""`python -m bench`: time, peak memory and error of kdkernels against what users run today.

Providers (a row each, per divergence and mode):

  kd-torch, kd-triton, kd-ext
      kd.kd_loss(s, t, divergence=..., temperature=T, reduction="batchmean", impl=...), for
      every impl that can run on this device (kd-triton only on CUDA: on CPU Triton runs
      under its interpreter, which is for tests, not timing).
  eager
      the pipeline users write today,
          F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T*T
      and for the other divergences the same style of eager PyTorch (DESIGN.md §1).
  compile
      torch.compile(eager).
  compile_chunked
      torch.compile of a loop over row chunks of the eager formula (reduction="sum", divided
      by N at the end): what a user who knows about chunking writes with PyTorch alone.
  copy_floor
      torch.add(s, t): read s and t once and write one fresh N x V tensor. The bandwidth limit
      of a fused single pass that writes the gradient once (mode "full" only). The output is
      freshly allocated each time, as every kernel's gradient is, so the OS page faults that
      a new N x V buffer costs are part of the floor.
  copy_prealloc
      torch.add(s, t, out=buf) with buf allocated once: the same traffic without the
      allocation; shows what the page faults of a fresh N x V buffer cost on this machine.

Modes: forward (loss = f(s, t) with s requiring grad), backward (loss.backward()), full
(both). One training-step iteration is timed at the forward/backward boundary, so a run
with --mode all costs the same as --mode full. CPU ops are synchronous, so wall-clock time
at the boundary is exact there; on CUDA three events are recorded and the L2 cache is
flushed before every repetition.

Peak extra memory: everything allocated during the iteration above what was live before it
(the inputs), gradient included.
  CUDA: torch.cuda.max_memory_allocated() minus the baseline.
  CPU:  torch.profiler with profile_memory=True records every allocation and free made by
        PyTorch's CPU allocator, in order; the peak of their running sum is the peak extra
        memory. This counts every tensor that eager ops, inductor's generated code or a C++
        extension allocate (they all go through c10's allocator), exactly and however brief
        it lives; sampling RSS would miss short peaks and depends on glibc returning memory.
        It does not see raw malloc calls inside third-party libraries (none in these paths).
        The profiled iteration is not timed; it doubles as the warm-up iteration.

Error: the loss against a float64 evaluation of DESIGN.md §1's formula over all rows (in
row chunks); the gradient against float64 autograd of the same formula on a sample of rows
(every k-th row, at most --grad-rows; rows are independent, so a row's gradient does not
depend on the others). Both are max abs errors.

GB/s: bytes a fused two-pass design must move, divided by time (so eager's number is an
"effective" bandwidth): per logit element, forward reads s and t (x2 for jsd/skew, which
need the normalizers first), backward reads s and t and writes d s; the copy floor reads
two and writes one. On CUDA the fraction of the device's peak bandwidth is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import gc
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
MODES = ("forward", "backward", "full")
KD_IMPLS = ("torch", "triton", "ext")
PROVIDERS = (
    "kd-torch", "kd-triton", "kd-ext", "eager", "compile", "compile_chunked",
    "copy_floor", "copy_prealloc",
)
COMPILED = ("compile", "compile_chunked")
COPIES = ("copy_floor", "copy_prealloc")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Elements per chunk of the compiled chunked loss: 2**25 float32 = 128 MiB per temporary, i.e.
# 256 rows of a 128256 vocabulary (8 chunks at N = 2048, unrolled by dynamo).
COMPILED_CHUNK_ELEMENTS = 1 << 25
# Elements per chunk of the float64 ground truth: 2**22 float64 = 32 MiB per temporary.
F64_CHUNK_ELEMENTS = 1 << 22

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Issue targets, checked on the rows of one run (forward_kl, mode full unless said otherwise).
TARGET_CONFIG = "CPU float32 N=2048 V=128256 forward_kl T=2 forward+backward"


# --------------------------------------------------------------------------------------
# The losses: eager PyTorch, chunked, compiled, kdkernels, and the float64 ground truth
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    n: int
    v: int
    dtype: torch.dtype
    device: torch.device
    temperature: float = 2.0
    beta: float = 0.5
    skew: float = 0.1


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def canonical(divergence: str, beta: float, skew: float) -> tuple[str, float]:
    """(kind, a): jsd(beta=0|1) and skew(0) are forward/reverse KL exactly (GKD/TRL)."""
    if divergence == "jsd":
        if beta == 0.0:
            return "forward_kl", 0.0
        if beta == 1.0:
            return "reverse_kl", 0.0
        return "jsd", beta
    if divergence == "skew_forward_kl" and skew == 0.0:
        return "forward_kl", 0.0
    if divergence == "skew_reverse_kl" and skew == 0.0:
        return "reverse_kl", 0.0
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return divergence, skew


def eager_loss(s, t, divergence: str, cfg: Config, reduction: str = "batchmean"):
    """The eager pipeline a user writes today (mixtures in log space, as TRL's GKD loss)."""
    T = cfg.temperature
    kind, a = canonical(divergence, cfg.beta, cfg.skew)
    if kind == "forward_kl":  # KL(p || q), the F.kl_div line of every distillation script
        loss = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction=reduction)
    elif kind == "reverse_kl":  # KL(q || p)
        loss = F.kl_div(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1),
                        reduction=reduction, log_target=True)
    else:
        lq = F.log_softmax(s / T, -1)
        lp = F.log_softmax(t / T, -1)
        if kind == "jsd":  # a KL(p || m) + (1 - a) KL(q || m), m = a p + (1 - a) q
            lm = torch.logaddexp(lp + _log(a), lq + _log(1.0 - a))
            loss = (a * F.kl_div(lm, lp, reduction=reduction, log_target=True)
                    + (1.0 - a) * F.kl_div(lm, lq, reduction=reduction, log_target=True))
        elif kind == "skew_forward_kl":  # KL(p || a p + (1 - a) q)
            lm = torch.logaddexp(lp + _log(a), lq + _log(1.0 - a))
            loss = F.kl_div(lm, lp, reduction=reduction, log_target=True)
        else:  # skew_reverse_kl: KL(q || a q + (1 - a) p)
            lm = torch.logaddexp(lq + _log(a), lp + _log(1.0 - a))
            loss = F.kl_div(lm, lq, reduction=reduction, log_target=True)
    return loss * (T * T)


def chunked_loss(s, t, divergence: str, cfg: Config, rows_per_chunk: int):
    """The eager formula over row chunks, summed, divided by N (batchmean)."""
    n = s.shape[0]
    total = eager_loss(s[:rows_per_chunk], t[:rows_per_chunk], divergence, cfg, "sum")
    for i in range(rows_per_chunk, n, rows_per_chunk):
        j = i + rows_per_chunk
        total = total + eager_loss(s[i:j], t[i:j], divergence, cfg, "sum")
    return total / n


def rows_float64(s, t, divergence: str, cfg: Config):
    """Row losses (divergence * T**2) in float64, written from DESIGN.md §1 directly."""
    T = cfg.temperature
    kind, a = canonical(divergence, cfg.beta, cfg.skew)
    # in place on a fresh copy (copy=True even for float64 input): one less temporary
    zs = s.to(torch.float64, copy=True).div_(T)
    zt = t.to(torch.float64, copy=True).div_(T)
    if torch.is_grad_enabled():
        lq = zs - torch.logsumexp(zs, -1, keepdim=True)
        lp = zt - torch.logsumexp(zt, -1, keepdim=True)
    else:  # the same values in place: two fewer N x V float64 temporaries per chunk
        lq = zs.sub_(torch.logsumexp(zs, -1, keepdim=True))
        lp = zt.sub_(torch.logsumexp(zt, -1, keepdim=True))
    if kind == "forward_kl":
        return (lp.exp() * (lp - lq)).sum(-1) * (T * T)
    if kind == "reverse_kl":
        return (lq.exp() * (lq - lp)).sum(-1) * (T * T)
    q, p = lq.exp(), lp.exp()
    if kind == "jsd":
        lm = torch.logaddexp(lp + _log(a), lq + _log(1.0 - a))
        d = a * (p * (lp - lm)).sum(-1) + (1.0 - a) * (q * (lq - lm)).sum(-1)
    elif kind == "skew_forward_kl":
        lm = torch.logaddexp(lp + _log(a), lq + _log(1.0 - a))
        d = (p * (lp - lm)).sum(-1)
    else:
        lm = torch.logaddexp(lq + _log(a), lp + _log(1.0 - a))
        d = (q * (lq - lm)).sum(-1)
    return d * (T * T)


@dataclass
class Truth:
    loss: float  # float64 batchmean loss over all rows
    rows: torch.Tensor  # (R,) indices of the rows whose gradient is checked
    grad: torch.Tensor | None  # (R, V) float64 d loss / d s on those rows


def ground_truth(s, t, divergence: str, cfg: Config, grad_rows: int, need_grad: bool) -> Truth:
    n, v = s.shape
    step = max(1, F64_CHUNK_ELEMENTS // v)
    with torch.no_grad():
        total = sum(
            float(rows_float64(s[i:i + step], t[i:i + step], divergence, cfg).sum())
            for i in range(0, n, step)
        )
    r = min(n, grad_rows)
    rows = torch.linspace(0, n - 1, r).round().long().unique() if r < n else torch.arange(n)
    rows = rows.to(s.device)
    grad = None
    if need_grad:
        parts = []
        for i in range(0, rows.numel(), step):
            idx = rows[i:i + step]
            x = s.detach()[idx].double().requires_grad_()
            # batchmean: each row's term is divided by the full N
            (rows_float64(x, t[idx], divergence, cfg).sum() / n).backward()
            parts.append(x.grad)
        grad = torch.cat(parts)
    return Truth(total / n, rows, grad)


def make_loss(provider: str, divergence: str, cfg: Config):
    """A function (s, t) -> scalar loss for `provider`; None for the copy providers."""
    if provider.startswith("kd-"):
        import kdkernels as kd

        return functools.partial(
            kd.kd_loss, divergence=divergence, beta=cfg.beta, skew=cfg.skew,
            temperature=cfg.temperature, reduction="batchmean", impl=provider[3:],
        )
    if provider == "eager":
        return functools.partial(eager_loss, divergence=divergence, cfg=cfg)
    if provider == "compile":
        return torch.compile(functools.partial(eager_loss, divergence=divergence, cfg=cfg))
    if provider == "compile_chunked":
        rows = max(1, COMPILED_CHUNK_ELEMENTS // cfg.v)
        rows = 1 << (rows.bit_length() - 1)  # a power of two: equal chunks for most N
        return torch.compile(functools.partial(
            chunked_loss, divergence=divergence, cfg=cfg, rows_per_chunk=rows))
    raise ValueError(f"unknown provider {provider!r}")


def availability(provider: str, cfg: Config, explicit: bool) -> tuple[bool, str]:
    """Can `provider` run here? (ok, why not)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    if not provider.startswith("kd-"):
        return True, ""
    impl = provider[3:]
    if impl == "triton" and cfg.device.type != "cuda":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if not (explicit and interpreted):
            return False, ("Triton kernels need a CUDA device; on CPU they run only under "
                           "TRITON_INTERPRET=1 (the tests' interpreter), far too slow to time "
                           "(ask for it with --providers kd-triton and TRITON_INTERPRET=1)")
    try:
        from kdkernels import _dispatch

        _dispatch.resolve(impl, cfg.device, (cfg.dtype,))
    except Exception as e:  # a backend being built may fail in any way: report, go on
        return False, f"{type(e).__name__}: {e}"
    return True, ""


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


# Kineto's own log lines ("USDT:2026-01-01 12:00:00 123:123 SyncActivityProfilerHandler.cpp:39]
# profiler_start", a "gpuGetDeviceCount failed" error on machines without a GPU) go straight
# to file descriptor 2, whatever KINETO_LOG_LEVEL says.
_KINETO_LINE = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\.(cpp|h):\d+\] ")


@contextlib.contextmanager
def _without_kineto_log():
    """Capture fd 2 while profiling; re-emit everything but Kineto's log lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not _KINETO_LINE.match(line):
                    sys.stderr.write(line)


def _profile_peak(fn):
    """Run fn() under torch.profiler(profile_memory=True).

    Returns (fn's result, peak of the running sum of allocations minus frees, final sum), in
    bytes, from the CPU allocator's event stream: the peak above what was live at the start.
    Frees of blocks allocated during an earlier profiled call count negative (backward frees
    what forward saved); c10 cannot report the free of a block allocated while no profiler
    ran (it never recorded its size), so callers free such blocks before calling.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _without_kineto_log(), profile(activities=[ProfilerActivity.CPU],
                                        profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())  # stable: same-instant events keep their order
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return out, peak, cur


@dataclass
class Memory:
    forward: int
    backward: int | None  # peak above what was live when backward started
    full: int | None


def measure_memory(step, device: torch.device, backward: bool):
    """One untimed iteration: (loss, Memory). step() -> loss; loss.backward() when asked."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step()
        torch.cuda.synchronize()
        fwd = torch.cuda.max_memory_allocated() - base
        if not backward:
            return loss, Memory(fwd, None, None)
        mid = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        bwd = torch.cuda.max_memory_allocated() - mid
        return loss, Memory(fwd, bwd, max(fwd, mid - base + bwd))
    loss, fwd, net = _profile_peak(step)
    if not backward:
        return loss, Memory(fwd, None, None)
    _, bwd, _ = _profile_peak(loss.backward)
    return loss, Memory(fwd, bwd, max(fwd, net + bwd))


class _L2Flush:
    """Writes a buffer larger than any L2 before each CUDA repetition (cold-cache timing)."""

    def __init__(self, device):
        self.buf = torch.empty(256 << 20, dtype=torch.uint8, device=device)

    def __call__(self):
        self.buf.zero_()


def time_iterations(step, device: torch.device, backward: bool, reps: int, reset):
    """[(forward s, backward s)] for `reps` iterations; backward is 0.0 when not run."""
    out = []
    flush = _L2Flush(device) if device.type == "cuda" else None
    for _ in range(reps):
        reset()
        gc.collect()
        if flush is not None:
            flush()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
            loss = step()
            ev[1].record()
            if backward:
                loss.backward()
            ev[2].record()
            torch.cuda.synchronize()
            fwd = ev[0].elapsed_time(ev[1]) / 1e3
            bwd = ev[1].elapsed_time(ev[2]) / 1e3
        else:
            t0 = time.perf_counter()
            loss = step()
            t1 = time.perf_counter()
            if backward:
                loss.backward()
            t2 = time.perf_counter()
            fwd, bwd = t1 - t0, t2 - t1
        del loss
        out.append((fwd, bwd))
    del flush
    return out


@dataclass
class Row:
    provider: str
    divergence: str
    mode: str
    times: list[float] = field(default_factory=list)  # seconds, one per repetition
    peak: int | None = None  # bytes
    loss_err: float | None = None
    grad_err: float | None = None
    bytes_moved: int | None = None
    note: str = ""

    def median(self):
        return float(np.median(self.times)) if self.times else None

    def quantiles(self):
        if not self.times:
            return None, None
        q20, q80 = np.quantile(self.times, [0.2, 0.8])
        return float(q20), float(q80)


def bytes_moved(divergence: str, mode: str, cfg: Config) -> int:
    """Bytes a fused two-pass design must move (DESIGN.md §2), per the module docstring."""
    es = torch.empty((), dtype=cfg.dtype).element_size()
    kind, _ = canonical(divergence, cfg.beta, cfg.skew)
    fwd = 2 if kind in ("forward_kl", "reverse_kl") else 4  # mixtures: stats pass + value pass
    per = {"forward": fwd, "backward": 3, "full": fwd + 3, "copy": 3}[mode]
    return per * es * cfg.n * cfg.v


def run_provider(provider, divergence, cfg, s, t, truth, modes, reps, warmup):
    """Rows of one provider for one divergence (all requested modes from one set of runs)."""
    backward = any(m != "forward" for m in modes)

    def reset():
        s.grad = None

    if provider in COPIES:
        sd = s.detach()
        if provider == "copy_prealloc":
            buf = torch.empty_like(t)
            step = functools.partial(torch.add, sd, t, out=buf)
        else:
            step = functools.partial(torch.add, sd, t)
        for _ in range(warmup):
            step()
        _, mem = measure_memory(step, cfg.device, False)
        times = time_iterations(step, cfg.device, False, reps, reset)
        row = Row(provider, "-", "full", [f for f, _ in times], mem.forward,
                  bytes_moved=bytes_moved(divergence, "copy", cfg))
        if provider == "copy_prealloc":
            row.note = "output buffer allocated once, outside the timing"
        return [row]

    fn = make_loss(provider, divergence, cfg)

    def step():
        with torch.enable_grad():
            return fn(s, t)

    for _ in range(warmup):  # compiles (forward and backward graphs) for compiled providers
        reset()
        loss = step()
        if backward:
            loss.backward()
        del loss
    reset()
    gc.collect()
    loss, mem = measure_memory(step, cfg.device, backward)
    loss_err = abs(float(loss.detach().double()) - truth.loss)
    grad_err = None
    if backward:
        g = s.grad[truth.rows].double()
        grad_err = float((g - truth.grad).abs().max())
    del loss
    reset()
    times = time_iterations(step, cfg.device, backward, reps, reset)
    rows = []
    for mode in modes:
        if mode == "forward":
            ts, peak = [f for f, _ in times], mem.forward
        elif mode == "backward":
            ts, peak = [b for _, b in times], mem.backward
        else:
            ts, peak = [f + b for f, b in times], mem.full
        rows.append(Row(provider, divergence, mode, ts, peak, loss_err,
                        grad_err if mode != "forward" else None,
                        bytes_moved(divergence, mode, cfg)))
    return rows


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_inputs(cfg: Config, seed: int):
    """Student and teacher logits ~ N(0, 2^2): softmax at T=2 neither flat nor one-hot.
    Drawn on the benchmark's device (GPU shapes are GBs), in float32, then cast."""
    g = torch.Generator(device=cfg.device).manual_seed(seed)
    out = []
    for _ in range(2):
        x = torch.randn(cfg.n, cfg.v, generator=g, device=cfg.device).mul_(2.0)
        out.append(x.to(dtype=cfg.dtype))
        del x
    s, t = out
    return s.requires_grad_(), t


def run(cfg: Config, divergences, providers, modes, reps, warmup, grad_rows, seed, log=print,
        explicit=()):
    """All rows and the notes on skipped providers (`explicit`: providers the user named)."""
    backward = any(m != "forward" for m in modes)
    notes = []
    runnable = []
    for p in providers:
        ok, why = availability(p, cfg, explicit=p in explicit)
        if ok:
            runnable.append(p)
        else:
            notes.append(f"{p}: skipped ({why})")
    t0 = time.perf_counter()
    s, t = make_inputs(cfg, seed)
    log(f"# inputs {cfg.n} x {cfg.v} {_dtype_name(cfg.dtype)} on {cfg.device}: "
        f"{time.perf_counter() - t0:.1f} s")
    rows = []
    copies_done = False
    for div in divergences:
        t0 = time.perf_counter()
        truth = ground_truth(s, t, div, cfg, grad_rows, backward)
        log(f"# float64 ground truth for {div}: {time.perf_counter() - t0:.1f} s")
        for p in runnable:
            if p in COPIES and (copies_done or "full" not in modes):
                continue
            t0 = time.perf_counter()
            w = warmup if warmup is not None else _default_warmup(p, cfg.device)
            try:
                new = run_provider(p, div, cfg, s, t, truth, modes, reps, w)
            except Exception as e:  # one failing provider must not lose the others' rows
                notes.append(f"{p} ({div}): failed: {type(e).__name__}: {str(e)[:300]}")
                new = []
            finally:
                s.grad = None
                if p in COMPILED:
                    torch._dynamo.reset()
                _free(cfg.device)
            rows.extend(new)
            med = [f"{r.mode} {_fmt_s(r.median())}" for r in new]
            log(f"#   {p:<15} {div if p not in COPIES else '-':<16} {', '.join(med) or 'failed'} "
                f"({time.perf_counter() - t0:.1f} s)")
        copies_done = True
        del truth
    del s, t
    _free(cfg.device)
    return order_rows(rows, divergences), notes


def order_rows(rows, divergences):
    """Rows grouped by (divergence, mode), providers in PROVIDERS order; copies end the first
    full group (they depend on no divergence)."""
    first = divergences[0] if divergences else "-"

    def key(r):
        div = first if r.divergence == "-" else r.divergence
        return (divergences.index(div) if div in divergences else len(divergences),
                MODES.index(r.mode), PROVIDERS.index(r.provider))

    return sorted(rows, key=key)


def _default_warmup(provider, device):
    if device.type == "cuda":
        return 3
    # CPU: the memory-profiled iteration is the warm-up; compiled providers need one more
    # iteration that compiles (its time is compile time, not run time).
    return 1 if provider in COMPILED else 0


# --------------------------------------------------------------------------------------
# Reporting: table, ratios, CSV
# --------------------------------------------------------------------------------------


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _fmt_s(x):
    if x is None:
        return "-"
    ms = x * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1e3:.1f} us"


def _fmt_bytes(b):
    if b is None:
        return "-"
    if abs(b) >= 1e9:
        return f"{b / 1e9:.2f} GB"
    if abs(b) >= 1e6:
        return f"{b / 1e6:.1f} MB"
    return f"{b / 1e3:.1f} kB"


def _fmt_ratio(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_err(x):
    return "-" if x is None else f"{x:.1e}"


def peak_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of the GPU's memory: 2 transfers per clock (DDR/HBM) x bus width."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock = getattr(props, "memory_clock_rate", 0)  # kHz
    width = getattr(props, "memory_bus_width", 0)  # bits
    if clock and width:
        return 2.0 * clock * 1e3 * width / 8
    return None


def _find(rows, provider, divergence, mode):
    for r in rows:
        if r.provider == provider and r.divergence in (divergence, "-") and r.mode == mode:
            return r
    return None


def derived(rows, cfg: Config):
    """Per row: time/eager, mem/eager, peak / one N x V float32 tensor, GB/s, peak fraction."""
    nv32 = cfg.n * cfg.v * 4
    bw = peak_bandwidth(cfg.device)
    first_div = next((r.divergence for r in rows if r.divergence != "-"), "forward_kl")
    out = []
    for r in rows:
        div = r.divergence if r.divergence != "-" else first_div
        e = _find(rows, "eager", div, r.mode)
        med = r.median()
        d = {
            "time_vs_eager": med / e.median() if e and med and e.median() else None,
            "mem_vs_eager": (r.peak / e.peak if e and r.peak is not None and e.peak else None),
            "mem_x_nv_fp32": r.peak / nv32 if r.peak is not None else None,
            "gbps": r.bytes_moved / med / 1e9 if med and r.bytes_moved else None,
        }
        d["bw_fraction"] = d["gbps"] * 1e9 / bw if bw and d["gbps"] else None
        out.append(d)
    return out


def table(rows, cfg: Config, grad_rows_checked: int) -> str:
    der = derived(rows, cfg)
    cuda = cfg.device.type == "cuda"
    head = ["provider", "divergence", "mode", "median", "q20", "q80", "peak extra",
            "x NV fp32", "time/eager", "mem/eager", "loss err", "grad err*", "GB/s"]
    if cuda:
        head.append("% peak BW")
    lines = []
    for r, d in zip(rows, der, strict=True):
        q20, q80 = r.quantiles()
        cells = [r.provider, r.divergence, r.mode, _fmt_s(r.median()), _fmt_s(q20), _fmt_s(q80),
                 _fmt_bytes(r.peak), _fmt_ratio(d["mem_x_nv_fp32"]),
                 _fmt_ratio(d["time_vs_eager"], 3), _fmt_ratio(d["mem_vs_eager"], 3),
                 _fmt_err(r.loss_err), _fmt_err(r.grad_err), _fmt_ratio(d["gbps"], 1)]
        if cuda:
            cells.append(_fmt_ratio(None if d["bw_fraction"] is None
                                    else 100 * d["bw_fraction"], 1))
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, strict=True)]

    def fmt(cells):
        return "  ".join(str(c).rjust(w) if i > 2 else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [fmt(head), fmt(["-" * w for w in widths])]
    prev = None
    for r, cells in zip(rows, lines, strict=True):
        key = (r.divergence, r.mode)
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(fmt(cells))
    out.append("")
    out.append(f"* gradient checked on {grad_rows_checked} of {cfg.n} rows (evenly spaced) "
               "against float64 autograd; loss against float64 over all rows.")
    out.append("peak extra: allocated above the inputs during the iteration, gradient "
               "included (" + ("torch.cuda.max_memory_allocated" if cuda else
                               "CPU allocator events from torch.profiler") + "); "
               f"x NV fp32: in units of one {cfg.n} x {cfg.v} float32 tensor "
               f"({_fmt_bytes(cfg.n * cfg.v * 4)}).")
    out.append("GB/s: bytes of a fused two-pass design (fwd: read s,t [x2 for jsd/skew]; "
               "bwd: read s,t + write ds; copy: read 2 + write 1) / median time.")
    return "\n".join(out)


def _check(value, op, target):
    if value is None:
        return "n/a"
    ok = value <= target if op == "<=" else value >= target
    return "met" if ok else "MISSED"


def ratios(rows, cfg: Config) -> list[str]:
    """The ratios the issues ask for, from this run's rows."""
    nv32 = cfg.n * cfg.v * 4
    lines = []

    def med(p, div="forward_kl", mode="full"):
        r = _find(rows, p, div, mode)
        return r.median() if r else None

    def peak(p, div="forward_kl", mode="full"):
        r = _find(rows, p, div, mode)
        return r.peak if r and r.peak is not None else None

    # A verdict only where the run has the shape the targets are stated for (CPU targets at
    # N=2048, V=128256 float32; issue 3's on CUDA): other shapes show the ratios alone.
    at_target = cfg.device.type == "cuda" or (
        cfg.n == 2048 and cfg.v == 128256 and cfg.dtype == torch.float32
        and cfg.temperature == 2.0)

    def line(label, value, op, target, fmt="{:.2f}"):
        shown = "n/a" if value is None else fmt.format(value)
        verdict = _check(value, op, target) if at_target else "(not the target shape)"
        lines.append(f"  {label:<58} {shown:>8}   target {op} {target:<5} {verdict}")

    def div_(a, b):
        return a / b if a is not None and b else None

    this = (f"{cfg.device.type.upper()} {_dtype_name(cfg.dtype)} N={cfg.n} V={cfg.v} "
            f"T={cfg.temperature:g}")
    lines.append(f"Ratios (same run; {this}; targets are stated for {TARGET_CONFIG}"
                 + ("" if cfg.device.type == "cpu" else "; issue 3's for CUDA") + "):")
    eager, ref = med("eager"), med("kd-torch")
    if eager is None:
        lines.append("  (no eager forward_kl full row: the ratios to eager need --divergence "
                     "forward_kl, --mode full or all, and the eager provider)")
    else:
        lines.append(f"  eager forward_kl forward+backward: {_fmt_s(eager)}, peak "
                     f"{_fmt_bytes(peak('eager'))} = "
                     f"{_fmt_ratio(div_(peak('eager'), nv32))} x NV fp32")
    lines.append(" issue 2 (reference, impl=torch):")
    line("kd-torch time / eager time", div_(ref, eager), "<=", 1.0)
    line("kd-torch peak extra / one N x V float32 tensor", div_(peak("kd-torch"), nv32),
         "<=", 1.3)
    ext = med("kd-ext")
    if ext is not None or cfg.device.type == "cpu":
        lines.append(" issue 4 (C++ extension, impl=ext):")
        line("eager time / kd-ext time (speed-up)", div_(eager, ext), ">=", 6.0)
        line("compile_chunked time / kd-ext time (speed-up)", div_(med("compile_chunked"), ext),
             ">=", 1.3)
        line("kd-ext time / copy_floor time", div_(ext, med("copy_floor")), "<=", 2.5)
        line("kd-ext peak extra / one N x V float32 tensor", div_(peak("kd-ext"), nv32),
             "<=", 1.1)
    if cfg.device.type == "cuda":
        tri = med("kd-triton")
        r = _find(rows, "kd-triton", "forward_kl", "full")
        bw = peak_bandwidth(cfg.device)
        frac = r.bytes_moved / tri / bw if tri and bw and r else None
        lines.append(" issue 3 (Triton, impl=triton):")
        line("kd-triton fraction of peak memory bandwidth", frac, ">=", 0.85)
        line("eager time / kd-triton time (speed-up)", div_(eager, tri), ">=", 3.0)
    others = [d for d in ("reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
              if any(r.divergence == d for r in rows)]
    if others:
        lines.append(" divergences relative to forward_kl (time, forward+backward):")
        for p in ("kd-ext", "kd-triton", "kd-torch", "eager"):
            base = med(p)
            for d in others:
                v = div_(med(p, d), base)
                if v is not None:
                    target = 1.5 if d in ("reverse_kl", "jsd") and p == "kd-ext" else None
                    if target:
                        line(f"{p} {d} / forward_kl", v, "<=", target)
                    else:
                        lines.append(f"  {p + ' ' + d + ' / forward_kl':<58} {v:>8.2f}")
    return lines


def machine_info(device: torch.device, argv=None) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import kdkernels

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    bw = peak_bandwidth(device)
    return {
        "machine": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "gpu_peak_bandwidth_GBps": f"{bw / 1e9:.0f}" if bw else "n/a",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "kdkernels": kdkernels.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
    }


CSV_FIELDS = ("provider", "divergence", "mode", "device", "dtype", "n", "v", "temperature",
              "median_s", "q20_s", "q80_s", "reps", "peak_extra_bytes", "peak_x_nv_fp32",
              "time_vs_eager", "mem_vs_eager", "loss_abs_err", "grad_abs_err",
              "grad_rows_checked", "bytes_moved", "gbps", "bw_fraction", "note")


def write_csv(path: Path, rows, cfg: Config, info: dict, grad_rows_checked: int, notes):
    path.parent.mkdir(parents=True, exist_ok=True)
    der = derived(rows, cfg)
    with path.open("w", newline="") as f:
        for k, v in info.items():
            f.write(f"# {k}: {v}\n")
        for n in notes:
            f.write(f"# note: {n}\n")
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r, d in zip(rows, der, strict=True):
            q20, q80 = r.quantiles()
            w.writerow({
                "provider": r.provider, "divergence": r.divergence, "mode": r.mode,
                "device": cfg.device.type, "dtype": _dtype_name(cfg.dtype), "n": cfg.n,
                "v": cfg.v, "temperature": cfg.temperature, "median_s": r.median(),
                "q20_s": q20, "q80_s": q80, "reps": len(r.times), "peak_extra_bytes": r.peak,
                "peak_x_nv_fp32": d["mem_x_nv_fp32"], "time_vs_eager": d["time_vs_eager"],
                "mem_vs_eager": d["mem_vs_eager"], "loss_abs_err": r.loss_err,
                "grad_abs_err": r.grad_err,
                "grad_rows_checked": grad_rows_checked if r.grad_err is not None else "",
                "bytes_moved": r.bytes_moved, "gbps": d["gbps"],
                "bw_fraction": d["bw_fraction"], "note": r.note,
            })


def read_csv(path: Path):
    """(info dict, list of row dicts) of a CSV written by write_csv."""
    info, body = {}, []
    for line in Path(path).read_text().splitlines():
        if line.startswith("# ") and ": " in line:
            k, v = line[2:].split(": ", 1)
            info.setdefault(k, v)
        elif line:
            body.append(line)
    return info, list(csv.DictReader(body))


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _split(values, allowed, what):
    out = []
    for v in values:
        for x in v.split(","):
            x = x.strip()
            if not x:
                continue
            if x == "all":
                out.extend(allowed)
                continue
            if x in KD_IMPLS and what == "provider":
                x = "kd-" + x
            if x not in allowed:
                raise SystemExit(f"--{what}: unknown {x!r}; choose from {', '.join(allowed)}")
            out.append(x)
    return list(dict.fromkeys(out))


def parser():
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark kdkernels against eager PyTorch, torch.compile and the copy "
                    "floor on this machine's device. Subcommands: `python -m bench traffic "
                    "...` (Triton bytes per element), `python -m bench distributed ...` "
                    "(vocab-parallel over gloo).",
        epilog="Providers: " + ", ".join(PROVIDERS) + " (kd-* for each impl that can run).",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--n", type=int, default=None,
                   help="rows (tokens); default 2048 on CPU, 8192 on CUDA")
    p.add_argument("--v", type=int, default=128256, help="vocabulary (default %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="logit dtype; default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--divergence", nargs="+", default=["forward_kl"],
                   help="one or more of " + ", ".join(DIVERGENCES) + " (comma or space "
                        "separated, or 'all'); default forward_kl")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--beta", type=float, default=0.5, help="jsd mixture weight")
    p.add_argument("--skew", type=float, default=0.1, help="skew divergences' lambda")
    p.add_argument("--mode", choices=(*MODES, "all"), default="all",
                   help="forward | backward | full (forward+backward) | all (default): "
                        "backward and full come from the same timed training steps, so "
                        "'all' costs what 'full' costs")
    p.add_argument("--providers", nargs="+", default=None,
                   help="subset of: " + ", ".join(PROVIDERS) + " (torch/triton/ext mean "
                        "kd-torch/...); default: all that can run here")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions; default 3 on CPU, 20 on CUDA")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations before the memory-measuring one; default 1 for "
                        "compiled providers on CPU (compilation), 0 for others; 3 on CUDA")
    p.add_argument("--grad-rows", type=int, default=256,
                   help="rows whose gradient is checked against float64 (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="CSV path (default bench/results/<device>-<dtype>-N<n>-V<v>-<time>"
                        ".csv); the PNG plot goes next to it")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--quick", action="store_true",
                   help="small shapes for a smoke test (N=128, V=4096, 2 reps)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    n = args.n or (128 if args.quick else 8192 if cuda else 2048)
    v = 4096 if args.quick and args.v == 128256 else args.v
    reps = args.reps or (2 if args.quick else 20 if cuda else 3)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    for name, value in (("--n", n), ("--v", v), ("--reps", reps)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    if args.temperature <= 0:
        raise SystemExit(f"--temperature must be > 0, got {args.temperature}")
    for name, value in (("--beta", args.beta), ("--skew", args.skew)):
        if not 0.0 <= value <= 1.0:
            raise SystemExit(f"{name} must be in [0, 1], got {value}")
    divergences = _split(args.divergence, DIVERGENCES, "divergence")
    modes = list(MODES) if args.mode == "all" else [args.mode]
    providers = _split(args.providers, PROVIDERS, "provider") if args.providers else None
    cfg = Config(n, v, dtype, device, args.temperature, args.beta, args.skew)

    info = machine_info(device, argv)
    print(f"# kdkernels benchmark on {device}: {info['gpu'] if cuda else info['cpu']} "
          f"({info['cpu_count']} CPUs, {info['torch_threads']} torch threads); torch "
          f"{info['torch']}, triton {info['triton']}")
    print(f"# N={n} V={v} {_dtype_name(dtype)} T={args.temperature:g} divergences="
          f"{','.join(divergences)} modes={','.join(modes)} reps={reps}")
    t0 = time.perf_counter()
    rows, notes = run(cfg, divergences, providers or list(PROVIDERS), modes, reps, args.warmup,
                      args.grad_rows, args.seed, explicit=providers or ())
    grad_checked = min(n, args.grad_rows)
    print()
    print(table(rows, cfg, grad_checked))
    for note in notes:
        print(f"note: {note}")
    for r in rows:
        if r.note:
            print(f"note: {r.provider}: {r.note}")
    print()
    for line in ratios(rows, cfg):
        print(line)

    out = args.out or RESULTS_DIR / (
        f"{device.type}-{_dtype_name(dtype)}-N{n}-V{v}-"
        f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.csv")
    info["total_seconds"] = f"{time.perf_counter() - t0:.0f}"
    write_csv(out, rows, cfg, info, grad_checked, notes)
    print(f"\nCSV: {out}")
    if not args.no_plot and rows:
        try:
            from .plot import plot_rows

            png = plot_rows(rows, cfg, out.with_suffix(".png"), info)
            print(f"plot: {png}")
        except ImportError as e:
            print(f"plot: skipped ({e}; pip install matplotlib)")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0
