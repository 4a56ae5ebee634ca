"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90 (no GPU needed):
every configuration the launchers can choose compiles, and none spills registers.

The compiler runs in a subprocess without TRITON_INTERPRET (conftest.py sets it for this
process on CPU, and kernels decorated under the interpreter cannot be compiled).
"""

import csv
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("80", "90")
VOCABS = ("32000", "262144")  # the smallest and the largest real vocabulary
DTYPES = ("bf16", "fp32")
JOBS = os.cpu_count() or 1  # ~3 CPU-minutes of ptxas for every kernel (kd.py has ~650)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH")) if x)
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.csv"
    cmd = [sys.executable, "-m", "kdkernels.triton.aot", "--arch", *ARCHS, "--vocab", *VOCABS,
           "--dtype", *DTYPES, "--fail-on-spill", "--csv", str(out), "--jobs", str(JOBS)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=900)
    rows = list(csv.DictReader(out.open())) if out.exists() else []
    return proc, rows


def test_aot_compiles_without_spills(report):
    proc, rows = report
    assert proc.returncode == 0, f"aot failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert rows, proc.stdout
    for r in rows:
        assert not r["error"], r
        # registers > 0: the cuobjdump output was parsed (a broken parser cannot pass)
        assert int(r["registers"]) > 0, r
        assert int(r["spill"]) == 0 and int(r["local"]) == 0, r
    print(proc.stdout)


def test_aot_covers_every_module_arch_and_dtype(report):
    _, rows = report
    got = {(r["module"], r["arch"], r["dtype"]) for r in rows}
    for mod in ("softmax", "kl_div"):
        for arch in ARCHS:
            for dtype in DTYPES:
                assert (mod, arch, dtype) in got
    kernels = {(r["module"], r["kernel"]) for r in rows}
    for k in ("softmax_fwd", "softmax_bwd", "log_softmax_fwd", "log_softmax_bwd"):
        assert ("softmax", k) in kernels


def test_aot_includes_kd(report):
    kd = importlib.import_module("kdkernels.triton.kd")
    if not hasattr(kd, "aot_kernels"):
        pytest.skip("kdkernels/triton/kd.py has no aot_kernels(V, dtype) yet")
    _, rows = report
    kd_rows = [r for r in rows if r["module"] == "kd"]
    assert kd_rows, "kd.py lists AOT kernels but none were compiled"
    assert {r["arch"] for r in kd_rows} == set(ARCHS)


def test_aot_includes_sparse(report):
    """The sparse-teacher kernels (statistics and gradient), every label mode, both archs
    and dtypes."""
    _, rows = report
    got = {(r["kernel"].split("[")[0], r["arch"], r["dtype"]) for r in rows
           if r["module"] == "sparse"}
    for kernel in ("sparse_stats", "sparse_grad"):
        for arch in ARCHS:
            for dtype in DTYPES:
                assert (kernel, arch, dtype) in got


SPILL_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # a whole row held by one warp: BLOCK / 32 float32 values live per thread
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + cols)
    y = x - tl.max(x, 0)
    tl.store(y_ptr + cols, y / tl.sum(tl.exp(y), 0))
"""

SPILL_MAIN = """
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from spill_kernel import spill_kernel

from kdkernels.triton import aot
from kdkernels.triton._common import AotKernel

k = AotKernel("spill", spill_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
              {"BLOCK": 8192}, num_warps=1)
cubin, _ = aot.compile_kernel(k, 80, 1, Path(sys.argv[1]))
reg, stack, shared, local = aot.resource_usage(cubin)
print(reg, stack, local)
"""


def test_spill_detection_can_fail(tmp_path):
    """256 live float32 values per thread cannot fit in 255 registers: the report must show
    spill bytes for it (so a zero in the table above means something)."""
    (tmp_path / "spill_kernel.py").write_text(textwrap.dedent(SPILL_KERNEL))
    (tmp_path / "main.py").write_text(textwrap.dedent(SPILL_MAIN))
    proc = subprocess.run([sys.executable, str(tmp_path / "main.py"), str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    reg, stack, local = (int(v) for v in proc.stdout.split())
    assert reg > 0
    assert stack + local > 0, f"no spill reported (REG {reg}, STACK {stack}, LOCAL {local})"
