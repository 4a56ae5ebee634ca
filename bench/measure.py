"""How `python -m bench` measures: time per iteration and peak extra memory, per provider.

Modes: forward (loss = f(s, t) with s requiring grad), backward (loss.backward()), full
(both). One training-step iteration is timed at the forward/backward boundary, so a run
with --mode all costs the same as --mode full. CPU ops are synchronous, so wall-clock time
at the boundary is exact there; on CUDA three events are recorded and the L2 cache is
flushed before every repetition. A row reports the median and the 20 % / 80 % quantiles.

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

Error: the loss and the sampled rows' gradient against the float64 ground truth (truth.py),
as max abs errors.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .providers import (
    COMPILED,
    COPIES,
    MODES,
    PROVIDERS,
    Config,
    availability,
    bytes_moved,
    dtype_name,
    make_inputs,
    make_loss,
)
from .truth import ground_truth

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


def profile_peak(fn):
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
    loss, fwd, net = profile_peak(step)
    if not backward:
        return loss, Memory(fwd, None, None)
    _, bwd, _ = profile_peak(loss.backward)
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
    loss_err = grad_err = None
    if truth is not None:
        loss_err = abs(float(loss.detach().double()) - truth.loss)
    if backward and truth is not None:
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
    log(f"# inputs {cfg.n} x {cfg.v} {dtype_name(cfg.dtype)} on {cfg.device}: "
        f"{time.perf_counter() - t0:.1f} s")
    rows = []
    copies_done = False
    for div in divergences:
        t0 = time.perf_counter()
        try:
            truth = ground_truth(s, t, div, cfg, grad_rows, backward)
            log(f"# float64 ground truth for {div}: {time.perf_counter() - t0:.1f} s")
        except NotImplementedError as e:  # a divergence bench has no formula for: time it
            truth = None
            notes.append(f"{div}: errors not checked ({e})")
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
            med = [f"{r.mode} {1e3 * r.median():.2f} ms" for r in new]
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


def pick_device(asked: str | None) -> torch.device:
    """--device: the one asked for (cuda must exist), else cuda when available, else cpu."""
    if asked == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(asked or ("cuda" if torch.cuda.is_available() else "cpu"))
