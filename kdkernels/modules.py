"""nn.Module forms of the public functions."""

from __future__ import annotations

import inspect

import torch

from .functional import kd_loss, kl_div
from .linear import linear_kd_loss
from .sparse import sparse_kd_loss

__all__ = ["KDLoss", "KLDivLoss", "LinearKDLoss", "SparseKDLoss"]


def _options(fn, per_call=()) -> tuple:
    """fn's keyword-only arguments, read off its signature so a module and its function
    never disagree; `per_call` ones are forward's arguments, not options."""
    return tuple(name for name, p in inspect.signature(fn).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in per_call)


class _OptionsModule(torch.nn.Module):
    """A module holding a function's options (_KEYS); unknown names fail at construction."""

    _KEYS: tuple = ()

    def __init__(self, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(self._KEYS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown arguments {unknown}; known: "
                            f"{self._KEYS}")
        self.kwargs = kwargs

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class KDLoss(_OptionsModule):
    """`kd_loss` as a module: KDLoss(**kwargs)(student_logits, teacher_logits, labels=None).

    Keyword arguments are those of `kd_loss` and are validated on the first call's checks;
    unknown names fail here, at construction.
    """

    _KEYS = _options(kd_loss)

    def forward(self, student_logits, teacher_logits, labels=None):
        return kd_loss(student_logits, teacher_logits, labels, **self.kwargs)


class KLDivLoss(torch.nn.KLDivLoss):
    """Drop-in for torch.nn.KLDivLoss, computed by `kd.kl_div`."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean",
                 log_target: bool = False, *, impl: str = "auto"):
        super().__init__(size_average, reduce, reduction, log_target)
        self.impl = impl

    def forward(self, input, target):
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target,
                      impl=self.impl)


class LinearKDLoss(_OptionsModule):
    """`linear_kd_loss` as a module: LinearKDLoss(**kwargs)(student_hidden, student_weight,
    teacher_hidden=None, teacher_weight=None, labels=None, *, teacher_logits=None,
    student_bias=None, teacher_bias=None).

    Keyword arguments are linear_kd_loss's options (softcaps, chunk_size and kd_loss's
    options); unknown names fail here, at construction.
    """

    _PER_CALL = ("teacher_logits", "student_bias", "teacher_bias")
    _KEYS = _options(linear_kd_loss, _PER_CALL)

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                labels=None, *, teacher_logits=None, student_bias=None, teacher_bias=None):
        return linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                              labels, teacher_logits=teacher_logits, student_bias=student_bias,
                              teacher_bias=teacher_bias, **self.kwargs)


class SparseKDLoss(_OptionsModule):
    """`sparse_kd_loss` as a module: SparseKDLoss(**kwargs)(student_logits, teacher_ids,
    teacher_logprobs, labels=None).

    Keyword arguments are those of `sparse_kd_loss` (tail, divergence, temperature, ...);
    unknown names fail here, at construction.
    """

    _KEYS = _options(sparse_kd_loss)

    def forward(self, student_logits, teacher_ids, teacher_logprobs, labels=None):
        return sparse_kd_loss(student_logits, teacher_ids, teacher_logprobs, labels,
                              **self.kwargs)
