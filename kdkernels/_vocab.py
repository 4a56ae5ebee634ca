"""Row losses over the first `vocab` columns of wider logits (kd_loss's vocab_size): a
student and a teacher whose widths differ by padded embedding rows, read in place.

Every backend's kernels take a row stride for each input and output, so the (N, vocab)
views s[:, :vocab] and t[:, :vocab] of the (N, Vs) and (N, Vt) logits are read as they are.
The autograd node belongs to the full-width tensors, not to the views: backward allocates
each full-width gradient once (torch.empty), the backend's grads writes its first `vocab`
columns through the output's row stride, and only the padding columns are zeroed (they take
no part in the loss). Autograd through the slice instead would allocate a zero N x V
gradient and copy the N x vocab one into it. With inplace_backward the student's gradient
is written over its own full-width buffer, padding columns zeroed.

The forward is the row-statistics interface of _stats.py on whole rows: partial, the
second pass of the two-pass kinds (mixture, tvd, alpha_beta), finish (what every backend's
fused forward computes).
# read s, t once (twice for a two-pass kind) in the forward; backward reads them once and
# writes N x vocab, plus the zeros of the padding
"""

from __future__ import annotations

import torch

from . import _stats
from ._common import first_order_only, scale_rows_, take_inplace_grads
from ._spec import TWO_PASS_KINDS, LossSpec


def _forward(backend, s, t, labels, spec: LossSpec):
    stats = backend.partial(s, t, labels, spec, 0)
    two_pass = spec.div.kind in TWO_PASS_KINDS
    mix = backend.mix_partial(s, t, spec, stats, 0) if two_pass else None
    return _stats.finish(stats, labels, spec, mix)


def _full_grad(x, vocab: int, out=None):
    """The full-width gradient buffer of x (or `out`, x's own memory), padding columns 0."""
    g = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    g[:, vocab:].zero_()
    return g


def _grads(backend, s, t, labels, spec, stats, grad_rows, need_teacher, vocab, gs):
    gt = _full_grad(t, vocab) if need_teacher else None
    backend.grads(s[:, :vocab], t[:, :vocab], labels, spec, stats, 0, grad_rows,
                  need_teacher, out=gs[:, :vocab],
                  out_t=None if gt is None else gt[:, :vocab])
    return gs, gt


class VocabRows(torch.autograd.Function):
    """Row losses (N,) of the first `vocab` columns of s (N, Vs) and t (N, Vt); gradients
    of the full widths."""

    @staticmethod
    def forward(ctx, s, t, labels, spec: LossSpec, inplace_backward: bool, vocab: int,
                backend):
        need_teacher = ctx.needs_input_grad[1]
        loss, stats = _forward(backend, s[:, :vocab], t[:, :vocab], labels, spec)
        if inplace_backward:
            # the gradient for an upstream gradient of 1 per row, over s (reference.KDRows)
            ones = torch.ones_like(loss)
            gs = _full_grad(s, vocab, out=s)
            ctx.grads = _grads(backend, s, t, labels, spec, stats, ones, need_teacher, vocab,
                               gs)
            ctx.inplace = True
            return loss
        ctx.inplace = False
        ctx.spec, ctx.vocab, ctx.backend = spec, vocab, backend
        ctx.save_for_backward(s, t, labels, stats)
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss):
        if ctx.inplace:
            grad_s, grad_t = scale_rows_(grad_loss, *take_inplace_grads(ctx))
        else:
            s, t, labels, stats = ctx.saved_tensors
            grad_s, grad_t = _grads(ctx.backend, s, t, labels, ctx.spec, stats, grad_loss,
                                    ctx.needs_input_grad[1], ctx.vocab,
                                    _full_grad(s, ctx.vocab))
        return grad_s, grad_t, None, None, None, None, None


def vocab_rows(backend, s, t, labels, spec: LossSpec, inplace_backward: bool, vocab: int):
    return VocabRows.apply(s, t, labels, spec, inplace_backward, vocab, backend)
