"""Every bad input of DESIGN.md §3 raises the documented error type, with a message that names
the argument, before any work: the backend is replaced by one that fails the test if it is
ever asked to compute.
"""

import math
import types

import pytest
import torch
from _device import DEVICE

import kdkernels as kd
from kdkernels import _dispatch


@pytest.fixture
def no_work(monkeypatch):
    """Replace every backend by one that fails loudly if a kernel is called."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a backend was asked to compute before the input was validated")

    fake = types.SimpleNamespace(
        SUPPORTED_DTYPES=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        is_available=lambda device: (True, ""),
        kd_rows=forbidden, kl_div=forbidden, softmax=forbidden,
    )
    for name in _dispatch._BACKENDS:
        monkeypatch.setitem(_dispatch._BACKENDS, name, fake)
    monkeypatch.delenv("KDKERNELS_IMPL", raising=False)


S = torch.randn(2, 3, 10)
T = torch.randn(2, 3, 10)
LABELS = torch.tensor([[1, 2, 3], [4, 5, -100]])
META = torch.empty(2, 3, 10, device="meta")

# (name, args, kwargs, error type, message pattern naming the argument)
KD_LOSS_CASES = [
    ("shape", (S, torch.randn(3, 2, 10)), {}, ValueError,
     r"student_logits and teacher_logits must have the same shape.*\(2, 3, 10\).*\(3, 2, 10\)"),
    ("vocab", (torch.randn(4, 10), torch.randn(4, 11)), {}, ValueError,
     r"same shape.*\(4, 10\).*\(4, 11\)"),
    ("int-student", (S.long(), T), {}, TypeError, r"student_logits must be a floating"),
    ("int-teacher", (S, T.int()), {}, TypeError, r"teacher_logits must be a floating"),
    ("bool-student", (S > 0, T), {}, TypeError, r"student_logits"),
    ("list-student", (S.tolist(), T), {}, TypeError, r"student_logits must be a torch.Tensor"),
    ("0d", (torch.tensor(1.0), torch.tensor(1.0)), {}, ValueError, r"student_logits"),
    ("empty-vocab", (torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, r"student_logits"),
    ("labels-shape", (S, T, torch.zeros(6, dtype=torch.long)), {}, ValueError,
     r"labels must have shape.*\(2, 3\).*\(6,\)"),
    ("labels-float", (S, T, LABELS.float()), {}, TypeError, r"labels must be an integer"),
    ("labels-list", (S, T, [[1, 2, 3], [4, 5, 6]]), {}, TypeError, r"labels must be a"),
    ("labels-too-big", (S, T, torch.tensor([[1, 2, 10], [4, 5, 6]])), {}, ValueError,
     r"labels must be in \[0, 10\).*10"),
    ("labels-negative", (S, T, torch.tensor([[1, 2, -1], [4, 5, 6]])), {}, ValueError,
     r"labels must be in \[0, 10\).*-1"),
    ("labels-other-ignore", (S, T, LABELS), {"ignore_index": -1}, ValueError,
     r"labels must be in .*ignore_index=-1.*-100"),
    ("teacher-device", (S, META), {}, ValueError, r"same device.*cpu.*meta"),
    ("labels-device", (S, T, LABELS.to("meta")), {}, ValueError, r"labels must be on"),
    ("ce-without-labels", (S, T), {"ce_weight": 0.5}, ValueError, r"ce_weight.*labels"),
    ("divergence", (S, T), {"divergence": "kl"}, ValueError, r"divergence must be one of"),
    ("reduction", (S, T), {"reduction": "avg"}, ValueError, r"reduction must be one of"),
    ("impl", (S, T), {"impl": "cuda"}, ValueError, r"impl must be one of"),
    ("kd_weight-nan", (S, T), {"kd_weight": math.nan}, ValueError, r"kd_weight"),
    ("ce_weight-inf", (S, T, LABELS), {"ce_weight": math.inf}, ValueError, r"ce_weight"),
    ("ignore_index-float", (S, T, LABELS), {"ignore_index": -100.0}, TypeError,
     r"ignore_index must be an int"),
]
for value in (0.0, -1.0, math.nan, math.inf):
    KD_LOSS_CASES.append(
        (f"temperature={value}", (S, T), {"temperature": value}, ValueError, r"temperature")
    )
    KD_LOSS_CASES.append(
        (f"teacher_temperature={value}", (S, T), {"teacher_temperature": value}, ValueError,
         r"teacher_temperature")
    )
KD_LOSS_CASES.append(("temperature-str", (S, T), {"temperature": "2"}, TypeError,
                      r"temperature"))
for name in ("beta", "skew"):
    for value in (-0.1, 1.1, math.nan):
        KD_LOSS_CASES.append((f"{name}={value}", (S, T), {name: value}, ValueError,
                              rf"{name} must be in \[0, 1\]"))


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [c[1:] for c in KD_LOSS_CASES],
    ids=[c[0] for c in KD_LOSS_CASES],
)
def test_kd_loss_errors(no_work, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        kd.kd_loss(*args, **kwargs)


def test_kd_loss_errors_module(no_work):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        kd.KDLoss(divergence="jsd", beta=2.0)(S, T)


def test_inplace_backward_needs_contiguous_student(no_work):
    s = torch.randn(10, 6).t()
    with pytest.raises(ValueError, match=r"inplace_backward"):
        kd.kd_loss(s, s.contiguous(), inplace_backward=True)


def test_bad_environment_impl(no_work, monkeypatch):
    monkeypatch.setenv("KDKERNELS_IMPL", "fastest")
    with pytest.raises(ValueError, match=r"KDKERNELS_IMPL must be one of"):
        kd.kd_loss(S, T)


# --------------------------------------------------------------------------------------
# an impl that cannot run here is an error, never a silent fallback
# --------------------------------------------------------------------------------------


def test_impl_without_the_dtype():
    backend = _dispatch._BACKENDS["triton"]
    assert torch.float64 not in backend.SUPPORTED_DTYPES
    # on the test device: CPU tensors on a CUDA machine would fail first, for want of
    # TRITON_INTERPRET (the next test)
    with pytest.raises(RuntimeError, match=r"impl='triton'.*float64"):
        kd.kd_loss(S.double().to(DEVICE), T.double().to(DEVICE), impl="triton")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"impl='triton'.*TRITON_INTERPRET"):
        kd.kd_loss(S, T, impl="triton")


# --------------------------------------------------------------------------------------
# kl_div, softmax, modules
# --------------------------------------------------------------------------------------

X = torch.randn(3, 4).log_softmax(-1)
Y = torch.rand(3, 4)
KL_DIV_CASES = [
    ("input-list", (X.tolist(), Y), {}, TypeError, r"input must be a torch.Tensor"),
    ("target-int", (X, (Y * 10).long()), {}, TypeError, r"target must be a floating"),
    ("input-int", (X.long(), Y), {}, TypeError, r"input must be a floating"),
    ("reduction", (X, Y), {"reduction": "avg"}, ValueError, r"reduction must be one of"),
    ("token_mean", (X, Y), {"reduction": "token_mean"}, ValueError, r"reduction"),
    ("shapes", (X, torch.rand(3, 5)), {}, ValueError, r"broadcastable.*\(3, 4\).*\(3, 5\)"),
    ("device", (X, Y.to("meta")), {}, ValueError, r"same device"),
    ("impl", (X, Y), {"impl": "numpy"}, ValueError, r"impl must be one of"),
]


@pytest.mark.parametrize(
    "args,kwargs,error,match", [c[1:] for c in KL_DIV_CASES], ids=[c[0] for c in KL_DIV_CASES]
)
def test_kl_div_errors(no_work, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        kd.kl_div(*args, **kwargs)


SOFTMAX_CASES = [
    ("int", (torch.arange(6).reshape(2, 3),), {}, TypeError, r"x must be a floating"),
    ("0d-dim", (torch.tensor(1.0),), {"dim": 1}, ValueError, r"dim must be an int in \[-1, 1\)"),
    ("temperature", (X, 0.0), {}, ValueError, r"temperature"),
    ("temperature-nan", (X, math.nan), {}, ValueError, r"temperature"),
    ("dim", (X,), {"dim": 2}, ValueError, r"dim must be an int"),
    ("impl", (X,), {"impl": "fast"}, ValueError, r"impl must be one of"),
]


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(
    "args,kwargs,error,match", [c[1:] for c in SOFTMAX_CASES], ids=[c[0] for c in SOFTMAX_CASES]
)
def test_softmax_errors(no_work, log, args, kwargs, error, match):
    fn = kd.log_softmax if log else kd.softmax
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


def test_kdloss_unknown_kwarg():
    with pytest.raises(TypeError, match=r"unknown arguments \['temprature'\]"):
        kd.KDLoss(temprature=2.0)


def test_kldivloss_bad_reduction(no_work):
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        kd.KLDivLoss(reduction="avg")(X, Y)


def test_no_work_fixture_is_armed(no_work):
    """The guard above is real: valid input does reach the (forbidden) backend."""
    with pytest.raises(AssertionError, match="before the input was validated"):
        kd.kd_loss(S, T, LABELS)
