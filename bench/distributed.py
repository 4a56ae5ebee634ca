"""Vocab-parallel kd_loss over W gloo processes on CPU: impl="torch" against impl="ext".

    python -m bench distributed              W=2, N=1024, V=128256, float32, forward_kl, T=2,
                                             one thread per rank, impl torch and ext
    python -m bench distributed --quick      the same at N=128, V=8192 (a smoke test)
    python -m bench distributed --world 2 4 --rows 256 --vocab 32000 --divergence forward_kl jsd
    python -m bench.distributed ...          (the same, without bench/__main__.py)

Each world size is one spawn of W processes (gloo over a file rendezvous). Every rank holds
an uneven contiguous vocabulary shard (torch.chunk's split, as DTensor's Shard(-1)), and one
step is kd_loss(..., process_group=WORLD, impl=...) forward + backward (teacher gradient
with --teacher-grad). Every impl runs on the very same shards, labels and group; their timed
steps take turns (torch, ext, torch, ext, ...). Reported per configuration and impl:

  step_ms           median over steps of the slowest rank's step time (a barrier starts each
                    step, so it is the time the group spends), with 20% / 80% quantiles
  unsharded_ms      the same step without a group on full (N, V) logits, one process, same
                    thread count: the work that the W ranks share
  peak_extra_B      the largest rank's peak extra memory in one (untimed) step: the peak of
                    the running sum of PyTorch's CPU allocations and frees during the step,
                    from torch.profiler's allocator events (bench/measure.py), gradient
                    included, inputs excluded. It counts every tensor the step allocates,
                    however briefly; gloo's internal transport buffers (O(rows) here) are
                    not tensors and are not counted. RSS high-water marks are not used: they
                    include the full logits every rank draws and depend on glibc returning
                    memory to the OS.
  peak_x_local_nv_fp32   the largest rank's peak / one N x V_shard float32 tensor of that rank
  collectives       collectives per step, forward + backward (kdkernels.distributed counts them)
  payload_B         bytes of the tensors this rank hands to those collectives per step
  wire_B            bytes each rank sends with ring algorithms (all_gather (W-1) x payload,
                    all_reduce 2 (W-1)/W x payload)
  gather_logits_B   what each rank would send to all-gather student and teacher logits
                    instead ((W-1) x 2 x N x V_r x element size): the approach this avoids

Targets, per sharded problem run with both impls, with met / MISSED verdicts at the shape
they are stated for (W=2, N=1024, V=128256, float32, forward_kl, T=2, one thread per rank):
the ext path at least 3x faster per step than the torch path, and its peak extra memory per
rank at most 1.1x one local N x V_shard float32 tensor (the gradient alone is 1.0x).

On a shared CPU the processes compete for cores: compare step_ms across W only with
--threads x W <= the number of cores. Results go to stdout and, with --csv, to a CSV file
with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


IMPLS = ("torch", "ext", "triton", "auto")

# The shape the two targets are stated for; other shapes print the ratios without a verdict.
TARGET = {"world": 2, "rows": 1024, "vocab": 128256, "divergence": "forward_kl",
          "dtype": "float32", "temperature": 2.0, "threads": 1, "ce_weight": 0.0,
          "teacher_grad": False}
QUICK = {"rows": [128], "vocab": [8192], "steps": 5, "warmup": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, nargs="+", default=[TARGET["world"]],
                   help="processes W (default %(default)s)")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help=f"rows N (tokens); default {TARGET['rows']}")
    p.add_argument("--vocab", type=int, nargs="+", default=None,
                   help=f"global vocabulary V; default {TARGET['vocab']}")
    p.add_argument("--divergence", nargs="+", default=[TARGET["divergence"]],
                   choices=DIVERGENCES)
    p.add_argument("--ce-weight", type=float, default=0.0,
                   help="weight of the hard-label CE (labels are drawn when != 0)")
    p.add_argument("--teacher-grad", action="store_true", help="teacher logits require grad")
    p.add_argument("--dtype", default=TARGET["dtype"], choices=list(DTYPES))
    p.add_argument("--impl", nargs="+", default=["torch", "ext"], choices=IMPLS,
                   help="impl= values passed to kd_loss, each run on the same shards "
                        "(default: torch ext)")
    p.add_argument("--temperature", type=float, default=TARGET["temperature"])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    p.add_argument("--threads", type=int, default=TARGET["threads"],
                   help="torch threads per process (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a small shape for a smoke test (N=128, V=8192, 5 steps) unless "
                        "--rows / --vocab / --steps are given")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per world size before the processes are killed")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {"rows": [TARGET["rows"]], "vocab": [TARGET["vocab"]],
                                         "steps": 5, "warmup": 1}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.impl = list(dict.fromkeys(args.impl))
    for name in ("world", "rows", "vocab"):
        if any(x < 1 for x in getattr(args, name)):
            p.error(f"--{name} values must be >= 1")
    for v, w in itertools.product(args.vocab, args.world):
        if 0 in widths_of(v, w):
            p.error(f"--vocab {v} over {w} ranks leaves a rank without columns")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps and --threads must be >= 1, --warmup >= 0")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    return args


def widths_of(vocab: int, world: int) -> list[int]:
    """torch.chunk's split of `vocab` columns over `world` ranks (DTensor's Shard(-1))."""
    chunks = [c.numel() for c in torch.arange(vocab).chunk(world)]
    return chunks + [0] * (world - len(chunks))


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _step_fn(s, t, labels, args, divergence, impl, group):
    import kdkernels as kd

    def step():
        s.grad = None
        t.grad = None
        loss = kd.kd_loss(s, t, labels, divergence=divergence, temperature=args.temperature,
                          ce_weight=args.ce_weight, impl=impl, process_group=group)
        loss.backward()
        return loss

    return step


def _worker(rank, world, init, out_path, args):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    from bench.measure import profile_peak
    from kdkernels import distributed as kdd

    group = dist.group.WORLD
    dtype = DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    results = []
    for n, v, divergence in itertools.product(args.rows, args.vocab, args.divergence):
        widths = widths_of(v, world)
        off = sum(widths[:rank])
        g = torch.Generator().manual_seed(n * 7919 + v)
        # every rank draws the full logits and keeps its slice (cheap at bench sizes, and it
        # makes the unsharded baseline below use the very same numbers)
        S = (torch.randn(n, v, generator=g) * 2).to(dtype)
        T = (torch.randn(n, v, generator=g) * 2).to(dtype)
        labels = torch.randint(0, v, (n,), generator=g) if args.ce_weight else None
        s = S[:, off : off + widths[rank]].clone().requires_grad_(True)
        t = T[:, off : off + widths[rank]].clone().requires_grad_(args.teacher_grad)
        if rank != 0:
            del S, T  # only rank 0 runs the unsharded baseline
        # the same shards, labels and group for every impl: one sharded problem, compared
        steps = {impl: _step_fn(s, t, labels, args, divergence, impl, group)
                 for impl in args.impl}
        losses, calls, peaks = {}, {}, {}
        for impl, step in steps.items():
            for _ in range(args.warmup):
                step()
            with kdd.count_collectives() as calls[impl]:
                losses[impl] = float(step().detach())
            s.grad = None
            t.grad = None
            gc.collect()
            dist.barrier(group)
            _, peaks[impl], _ = profile_peak(step)
            s.grad = None
            t.grad = None
        # the impls take turns step by step, so that a change of load on a shared machine
        # or a late warm-up lands on all of them alike rather than on whichever ran first
        times = {impl: [] for impl in steps}
        for _ in range(args.steps):
            for impl, step in steps.items():
                dist.barrier(group)
                t0 = time.perf_counter()
                step()
                times[impl].append(time.perf_counter() - t0)
        s.grad = None
        t.grad = None
        # the group's step time is its slowest rank's; memory is per rank (the largest shown)
        all_times = [None] * world
        dist.all_gather_object(all_times, times, group=group)
        all_peaks = [None] * world
        dist.all_gather_object(all_peaks, peaks, group=group)

        unsharded = {impl: [] for impl in steps}
        if rank == 0:  # the other ranks wait at the barrier below
            Sf = S.clone().requires_grad_(True)
            Tf = T.clone().requires_grad_(args.teacher_grad)
            full = {impl: _step_fn(Sf, Tf, labels, args, divergence, impl, None)
                    for impl in steps}
            for step in full.values():
                for _ in range(args.warmup):
                    step()
            for _ in range(args.steps):
                for impl, step in full.items():
                    t0 = time.perf_counter()
                    step()
                    unsharded[impl].append(time.perf_counter() - t0)
            del Sf, Tf, full
        dist.barrier(group)
        if rank == 0:
            # one local N x V_shard float32 tensor (the gradient's size in float32) per rank
            local_nv32 = [n * w * 4 for w in widths]
            for impl in steps:
                step_s = [max(ts[impl][i] for ts in all_times) for i in range(args.steps)]
                peak = [p[impl] for p in all_peaks]
                results.append({
                    "impl": impl, "world": world, "rows": n, "vocab": v,
                    "divergence": divergence, "dtype": args.dtype,
                    "temperature": args.temperature, "ce_weight": args.ce_weight,
                    "teacher_grad": args.teacher_grad, "threads": args.threads,
                    "widths": "/".join(map(str, widths)), "loss": losses[impl],
                    "step_ms": 1e3 * statistics.median(step_s),
                    "step_ms_p20": 1e3 * _quantile(step_s, 0.2),
                    "step_ms_p80": 1e3 * _quantile(step_s, 0.8),
                    "unsharded_ms": 1e3 * statistics.median(unsharded[impl]),
                    "peak_extra_B": max(peak),
                    "peak_x_local_nv_fp32": max(p / b for p, b in zip(peak, local_nv32,
                                                                       strict=True)),
                    "collectives": len(calls[impl]),
                    "ops": "+".join(c.op for c in calls[impl]),
                    "payload_B": sum(c.payload_bytes for c in calls[impl]),
                    "wire_B": sum(c.wire_bytes for c in calls[impl]),
                    "gather_logits_B": (world - 1) * 2 * n * max(widths) * elem,
                })
        del s, t
        if rank == 0:
            del S, T
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def run_world(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        init = "file://" + os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(_worker, args=(world, init, out, args), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + args.timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"W={world}: no result after {args.timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        with open(out) as f:
            return json.load(f)


COLUMNS = ("impl", "world", "rows", "vocab", "divergence", "widths", "loss", "step_ms",
           "step_ms_p20", "step_ms_p80", "unsharded_ms", "peak_extra_B", "peak_x_local_nv_fp32",
           "collectives", "ops", "payload_B", "wire_B", "gather_logits_B")


def _fmt(x, column=""):
    if isinstance(x, float):
        return f"{x:.7g}" if column == "loss" or abs(x) < 0.01 else f"{x:.2f}"
    return str(x)


def format_table(rows) -> str:
    table = [COLUMNS] + [tuple(_fmt(r[c], c) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True))
                     for row in table)


def _at_target(r: dict) -> bool:
    return all(r[k] == v for k, v in TARGET.items())


def targets(rows) -> list[str]:
    """Per sharded problem run with both impls: the ext path against the torch path."""
    from bench.report import target_line

    lines = []
    problems = {}
    for r in rows:
        key = (r["world"], r["rows"], r["vocab"], r["divergence"])
        problems.setdefault(key, {})[r["impl"]] = r
    for (world, n, v, divergence), by_impl in problems.items():
        ref, ext = by_impl.get("torch"), by_impl.get("ext")
        if ref is None and ext is None:
            continue
        some = ext or ref
        checked = _at_target(some)
        threads = f"{some['threads']} thread" + ("s" if some["threads"] > 1 else "")
        lines.append(
            f"Targets (W={world} N={n} V={v} {some['dtype']} {divergence} "
            f"T={some['temperature']:g}, {threads} per rank; stated for "
            f"W=2 N=1024 V=128256 float32 forward_kl T=2, 1 thread per rank):")
        speedup = ref["step_ms"] / ext["step_ms"] if ref and ext and ext["step_ms"] else None
        lines.append(target_line("vocab-parallel extension vs reference",
                                 "torch step time / ext step time", speedup, ">=", 3.0,
                                 checked))
        memory = ext["peak_x_local_nv_fp32"] if ext else None
        lines.append(target_line("vocab-parallel extension memory per rank",
                                 "ext peak extra / one N x V_shard fp32", memory, "<=", 1.1,
                                 checked))
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    # load (or build, the first time) each impl once before W processes need it; an impl
    # that cannot run here is left out with the reason, the others still run
    import kdkernels as kd

    impls = []
    for impl in args.impl:
        try:
            kd.kd_loss(torch.zeros(1, 2, dtype=DTYPES[args.dtype]),
                       torch.zeros(1, 2, dtype=DTYPES[args.dtype]), impl=impl)
            impls.append(impl)
        except Exception as e:  # a backend may fail to build in any way: report, go on
            print(f"note: impl={impl} skipped ({type(e).__name__}: {str(e)[:300]})",
                  file=sys.stderr)
    if not impls:
        print("no impl could run", file=sys.stderr)
        return 1
    args.impl = impls
    rows = []
    for world in args.world:
        rows += run_world(world, args)
    print(format_table(rows))
    print()
    print("step_ms: median over steps of the slowest rank; peak_extra_B: the largest rank's "
          "peak of PyTorch CPU allocations during one step above its inputs, gradient "
          "included (allocator events from torch.profiler); peak_x_local_nv_fp32: the largest "
          "rank's peak / one N x V_shard float32 tensor of that rank.")
    print()
    for line in targets(rows):
        print(line)
    if args.csv:
        from bench.report import machine_info

        info = machine_info(torch.device("cpu"), ["distributed", *(argv or sys.argv[1:])])
        meta = {k: info[k] for k in ("machine", "cpu", "cpu_count", "torch", "kdkernels",
                                     "date", "command")}
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*rows[0].keys(), *meta.keys()] if rows else [])
            w.writeheader()
            for r in rows:
                w.writerow({**r, **meta})
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
