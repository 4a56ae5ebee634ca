"""`python -m bench`: time, peak memory and error of kdkernels against what users run today.

The command line of the provider benchmark: parses the flags, runs every provider
(providers.py) through the measurements (measure.py), prints the table and the targets and
writes the CSV (report.py) and the PNG plot (plot.py).
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

from .measure import pick_device, run
from .providers import DIVERGENCES, DTYPES, KD_IMPLS, MODES, PROVIDERS, Config, dtype_name
from .report import divergence_ratios, machine_info, table, targets, write_csv

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
                    "(vocab-parallel over gloo), `python -m bench linear ...` (the fused "
                    "linear loss against its GEMMs), `python -m bench sparse ...` (a top-k "
                    "teacher's loss against the eager top-k loss).",
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
    device = pick_device(args.device)
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
    print(f"# N={n} V={v} {dtype_name(dtype)} T={args.temperature:g} divergences="
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
    ratios = divergence_ratios(rows, "full" if "full" in modes else modes[0])
    if ratios:
        print()
        print(ratios)
    print()
    for line in targets(rows, cfg):
        print(line)

    out = args.out or RESULTS_DIR / (
        f"{device.type}-{dtype_name(dtype)}-N{n}-V{v}-"
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
