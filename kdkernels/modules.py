"""nn.Module forms of the public functions."""

from __future__ import annotations

import inspect

import torch

from .functional import kd_loss, kl_div

__all__ = ["KDLoss", "KLDivLoss"]


class KDLoss(torch.nn.Module):
    """`kd_loss` as a module: KDLoss(**kwargs)(student_logits, teacher_logits, labels=None).

    Keyword arguments are those of `kd_loss` and are validated on the first call's checks;
    unknown names fail here, at construction.
    """

    # kd_loss's keyword-only arguments, read off its signature so the two never disagree
    _KEYS = tuple(name for name, p in inspect.signature(kd_loss).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY)

    def __init__(self, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(self._KEYS))
        if unknown:
            raise TypeError(f"KDLoss got unknown arguments {unknown}; known: {self._KEYS}")
        self.kwargs = kwargs

    def forward(self, student_logits, teacher_logits, labels=None):
        return kd_loss(student_logits, teacher_logits, labels, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class KLDivLoss(torch.nn.KLDivLoss):
    """Drop-in for torch.nn.KLDivLoss, computed by `kd.kl_div`."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean",
                 log_target: bool = False, *, impl: str = "auto"):
        super().__init__(size_average, reduce, reduction, log_target)
        self.impl = impl

    def forward(self, input, target):
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target,
                      impl=self.impl)


class LinearKDLoss(torch.nn.Module):
    """`linear_kd_loss` as a module: LinearKDLoss(**kwargs)(student_hidden, student_weight,
    teacher_hidden=None, teacher_weight=None, labels=None, *, teacher_logits=None,
    student_bias=None, teacher_bias=None).

    Keyword arguments are linear_kd_loss's options (softcaps, chunk_size and kd_loss's
    options); unknown names fail here, at construction.
    """

    _KEYS = (
        "student_softcap", "teacher_softcap", "chunk_size", "divergence", "beta", "skew",
        "temperature", "teacher_temperature", "temperature_scale", "kd_weight", "ce_weight",
        "ignore_index", "reduction", "impl",
    )

    def __init__(self, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(self._KEYS))
        if unknown:
            raise TypeError(f"LinearKDLoss got unknown arguments {unknown}; known: {self._KEYS}")
        self.kwargs = kwargs

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                labels=None, *, teacher_logits=None, student_bias=None, teacher_bias=None):
        from .linear import linear_kd_loss  # linear.py imports this module

        return linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                              labels, teacher_logits=teacher_logits, student_bias=student_bias,
                              teacher_bias=teacher_bias, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
