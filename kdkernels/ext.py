"""C++/CUDA extension backend (impl="ext"): builds csrc/ on first use and registers its ops.

Two libraries, built with torch.utils.cpp_extension + ninja into a cache outside the source
tree (~/.cache/kdkernels/<torch version>-<hash of sources and flags>, or
$KDKERNELS_CACHE_DIR):

    kdkernels_cpu   csrc/kd_cpu.cpp: TORCH_LIBRARY(kdkernels) schemas + CPU kernels. Built
                    whenever a C++ compiler is present; vectorized for the CPU capability
                    ATen reports on this machine (AVX512 / AVX2 / none), which is part of
                    the cache key, so a library is never run on a CPU it was not built for.
    kdkernels_cuda  csrc/kd_cuda.cu: TORCH_LIBRARY_IMPL(kdkernels, CUDA) kernels: machine code
                    for sm_80 and sm_90 plus compute_90 PTX, which the driver compiles for
                    newer GPUs. GPUs older than sm_80 cannot run it (is_available says so).
                    Built when torch has CUDA, nvcc is found and KDKERNELS_SKIP_CUDA_BUILD is
                    unset; loaded when a CUDA tensor needs it.

Ops (torch.ops.kdkernels.*; fake and autograd registrations below):

    kd_forward(s, t, labels, <spec>) -> (row losses (N,), stats (N, NSTAT))
    kd_partial(s, t, labels, <spec>, offset) -> stats (N, NSTAT) of a column range
    kd_mix_partial(s, t, stats, <spec>, offset) -> the mixture's pass-2 sums (N, 4)
    kd_backward(grad_loss, s, t, labels, stats, <spec>, offset, need_teacher)
        -> (grad_s, grad_t) of a column range
    kd_fused_(s!, t, labels, <spec>, need_teacher) -> (row losses, grad_t)  [s <- grad_s]
    kl_div / kl_div_sum / kl_div_backward, softmax / softmax_backward

<spec> is the LossSpec as primitives (LossSpec.as_args()): kind, mix, coef_p, coef_q, inv_ts,
inv_tt, kd_scale, ce_weight, ignore_index. stats is the table of kdkernels/_stats.py (columns
Col, mirrored in csrc/kd_layout.h); partial / mix_partial / grads below are this backend's
side of its interface. A build failure makes is_available() return (False, message) and
warns once; impl="auto" then falls back to the PyTorch path.

CLI: python -m kdkernels.ext [--cuda] [--check-spills] builds the libraries, prints the
register/spill lines of every CUDA kernel (ptxas -v) and exits non-zero on a build error or
on any spill.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from ._spec import LossSpec
from ._stats import NCOL
from .reference import scale_rows_

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
HEADERS = ("kd_math.h", "kd_layout.h", "kd_checks.h")
CPU_SOURCES = ("kd_cpu.cpp", *HEADERS)
CUDA_SOURCES = ("kd_cuda.cu", *HEADERS)
CUDA_ARCHS = ("80", "90")  # machine code; PTX of the last one too (see _cuda_flags)
MIN_CAPABILITY = (8, 0)  # the oldest GPU the machine code or the PTX runs on
NSTAT = NCOL  # columns of the ops' stats (csrc/kd_layout.h: enum Stat)

_lock = threading.RLock()
_status: dict[str, tuple[bool, str] | None] = {"cpu": None, "cuda": None}
_warned = False
_registered = False


# --------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------


def _cpu_capability_flags() -> list[str]:
    """Flags that give at::vec::Vectorized the widest path this CPU runs (as ATen decides:
    torch.backends.cpu.get_cpu_capability(), which honours ATEN_CPU_CAPABILITY)."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    if cap == "AVX512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if cap == "AVX2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _cache_dir(kind: str, sources, flags) -> Path:
    h = hashlib.sha256()
    for name in sources:
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(sys.version.encode())
    root = Path(os.environ.get("KDKERNELS_CACHE_DIR") or Path.home() / ".cache" / "kdkernels")
    d = root / f"{kind}-{torch.__version__}-{h.hexdigest()[:16]}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder (holding bin/nvcc, include/, lib64/), or None.

    torch guesses CUDA_HOME from nvcc's place on PATH, which is wrong when PATH holds a
    symlink (e.g. /usr/local/bin/nvcc -> .../cuda-13.0/bin/nvcc). nvcc itself knows: its
    --dryrun output prints TOP=<toolkit>.
    """
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    if shutil.which("nvcc"):
        candidates.append(Path(shutil.which("nvcc")))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for nvcc in candidates:
        if not nvcc.exists():
            continue
        try:
            out = subprocess.run([str(nvcc), "--dryrun", "-c", "x.cu"], capture_output=True,
                                 text=True, timeout=60, cwd=tempfile.gettempdir())
        except (OSError, subprocess.SubprocessError):
            continue
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        top = Path(m.group(1).strip()).resolve() if m else nvcc.resolve().parent.parent
        if (top / "include" / "cuda_runtime.h").exists():
            return str(top)
    return None


def _build(kind: str, verbose: bool = False, ptxas_verbose: bool = False) -> Path:
    """Build (or reuse) and load library `kind` ("cpu" or "cuda"); returns its build dir."""
    if torch.version.cuda is not None and "CUDA_HOME" not in os.environ:
        # torch.utils.cpp_extension guesses CUDA_HOME when imported (and warns when the
        # guess has no runtime); give it the toolkit nvcc reports instead
        home = find_cuda_home()
        if home is not None:
            os.environ["CUDA_HOME"] = home
    # cpp_extension logs a CUDA_HOME notice when imported on a machine without a GPU
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)

    if kind == "cpu":
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH; set CXX)")
        # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds (inline in the headers);
        # without it the rows run on one thread. The library then needs libgomp.so.1, the
        # one torch has loaded already (torch/lib), so a single OpenMP runtime serves both.
        flags = ["-O3", "-DNDEBUG", "-fopenmp", *_cpu_capability_flags()]
        d = _cache_dir("cpu", CPU_SOURCES, flags)
        cpp_extension.load(name="kdkernels_cpu", sources=[str(CSRC / "kd_cpu.cpp")],
                           extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           extra_include_paths=[str(CSRC)],
                           build_directory=str(d), is_python_module=False, verbose=verbose,
                           with_cuda=False)
        return d
    if torch.version.cuda is None:
        raise RuntimeError("this torch build has no CUDA support")
    home = find_cuda_home()
    if home is None:
        raise RuntimeError("nvcc was not found (set CUDA_HOME to the CUDA toolkit folder)")
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home  # read at call time; torch may have guessed another one
    flags = _cuda_flags(ptxas_verbose)
    d = _cache_dir("cuda", CUDA_SOURCES, flags)
    cpp_extension.load(name="kdkernels_cuda", sources=[str(CSRC / "kd_cuda.cu")],
                       extra_cflags=["-O3", "-DNDEBUG"], extra_cuda_cflags=flags,
                       extra_include_paths=[str(CSRC)], build_directory=str(d),
                       is_python_module=False, verbose=verbose, with_cuda=True)
    return d


def _cuda_flags(ptxas_verbose: bool = False) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    # PTX of the newest target: a GPU newer than every sm_ listed JIT-compiles it (without
    # it, every launch there fails with "no kernel image")
    newest = CUDA_ARCHS[-1]
    gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    flags = ["-O3", "-DNDEBUG", "-lineinfo", *gencode]
    if ptxas_verbose:
        flags += ["-Xptxas", "-v"]
    return flags


def _device_supported(device: torch.device) -> tuple[bool, str]:
    """Whether the CUDA library has code this GPU runs (machine code or PTX it can JIT)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(idx)
    if cap < MIN_CAPABILITY:
        return False, (f"the kdkernels CUDA library needs a GPU of compute capability >= "
                       f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, cuda:{idx} "
                       f"({torch.cuda.get_device_name(idx)}) is {cap[0]}.{cap[1]}")
    return True, ""


def _ensure(kind: str) -> tuple[bool, str]:
    """Build/load library `kind` once per process; (ok, why not)."""
    with _lock:
        if _status[kind] is None:
            if kind == "cuda":
                ok, why = _ensure("cpu")  # the schemas live in the CPU library
                if not ok:
                    _status[kind] = (False, why)
                    return _status[kind]
                if os.environ.get("KDKERNELS_SKIP_CUDA_BUILD"):
                    _status[kind] = (False, "the CUDA library is not built "
                                            "(KDKERNELS_SKIP_CUDA_BUILD is set)")
                    return _status[kind]
            try:
                _build(kind)
                if kind == "cpu":
                    _register()
                _status[kind] = (True, "")
            except Exception as e:  # compiler missing, build or load error
                msg = str(e).strip()
                if len(msg) > 4000:
                    msg = msg[:2000] + "\n...\n" + msg[-2000:]
                _status[kind] = (False, f"the kdkernels {kind.upper()} extension could not be "
                                        f"built or loaded: {msg}")
        return _status[kind]


def is_available(device: torch.device) -> tuple[bool, str]:
    global _warned
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return False, f"the extension has kernels for cpu and cuda, not {device.type}"
    if device.type == "cuda":
        ok, why = _device_supported(device)
        if ok:
            ok, why = _ensure("cuda")
    else:
        ok, why = _ensure("cpu")
    if not ok and not _warned:
        _warned = True
        warnings.warn(f"kdkernels: {why}\nimpl='auto' falls back to another implementation.",
                      RuntimeWarning, stacklevel=3)
    return ok, why


def _require(device: torch.device) -> None:
    if torch.compiler.is_compiling():  # availability was settled when the impl was resolved
        return
    ok, why = is_available(device)
    if not ok:
        raise RuntimeError(why)


def supported_dtypes(device: torch.device) -> tuple:
    """The CUDA kernels compute in float32, so float64 is a CPU-only dtype here: float64
    CUDA logits get a clear error with impl="ext" (impl="auto" sends them to "torch")."""
    if device.type == "cuda":
        return tuple(d for d in SUPPORTED_DTYPES if d != torch.float64)
    return SUPPORTED_DTYPES


# --------------------------------------------------------------------------------------
# fake (meta) kernels and autograd
# --------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kd_forward_fake(s, t, labels, *spec):
    n = s.shape[0]
    acc = _acc(s.dtype)
    return s.new_empty((n,), dtype=acc), s.new_empty((n, NSTAT), dtype=acc)


def _kd_partial_fake(s, t, labels, *spec_and_offset):
    return s.new_empty((s.shape[0], NSTAT), dtype=_acc(s.dtype))


def _kd_mix_partial_fake(s, t, stats, *spec_and_offset):
    return s.new_empty((s.shape[0], 4), dtype=_acc(s.dtype))


def _kd_backward_fake(grad_loss, s, t, labels, stats, *spec_and_need):
    need_teacher = spec_and_need[-1]
    return torch.empty_like(s), (torch.empty_like(t) if need_teacher else t.new_empty((0,)))


def _kd_fused_fake(s, t, labels, *spec_and_need):
    need_teacher = spec_and_need[-1]
    loss = s.new_empty((s.shape[0],), dtype=_acc(s.dtype))
    return loss, (torch.empty_like(t) if need_teacher else t.new_empty((0,)))


def _kd_setup(ctx, inputs, output):
    s, t, labels, *spec = inputs
    ctx.spec = spec
    ctx.save_for_backward(s, t, labels, output[1])


def _kd_backward(ctx, grad_loss, grad_stats):
    s, t, labels, stats = ctx.saved_tensors
    need_t = ctx.needs_input_grad[1]
    if grad_loss is None:
        grad_loss = stats.new_zeros((s.shape[0],))
    gs, gt = torch.ops.kdkernels.kd_backward(grad_loss, s, t, labels, stats, *ctx.spec, 0,
                                             need_t)
    return (gs, gt if need_t else None, None) + (None,) * len(ctx.spec)


def _kl_div_fake(x, y, log_target):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype))


def _kl_div_sum_fake(x, y, log_target):
    return x.new_empty((), dtype=_acc(torch.promote_types(x.dtype, y.dtype)))


def _kl_div_backward_fake(grad, x, y, log_target, need_x, need_y):
    return (torch.empty_like(x) if need_x else x.new_empty((0,)),
            torch.empty_like(y) if need_y else y.new_empty((0,)))


def _kl_setup(ctx, inputs, output):
    x, y, log_target = inputs
    ctx.log_target = log_target
    ctx.save_for_backward(x, y)


def _kl_backward(ctx, grad):
    x, y = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[:2]
    gx, gy = torch.ops.kdkernels.kl_div_backward(grad, x, y, ctx.log_target, need_x, need_y)
    return (gx if need_x else None), (gy if need_y else None), None


def _softmax_fake(x, inv_t, log):
    return torch.empty_like(x)


def _softmax_backward_fake(grad, y, inv_t, log):
    return torch.empty_like(y)


def _softmax_setup(ctx, inputs, output):
    _, ctx.inv_t, ctx.log = inputs
    ctx.save_for_backward(output)


def _softmax_bwd(ctx, grad):
    (y,) = ctx.saved_tensors
    return torch.ops.kdkernels.softmax_backward(grad, y, ctx.inv_t, ctx.log), None, None


def _register() -> None:
    global _registered
    if _registered:
        return
    lib = torch.library
    lib.register_fake("kdkernels::kd_forward", _kd_forward_fake)
    lib.register_fake("kdkernels::kd_partial", _kd_partial_fake)
    lib.register_fake("kdkernels::kd_mix_partial", _kd_mix_partial_fake)
    lib.register_fake("kdkernels::kd_backward", _kd_backward_fake)
    lib.register_fake("kdkernels::kd_fused_", _kd_fused_fake)
    lib.register_fake("kdkernels::kl_div", _kl_div_fake)
    lib.register_fake("kdkernels::kl_div_sum", _kl_div_sum_fake)
    lib.register_fake("kdkernels::kl_div_backward", _kl_div_backward_fake)
    lib.register_fake("kdkernels::softmax", _softmax_fake)
    lib.register_fake("kdkernels::softmax_backward", _softmax_backward_fake)
    lib.register_autograd("kdkernels::kd_forward", _kd_backward, setup_context=_kd_setup)
    lib.register_autograd("kdkernels::kl_div", _kl_backward, setup_context=_kl_setup)
    lib.register_autograd("kdkernels::kl_div_sum", _kl_backward, setup_context=_kl_setup)
    lib.register_autograd("kdkernels::softmax", _softmax_bwd, setup_context=_softmax_setup)
    _registered = True


# --------------------------------------------------------------------------------------
# backend interface (see kdkernels/_dispatch.py)
# --------------------------------------------------------------------------------------


class _FusedRows(torch.autograd.Function):
    """inplace_backward: the gradient (upstream gradient 1) is computed in the forward and
    written over s; backward only rescales it by the row gradients."""

    @staticmethod
    def forward(ctx, s, t, labels, args):
        need_t = ctx.needs_input_grad[1]
        loss, gt = torch.ops.kdkernels.kd_fused_(s, t, labels, *args, need_t)
        ctx.grads = (s, gt if need_t else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_s, grad_t = scale_rows_(grad_loss, *ctx.grads)
        del ctx.grads
        return grad_s, grad_t, None, None


def kd_rows(s, t, labels, spec: LossSpec, inplace_backward: bool = False):
    _require(s.device)
    args = spec.as_args()
    if inplace_backward:
        return _FusedRows.apply(s, t, labels, args)
    loss, _ = torch.ops.kdkernels.kd_forward(s, t, labels, *args)
    return loss


def partial(s, t, labels, spec: LossSpec, offset: int = 0) -> torch.Tensor:
    """Statistics (N, NSTAT) of the columns [offset, offset + Vr) of rows: s, t (N, Vr),
    labels (N,) GLOBAL ids or None (kdkernels/_stats.py)."""
    _require(s.device)
    return torch.ops.kdkernels.kd_partial(s.contiguous(), t.contiguous(), _labels(labels),
                                          *spec.as_args(), int(offset))


def mix_partial(s, t, spec: LossSpec, stats, offset: int = 0) -> torch.Tensor:
    """The mixture's pass-2 sums (N, 4) = (A, B, Uq, Up) over the columns [offset,
    offset + Vr), given the rows' GLOBAL (merged) statistics. For jsd (u = 1) Uq and Up are
    the range's sums of q and p, so the ranges of a row add up to 1."""
    _require(s.device)
    return torch.ops.kdkernels.kd_mix_partial(s.contiguous(), t.contiguous(),
                                              stats.contiguous(), *spec.as_args(), int(offset))


def grads(s, t, labels, spec: LossSpec, stats, offset: int, grad_rows, need_teacher: bool):
    """(grad_s, grad_t or None) of the columns [offset, offset + Vr) given the rows' GLOBAL
    finished statistics (DIV set), times grad_rows (N,); ignored rows get 0."""
    _require(s.device)
    gs, gt = torch.ops.kdkernels.kd_backward(grad_rows, s.contiguous(), t.contiguous(),
                                             _labels(labels), stats.contiguous(),
                                             *spec.as_args(), int(offset), bool(need_teacher))
    return gs, (gt if need_teacher else None)


def _labels(labels):
    return None if labels is None else labels.contiguous()


def kl_div(x, y, log_target: bool, reduce_sum: bool):
    _require(x.device)
    x, y = x.contiguous(), y.contiguous()
    if reduce_sum:
        return torch.ops.kdkernels.kl_div_sum(x, y, bool(log_target))
    return torch.ops.kdkernels.kl_div(x, y, bool(log_target))


def softmax(x, inv_temperature: float, log: bool):
    _require(x.device)
    return torch.ops.kdkernels.softmax(x.contiguous(), float(inv_temperature), bool(log))


# --------------------------------------------------------------------------------------
# CLI: build, report registers / spills
# --------------------------------------------------------------------------------------

_PTXAS_FN = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> list[dict]:
    """One record per (kernel, arch) from `ptxas -v` output."""
    out, cur = [], None
    for line in log.splitlines():
        m = _PTXAS_FN.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": None,
                   "stack": 0, "spill_stores": 0, "spill_loads": 0}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _PTXAS_REGS.search(line)
        if m:
            cur["registers"] = int(m.group(1))
    return out


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = r.stdout.splitlines()
    return lines if len(lines) == len(names) else names


def _build_capturing(kind: str, ptxas_verbose: bool) -> tuple[Path, str]:
    """Build with the compiler's output captured at the file-descriptor level."""
    with tempfile.TemporaryFile(mode="w+b") as f:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        err = None
        try:
            d = _build(kind, verbose=True, ptxas_verbose=ptxas_verbose)
        except Exception as e:
            err = e
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        f.seek(0)
        log = f.read().decode(errors="replace")
    if err is not None:
        raise RuntimeError(f"{err}\n--- build log ---\n{log}")
    return d, log


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdkernels.ext", description=__doc__.split("\n")[0])
    ap.add_argument("--cuda", action="store_true", help="also build the CUDA library")
    ap.add_argument("--check-spills", action="store_true",
                    help="build the CUDA part with ptxas -v; fail on any register spill")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        d, _ = _build_capturing("cpu", False)
        _register()
    except Exception as e:
        print(f"kdkernels: CPU library build FAILED:\n{e}", file=sys.stderr)
        return 1
    print(f"cpu: built/loaded in {time.perf_counter() - t0:.1f} s ({d})")
    if not (a.cuda or a.check_spills):
        return 0
    t0 = time.perf_counter()
    try:
        d, log = _build_capturing("cuda", a.check_spills)
    except Exception as e:
        print(f"kdkernels: CUDA library build FAILED:\n{e}", file=sys.stderr)
        return 1
    print(f"cuda: built/loaded in {time.perf_counter() - t0:.1f} s ({d}, "
          f"CUDA_HOME={os.environ.get('CUDA_HOME')})")
    if not a.check_spills:
        return 0
    saved = d / "ptxas.log"
    recs = parse_ptxas(log)
    if recs:
        saved.write_text(log)
    elif saved.exists():  # nothing was recompiled: the report of the build that made it
        recs = parse_ptxas(saved.read_text())
    if not recs:
        print("kdkernels: no ptxas report found (delete the build folder to rebuild): "
              f"{d}", file=sys.stderr)
        return 1
    names = _demangle([r["kernel"] for r in recs])
    bad = 0
    for r, name in zip(recs, names, strict=True):
        spill = r["spill_stores"] + r["spill_loads"]
        bad += spill > 0
        print(f"{r['arch']}  regs={r['registers']:>3}  stack={r['stack']:>4}  "
              f"spill_stores={r['spill_stores']}  spill_loads={r['spill_loads']}  "
              f"{'SPILL ' if spill else ''}{name}")
    print(f"{len(recs)} kernel builds, {bad} with spills")
    return 1 if bad else 0


if __name__ == "__main__":
    # run the package's module (kdkernels imports it), not a second copy of its state
    from kdkernels import ext as _ext

    sys.exit(_ext.main())
