"""kd.kd_loss against the direct float64 formulas of tests/_formulas.py (DESIGN.md §1, §3).

Every impl goes through the public API. Values and gradients (student, and teacher when it
requires grad) are checked with the error model of _formulas.assert_error_model: the truth
is the formula in float64 on the same (already rounded) inputs, the baseline the formula at
the inputs' dtype, i.e. what plain PyTorch gives.
"""

import pytest
import torch
from _device import float64_device
from _formulas import (
    TOLERANCES,
    assert_error_model,
    check_kd_loss,
    log_softmax,
    skip_unsupported,
)

import kdkernels as kd

# tensors the tests create land on the device of the `device` fixture
pytestmark = pytest.mark.usefixtures("tensors_on_device")


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "soft_cross_entropy", "tvd", "forward_reverse_kl", "alpha_beta")
REDUCTIONS = ("none", "sum", "mean", "batchmean", "token_mean")
# (temperature, teacher_temperature): T = 1, T = 2, and a teacher at its own temperature
TEMPERATURES = {"T1": (1.0, None), "T2": (2.0, None), "Ts2-Tt0.7": (2.0, 0.7)}
# labels=None; labels with ignored rows and no CE (the rows are skipped); the same with CE
LABELS = ("no-labels", "ignored", "ce0.5")


def logits(shape, dtype=torch.float32, scale=2.0):
    """Random logits of a realistic spread (softmaxes neither flat nor one-hot)."""
    return (torch.randn(shape) * scale).to(dtype)


def make_labels(lead, vocab, ignore_index=-100):
    """Labels with every third row ignored (at least one ignored and one valid row)."""
    labels = torch.randint(0, vocab, lead)
    labels.view(-1)[::3] = ignore_index
    if labels.numel() == 1:
        labels.view(-1)[0] = 0
    return labels


def labels_kwargs(mode, lead, vocab):
    if mode == "no-labels":
        return None, {}
    labels = make_labels(lead, vocab)
    return labels, ({"ce_weight": 0.5} if mode == "ce0.5" else {})


# --------------------------------------------------------------------------------------
# the full matrix: divergence x reduction x temperature x labels/CE, float32
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels_mode", LABELS)
@pytest.mark.parametrize("temps", list(TEMPERATURES), ids=list(TEMPERATURES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matrix(impl, divergence, reduction, temps, labels_mode):
    shape = (2, 3, 97)
    temperature, teacher_temperature = TEMPERATURES[temps]
    labels, extra = labels_kwargs(labels_mode, shape[:-1], shape[-1])
    check_kd_loss(
        impl, logits(shape), logits(shape), labels,
        divergence=divergence, reduction=reduction, temperature=temperature,
        teacher_temperature=teacher_temperature, **extra,
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_without_grad(impl, divergence):
    """A frozen teacher: no teacher gradient, the student gradient unchanged."""
    shape = (4, 97)
    labels = make_labels(shape[:-1], shape[-1])
    check_kd_loss(
        impl, logits(shape), logits(shape), labels, teacher_grad=False,
        divergence=divergence, temperature=2.0, ce_weight=0.5, reduction="none",
    )


@pytest.mark.parametrize(
    "divergence,beta,skew",
    [("jsd", 0.1, 0.1), ("jsd", 0.9, 0.1), ("skew_forward_kl", 0.5, 0.5),
     ("skew_reverse_kl", 0.5, 0.9), ("skew_forward_kl", 0.5, 1.0), ("jsd", 0.5, 0.0)],
)
def test_mixture_weights(impl, divergence, beta, skew):
    """Non-default beta / skew, including skew = 1 (the divergence is then exactly 0)."""
    shape = (5, 67)
    check_kd_loss(
        impl, logits(shape), logits(shape), divergence=divergence, beta=beta, skew=skew,
        temperature=1.5, reduction="none",
    )


@pytest.mark.parametrize("temperature_scale", [True, False])
@pytest.mark.parametrize("kd_weight", [1.0, 0.3])
def test_temperature_scale_and_kd_weight(impl, temperature_scale, kd_weight):
    shape = (4, 97)
    labels = make_labels(shape[:-1], shape[-1])
    check_kd_loss(
        impl, logits(shape), logits(shape), labels, divergence="reverse_kl",
        temperature=3.0, temperature_scale=temperature_scale, kd_weight=kd_weight,
        ce_weight=0.25, reduction="sum",
    )


def test_temperature_scale_is_t_squared(impl):
    """temperature_scale multiplies exactly the soft loss by T**2 (CE is not scaled)."""
    shape = (4, 97)
    s, t = logits(shape), logits(shape)
    on = kd.kd_loss(s, t, temperature=3.0, impl=impl, reduction="none")
    off = kd.kd_loss(s, t, temperature=3.0, temperature_scale=False, impl=impl,
                     reduction="none")
    torch.testing.assert_close(on, off * 9.0, rtol=1e-6, atol=1e-7)


def test_ce_only(impl):
    """kd_weight = 0 leaves the hard-label cross-entropy at T = 1, as F.cross_entropy."""
    shape = (6, 97)
    s, t = logits(shape), logits(shape)
    labels = make_labels(shape[:-1], shape[-1])
    out = kd.kd_loss(s, t, labels, kd_weight=0.0, ce_weight=1.0, temperature=4.0, impl=impl)
    want = torch.nn.functional.cross_entropy(s.double(), labels)
    assert_error_model(out, want, None, torch.float32, "CE")


def test_custom_ignore_index(impl):
    shape = (6, 50)
    labels = torch.randint(0, 50, (6,))
    labels[1] = labels[4] = 7  # ignore_index may be a valid-looking class id
    check_kd_loss(
        impl, logits(shape), logits(shape), labels, ignore_index=7, ce_weight=0.5,
        reduction="token_mean",
    )


# --------------------------------------------------------------------------------------
# shapes (..., V) with 0 to 3 leading dims, and low-precision inputs
# --------------------------------------------------------------------------------------

SHAPES = [(300,), (5, 300), (3, 257), (2, 3, 129), (2, 2, 2, 67)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_and_dtypes(impl, shape, dtype):
    skip_unsupported(impl, dtype)
    lead, vocab = shape[:-1], shape[-1]
    labels = make_labels(lead, vocab) if lead else None
    extra = {"ce_weight": 0.5} if lead else {}
    # alternate the divergence so every shape meets a one-pass and a two-pass divergence
    divergence = "forward_kl" if len(shape) % 2 else "jsd"
    check_kd_loss(
        impl, logits(shape, dtype), logits(shape, dtype), labels, divergence=divergence,
        temperature=2.0, reduction="none", **extra,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reduction_shapes(impl, dtype):
    """none keeps shape[:-1]; every other reduction is a 0-d float32 tensor."""
    skip_unsupported(impl, dtype)
    s, t = logits((2, 3, 40), dtype), logits((2, 3, 40), dtype)
    for reduction in REDUCTIONS:
        out = kd.kd_loss(s, t, reduction=reduction, impl=impl)
        assert out.dtype == torch.float32
        assert out.shape == ((2, 3) if reduction == "none" else ())


@pytest.mark.slow
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_several_vocab_tiles(impl, divergence):
    """A vocabulary larger than one kernel tile, odd so the last tile is ragged."""
    shape = (6, 4099)
    labels = make_labels(shape[:-1], shape[-1])
    check_kd_loss(
        impl, logits(shape), logits(shape), labels, divergence=divergence, temperature=2.0,
        ce_weight=0.5, reduction="none",
    )


def test_non_contiguous_inputs(impl):
    """Transposed and sliced logits are the same loss as their contiguous copies."""
    base_s, base_t = logits((97, 8)), logits((97, 8))
    s, t = base_s.t()[:, :90], base_t.t()[:, :90]  # (8, 90), strided
    assert not s.is_contiguous()
    check_kd_loss(impl, s, t, divergence="jsd", temperature=2.0, reduction="none")


def test_float64(impl):
    skip_unsupported(impl, torch.float64)
    device = float64_device(impl)
    shape = (4, 67)
    labels = make_labels(shape[:-1], shape[-1]).to(device)
    for divergence in DIVERGENCES:
        check_kd_loss(
            impl, logits(shape, torch.float64).to(device),
            logits(shape, torch.float64).to(device), labels,
            divergence=divergence, temperature=2.0, teacher_temperature=1.5, ce_weight=0.5,
            reduction="sum",
        )


def test_tolerance_table_covers_dtypes():
    for dtype in (*DTYPES, torch.float64):
        assert dtype in TOLERANCES


# --------------------------------------------------------------------------------------
# kd.softmax / kd.log_softmax: the temperature softmax the losses are built on
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_temperature_softmax(impl, log, temperature):
    x = logits((3, 4, 67)).requires_grad_()
    fn = kd.log_softmax if log else kd.softmax
    y = fn(x, temperature, impl=impl)
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    y64 = log_softmax(x64 / temperature)
    y64 = y64 if log else y64.exp()
    y64.backward(g.double())
    xb = x.detach().clone().requires_grad_()
    yb = log_softmax(xb / temperature)
    yb = yb if log else yb.exp()
    yb.backward(g)
    assert y.dtype == x.dtype
    assert_error_model(y, y64, yb, torch.float32, "softmax")
    assert_error_model(x.grad, x64.grad, xb.grad, torch.float32, "softmax gradient")


def test_softmax_dim(impl):
    """dim other than -1 moves the axis and back."""
    x = logits((5, 6, 7))
    y = kd.softmax(x, 2.0, dim=1, impl=impl)
    want = torch.softmax(x.double() / 2.0, dim=1)
    assert_error_model(y, want, torch.softmax(x / 2.0, dim=1), torch.float32, "softmax dim=1")


@pytest.mark.parametrize("kind", ["column-slice", "expanded"])
def test_non_contiguous_labels(impl, kind):
    """Labels that are a strided view (a column of a 2-D tensor, an expanded scalar) are
    valid labels: the same loss as their contiguous copy."""
    s, t = logits((6, 97)), logits((6, 97))
    if kind == "column-slice":
        labels = torch.randint(0, 97, (6, 2))[:, 1]
    else:
        labels = torch.tensor(5).expand(6)
    assert not labels.is_contiguous()
    got = kd.kd_loss(s, t, labels, ce_weight=0.5, impl=impl, reduction="none")
    want = kd.kd_loss(s, t, labels.contiguous(), ce_weight=0.5, impl=impl, reduction="none")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
