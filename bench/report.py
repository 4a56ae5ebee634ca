"""What `python -m bench` prints and writes: the table, the targets, the CSV.

The targets are checked on the rows of one run (forward_kl, mode full unless said
otherwise); each is named by what it compares, and a verdict (met / MISSED) is printed only
where the run has the shape the target is stated for.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

from .measure import peak_bandwidth
from .providers import DIVERGENCES, PROVIDERS, Config, dtype_name

TARGET_CONFIG = "CPU float32 N=2048 V=128256 forward_kl T=2 forward+backward"

# Bounds on a divergence's forward+backward time over the same provider's forward KL: the
# extension's mixtures move 1.4x the bytes of forward KL (a second forward pass over s and t),
# the reference's may cost 2.5x (its mixture pass forms log m and u in PyTorch ops).
_MIXTURES = ("jsd", "skew_forward_kl", "skew_reverse_kl")
RATIO_TARGETS = {("kd-ext", "reverse_kl"): 1.5,
                 **{("kd-ext", d): 1.5 for d in _MIXTURES},
                 **{("kd-torch", d): 2.5 for d in _MIXTURES}}


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


def divergence_ratios(rows, mode: str = "full") -> str:
    """Each divergence's median time over the same provider's forward KL (one line per
    provider, one column per divergence of kdkernels, in its order); "" with fewer than two
    divergences. Timed in the same run, so a shared machine's load shifts both alike."""
    divs = [d for d in DIVERGENCES if any(r.divergence == d for r in rows)]
    provs = [p for p in PROVIDERS if any(r.provider == p and r.divergence in divs for r in rows)]
    if len(divs) < 2 or "forward_kl" not in divs or not provs:
        return ""
    head = ["provider"] + divs
    lines = []
    for p in provs:
        base = _find(rows, p, "forward_kl", mode)
        cells = [p]
        for d in divs:
            r = _find(rows, p, d, mode)
            ok = r is not None and base is not None and r.median() and base.median()
            cells.append(_fmt_ratio(r.median() / base.median()) if ok else "-")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, strict=True)]

    def fmt(cells):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [f"time / the same provider's forward_kl ({mode}, medians):", fmt(head),
           fmt(["-" * w for w in widths])]
    return "\n".join(out + [fmt(c) for c in lines])


def verdict(value, op: str, target: float) -> str:
    """met / MISSED for `value op target` (op "<=", "<", ">=" or ">"); n/a without a value."""
    if value is None:
        return "n/a"
    compare = {"<=": float.__le__, "<": float.__lt__, ">=": float.__ge__, ">": float.__gt__}
    if op not in compare:
        raise ValueError(f"op must be one of {sorted(compare)}, got {op!r}")
    return "met" if compare[op](float(value), float(target)) else "MISSED"


def target_line(name: str, formula: str, value, op: str, target: float,
                checked: bool = True) -> str:
    """One target: what it measures, the measured ratio, the bound and the verdict."""
    shown = "n/a" if value is None else f"{value:.2f}"
    said = verdict(value, op, target) if checked else "(not the target shape)"
    return f"  {name:<42} {formula:<40} {shown:>8}   target {op} {target:<5} {said}"


def targets(rows, cfg: Config) -> list[str]:
    """The project's targets, as ratios of this run's rows, with verdicts."""
    nv32 = cfg.n * cfg.v * 4
    cuda = cfg.device.type == "cuda"
    lines = []

    def med(p, div="forward_kl", mode="full"):
        r = _find(rows, p, div, mode)
        return r.median() if r else None

    def peak(p, div="forward_kl", mode="full"):
        r = _find(rows, p, div, mode)
        return r.peak if r and r.peak is not None else None

    # A verdict only where the run has the shape a target is stated for: the CPU targets on
    # the CPU at N=2048, V=128256, float32, T=2, the Triton targets on CUDA. Elsewhere (a GPU
    # run of a CPU target, say) the ratio is shown with its bound and no verdict.
    at_cpu_target = not cuda and (
        cfg.n == 2048 and cfg.v == 128256 and cfg.dtype == torch.float32
        and cfg.temperature == 2.0)

    def line(name, formula, value, op, target, checked=at_cpu_target):
        lines.append(target_line(name, formula, value, op, target, checked))

    def div_(a, b):
        return a / b if a is not None and b else None

    this = (f"{cfg.device.type.upper()} {dtype_name(cfg.dtype)} N={cfg.n} V={cfg.v} "
            f"T={cfg.temperature:g}")
    lines.append(f"Targets (same run; {this}; stated for {TARGET_CONFIG}"
                 + ("; the Triton targets for CUDA" if cuda else "") + "):")
    eager, ref = med("eager"), med("kd-torch")
    if eager is None:
        lines.append("  (no eager forward_kl full row: the ratios to eager need --divergence "
                     "forward_kl, --mode full or all, and the eager provider)")
    else:
        lines.append(f"  eager forward_kl forward+backward: {_fmt_s(eager)}, peak "
                     f"{_fmt_bytes(peak('eager'))} = "
                     f"{_fmt_ratio(div_(peak('eager'), nv32))} x NV fp32")
    line("reference time vs eager", "kd-torch time / eager time", div_(ref, eager), "<=", 1.0)
    line("reference memory", "kd-torch peak extra / one N x V fp32",
         div_(peak("kd-torch"), nv32), "<=", 1.3)
    ext = med("kd-ext")
    if ext is not None or not cuda:
        line("extension vs eager", "eager time / kd-ext time", div_(eager, ext), ">=", 6.0)
        line("extension vs compiled chunked loss", "compile_chunked time / kd-ext time",
             div_(med("compile_chunked"), ext), ">=", 1.3)
        line("extension vs copy floor", "kd-ext time / copy_floor time",
             div_(ext, med("copy_floor")), "<=", 2.5)
        line("extension memory", "kd-ext peak extra / one N x V fp32",
             div_(peak("kd-ext"), nv32), "<=", 1.1)
    if cuda:
        tri = med("kd-triton")
        r = _find(rows, "kd-triton", "forward_kl", "full")
        bw = peak_bandwidth(cfg.device)
        frac = r.bytes_moved / tri / bw if tri and bw and r else None
        line("Triton memory bandwidth", "kd-triton GB/s / device peak GB/s", frac, ">=", 0.85,
             checked=True)
        line("Triton vs eager", "eager time / kd-triton time", div_(eager, tri), ">=", 3.0,
             checked=True)
    others = [d for d in DIVERGENCES[1:] if any(r.divergence == d for r in rows)]
    if others:
        lines.append(" each divergence vs the same provider's forward KL (time, forward+backward):")
        names = {"kd-ext": "extension", "kd-triton": "Triton", "kd-torch": "reference",
                 "eager": "eager"}
        for p in ("kd-ext", "kd-triton", "kd-torch", "eager"):
            base = med(p)
            for d in others:
                v = div_(med(p, d), base)
                if v is None:
                    continue
                name = f"{names[p]} {d} vs its forward KL"
                formula = f"{p} {d} / forward_kl"
                bound = RATIO_TARGETS.get((p, d))
                if bound is not None:
                    line(name, formula, v, "<=", bound)
                else:
                    lines.append(f"  {name:<42} {formula:<40} {v:>8.2f}")
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
                "device": cfg.device.type, "dtype": dtype_name(cfg.dtype), "n": cfg.n,
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
