"""TRL: a fused drop-in for `GKDTrainer.generalized_jsd_loss`.

TRL's GKD trainer (on-policy distillation, arXiv:2306.13649) computes its loss with a static
method that builds several (batch, sequence, V) tensors: log-softmaxes, their stacked
mixture, elementwise KL terms. `generalized_jsd_loss` below takes the same arguments and
returns the same value and gradients from kdkernels' fused kernels. To make a trainer use it:

    import kdkernels.integrations.trl
    from trl.experimental.gkd import GKDTrainer   # trl.GKDTrainer in older TRL releases

    GKDTrainer.generalized_jsd_loss = staticmethod(kdkernels.integrations.trl.generalized_jsd_loss)

The conventions it reproduces (TRL's, not kd_loss's defaults):

    p = softmax(teacher / T), q = softmax(student / T)      (T = temperature, both sides)
    beta = 0: KL(p || q) (forward KL);  beta = 1: KL(q || p) (reverse KL);
    otherwise, with m = beta p + (1 - beta) q:  beta KL(p || m) + (1 - beta) KL(q || m)
    no T**2 factor; tokens whose label is -100 are left out, and the sum over the rest is
        num_items_in_batch given:   divided by num_items_in_batch (gradient accumulation)
        reduction="batchmean":      divided by the number of unmasked tokens (at least 1), or
                                    without labels by student_logits.shape[0]
        reduction="sum":            not divided
        reduction="mean":           divided by (unmasked tokens) x V, or without labels by
                                    the logits' numel (a mean over elements, as jsd.mean())

One difference: the result is float32 (float64 for float64 logits) whatever the logits'
dtype, where TRL's own function does its arithmetic in the logits' dtype (bf16 in bf16).
"""

from __future__ import annotations

import torch

from ..functional import kd_loss

__all__ = ["generalized_jsd_loss"]

_REDUCTIONS = ("batchmean", "sum", "mean")


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    logits_are_probs: bool = False,
    num_items_in_batch=None,
    *,
    vocab_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """TRL's generalized JSD loss between (..., V) logits, fused (see the module docstring).

    The positional arguments and `logits_are_probs` / `num_items_in_batch` are TRL's, so
    the function can replace `GKDTrainer.generalized_jsd_loss`. `vocab_size` and `impl` are
    kd_loss's: the first `vocab_size` columns of both logits (a padded vocabulary), and the
    implementation to run.
    """
    if logits_are_probs:
        raise ValueError(
            "logits_are_probs=True is not supported: pass logits (kdkernels normalizes them "
            "with a fused softmax)"
        )
    if reduction not in _REDUCTIONS and num_items_in_batch is None:
        raise ValueError(
            f"reduction must be one of {_REDUCTIONS}, got {reduction!r} (TRL returns the "
            "per-element terms for other values, an N x V tensor this fused loss never builds)"
        )
    if isinstance(beta, torch.Tensor):
        beta = float(beta)
    if beta == 0:
        divergence = "forward_kl"
    elif beta == 1:
        divergence = "reverse_kl"
    else:
        divergence = "jsd"
    kd_labels = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        # only the mask matters (no hard-label term): label values are not range-checked,
        # as in TRL, where any label other than -100 marks a token that counts
        kd_labels = torch.where(labels == -100, -100, 0)
    total = kd_loss(
        student_logits, teacher_logits, kd_labels, divergence=divergence, beta=beta,
        temperature=temperature, temperature_scale=False, ignore_index=-100,
        reduction="sum", vocab_size=vocab_size, impl=impl,
    )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    rows = student_logits.shape[:-1].numel()
    valid = (labels != -100).sum() if labels is not None else rows
    if reduction == "batchmean":
        if labels is not None:
            return total / valid.clamp(min=1)
        return total / max(student_logits.shape[0], 1)
    # "mean": over the elements of the masked (tokens, V) terms; 0 / 0 = nan for an empty
    # selection, as torch's mean of an empty tensor
    width = student_logits.shape[-1] if vocab_size is None else vocab_size
    return total / torch.as_tensor(valid * width, dtype=total.dtype, device=total.device)
