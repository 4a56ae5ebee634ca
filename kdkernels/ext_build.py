"""Building the kdkernels C++/CUDA libraries (csrc/) and the build CLI.

Two libraries, built with torch.utils.cpp_extension + ninja into a cache outside the source
tree (~/.cache/kdkernels/<kind>-<torch version>-<hash of sources, their folder and flags>, or
$KDKERNELS_CACHE_DIR):

    kdkernels_cpu   csrc/kd_cpu.cpp: TORCH_LIBRARY(kdkernels) schemas + CPU kernels (and
                    kd_sparse_cpu.cpp: the sparse-teacher ops, a fragment of it). Built
                    whenever a C++ compiler is present; vectorized for the CPU capability
                    ATen reports on this machine (AVX512 / AVX2 / none), which is part of
                    the cache key, so a library is never run on a CPU it was not built for.
    kdkernels_cuda  csrc/kd_cuda.cu: TORCH_LIBRARY_IMPL(kdkernels, CUDA) kernels: machine code
                    for sm_80 and sm_90 plus compute_90 PTX, which the driver compiles for
                    newer GPUs; GPUs older than sm_80 cannot run it (MIN_CAPABILITY).

kdkernels/ext.py loads them on first use (build(kind)) and registers the ops' fake and
autograd kernels.

CLI: python -m kdkernels.ext [--cuda] [--check-spills] (or python -m kdkernels.ext_build)
builds the libraries, prints the register/spill lines of every CUDA kernel (ptxas -v) and
exits non-zero on a build error or on any spill.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _find_csrc() -> Path:
    """The folder holding the C++/CUDA sources.

    An installed package (wheel or sdist) carries them as package data, kdkernels/_csrc
    (pyproject.toml maps the repository's top-level csrc/ there); a source checkout (run from
    the repository, or an editable install) has them at <repository>/csrc. cpp_extension
    compiles files, so the package data must be a real folder (not inside a zip archive).
    Never raises: build() reports a folder without sources.
    """
    try:
        packaged = importlib.resources.files("kdkernels").joinpath("_csrc")
        if packaged.is_dir():
            return Path(str(packaged)).resolve()
    except (ModuleNotFoundError, TypeError, OSError):  # pragma: no cover - unusual loaders
        pass
    return Path(__file__).resolve().parent.parent / "csrc"


def _check_sources(names) -> None:
    missing = [n for n in names if not (CSRC / n).is_file()]
    if missing:
        raise RuntimeError(
            f"kdkernels' C++ sources are missing from {CSRC} ({', '.join(missing)}): they "
            "ship in the package as kdkernels/_csrc (a source checkout has them in csrc/); "
            "reinstall kdkernels from a wheel or an sdist"
        )


CSRC = _find_csrc()
HEADERS = ("kd_math.h", "kd_layout.h", "kd_checks.h")
# the translation units of the CPU library: the dense ops, then the sparse-teacher ops
CPU_UNITS = ("kd_cpu.cpp", "kd_sparse_cpu.cpp")
CPU_SOURCES = (*CPU_UNITS, "kd_cpu_simd.h", *HEADERS)
# kd_cuda.cu includes the sparse-teacher kernels (they use its packs and reductions)
CUDA_SOURCES = ("kd_cuda.cu", "kd_sparse_cuda.cuh", *HEADERS)
CUDA_ARCHS = ("80", "90")  # machine code; PTX of the last one too (see cuda_flags)
MIN_CAPABILITY = (8, 0)  # the oldest GPU the machine code or the PTX runs on


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
    # the sources' folder too: build.ninja records absolute source paths, so two checkouts
    # (or a checkout and an installed copy) sharing one cache root would otherwise rebuild
    # each other's library on every first use
    h.update(str(CSRC).encode())
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


STAMP = "kdkernels.stamp"  # in a build folder: "<size> <sha256>" of the library built there


def _digest(lib: Path) -> str:
    h = hashlib.sha256()
    with open(lib, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{lib.stat().st_size} {h.hexdigest()}"


def _load_verified(cpp_extension, name: str, d: Path, **kwargs) -> None:
    """cpp_extension.load into build folder d, guarded against a damaged cache.

    ninja decides what to rebuild from timestamps only, so a library file that was cut short
    (a full disk, a killed copy) looks up to date, and loading it kills the process (SIGBUS).
    A stamp with the library's size and hash is written after each build and load; a library
    that does not match its stamp (or has none) is deleted first, so it is linked again. A
    file lock keeps another process from checking or stamping halfway through a build."""
    import fcntl

    lib, stamp = d / f"{name}.so", d / STAMP
    with open(d / "kdkernels.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists() and (not stamp.exists() or stamp.read_text() != _digest(lib)):
            lib.unlink()
        cpp_extension.load(name=name, build_directory=str(d), **kwargs)
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(_digest(lib))
        tmp.replace(stamp)


def build(kind: str, verbose: bool = False, ptxas_verbose: bool = False) -> Path:
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
        _check_sources(CPU_SOURCES)
        d = _cache_dir("cpu", CPU_SOURCES, flags)
        _load_verified(cpp_extension, "kdkernels_cpu", d,
                       sources=[str(CSRC / u) for u in CPU_UNITS], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)],
                       is_python_module=False, verbose=verbose, with_cuda=False)
        return d
    if torch.version.cuda is None:
        raise RuntimeError("this torch build has no CUDA support")
    home = find_cuda_home()
    if home is None:
        raise RuntimeError("nvcc was not found (set CUDA_HOME to the CUDA toolkit folder)")
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home  # read at call time; torch may have guessed another one
    flags = cuda_flags(ptxas_verbose)
    _check_sources(CUDA_SOURCES)
    d = _cache_dir("cuda", CUDA_SOURCES, flags)
    _load_verified(cpp_extension, "kdkernels_cuda", d, sources=[str(CSRC / "kd_cuda.cu")],
                   extra_cflags=["-O3", "-DNDEBUG"], extra_cuda_cflags=flags,
                   extra_include_paths=[str(CSRC)], is_python_module=False,
                   verbose=verbose, with_cuda=True)
    return d


def cuda_flags(ptxas_verbose: bool = False) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    # PTX of the newest target: a GPU newer than every sm_ listed JIT-compiles it (without
    # it, every launch there fails with "no kernel image")
    newest = CUDA_ARCHS[-1]
    gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    flags = ["-O3", "-DNDEBUG", "-lineinfo", *gencode]
    if ptxas_verbose:
        flags += ["-Xptxas", "-v"]
    return flags


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
            d = build(kind, verbose=True, ptxas_verbose=ptxas_verbose)
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
    ap = argparse.ArgumentParser(prog="python -m kdkernels.ext",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--cuda", action="store_true", help="also build the CUDA library")
    ap.add_argument("--check-spills", action="store_true",
                    help="build the CUDA part with ptxas -v; fail on any register spill")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        d, _ = _build_capturing("cpu", False)
        from . import ext  # the ops' Python registrations (ext imports this module)

        ext.register()
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
    from kdkernels import ext_build as _ext_build

    sys.exit(_ext_build.main())
