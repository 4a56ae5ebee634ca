"""The CUDA library compiles for sm_80 and sm_90, links against torch's CUDA build, and no
kernel spills registers (ptxas -v). This is how CI proves kd_cuda.cu without a GPU: the
build runs in a subprocess (`python -m kdkernels.ext --cuda --check-spills`), which exits
non-zero on a build error or on any spill. Skipped only where nvcc or a CUDA build of torch
is absent (CI has both)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdkernels import ext, ext_build


def test_cuda_library_builds_without_spills():
    if torch.version.cuda is None:
        pytest.skip("torch has no CUDA support")
    if ext_build.find_cuda_home() is None:
        pytest.skip("nvcc not found")
    env = dict(os.environ)
    env.pop("KDKERNELS_SKIP_CUDA_BUILD", None)
    r = subprocess.run([sys.executable, "-m", "kdkernels.ext", "--cuda", "--check-spills"],
                       capture_output=True, text=True, timeout=1800, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"CUDA build failed or spilled:\n{out[-6000:]}"
    report = [line for line in r.stdout.splitlines() if "regs=" in line]
    for arch in ("sm_80", "sm_90"):
        assert any(line.startswith(arch) for line in report), f"no {arch} kernels:\n{out}"
    for kernel in ("kd_stats_kernel", "kd_grad_kernel", "kd_mix_kernel", "softmax_kernel"):
        assert any(kernel in line for line in report), f"{kernel} missing:\n{out}"
    assert not any("SPILL" in line for line in report)
    # the library embeds compute_90 PTX besides the machine code: GPUs newer than sm_90 run it
    folder = re.search(r"^cuda: built/loaded in .* s \((.+?), CUDA_HOME=", r.stdout, re.M)
    assert folder, out
    ninja = (Path(folder.group(1)) / "build.ninja").read_text()
    assert "arch=compute_90,code=compute_90" in ninja
    for arch in ext_build.CUDA_ARCHS:
        assert f"arch=compute_{arch},code=sm_{arch}" in ninja


def test_cuda_flags_embed_ptx_of_the_newest_target():
    flags = ext_build.cuda_flags()
    newest = ext_build.CUDA_ARCHS[-1]
    assert f"-gencode=arch=compute_{newest},code=compute_{newest}" in flags
    assert sum("code=compute_" in f for f in flags) == 1


def test_older_gpu_is_reported_unavailable(monkeypatch):
    # a GPU below sm_80 runs neither the machine code nor the PTX: is_available says why,
    # so impl="auto" picks another implementation (nothing is built or launched)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=None: "Tesla T4")
    monkeypatch.setattr(ext, "_warned", True)
    ok, why = ext.is_available(torch.device("cuda", 0))
    assert not ok
    assert "compute capability >= 8.0" in why and "7.5" in why and "Tesla T4" in why


def test_ptxas_report_parser():
    log = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers\n"
    )
    (rec,) = ext_build.parse_ptxas(log)
    assert rec == {"kernel": "_Z3fooPf", "arch": "sm_90", "registers": 40, "stack": 0,
                   "spill_stores": 8, "spill_loads": 4}


_USE_EXT = """
import torch, kdkernels as kd
s, t = torch.randn(4, 33, dtype=torch.float64), torch.randn(4, 33, dtype=torch.float64)
got = kd.kd_loss(s, t, impl="ext", reduction="none")
want = kd.kd_loss(s, t, impl="torch", reduction="none")
torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
from kdkernels import ext_build
print("LIB", next(ext_build._cache_dir("cpu", ext_build.CPU_SOURCES, [])
                  .parent.glob("cpu-*/kdkernels_cpu.so")))
"""


def test_damaged_cache_is_rebuilt(tmp_path):
    """A cached library cut to half its size (a full disk, a killed copy) is detected by its
    stamp and linked again: the next process gives the right numbers instead of dying with
    SIGBUS when the library is loaded. A library without a stamp is linked again too."""
    env = dict(os.environ, KDKERNELS_CACHE_DIR=str(tmp_path), KDKERNELS_SKIP_CUDA_BUILD="1")

    def use_ext():
        r = subprocess.run([sys.executable, "-c", _USE_EXT], capture_output=True, text=True,
                           timeout=900, env=env)
        assert r.returncode == 0, f"rc {r.returncode}:\n{r.stderr[-3000:]}"
        return Path(re.search(r"^LIB (.+)$", r.stdout, re.M).group(1))

    lib = use_ext()
    stamp = lib.parent / ext_build.STAMP
    assert stamp.read_text() == ext_build._digest(lib)
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 2])
    use_ext()
    assert stamp.read_text() == ext_build._digest(lib)
    stamp.unlink()
    use_ext()
    assert stamp.read_text() == ext_build._digest(lib)
