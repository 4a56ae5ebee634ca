"""Memory traffic of the Triton kernels, counted by running them under the interpreter.

    python -m bench.traffic [--dtype bf16 fp32] [--shape 4x4096 3x5003]
                            [--function kd_loss softmax log_softmax kl_div]
                            [--teacher-grad] [--check] [--csv PATH]

Every public function runs with impl="triton" on CPU under TRITON_INTERPRET=1, where each
tl.load / tl.store goes through the interpreter's builder (InterpreterBuilder in
triton/runtime/interpreter.py: create_masked_load / create_masked_store; unmasked loads and
stores are routed through those too). The counter wraps both and adds, per call, the number
of masked-in lanes times the element size of the pointer: the bytes a GPU would move for
that access, ignoring caches (each access is counted as if it went to DRAM, which is the
right model for a row that does not fit in L2). Atomics count one read and one write per
active lane. The figure reported is bytes per logit element (N x V; for kl_div, per element
of the input): forward, backward and both. O(N) traffic (row statistics, losses, upstream
row gradients) is included; it is negligible per element at real V.

Targets (bfloat16, teacher without gradient):
    forward_kl, reverse_kl   fwd+bwd <= 10.5 B/elem, forward alone <= 4.1 B/elem
    jsd, skew_*              fwd+bwd <= 14.5 B/elem
--check exits 1 when a bf16 kd_loss row misses its target.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kdkernels.triton._common import text_table

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
FUNCTIONS = ("kd_loss", "softmax", "log_softmax", "kl_div")
DEFAULT_SHAPES = ("4x4096", "3x5003", "2x32000")  # 32000 > one tile: the two-pass paths
DEFAULT_DTYPES = ("bf16", "fp32")

# (forward + backward, forward alone) bytes per element in bfloat16; None = no target
TARGETS_BF16 = {
    "forward_kl": (10.5, 4.1),
    "reverse_kl": (10.5, 4.1),
    "jsd": (14.5, None),
    "skew_forward_kl": (14.5, None),
    "skew_reverse_kl": (14.5, None),
}


# --------------------------------------------------------------------------------------
# the counter
# --------------------------------------------------------------------------------------


@dataclass
class Traffic:
    read: int = 0  # bytes loaded
    write: int = 0  # bytes stored
    uncounted: int = 0  # calls to memory ops the counter does not model (tensor descriptors)

    @property
    def total(self) -> int:
        return self.read + self.write


def _active_lanes(ptrs, mask) -> int:
    import numpy as np

    if mask is None:
        return int(np.size(ptrs.data))
    return int(np.count_nonzero(np.broadcast_to(mask.data, np.shape(ptrs.data))))


def _elem_bytes(ptrs) -> int:
    return ptrs.get_element_ty().primitive_bitwidth // 8


@contextmanager
def count_traffic():
    """Count the bytes every interpreted tl.load / tl.store moves inside the `with` block.

    Yields a Traffic that fills up while the block runs. Needs TRITON_INTERPRET=1 at the
    time the kernels were decorated (otherwise nothing goes through the interpreter and the
    counts stay 0, which the callers check)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    traffic = Traffic()
    load = builder.create_masked_load
    store = builder.create_masked_store
    rmw = builder.create_atomic_rmw
    cas = builder.create_atomic_cas
    desc_load = builder.create_descriptor_load
    desc_store = builder.create_descriptor_store

    def counted_load(ptrs, mask, *args, **kwargs):
        traffic.read += _active_lanes(ptrs, mask) * _elem_bytes(ptrs)
        return load(ptrs, mask, *args, **kwargs)

    def counted_store(ptrs, value, mask, *args, **kwargs):
        traffic.write += _active_lanes(ptrs, mask) * _elem_bytes(ptrs)
        return store(ptrs, value, mask, *args, **kwargs)

    def counted_rmw(op, ptr, val, mask, *args, **kwargs):
        n = _active_lanes(ptr, mask) * _elem_bytes(ptr)
        traffic.read += n
        traffic.write += n
        return rmw(op, ptr, val, mask, *args, **kwargs)

    def counted_cas(ptr, cmp, val, *args, **kwargs):
        n = _active_lanes(ptr, None) * _elem_bytes(ptr)
        traffic.read += n
        traffic.write += n
        return cas(ptr, cmp, val, *args, **kwargs)

    def uncounted(fn):
        def wrapper(*args, **kwargs):
            traffic.uncounted += 1
            return fn(*args, **kwargs)

        return wrapper

    patches = {
        "create_masked_load": counted_load,
        "create_masked_store": counted_store,
        "create_atomic_rmw": counted_rmw,
        "create_atomic_cas": counted_cas,
        "create_descriptor_load": uncounted(desc_load),
        "create_descriptor_store": uncounted(desc_store),
    }
    for name, fn in patches.items():
        setattr(builder, name, fn)  # instance attributes shadow the class methods
    try:
        yield traffic
    finally:
        for name in patches:
            delattr(builder, name)


# --------------------------------------------------------------------------------------
# measurements through the public API
# --------------------------------------------------------------------------------------


def kd_available() -> bool:
    return importlib.util.find_spec("kdkernels.triton.kd") is not None


@dataclass
class Result:
    function: str
    variant: str
    dtype: str
    n: int
    v: int
    fwd: Traffic
    bwd: Traffic

    @property
    def elems(self) -> int:
        return self.n * self.v

    def per_elem(self, t: Traffic) -> float:
        return t.total / self.elems

    @property
    def fwd_b(self) -> float:
        return self.per_elem(self.fwd)

    @property
    def bwd_b(self) -> float:
        return self.per_elem(self.bwd)

    @property
    def total_b(self) -> float:
        return (self.fwd.total + self.bwd.total) / self.elems

    def target(self) -> tuple[float | None, float | None]:
        if self.function != "kd_loss" or self.dtype != "bf16" or "+dt" in self.variant:
            return None, None
        return TARGETS_BF16.get(self.variant, (None, None))

    def meets_target(self) -> bool | None:
        both, fwd = self.target()
        if both is None and fwd is None:
            return None
        ok = both is None or self.total_b <= both
        return ok and (fwd is None or self.fwd_b <= fwd)


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _run(fwd_fn):
    """Count forward (fwd_fn() -> scalar loss) and backward separately."""
    with count_traffic() as f:
        loss = fwd_fn()
    with count_traffic() as b:
        loss.backward()
    return f, b


def measure_kd_loss(divergence, dtype, n, v, teacher_grad=False, seed=0) -> Result:
    import torch

    import kdkernels as kd

    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g).to(_dtype(dtype)).requires_grad_()
    t = torch.randn(n, v, generator=g).to(_dtype(dtype)).requires_grad_(teacher_grad)
    f, b = _run(lambda: kd.kd_loss(s, t, divergence=divergence, impl="triton"))
    name = divergence + ("+dt" if teacher_grad else "")
    return Result("kd_loss", name, dtype, n, v, f, b)


def measure_softmax(log, dtype, n, v, seed=0) -> Result:
    import torch

    import kdkernels as kd

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g).to(_dtype(dtype)).requires_grad_()
    up = torch.randn(n, v, generator=g).to(_dtype(dtype))
    fn = kd.log_softmax if log else kd.softmax
    with count_traffic() as f:
        y = fn(x, 2.0, impl="triton")
    with count_traffic() as b:
        y.backward(up)
    return Result("log_softmax" if log else "softmax", "T=2", dtype, n, v, f, b)


def measure_kl_div(reduction, dtype, n, v, seed=0) -> Result:
    import torch

    import kdkernels as kd

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g).log_softmax(-1).to(_dtype(dtype)).requires_grad_()
    y = torch.randn(n, v, generator=g).softmax(-1).to(_dtype(dtype))
    with count_traffic() as f:
        out = kd.kl_div(x, y, reduction=reduction, impl="triton")
    with count_traffic() as b:
        out.backward(torch.ones_like(out))
    return Result("kl_div", f"{reduction},dx", dtype, n, v, f, b)


def measure(functions, dtypes, shapes, divergences=DIVERGENCES, teacher_grad=False, log=print):
    results = []
    for dtype in dtypes:
        for n, v in shapes:
            if "kd_loss" in functions:
                if not kd_available():
                    log("note: kdkernels/triton/kd.py does not exist yet: kd_loss skipped")
                else:
                    for div in divergences:
                        results.append(measure_kd_loss(div, dtype, n, v))
                        if teacher_grad:
                            results.append(measure_kd_loss(div, dtype, n, v, True))
            for log_ in (False, True):
                if ("log_softmax" if log_ else "softmax") in functions:
                    results.append(measure_softmax(log_, dtype, n, v))
            if "kl_div" in functions:
                for red in ("sum", "none"):
                    results.append(measure_kl_div(red, dtype, n, v))
    return results


def format_table(results) -> str:
    head = ("function", "variant", "dtype", "N x V", "fwd r/w", "fwd", "bwd r/w", "bwd",
            "fwd+bwd", "target", "ok")
    body = []
    for r in results:
        both, fwd = r.target()
        tgt = " / ".join(x for x in (f"<={both}" if both else "",
                                     f"fwd<={fwd}" if fwd else "") if x) or "-"
        ok = {None: "-", True: "yes", False: "NO"}[r.meets_target()]
        e = r.elems
        body.append((
            r.function, r.variant, r.dtype, f"{r.n}x{r.v}",
            f"{r.fwd.read / e:.2f}/{r.fwd.write / e:.2f}", f"{r.fwd_b:.2f}",
            f"{r.bwd.read / e:.2f}/{r.bwd.write / e:.2f}", f"{r.bwd_b:.2f}",
            f"{r.total_b:.2f}", tgt, ok,
        ))
    return text_table(head, body)


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        n, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4x4096, got {text!r}") from None
    if n <= 0 or v <= 0:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return n, v


def _interpreted() -> bool:
    """True when the kernels in this process run under the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from triton.runtime.interpreter import InterpretedFunction

    mod = importlib.import_module("kdkernels.triton.softmax")
    return isinstance(mod._softmax_fwd_kernel, InterpretedFunction)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", nargs="+", default=list(DEFAULT_DTYPES),
                   choices=("bf16", "fp16", "fp32"))
    p.add_argument("--shape", nargs="+", type=_parse_shape,
                   default=[_parse_shape(s) for s in DEFAULT_SHAPES],
                   help="N x V logit shapes (default: %(default)s)")
    p.add_argument("--function", nargs="+", default=list(FUNCTIONS), choices=FUNCTIONS)
    p.add_argument("--divergence", nargs="+", default=list(DIVERGENCES), choices=DIVERGENCES)
    p.add_argument("--teacher-grad", action="store_true",
                   help="also measure kd_loss with a teacher that requires grad (+dt rows)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if a bf16 kd_loss row misses its target")
    p.add_argument("--csv", type=Path, help="also write the results as CSV")
    args = p.parse_args(argv)

    if not _interpreted():
        # Triton decides interpreter vs compiler when a kernel is decorated: count in a
        # fresh process that sets TRITON_INTERPRET=1 before the kernels are imported.
        env = dict(os.environ, TRITON_INTERPRET="1")
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH")) if x)
        cmd = [sys.executable, "-m", "bench.traffic",
               *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode

    # numpy's notes on inf/nan arithmetic inside interpreted kernels (e.g. -inf - -inf at
    # vocab padding, handled by the kernels' masks) are not findings here
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            module="triton.runtime.interpreter")
    results = measure(args.function, args.dtype, args.shape, args.divergence,
                      args.teacher_grad)
    if any(r.fwd.uncounted or r.bwd.uncounted for r in results):
        print("warning: some kernels use tensor-descriptor loads/stores the counter does not "
              "model; their bytes are missing")
    print(format_table(results))
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["function", "variant", "dtype", "n", "v", "fwd_read", "fwd_write",
                        "bwd_read", "bwd_write", "fwd_B_per_elem", "bwd_B_per_elem",
                        "total_B_per_elem"])
            for r in results:
                w.writerow([r.function, r.variant, r.dtype, r.n, r.v, r.fwd.read,
                            r.fwd.write, r.bwd.read, r.bwd.write, f"{r.fwd_b:.4f}",
                            f"{r.bwd_b:.4f}", f"{r.total_b:.4f}"])
    missed = [r for r in results if r.meets_target() is False]
    if missed:
        print(f"\n{len(missed)} kd_loss row(s) miss their target: "
              + ", ".join(f"{r.variant} {r.n}x{r.v}" for r in missed))
    return 1 if (missed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
