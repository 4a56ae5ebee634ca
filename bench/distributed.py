"""Vocab-parallel kd_loss over W gloo processes on CPU: time and bytes communicated per step.

    python -m bench.distributed --world 2 4 --rows 256 --vocab 32000 --divergence forward_kl jsd
    python -m bench distributed ...          (the same, through bench/__main__.py)

Each world size is one spawn of W processes (gloo over 127.0.0.1). Every rank holds an
uneven contiguous vocabulary shard (torch.chunk's split, as DTensor's Shard(-1)), and one
step is kd_loss(..., process_group=WORLD) forward + backward (teacher gradient with
--teacher-grad). Reported per configuration:

  step_ms           median over steps of the slowest rank's step time (a barrier starts each
                    step, so it is the time the group spends), with 20% / 80% quantiles
  unsharded_ms      the same step without a group on full (N, V) logits, one process, same
                    thread count: the work that the W ranks share
  collectives       collectives per step, forward + backward (kdkernels.distributed counts them)
  payload_B         bytes of the tensors this rank hands to those collectives per step
  wire_B            bytes each rank sends with ring algorithms (all_gather (W-1) x payload,
                    all_reduce 2 (W-1)/W x payload)
  gather_logits_B   what each rank would send to all-gather student and teacher logits
                    instead ((W-1) x 2 x N x V_r x element size): the approach this avoids

On a shared CPU the processes compete for cores: compare step_ms across W only with
--threads x W <= the number of cores. Results go to stdout and, with --csv, to a CSV file
with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import platform
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, nargs="+", default=[2, 4], help="processes (W)")
    p.add_argument("--rows", type=int, nargs="+", default=[256], help="rows N (tokens)")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000], help="global vocabulary V")
    p.add_argument("--divergence", nargs="+", default=["forward_kl", "jsd"],
                   choices=DIVERGENCES)
    p.add_argument("--ce-weight", type=float, default=0.0,
                   help="weight of the hard-label CE (labels are drawn when != 0)")
    p.add_argument("--teacher-grad", action="store_true", help="teacher logits require grad")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--impl", default="torch", help="impl= passed to kd_loss")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per world size before the processes are killed")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    for name in ("world", "rows", "vocab"):
        if any(x < 1 for x in getattr(args, name)):
            p.error(f"--{name} values must be >= 1")
    for v, w in itertools.product(args.vocab, args.world):
        if 0 in widths_of(v, w):
            p.error(f"--vocab {v} over {w} ranks leaves a rank without columns")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps and --threads must be >= 1, --warmup >= 0")
    return args


def widths_of(vocab: int, world: int) -> list[int]:
    """torch.chunk's split of `vocab` columns over `world` ranks (DTensor's Shard(-1))."""
    chunks = [c.numel() for c in torch.arange(vocab).chunk(world)]
    return chunks + [0] * (world - len(chunks))


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _step_fn(s, t, labels, args, divergence, group):
    import kdkernels as kd

    def step():
        if s.grad is not None:
            s.grad = None
            t.grad = None
        loss = kd.kd_loss(s, t, labels, divergence=divergence, temperature=args.temperature,
                          ce_weight=args.ce_weight, impl=args.impl, process_group=group)
        loss.backward()
        return loss

    return step


def _worker(rank, world, init, out_path, args):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    from kdkernels import distributed as kdd

    group = dist.group.WORLD
    dtype = DTYPES[args.dtype]
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
        step = _step_fn(s, t, labels, args, divergence, group)
        for _ in range(args.warmup):
            step()
        with kdd.count_collectives() as calls:
            step()
        times = []
        for _ in range(args.steps):
            dist.barrier(group)
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        # the group's step time is its slowest rank's
        all_times = [None] * world
        dist.all_gather_object(all_times, times, group=group)
        step_s = [max(ts[i] for ts in all_times) for i in range(args.steps)]

        unsharded = []
        if rank == 0:  # the other ranks wait at the barrier below
            Sf = S.clone().requires_grad_(True)
            Tf = T.clone().requires_grad_(args.teacher_grad)
            full = _step_fn(Sf, Tf, labels, args, divergence, None)
            for _ in range(args.warmup):
                full()
            for _ in range(args.steps):
                t0 = time.perf_counter()
                full()
                unsharded.append(time.perf_counter() - t0)
        dist.barrier(group)
        if rank == 0:
            elem = torch.empty((), dtype=dtype).element_size()
            results.append({
                "world": world, "rows": n, "vocab": v, "divergence": divergence,
                "dtype": args.dtype, "ce_weight": args.ce_weight,
                "teacher_grad": args.teacher_grad, "threads": args.threads,
                "widths": "/".join(map(str, widths)),
                "step_ms": 1e3 * statistics.median(step_s),
                "step_ms_p20": 1e3 * _quantile(step_s, 0.2),
                "step_ms_p80": 1e3 * _quantile(step_s, 0.8),
                "unsharded_ms": 1e3 * statistics.median(unsharded),
                "collectives": len(calls),
                "ops": "+".join(c.op for c in calls),
                "payload_B": sum(c.payload_bytes for c in calls),
                "wire_B": sum(c.wire_bytes for c in calls),
                "gather_logits_B": (world - 1) * 2 * n * max(widths) * elem,
            })
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


COLUMNS = ("world", "rows", "vocab", "divergence", "widths", "step_ms", "step_ms_p20",
           "step_ms_p80", "unsharded_ms", "collectives", "ops", "payload_B", "wire_B",
           "gather_logits_B")


def _fmt(x):
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def main(argv=None) -> int:
    args = parse_args(argv)
    # load (or build, the first time) the selected impl once before W processes need it
    import kdkernels as kd

    kd.kd_loss(torch.zeros(1, 2, dtype=DTYPES[args.dtype]),
               torch.zeros(1, 2, dtype=DTYPES[args.dtype]), impl=args.impl)
    rows = []
    for world in args.world:
        rows += run_world(world, args)
    table = [COLUMNS] + [tuple(_fmt(r[c]) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)))
    if args.csv:
        meta = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(), "torch": torch.__version__,
                "date": datetime.datetime.now().isoformat(timespec="seconds")}
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*rows[0].keys(), *meta.keys()] if rows else [])
            w.writeheader()
            for r in rows:
                w.writerow({**r, **meta})
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
