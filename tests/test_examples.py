"""The examples run as a user runs them (a subprocess, from the command line) and do what
they claim: examples/distill.py's held-out distillation loss falls; examples/hf_trainer.py
(transformers.Trainer with kdkernels' loss, skipped without transformers) follows the same
loss trajectory as the F.kl_div version of its loss."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    """The checkout's kdkernels first, whether or not the package is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(*args: str, timeout: int = 240) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "distill.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_distill_loss_falls(divergence):
    out = _run("--steps", "200", "--device", "cpu", "--impl", "torch",
               "--divergence", divergence)
    m = re.search(r"loss fell from ([0-9.]+) to ([0-9.]+) .* from ([0-9.]+) to ([0-9.]+)", out)
    assert m, out
    first, last, div_first, div_last = (float(x) for x in m.groups())
    # The student learned from the teacher: the held-out divergence to it drops by a clear
    # margin (to ~0.6x for forward_kl, ~0.75x for jsd at these settings; the step-to-step
    # noise of the held-out value is ~1 %), and so does the whole loss.
    assert div_last < 0.8 * div_first, out
    assert last < first, out
    held = [float(x) for x in re.findall(r"held-out loss ([0-9.]+)", out)]
    assert len(held) >= 10 and held[-1] == pytest.approx(last, abs=1e-4), out


def test_distill_rejects_bad_flags():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "distill.py"), "--alpha", "2"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env(),
    )
    assert proc.returncode != 0 and "--alpha" in proc.stderr


# --------------------------------------------------------------------------------------
# examples/hf_trainer.py: transformers.Trainer with kdkernels' loss
# --------------------------------------------------------------------------------------


def _hf_example():
    pytest.importorskip("transformers", reason="transformers is not installed "
                        "(pip install 'kdkernels[transformers]')")
    path = ROOT / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("loss,impl", [("kdkernels", "auto"), ("kdkernels", "torch"),
                                       ("linear", "auto")])
def test_hf_trainer_matches_the_kl_div_trajectory(loss, impl):
    hf = _hf_example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order in both runs, and no idle spinning
    common = dict(steps=6, teacher_steps=10, batch=4, length=16, seed=3, progress=False)
    try:
        fused, _ = hf.train(loss=loss, impl=impl, **common)
        plain, _ = hf.train(loss="kl_div", **common)
    finally:
        torch.set_num_threads(threads)
    a, b = fused.loss_history, plain.loss_history
    assert len(a) == len(b) == 6
    # same seeds, same batches, same loss up to float32 rounding, so the same updates: the
    # trajectories agree far more closely than steps differ from each other (~1e-2 here)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
    assert min(abs(x - y) for x, y in zip(a[:-1], a[1:], strict=True)) > 5e-4, a


def test_hf_trainer_runs_from_the_command_line():
    _hf_example()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_trainer.py"), "--steps", "12",
         "--teacher-steps", "20", "--batch", "4", "--length", "16", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"loss \(kdkernels\) fell from ([0-9.]+) to ([0-9.]+) in 12 steps", proc.stdout)
    assert m, proc.stdout
    assert float(m.group(2)) < float(m.group(1)), proc.stdout
    assert "12/12" in proc.stderr, "no progress bar"  # Trainer's tqdm bar


# --------------------------------------------------------------------------------------
# examples/sparse_distill.py: a top-k teacher stored with numpy, a student trained from it
# --------------------------------------------------------------------------------------


def test_sparse_distill_learns_from_stored_topk(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sparse_distill.py"), "--steps", "40",
         "--device", "cpu", "--impl", "torch", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("inputs", "targets", "ids", "logprobs"):
        assert (tmp_path / f"{name}.npy").exists(), name
    m = re.search(r"sparse loss fell from ([0-9.]+) to ([0-9.]+); dense "
                  r"KL\(teacher \|\| student\) from ([0-9.]+) to ([0-9.]+)", proc.stdout)
    assert m, proc.stdout
    first, last, kl_first, kl_last = (float(x) for x in m.groups())
    # the student learned the teacher from its top-16 alone: the held-out sparse loss and
    # the dense KL over the whole vocabulary (never seen in training) both drop clearly
    # (to ~0.2x and ~0.45x at these settings)
    assert last < 0.5 * first, proc.stdout
    assert kl_last < 0.7 * kl_first, proc.stdout
