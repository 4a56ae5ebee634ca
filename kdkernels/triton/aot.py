"""Ahead-of-time compilation of every Triton kernel for sm_80 / sm_90, with no GPU present.

    python -m kdkernels.triton.aot [--arch 80 90] [--vocab 32000 128256 152064 262144]
                                   [--dtype bf16 fp32] [--fail-on-spill] [--csv PATH]
                                   [--module kd softmax kl_div sparse] [--every-block] [--jobs N]

Each kernel module (kd.py, softmax.py, kl_div.py, sparse.py) lists the launch configurations its
launchers can choose for rows of width V in a dtype: `aot_kernels(V, dtype) -> [AotKernel]`
(see _common.py). Every distinct configuration is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` down to a cubin, and
`cuobjdump --dump-resource-usage` (shipped in the triton wheel) reads its registers per
thread, STACK and LOCAL bytes. Spilled registers live in thread-local memory, which on a
memory-bound kernel costs extra traffic per element. With the CUDA 12/13 ptxas that Triton
ships, spills are placed in the ABI stack frame: cuobjdump reports them as STACK, while
LOCAL stays 0 (checked: a kernel holding 512 float32 values per thread shows REG:64
STACK:4744 LOCAL:0, and `ptxas -v` on its PTX reports ~15 KB of spill stores). Triton
inlines every device function, so a non-zero stack frame means spills; the "spill" column
is STACK + LOCAL and --fail-on-spill fails when it is > 0. Shared memory is the static
amount cuobjdump reports plus the dynamic amount Triton requests at launch (reductions,
layout conversions).

The JIT specializes pointer arguments (16-byte aligned) and integer arguments divisible by
16; this tool gives the same hints: pointers always (torch allocations are aligned), the
row-width arguments named in VOCAB_ARGS when V % 16 == 0.

Compiling needs the real @triton.jit functions, so the kernel modules must not be imported
under TRITON_INTERPRET=1; when that variable is set the tool re-runs itself without it.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._common import text_table

MODULES = ("kd", "softmax", "kl_div", "sparse")
DEFAULT_ARCHS = (80, 90)
DEFAULT_VOCABS = (32000, 128256, 152064, 262144)
DEFAULT_DTYPES = ("bf16", "fp32")
VOCAB_ARGS = ("V", "n_cols", "vocab", "vocab_size", "stride", "row_stride")
# Row strides of kd.py's kernels: the row width, or the wider width of logits whose first
# columns are read in place (151936 / 152064: multiples of 16 too).
VOCAB_ARGS += ("s_stride", "t_stride", "ds_stride", "dt_stride")

_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass
class Row:
    module: str
    kernel: str
    arch: int
    dtype: str
    vocabs: list[int]
    config: str  # BLOCK sizes and num_warps
    registers: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1
    error: str = ""

    @property
    def spill(self) -> int:
        """Bytes of thread-local memory: the stack frame (where ptxas spills) plus LOCAL."""
        return self.stack + self.local


def cuobjdump_path() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path} (the triton wheel ships it)")
    return str(path)


def resource_usage(cubin: Path) -> tuple[int, int, int, int]:
    """(registers, stack, static shared, local) bytes of the single kernel in `cubin`."""
    out = subprocess.run(
        [cuobjdump_path(), "--dump-resource-usage", str(cubin)],
        capture_output=True, text=True, check=True,
    ).stdout
    found = _USAGE.search(out)
    if found is None:
        raise RuntimeError(f"cannot parse cuobjdump output for {cubin}:\n{out}")
    reg, stack, shared, local = (int(v) for v in found.groups())
    return reg, stack, shared, local


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _config_label(k) -> str:
    blocks = [f"{n}={v}" for n, v in k.constexprs.items() if n.startswith("BLOCK")]
    return "/".join([*blocks, f"w{k.num_warps}"])


def _attrs(k, vocab: int) -> dict:
    """Divisibility hints, as the JIT would specialize them (see the module docstring)."""
    names = list(k.fn.arg_names)
    hinted = []
    for name, ty in k.signature.items():
        if ty.startswith("*"):
            hinted.append(name)
        elif ty in ("i32", "i64") and name in VOCAB_ARGS and vocab % 16 == 0:
            hinted.append(name)
    return {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}


def compile_kernel(k, arch: int, vocab: int, workdir: Path) -> tuple[Path, int]:
    """Compile one AotKernel for sm_<arch>; returns (cubin path, dynamic shared bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=k.fn, signature=dict(k.signature), constexprs=dict(k.constexprs),
                    attrs=_attrs(k, vocab))
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32),
        options={"num_warps": k.num_warps, "num_stages": k.num_stages},
    )
    cubin = workdir / f"{k.fn.__name__}_{abs(hash((k.name, arch, vocab))):x}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    return cubin, int(getattr(compiled.metadata, "shared", 0))


def collect(archs, vocabs, dtypes, modules=MODULES, log=print):
    """Distinct (module, kernel config, arch) entries, each with the vocabularies it serves."""
    import torch  # noqa: F401  (the modules build torch dtypes)

    table: dict = {}
    for mod_name in modules:
        try:
            mod = importlib.import_module(f"kdkernels.triton.{mod_name}")
        except ModuleNotFoundError as e:
            if e.name != f"kdkernels.triton.{mod_name}":
                raise
            log(f"note: kdkernels/triton/{mod_name}.py does not exist yet: skipped")
            continue
        if not hasattr(mod, "aot_kernels"):
            log(f"note: kdkernels/triton/{mod_name}.py has no aot_kernels(V, dtype): skipped")
            continue
        for dtype in dtypes:
            for vocab in vocabs:
                for k in mod.aot_kernels(vocab, _torch_dtype(dtype)):
                    hints = sorted(_attrs(k, vocab))
                    key = (mod_name, k.fn.__name__, tuple(sorted(k.signature.items())),
                           tuple(sorted((n, repr(v)) for n, v in k.constexprs.items())),
                           k.num_warps, k.num_stages, tuple(hints))
                    for arch in archs:
                        entry = table.get((key, arch))
                        if entry is None:
                            entry = (k, vocab, Row(mod_name, k.name, arch, dtype, [],
                                                   _config_label(k)))
                            table[(key, arch)] = entry
                        if vocab not in entry[2].vocabs:
                            entry[2].vocabs.append(vocab)
    return list(table.values())


_ENTRIES: list = []  # what the forked workers compile, by index (JITFunctions don't pickle)


def _compile_entry(args) -> tuple:
    """(registers, stack, shared, local, error) of _ENTRIES[i]; runs in a worker."""
    i, tmp = args
    k, vocab, row = _ENTRIES[i]
    try:
        cubin, dyn_shared = compile_kernel(k, row.arch, vocab, Path(tmp))
        reg, stack, static_shared, local = resource_usage(cubin)
        return reg, stack, static_shared + dyn_shared, local, ""
    except Exception as e:  # report every failure, keep compiling the others
        return -1, -1, -1, -1, f"{type(e).__name__}: {(str(e) or ' ').splitlines()[0]}"


def run(archs, vocabs, dtypes, modules=MODULES, log=print, jobs: int = 1) -> list[Row]:
    """Compile every distinct configuration; `jobs` > 1 compiles in forked processes."""
    _ENTRIES[:] = collect(archs, vocabs, dtypes, modules, log)
    with tempfile.TemporaryDirectory(prefix="kdkernels-aot-") as tmp:
        work = [(i, tmp) for i in range(len(_ENTRIES))]
        if jobs > 1 and len(work) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                results = list(pool.map(_compile_entry, work, chunksize=4))
        else:
            results = [_compile_entry(w) for w in work]
    rows = []
    for (_, _, row), (reg, stack, shared, local, error) in zip(_ENTRIES, results, strict=True):
        row.registers, row.stack, row.shared, row.local, row.error = (
            reg, stack, shared, local, error)
        rows.append(row)
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "arch", "dtype", "V", "BLOCK/num_warps", "regs", "STACK", "LOCAL",
            "spill", "shared")
    body = []
    for r in rows:
        vs = sorted(r.vocabs)
        v = ",".join(map(str, vs)) if len(vs) <= 4 else f"{vs[0]}..{vs[-1]} ({len(vs)} V)"
        if r.error:
            body.append((f"{r.module}.{r.kernel}", f"sm_{r.arch}", r.dtype, v, r.config,
                         "ERROR", r.error, "", "", ""))
        else:
            body.append((f"{r.module}.{r.kernel}", f"sm_{r.arch}", r.dtype, v, r.config,
                         str(r.registers), str(r.stack), str(r.local), str(r.spill),
                         str(r.shared)))
    return text_table(head, body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdkernels.triton.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    p.add_argument("--vocab", type=int, nargs="+", default=list(DEFAULT_VOCABS))
    p.add_argument("--dtype", nargs="+", default=list(DEFAULT_DTYPES),
                   choices=("bf16", "fp16", "fp32"))
    p.add_argument("--module", nargs="+", default=list(MODULES), choices=MODULES,
                   help="kernel modules to compile (default: all)")
    p.add_argument("--fail-on-spill", action="store_true",
                   help="exit 1 when any kernel spills (STACK + LOCAL bytes > 0)")
    p.add_argument("--csv", type=Path, help="also write the table as CSV")
    p.add_argument("--every-block", action="store_true",
                   help="add V = 1, 2, 4, ..., 2**18 to --vocab: every power-of-two bucket, "
                   "so every BLOCK a launcher can pick for V up to 262144 is compiled "
                   "(many more kernels for kd.py)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="compile in this many processes (default: the CPU count)")
    args = p.parse_args(argv)
    if any(v <= 0 for v in args.vocab):
        p.error("--vocab values must be positive")
    if args.every_block:
        args.vocab = sorted(set(args.vocab) | {2**k for k in range(19)})

    if os.environ.get("TRITON_INTERPRET") == "1":
        # kernels decorated under the interpreter cannot be compiled: run in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "kdkernels.triton.aot",
               *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode

    rows = run(args.arch, args.vocab, args.dtype, tuple(args.module), jobs=max(1, args.jobs))
    print(format_table(rows))
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["module", "kernel", "arch", "dtype", "vocabs", "config", "registers",
                        "stack", "local", "spill", "shared", "error"])
            for r in rows:
                w.writerow([r.module, r.kernel, r.arch, r.dtype,
                            " ".join(map(str, r.vocabs)), r.config, r.registers, r.stack,
                            r.local, r.spill, r.shared, r.error])
    errors = [r for r in rows if r.error]
    spills = [r for r in rows if not r.error and r.spill > 0]
    print(f"\n{len(rows)} kernels compiled, {len(errors)} failed, {len(spills)} with spills")
    if errors:
        return 2
    if spills and args.fail_on_spill:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
