"""python -m kdkernels.selfcheck, run in-process: it passes on this machine, and it fails
(exit status 1, the wrong rows marked) when an implementation returns wrong numbers or
raises."""

from __future__ import annotations

import os

import pytest
import torch

from kdkernels import _dispatch, reference, selfcheck

STATUSES = ("pass", "FAIL", "skip", "n/a")
OPS = (*selfcheck.DIVERGENCES, "kl_div[none]", "kl_div[sum,log_target]", "softmax",
       "log_softmax")


def _table(out: str) -> list[tuple[str, str, str, str]]:
    """(status, impl, what, dtype) of every row of the printed table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("status  impl"))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        status, impl, what, dtype = line.split()[:4]
        assert status in STATUSES, line
        rows.append((status, impl, what, dtype))
    return rows


def test_quick_cpu_passes(capsys):
    code = selfcheck.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    rows = _table(out)
    assert code == 0, out
    assert all(status != "FAIL" for status, *_ in rows), out
    # every impl runs here (the extension's CPU kernel; Triton interpreted when this
    # session has no GPU, as tests/conftest.py sets it up)
    impls = ["torch", "ext"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        impls.append("triton")
    assert not [r for r in rows if r[0] == "n/a" and r[1] in impls], out
    passed = {(impl, what, dtype) for status, impl, what, dtype in rows if status == "pass"}
    for impl in impls:
        for dtype in ("float32", "bfloat16"):
            for op in OPS:
                grads = ("d_student", "d_teacher")
                if op.startswith("kl_div"):
                    grads = ("d_input", "d_target")
                elif op in ("softmax", "log_softmax"):
                    grads = ("d_x",)
                for what in ("value", *grads):
                    assert (impl, f"{op}.{what}", dtype) in passed, (impl, op, what, dtype)
    # Triton under the interpreter is skipped on the large shape only, and says so
    skipped = [r for r in rows if r[0] == "skip"]
    assert all(impl == "triton" for _, impl, _, _ in skipped)
    assert "TRITON_INTERPRET" in out or not skipped
    assert "checks: " in out and " 0 failed" in out


@pytest.mark.parametrize("impl", ["torch", "ext"])
def test_wrong_values_fail(impl, monkeypatch, capsys):
    # a loss off by 1e-5 relative (1.5e-4 on a row loss of 15) is outside the error model at
    # float32 and at bfloat16 (the loss is float32 for both), including the allowance for
    # the extension's approximate exp on CPU
    backend = _dispatch._BACKENDS[impl]
    kd_rows = backend.kd_rows
    monkeypatch.setattr(backend, "kd_rows", lambda *a, **k: kd_rows(*a, **k) * (1 + 1e-5))
    code = selfcheck.main(["--quick", "--device", "cpu", "--impl", impl])
    out = capsys.readouterr().out
    rows = _table(out)
    assert code == 1
    failed = {(what, dtype) for status, _, what, dtype in rows if status == "FAIL"}
    for dtype in ("float32", "bfloat16"):
        for div in selfcheck.DIVERGENCES:
            assert (f"{div}.value", dtype) in failed, out
    # the failure is localized: the ops that do not use kd_rows still pass
    assert not [w for w, _ in failed if not w.startswith(selfcheck.DIVERGENCES)], out
    assert f"FAILED: impl {impl}" in out


def test_raising_impl_fails(monkeypatch, capsys):
    def broken(x, inv_temperature, log):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(reference, "softmax", broken)
    code = selfcheck.main(["--quick", "--device", "cpu", "--impl", "torch",
                           "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 1
    failed = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert failed and all("no kernel image" in line for line in failed), out
    assert {line.split()[2] for line in failed} == {"softmax.value", "log_softmax.value"}
    assert "FAILED: impl torch" in out


def test_bad_arguments():
    with pytest.raises(SystemExit):
        selfcheck.main(["--device", "tpu"])
    with pytest.raises(SystemExit):
        selfcheck.main(["--impl", "auto"])
    with pytest.raises(SystemExit):
        selfcheck.main(["--dtype", "float64"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            selfcheck.main(["--device", "cuda"])
