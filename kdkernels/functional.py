"""Public functions: validate the arguments, normalize shapes to (rows, V), dispatch.

Kernels never see user arguments; they receive (rows, V) logits (rows with stride 1 along V,
any row stride) and a LossSpec.
Reductions are applied here, on the (rows,) vector of row losses the backend returns.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn import _reduction as _legacy_reduction

from . import _dispatch, _vocab
from ._common import strided_rows
from ._spec import DIVERGENCES, REDUCTIONS, Divergence, LossSpec

__all__ = ["kd_loss", "kl_div", "softmax", "log_softmax"]

_KL_DIV_REDUCTIONS = ("none", "sum", "mean", "batchmean")


# --------------------------------------------------------------------------------------
# validation helpers: every error names the argument (and the shapes)
# --------------------------------------------------------------------------------------


def _check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_logits(name: str, x, sharded: bool = False) -> None:
    """sharded: x is one rank's vocabulary shard, which may be empty (distributed.py checks
    the global vocabulary on every rank, so that no rank raises alone and leaves the others
    waiting in a collective)."""
    _check_float_tensor(name, x)
    if x.dim() == 0:
        raise ValueError(f"{name} must have a vocabulary dimension, got a 0-d tensor")
    if x.shape[-1] == 0 and not sharded:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(x.shape)}")


def _check_unit(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_positive(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _check_finite(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_labels_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Labels must lie in [0, V) or equal ignore_index. On CUDA (or when compiling) the
    check is a device-side assert, so it costs no host synchronization."""
    ok = ((labels >= 0) & (labels < vocab)) | (labels == ignore_index)
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            bad = labels[~ok][0].item()
            raise ValueError(
                f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, "
                f"found {bad}"
            )
    else:
        torch._assert_async(ok.all(), "kdkernels: labels out of [0, V) and not ignore_index")


def _reject_forward_ad(**tensors) -> None:
    """Forward-mode AD (torch.func.jvp, forward_ad dual tensors) has no rules here: raise,
    rather than let a kernel drop the tangent and return a silent None."""
    if torch.compiler.is_compiling():
        return
    for name, x in tensors.items():
        if isinstance(x, torch.Tensor) and fwAD.unpack_dual(x).tangent is not None:
            raise NotImplementedError(
                f"{name} carries a forward-mode AD tangent: kdkernels provides reverse-mode "
                "gradients only (use backward / torch.autograd.grad, or torch.func.vjp)"
            )


# --------------------------------------------------------------------------------------
# kd_loss
# --------------------------------------------------------------------------------------


def _check_vocab(s: torch.Tensor, t: torch.Tensor, vocab_size, sharded: bool) -> int | None:
    """kd_loss's `vocab_size`, checked against both widths; None when it is both widths
    (nothing to narrow)."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if sharded:
        raise ValueError("vocab_size is not supported with a process_group (sharded logits)")
    vs, vt = s.shape[-1], t.shape[-1]
    if not 1 <= vocab_size <= min(vs, vt):
        raise ValueError(
            f"vocab_size must be in [1, {min(vs, vt)}] (student_logits has vocabulary width "
            f"{vs}, teacher_logits {vt}), got {vocab_size}"
        )
    return None if vocab_size == vs == vt else vocab_size


def _reduce(rows: torch.Tensor, reduction: str, valid_rows, batch: int, numel: int, shape):
    """Apply `reduction` to the (N,) row losses."""
    if reduction == "none":
        return rows.reshape(shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "token_mean":
        # 0, not nan, when every row is ignored: sum is 0 and the count is clamped to 1.
        return total / valid_rows.clamp(min=1)
    if reduction == "batchmean":
        return total / batch if batch else total
    return total / numel if numel else total  # "mean"


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha: float = 0.5,
    ab_alpha: float = 0.5,
    ab_beta: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    temperature_scale: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "token_mean",
    impl: str = "auto",
    inplace_backward: bool = False,
    process_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Knowledge-distillation loss between student and teacher logits of shape (..., V).

    loss = kd_weight * D(softmax(t / Tt) || softmax(s / Ts)) * (Ts**2 if temperature_scale)
         + ce_weight * CE(s at T=1, labels)

    with D chosen by `divergence` (forward_kl, reverse_kl, jsd(beta), skew_forward_kl(skew),
    skew_reverse_kl(skew), soft_cross_entropy (-sum p log q), tvd (1/2 sum |p - q|),
    forward_reverse_kl(alpha) = alpha KL(p||q) + (1 - alpha) KL(q||p), alpha_beta(ab_alpha,
    ab_beta): ABKD's alpha-beta divergence, see _spec.py). Rows whose label is
    `ignore_index` are skipped. The result is
    float32 (float64 for float64 logits). Gradients reach `student_logits` and, when it
    requires grad, `teacher_logits`.

    inplace_backward=True computes the student gradient during the forward and stores it in
    `student_logits`' memory (no extra N x V buffer): the logits are overwritten.
    process_group: logits are this rank's contiguous vocabulary shard (see distributed.py).

    vocab_size: use the first `vocab_size` columns of both logits. For a teacher and a
    student whose widths differ only by padded embedding rows (e.g. 152064 vs 151936): pass
    the real vocabulary size; labels must then lie in [0, vocab_size). Nothing is copied:
    the kernels read the first columns in place (they take a row stride), and each
    gradient is written once at its tensor's full width, 0 in the columns past vocab_size
    (with inplace_backward too, over the student's whole buffer).
    """
    from . import distributed

    # DTensor logits (Shard(-1) on a 1-D mesh): their local shards and the mesh's group
    unwrapped = distributed.unwrap_dtensor(student_logits, teacher_logits, labels, process_group)
    if unwrapped is not None:
        student_logits, teacher_logits, labels, process_group = unwrapped
    sharded = process_group is not None
    _reject_forward_ad(student_logits=student_logits, teacher_logits=teacher_logits)
    _check_logits("student_logits", student_logits, sharded)
    _check_logits("teacher_logits", teacher_logits, sharded)
    vocab = None  # the columns used, when fewer than a tensor's width
    if vocab_size is not None:
        vocab = _check_vocab(student_logits, teacher_logits, vocab_size, sharded)
    elif (not sharded and student_logits.shape[:-1] == teacher_logits.shape[:-1]
            and student_logits.shape[-1] != teacher_logits.shape[-1]):
        vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}: vocabulary "
            f"widths {vs} and {vt}. If they share the first {min(vs, vt)} tokens (padded "
            f"embedding rows), pass vocab_size={min(vs, vt)} to use the first {min(vs, vt)} "
            "columns of both"
        )
    # with vocab_size the widths may differ (the first `vocab` columns of both are used)
    if process_group is None and (student_logits.shape[:-1] != teacher_logits.shape[:-1] or (
            vocab is None and student_logits.shape != teacher_logits.shape)):
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            "student_logits and teacher_logits must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    beta = _check_unit("beta", beta)
    skew = _check_unit("skew", skew)
    alpha = _check_unit("alpha", alpha)
    ab_alpha = _check_finite("ab_alpha", ab_alpha)
    ab_beta = _check_finite("ab_beta", ab_beta)
    temperature = _check_positive("temperature", temperature)
    teacher_temperature = (
        temperature
        if teacher_temperature is None
        else _check_positive("teacher_temperature", teacher_temperature)
    )
    kd_weight = _check_finite("kd_weight", kd_weight)
    ce_weight = _check_finite("ce_weight", ce_weight)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    lead = student_logits.shape[:-1]
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"labels must be an integer tensor (int64), got dtype {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(
                f"labels must have shape student_logits.shape[:-1] = {tuple(lead)}, "
                f"got {tuple(labels.shape)}"
            )
        if labels.device != student_logits.device:
            raise ValueError(
                f"labels must be on the logits' device {student_logits.device}, "
                f"got {labels.device}"
            )
    elif ce_weight != 0.0:
        raise ValueError(f"ce_weight={ce_weight} needs labels; got labels=None")
    if inplace_backward and process_group is not None:
        raise ValueError("inplace_backward=True is not supported with a process_group")

    spec = LossSpec(
        div=Divergence.from_user(divergence, beta, skew, alpha, ab_alpha, ab_beta),
        inv_ts=1.0 / temperature,
        inv_tt=1.0 / teacher_temperature,
        kd_scale=kd_weight * (temperature * temperature if temperature_scale else 1.0),
        ce_weight=ce_weight,
        ignore_index=ignore_index,
    )
    v = student_logits.shape[-1] if vocab is None else vocab
    # explicit row counts: reshape(-1, 0) is ambiguous (a rank's vocabulary shard may be
    # empty). The kernels take a row stride: a view whose rows are apart (a column slice)
    # is read in place; only a stride along the vocabulary needs a copy.
    s = student_logits.reshape(math.prod(lead), student_logits.shape[-1])
    t = teacher_logits.reshape(math.prod(teacher_logits.shape[:-1]), teacher_logits.shape[-1])
    if not strided_rows(s):
        s = s.contiguous()
    if not strided_rows(t):
        t = t.contiguous()
    if (inplace_backward and not torch.compiler.is_compiling()
            and s.data_ptr() != student_logits.data_ptr()):
        raise ValueError(
            "inplace_backward=True needs contiguous student_logits (its buffer receives "
            "the gradient)"
        )
    flat_labels = None
    if labels is not None:
        # contiguous: a column slice or an expanded scalar is a valid labels tensor
        flat_labels = labels.reshape(-1).to(torch.int64).contiguous()

    dtypes = (s.dtype, t.dtype)
    backend = _dispatch.resolve(impl, s.device, dtypes)
    if process_group is not None:
        rows = distributed.kd_rows(s, t, flat_labels, spec, process_group, backend)
    else:
        if flat_labels is not None:
            _check_labels_range(flat_labels, v, ignore_index)
        if vocab is None:
            rows = backend.kd_rows(s, t, flat_labels, spec, inplace_backward)
        else:
            rows = _vocab.vocab_rows(backend, s, t, flat_labels, spec, inplace_backward, vocab)

    valid = None
    if reduction == "token_mean":
        if flat_labels is None:
            valid = torch.tensor(float(s.shape[0]), device=s.device, dtype=rows.dtype)
        else:
            valid = (flat_labels != ignore_index).sum().to(rows.dtype)
    # F.kl_div's batchmean: the first dim of the logits used, even for 1-D
    batch = student_logits.shape[0] if student_logits.dim() > 1 else v
    numel = s.shape[0] * v  # F.kl_div's mean: the numel of the logits used
    if process_group is not None and reduction == "mean":
        # F.kl_div's mean divides by the numel of the GLOBAL logits: N x V, V over the group
        numel = s.shape[0] * distributed.vocab_size(s, process_group)
    return _reduce(rows, reduction, valid, batch, numel, lead)


# --------------------------------------------------------------------------------------
# kl_div: drop-in for torch.nn.functional.kl_div
# --------------------------------------------------------------------------------------


def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    log_target: bool = False,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Drop-in for torch.nn.functional.kl_div: same arguments, values and gradients.

    `input` holds log-probabilities; `target` probabilities (log-probabilities when
    log_target). For scalar reductions no elementwise tensor is built. One deliberate
    difference: where target == 0 (log_target=False) the gradient w.r.t. target is -inf,
    the derivative of target * log(target), where PyTorch returns nan.
    """
    # F.kl_div divides by input.size(0) whenever reduction="batchmean" is passed, even when
    # the legacy size_average/reduce arguments choose the reduction itself.
    divide_by_batch = reduction == "batchmean"
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction.legacy_get_string(size_average, reduce)
    _check_float_tensor("input", input)
    _check_float_tensor("target", target)
    if reduction not in _KL_DIV_REDUCTIONS:
        raise ValueError(f"reduction must be one of {_KL_DIV_REDUCTIONS}, got {reduction!r}")
    _reject_forward_ad(input=input, target=target)
    if input.device != target.device:
        raise ValueError(
            f"input and target must be on the same device, got {input.device} and "
            f"{target.device}"
        )
    # batchmean divides by the first dim of `input` as given (F.kl_div: none for 0-d input)
    batch = input.shape[0] if input.dim() else 1
    if input.shape != target.shape:
        try:
            input, target = torch.broadcast_tensors(input, target)
        except RuntimeError:
            raise ValueError(
                "input and target must have broadcastable shapes, got "
                f"{tuple(input.shape)} and {tuple(target.shape)}"
            ) from None
    backend = _dispatch.resolve(impl, input.device, (input.dtype, target.dtype))
    x = input.reshape(-1)
    y = target.reshape(-1)
    if reduction == "none":
        out = backend.kl_div(x, y, bool(log_target), False).reshape(input.shape)
    else:
        out = backend.kl_div(x, y, bool(log_target), True)
        if reduction == "mean":
            out = out / input.numel()
        out = out.to(torch.promote_types(input.dtype, target.dtype))
    return out / batch if divide_by_batch else out


# --------------------------------------------------------------------------------------
# softmax / log_softmax with a temperature
# --------------------------------------------------------------------------------------


def _temperature_softmax(name, x, temperature, dim, impl, log, process_group):
    from . import distributed

    # a DTensor x: softmax of its local tensor (over the group when `dim` is sharded), rewrapped
    wrapped = distributed.unwrap_dtensor_input(x, dim, process_group)
    if wrapped is not None:
        x_local, group, rewrap = wrapped
        return rewrap(_temperature_softmax(name, x_local, temperature, dim, impl, log, group))
    _check_float_tensor(name, x)
    temperature = _check_positive("temperature", temperature)
    _reject_forward_ad(**{name: x})
    rank = max(x.dim(), 1)  # as torch.softmax: a 0-d tensor has the one dim -1 (or 0)
    if not isinstance(dim, int) or isinstance(dim, bool) or not -rank <= dim < rank:
        raise ValueError(f"dim must be an int in [{-rank}, {rank}), got {dim!r}")
    if x.dim() == 0:  # one entry: softmax 1, log_softmax 0
        y = _temperature_softmax(name, x.reshape(1), temperature, -1, impl, log, process_group)
        return y.reshape(())
    if x.numel() == 0 and process_group is None:
        # nothing to normalize (as torch.softmax: an empty result that keeps autograd)
        return x * 0.0
    moved = dim not in (-1, x.dim() - 1)
    if moved:
        x = x.movedim(dim, -1)
    shape = x.shape
    x2 = x.reshape(math.prod(shape[:-1]), shape[-1])  # not -1: the shard may be empty
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    backend = _dispatch.resolve(impl, x2.device, (x2.dtype,))
    if process_group is not None:
        y = distributed.softmax(x2, 1.0 / temperature, log, process_group, backend)
    else:
        y = backend.softmax(x2, 1.0 / temperature, log)
    y = y.reshape(shape)
    return y.movedim(-1, dim) if moved else y


def _cast(x, dtype):
    """torch.softmax's `dtype`: the input is cast to it before the operation (so the math
    and the result, and the gradient's accuracy, are those of that dtype)."""
    if dtype is None or not isinstance(x, torch.Tensor):
        return x
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    return x.to(dtype)


def softmax(x, temperature: float = 1.0, *, dim: int = -1, dtype=None, impl: str = "auto",
            process_group=None):
    """softmax(x / temperature) along `dim`, chunked, math in float32 (float64 for float64
    input), result in x.dtype; `dtype` casts x first, as torch.softmax's does."""
    return _temperature_softmax("x", _cast(x, dtype), temperature, dim, impl, False,
                                process_group)


def log_softmax(x, temperature: float = 1.0, *, dim: int = -1, dtype=None, impl: str = "auto",
                process_group=None):
    """log_softmax(x / temperature) along `dim`, chunked, math in float32 (float64 for
    float64 input), result in x.dtype; `dtype` casts x first, as torch.log_softmax's does."""
    return _temperature_softmax("x", _cast(x, dtype), temperature, dim, impl, True,
                                process_group)
