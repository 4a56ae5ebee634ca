"""The wheel and the sdist carry everything kdkernels needs at run time, the C++/CUDA sources
included (kdkernels/_csrc), and an installed wheel builds and runs the extension's CPU
kernel with no source checkout in sight.

The packages are built from a copy of the checkout's package files (so the build leaves
nothing in the checkout), without build isolation (the environment's setuptools; nothing is
downloaded). The installed test runs in a fresh virtual environment that sees this
environment's packages (torch) through a .pth file but not the checkout, from a temporary
working directory, with an empty extension cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import kdkernels

ROOT = Path(__file__).resolve().parents[1]
CSRC_FILES = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.is_file())
PACKAGE_FILES = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "kdkernels").rglob("*.py")
    if "__pycache__" not in p.parts
)


def _run(cmd, timeout=600, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path | None]:
    """{"wheel": path, "sdist": path or None}: built with `python -m build` (the wheel then
    comes from the sdist, which proves the sdist complete) or, where the `build` package is
    not installed, with `pip wheel` (no sdist)."""
    try:
        setuptools_version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        setuptools_version = "0"
    if int(setuptools_version.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools_version} is older than pyproject.toml's build "
                    "requirement (pip install 'setuptools>=77', part of the test extra)")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("kdkernels", "csrc"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    if importlib.util.find_spec("build") is not None:
        _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src])
    else:
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
              "--wheel-dir", out, src])
    wheels = list(out.glob("kdkernels-*.whl"))
    sdists = list(out.glob("kdkernels-*.tar.gz"))
    assert len(wheels) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0] if sdists else None}


def test_wheel_holds_the_package_and_its_sources(dist):
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    for rel in PACKAGE_FILES:
        assert rel in names, f"{rel} missing from the wheel"
    for name in CSRC_FILES:
        assert f"kdkernels/_csrc/{name}" in names, f"csrc/{name} missing from the wheel"
    # nothing outside the package and its metadata (no top-level csrc/ or tests/)
    stray = [n for n in names if not n.startswith(("kdkernels/", "kdkernels-"))]
    assert not stray, stray
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(dist["wheel"]).read(meta).decode()
    assert re.search(rf"^Version: {re.escape(kdkernels.__version__)}$", text, re.M), text
    requires = re.findall(r"^Requires-Dist: (.+)$", text, re.M)
    assert "torch>=2.14.1" in requires and "triton>=3.8.0" in requires, requires


def test_sdist_holds_the_sources(dist):
    if dist["sdist"] is None:
        pytest.skip("the `build` package is not installed (pip install build): no sdist")
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for rel in ["pyproject.toml", *PACKAGE_FILES, *(f"csrc/{n}" for n in CSRC_FILES)]:
        assert rel in names, f"{rel} missing from the sdist"


def test_installed_wheel_builds_and_runs_the_extension(dist, tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the extension cannot be built")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    # this environment's packages (torch, triton, numpy) without reinstalling them: a .pth
    # line only appends its folder to sys.path (the .pth files there, such as an editable
    # install's finder of the checkout, are not run), after the venv's own site-packages
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
                   .stdout.strip())
    folders = dict.fromkeys([
        *(str(Path(importlib.util.find_spec(m).origin).parents[1])
          for m in ("torch", "triton", "numpy")),
        *site.getsitepackages(),
    ])
    # none of them may hold the checkout's package (a .venv inside the checkout is fine: an
    # editable install there is only a finder module that this .pth does not run)
    assert not any((Path(f) / "kdkernels").exists() or Path(f).resolve() == ROOT
                   for f in folders), folders
    (purelib / "zz_parent_env.pth").write_text("\n".join(folders) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index",
          "--quiet", dist["wheel"]])

    script = r"""
import json, torch
import kdkernels as kd
from kdkernels import _dispatch, ext_build

torch.manual_seed(0)
s = torch.randn(7, 1031, dtype=torch.float64, requires_grad=True)
t = torch.randn(7, 1031, dtype=torch.float64)
labels = torch.tensor([3, -100, 1030, 0, 17, -100, 512])
res = {}
for impl in ("ext", "torch"):
    loss = kd.kd_loss(s, t, labels, divergence="jsd", temperature=2.0, ce_weight=0.5,
                      impl=impl)
    (grad,) = torch.autograd.grad(loss, s)
    res[impl] = (loss.item(), grad.flatten().tolist())
print(json.dumps({
    "file": kd.__file__, "csrc": str(ext_build.CSRC), "version": kd.__version__,
    "auto": _dispatch.resolve("auto", torch.device("cpu"), (torch.float32,)).__name__,
    "loss": [res["ext"][0], res["torch"][0]],
    "grad_err": max(abs(a - b) for a, b in zip(res["ext"][1], res["torch"][1])),
}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["KDKERNELS_CACHE_DIR"] = str(tmp_path / "cache")
    env.pop("KDKERNELS_IMPL", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _run([py, "-c", script], cwd=elsewhere, env=env).stdout
    r = json.loads(out.strip().splitlines()[-1])

    # the installed copy ran, with the sources it carries, not the checkout's
    assert Path(r["file"]).resolve().is_relative_to(venv.resolve()), r
    assert Path(r["csrc"]) == (purelib / "kdkernels" / "_csrc").resolve(), r
    assert r["version"] == kdkernels.__version__
    assert r["auto"] == "kdkernels.ext", "impl='auto' did not pick the extension's CPU kernel"
    ninja = next((tmp_path / "cache").glob("cpu-*/build.ninja")).read_text()
    assert str(Path(r["csrc"]) / "kd_cpu.cpp") in ninja
    assert str(ROOT / "csrc") not in ninja and str(ROOT / "kdkernels") not in ninja
    # float64: the extension and the reference agree to rounding
    ext_loss, torch_loss = r["loss"]
    assert ext_loss == pytest.approx(torch_loss, rel=1e-12, abs=1e-12)
    assert r["grad_err"] < 1e-12


def test_two_source_folders_never_share_a_build_folder(tmp_path, monkeypatch):
    # build.ninja records absolute source paths: identical sources in two folders (two
    # checkouts, or a checkout and an installed copy) get two build folders, so neither
    # rebuilds the other's library
    from kdkernels import ext_build

    monkeypatch.setenv("KDKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "other-checkout" / "csrc"
    shutil.copytree(ext_build.CSRC, copy)
    flags = ["-O3"]
    here = ext_build._cache_dir("cpu", ext_build.CPU_SOURCES, flags)
    assert ext_build._cache_dir("cpu", ext_build.CPU_SOURCES, flags) == here  # stable
    monkeypatch.setattr(ext_build, "CSRC", copy)
    assert ext_build._cache_dir("cpu", ext_build.CPU_SOURCES, flags) != here
