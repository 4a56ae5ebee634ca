"""Fused linear distillation: the loss from hidden states and lm_head weights, no logits.

    s = cap_s(h W^T + b),   t = cap_t(h_t W_t^T + b_t)   (or t given as teacher_logits)
    cap(z) = c tanh(z / c) when a softcap c is given (Gemma's final_logit_softcapping)
    loss = reduce(kd_loss rows of (s, t))

The rows are processed in chunks of C rows. Per chunk: one GEMM into a C x V student buffer
(and one into a C x V teacher buffer; on a CPU in float32 oneDNN's matmul makes them, see
_fresh_logits), the fused loss of kd_loss with inplace_backward=True
(any impl, through the normal dispatch), which writes g = d loss / d s over the student
buffer, then

    d/dz cap(z) = 1 - tanh(z / c)^2           (tanh kept from the forward of the chunk)
    grad_h[chunk] = g @ W,   grad_W += g^T h[chunk],   grad_b += sum_rows g

with grad_W and grad_b accumulated in float32 for low-precision weights. The N x V logits
never exist: the extra memory is two (three with a softcap, four with a teacher softcap and
teacher gradients) C x V buffers plus what the loss kernel of one chunk needs.

Scalar reductions compute the gradients in the forward, scaled by the reduction's global
factor (token_mean: 1 / the non-ignored rows of the WHOLE batch, counted from the labels
before the first chunk); backward only multiplies them by the upstream scalar (as Liger's
fused-linear losses do). reduction="none" recomputes the chunks in backward with the
upstream row gradients: a weight gradient is a sum over rows and cannot be rescaled row by
row afterwards. A second backward through the same graph (retain_graph=True) recomputes
too: the first one handed its gradients over to autograd.

Chunk rule (chunk_rows): fewer than C = H/2 rows, so that the student and teacher C x V
buffers together hold fewer elements than one lm_head weight (a softcap whose gradient is
needed adds a third buffer), clamped so that one buffer in the logits' dtype stays within
[MIN_CHUNK_BYTES, MAX_CHUNK_BYTES] (GEMMs of a useful height for small heads; a bound for
huge ones); the N rows are then split into ceil(N / C) chunks of equal size. On a CPU the
GEMMs of a chunk run faster the taller the chunk is: chunk_size trades memory for time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import acc_dtype, first_order_only
from ._spec import REDUCTIONS
from .functional import _check_float_tensor, _check_positive, _reduce, kd_loss

__all__ = ["linear_kd_loss", "chunk_rows"]

MIN_CHUNK_BYTES = 32 << 20
MAX_CHUNK_BYTES = 512 << 20


def chunk_rows(n_rows: int, hidden: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: fewer than H / 2 (the student and teacher chunk buffers together then
    hold fewer elements than one lm_head weight), with one chunk x V buffer of `dtype` kept
    within [MIN_CHUNK_BYTES, MAX_CHUNK_BYTES]; the rows are then split into equal chunks (no
    short last chunk, whose GEMMs would run at a poor shape).

    Why as tall as that: every chunk streams the (V, H) weights through three GEMMs (student
    and teacher logits, grad_hidden) and reads and writes the (V, H) weight gradient once, a
    fixed cost per chunk that taller chunks amortize. Measured at N=2048, H=512, V=128256
    float32 on two CPU cores (which share one memory bus for those passes), all four GEMMs
    in MKL: those of 11 chunks of 187 rows (the former 3H/8 rule) took about 16% more CPU
    time than 1024-row ones, those of 9 chunks of 228 rows about 8%, those of 8 chunks of
    256 rows (buffers of a whole weight) about 7%."""
    row_bytes = max(vocab, 1) * torch.empty((), dtype=dtype).element_size()
    lo = max(1, MIN_CHUNK_BYTES // row_bytes)
    hi = max(1, MAX_CHUNK_BYTES // row_bytes)
    most = min(max((hidden - 1) // 2, lo), hi)
    if n_rows <= most:
        return max(1, n_rows)
    return -(-n_rows // -(-n_rows // most))  # ceil(n / ceil(n / most))


# --------------------------------------------------------------------------------------
# the chunk loop: forward values and (optionally) gradients for given row weights
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    kd: tuple  # (name, value) pairs of the kd_loss options
    reduction: str
    student_softcap: float | None
    teacher_softcap: float | None
    chunk: int
    batch: int  # first dim of student_hidden (batchmean)
    grad_enabled: bool
    vocab: int  # the first `vocab` rows of the weights (and columns of teacher_logits) are used


def _fresh_logits(h, w) -> bool:
    """Whether a chunk's logits come from oneDNN's matmul, as a fresh tensor per chunk,
    rather than torch.mm (MKL) into a reused buffer: on a CPU in float32. oneDNN runs this
    short-and-wide product ((rows, H) x (H, V), a few hundred rows) faster than MKL (about
    13% less CPU time at 228 x 512 x 128256 on two cores, page faults of the fresh tensor
    included; at 2048 rows MKL is the faster one). grad_hidden and grad_W stay with torch.mm.
    A chunk's tensors are freed before the next chunk's are made (_run), so the memory is
    that of reused buffers."""
    return (h.device.type == "cpu" and h.dtype == torch.float32 and w.is_contiguous()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _capped_logits(h, w, b, buf, cap, keep_tanh):
    """(cap(h @ w^T + b), tanh(z / c) in keep_tanh's memory when asked, else None); the
    logits land in buf, or in a fresh tensor from oneDNN when buf is None."""
    if buf is None:
        out = torch.ops.mkldnn._linear_pointwise(h, w, b, "none", [], "")
    elif b is None:
        out = torch.mm(h, w.t(), out=buf)
    else:
        out = torch.addmm(b, h, w.t(), out=buf)
    if cap is None:
        return out, None
    if keep_tanh is None:
        out.div_(cap).tanh_().mul_(cap)
        return out, None
    torch.div(out, cap, out=keep_tanh).tanh_()
    torch.mul(keep_tanh, cap, out=out)
    return out, keep_tanh


def _linear_grads(g, tanh, h, w, row_weight, grads, i, j):
    """Back through cap and the linear layer for rows [i, j): g (rows, V) is the loss
    gradient of the capped logits for an upstream gradient of 1 per row, row_weight (rows,)
    float32 the real one; grads = [grad_h, grad_w accumulator, grad_b accumulator] (entries
    may be None). The row weights multiply the small side (h, the (rows, H) product), never
    the (rows, V) gradient.

    The (V, H) accumulator is not zeroed beforehand: the first chunk (i == 0) writes it
    (beta=0 ignores the uninitialized memory, NaNs included), later chunks add to it: no
    separate pass writes zeros over the V x H buffer."""
    grad_h, grad_w, grad_b = grads
    if tanh is not None:
        g.mul_(tanh.square_().neg_().add_(1.0))  # d/dz c tanh(z/c) = 1 - tanh(z/c)^2
    rw = row_weight[:, None]
    if grad_h is not None:  # written in place: no (rows, H) temporaries
        torch.mm(g, w, out=grad_h[i:j]).mul_(rw)
    if grad_w is not None:
        hw = (h * rw).to(h.dtype)  # one rounding, as the weighted gradient's would be
        if grad_w.dtype == g.dtype:
            grad_w.addmm_(g.t(), hw, beta=0.0 if i == 0 else 1.0)
        elif i == 0:  # low precision: one rounding per chunk, the sum over chunks in float32
            grad_w.copy_(torch.mm(g.t(), hw))
        else:
            grad_w.add_(torch.mm(g.t(), hw))
    if grad_b is not None:
        grad_b.add_(torch.mv(g.t(), row_weight.to(g.dtype)))


def _grad_buffers(h, w, b, need, v: int):
    """[grad_h, grad_w, grad_b] for the flagged ones (a None bias is never flagged); the
    chunks write the first v rows of grad_w, its rows past v (vocab_size) are 0."""
    need_h, need_w, need_b = need
    acc = acc_dtype(w.dtype)
    # the first chunk writes the weight gradient (_linear_grads); without rows there is none
    grad_w = None
    if need_w:
        grad_w = (torch.empty if h.shape[0] else torch.zeros)(w.shape, dtype=acc, device=w.device)
        grad_w[v:].zero_()
    return [
        torch.empty_like(h) if need_h else None,
        grad_w,
        torch.zeros(b.shape, dtype=acc, device=b.device) if need_b else None,
    ]


def _run(cfg: _Config, tensors, need, row_weight):
    """Row losses (N,) and, for the inputs flagged in `need`, the gradients of
    sum(row_weight * rows); row_weight is a 0-d tensor (one factor for every row) or (N,).
    The loss kernel computes each chunk's gradient for an upstream gradient of 1 per row
    (in its forward, over the student buffer); the weights are applied by _linear_grads."""
    sh, sw_full, sb_full, th, tw_full, tb_full, tl_full, labels = tensors
    n, v = sh.shape[0], cfg.vocab
    # the first v rows of the weights and biases, the first v columns of teacher_logits:
    # views (a weight's rows are contiguous; teacher_logits' rows are read with their
    # stride); the gradients keep the full shapes, 0 past v
    sw, sb, tw, tb = (None if x is None else x[:v] for x in (sw_full, sb_full, tw_full, tb_full))
    tl = None if tl_full is None else tl_full[:, :v]
    want_s, want_t = any(need[0:3]), any(need[3:7])
    c = cfg.chunk
    kd = dict(cfg.kd)
    rows = torch.empty(n, dtype=acc_dtype(sh.dtype), device=sh.device)
    # per-chunk buffers, reused by every chunk: student logits (then their gradient), the
    # teacher logits (unless oneDNN makes them, _fresh_logits), and tanh(z / c) where the
    # softcap's derivative is needed
    s_buf = None if _fresh_logits(sh, sw) else sh.new_empty((c, v))
    t_buf = th.new_empty((c, v)) if tl is None and not _fresh_logits(th, tw) else None
    s_tanh = sh.new_empty((c, v)) if want_s and cfg.student_softcap is not None else None
    t_tanh = (th.new_empty((c, v)) if want_t and tl is None
              and cfg.teacher_softcap is not None else None)
    s_grads = _grad_buffers(sh, sw_full, sb_full, need[0:3], v)
    if tl is None:
        t_grads = _grad_buffers(th, tw_full, tb_full, need[3:6], v)
        grad_tl = None
    else:
        t_grads = [None, None, None]
        grad_tl = torch.empty_like(tl_full) if need[6] else None
        if grad_tl is not None:
            grad_tl[:, v:].zero_()
    # the chunks accumulate into the first v rows (columns of grad_tl)
    s_acc, t_acc = ([g if g is None or k == 0 else g[:v] for k, g in enumerate(gr)]
                    for gr in (s_grads, t_grads))

    def part(buf, rows_):  # the chunk's rows of a reused buffer, or None
        return None if buf is None else buf[:rows_]

    def chunk(i, j):
        """Rows [i, j). A function so that fresh logits die with it, before the next chunk's
        are made."""
        s, s_th = _capped_logits(sh[i:j], sw, sb, part(s_buf, j - i), cfg.student_softcap,
                                 part(s_tanh, j - i))
        if tl is None:
            t, t_th = _capped_logits(th[i:j], tw, tb, part(t_buf, j - i),
                                     cfg.teacher_softcap, part(t_tanh, j - i))
        else:
            t, t_th = tl[i:j], None
        lab = None if labels is None else labels[i:j]
        if not (want_s or want_t):
            rows[i:j] = kd_loss(s, t, lab, reduction="none", **kd)
            return
        if want_t:
            with torch.enable_grad():
                # leaves sharing the buffers' memory: the in-place backward writes over s
                s_in = s.detach().requires_grad_()
                t_in = t.detach().requires_grad_()
                r = kd_loss(s_in, t_in, lab, reduction="none", inplace_backward=True, **kd)
                gs, gt = torch.autograd.grad(r, (s_in, t_in), torch.ones_like(r))
        else:
            # the forward writes d/ds for an upstream gradient of 1 per row over s
            r = kd_loss(s, t, lab, reduction="none", inplace_backward=True, **kd)
            gs = s
        rows[i:j] = r.detach()
        w_rows = (row_weight.expand(j - i) if row_weight.dim() == 0
                  else row_weight[i:j]).to(rows.dtype)
        if want_s:
            _linear_grads(gs, s_th, sh[i:j], sw, w_rows, s_acc, i, j)
        if want_t:
            if tl is None:
                _linear_grads(gt, t_th, th[i:j], tw, w_rows, t_acc, i, j)
            else:
                grad_tl[i:j, :v] = gt * w_rows[:, None]

    for i in range(0, n, c):
        chunk(i, min(i + c, n))

    def cast(g, like):
        return None if g is None else g.to(like.dtype)

    grads = (s_grads[0], cast(s_grads[1], sw_full), cast(s_grads[2], sb_full),
             t_grads[0], cast(t_grads[1], tw_full), cast(t_grads[2], tb_full), grad_tl)
    return rows, grads


class _LinearKD(torch.autograd.Function):
    """Scalar reductions: gradients computed in forward, scaled by the upstream scalar in
    backward. reduction="none", and a second backward through the same graph
    (retain_graph=True): the chunks are recomputed with the upstream gradients."""

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, tl, labels, cfg: _Config):
        tensors = (sh, sw, sb, th, tw, tb, tl, labels)
        need = tuple(cfg.grad_enabled and bool(x) for x in ctx.needs_input_grad[:7])
        ctx.cfg, ctx.need = cfg, need
        # the inputs themselves (no copies), for a backward that recomputes
        ctx.save_for_backward(*tensors)
        n, v = sh.shape[0], cfg.vocab
        if cfg.reduction == "none":
            return _run(cfg, tensors, (False,) * 7, None)[0]
        valid = None
        if cfg.reduction == "token_mean":
            ignore = dict(cfg.kd)["ignore_index"]
            count = n if labels is None else (labels != ignore).sum()
            valid = torch.as_tensor(count, dtype=acc_dtype(sh.dtype), device=sh.device)
        # the reduction's factor on every row, known before the first chunk
        one = torch.ones((), dtype=acc_dtype(sh.dtype), device=sh.device)
        ctx.factor = _reduce(one, cfg.reduction, valid, cfg.batch, n * v, ())
        rows, grads = _run(cfg, tensors, need, ctx.factor)
        if any(need):
            ctx.grads = grads
        return _reduce(rows, cfg.reduction, valid, cfg.batch, n * v, (n,))

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        grads = getattr(ctx, "grads", None)
        if grads is None:  # reduction="none", or the stored gradients were consumed
            weight = grad_out.reshape(-1) if ctx.cfg.reduction == "none" else (
                ctx.factor * grad_out)
            _, grads = _run(ctx.cfg, ctx.saved_tensors, ctx.need, weight)
            return (*grads, None, None)
        # handed over, not kept: autograd can then adopt them as .grad without a copy
        del ctx.grads
        # the common case (loss.backward() of the loss itself) skips the multiplications
        if not (grad_out.device.type == "cpu" and bool(grad_out == 1)):
            grads = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)
        return (*grads, None, None)


# --------------------------------------------------------------------------------------
# public function: validate, flatten to (N, H), dispatch the chunk loop
# --------------------------------------------------------------------------------------


def _check_tensor(name, x, dim=None):
    _check_float_tensor(name, x)
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-d, got shape {tuple(x.shape)}")
    if dim is None and x.dim() == 0:
        raise ValueError(f"{name} must have a hidden dimension, got a 0-d tensor")


def _check_layer(prefix, hidden, weight, bias, vocab=None):
    """hidden (..., H), weight (V, H), bias (V,): names the argument that disagrees."""
    _check_tensor(f"{prefix}_hidden", hidden)
    _check_tensor(f"{prefix}_weight", weight, dim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}_weight must have shape (V, {prefix}_hidden.shape[-1]) = (V, "
            f"{hidden.shape[-1]}), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}_weight has an empty vocabulary: shape {tuple(weight.shape)}")
    if vocab is not None and weight.shape[0] != vocab:
        raise ValueError(
            f"{prefix}_weight has vocabulary {weight.shape[0]}, the student's is {vocab}: "
            f"got {prefix}_weight {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight and {prefix}_hidden must have the same dtype, got "
                        f"{weight.dtype} and {hidden.dtype}")
    if bias is not None:
        _check_tensor(f"{prefix}_bias", bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}_bias must have shape ({weight.shape[0]},) (the "
                             f"vocabulary of {prefix}_weight), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{prefix}_bias must have {prefix}_weight's dtype {weight.dtype}, "
                            f"got {bias.dtype}")
    for name, x in ((f"{prefix}_weight", weight), (f"{prefix}_bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} must be on {prefix}_hidden's device {hidden.device}, "
                             f"got {x.device}")


def _teacher_width(weight, logits):
    """The teacher's vocabulary as given: teacher_logits' width, else teacher_weight's rows
    (None when neither is a tensor of a usable shape: their own checks name them)."""
    if isinstance(logits, torch.Tensor):
        return logits.shape[-1] if logits.dim() else None
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    return None


def _flat(x, lead_numel):
    x = x.reshape(lead_numel, x.shape[-1])
    return x if x.is_contiguous() else x.contiguous()


def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
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
    vocab_size: int | None = None,
) -> torch.Tensor:
    """kd_loss of the logits of two linear heads, computed chunk by chunk: the (..., V)
    logits are never materialized.

    student logits = cap(student_hidden @ student_weight.T + student_bias), with
    cap(z) = c * tanh(z / c) for c = student_softcap (no cap when None); the teacher's the
    same with its own hidden states, weight, bias and softcap, or `teacher_logits` (..., V)
    given directly (used as given: teacher_softcap and teacher_bias then are errors).

    student_hidden (..., H), student_weight (V, H), student_bias (V,); teacher_hidden
    (..., Ht) with the student's leading shape, teacher_weight (V, Ht); labels (...). The
    other keyword arguments are kd_loss's, with the same meaning and the same result as on
    the materialized logits (batchmean divides by their first dim; mean by their number).

    Gradients reach the student's hidden states, weight and bias, and the teacher's hidden
    states, weight, bias or logits when they require grad (self/online distillation).
    Scalar reductions compute the gradients in the forward (backward scales them by the
    upstream gradient); reduction="none" recomputes the chunks in backward (two passes of
    GEMMs), as does a second backward through the same graph.

    chunk_size: rows per chunk; default chunk_rows(N, H, V, dtype) (see the module doc).

    vocab_size: use the first `vocab_size` rows of both weights (and biases), or columns of
    teacher_logits, when the two vocabularies differ only by padded embedding rows (as
    kd_loss's vocab_size); slicing copies nothing, and the gradients keep the full shapes,
    0 in the rows (columns) past vocab_size.
    """
    _check_layer("student", student_hidden, student_weight, student_bias)
    vocab = student_weight.shape[0]
    lead = student_hidden.shape[:-1]
    teacher_width = _teacher_width(teacher_weight, teacher_logits)
    if vocab_size is not None:
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
        widest = vocab if teacher_width is None else min(vocab, teacher_width)
        if not 1 <= vocab_size <= widest:
            raise ValueError(
                f"vocab_size must be in [1, {widest}] (student_weight has {vocab} rows, the "
                f"teacher's vocabulary is {teacher_width}), got {vocab_size}")
    elif teacher_width is not None and teacher_width != vocab:
        name = "teacher_logits" if teacher_logits is not None else "teacher_weight"
        small = min(vocab, teacher_width)
        raise ValueError(
            f"student_weight has vocabulary {vocab} and {name} {teacher_width}: if they share "
            f"the first {small} tokens (padded embedding rows), pass vocab_size={small} to use "
            f"the first {small} of both")
    teacher_vocab = teacher_width if vocab_size is not None else vocab
    n = math.prod(lead)
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("give either teacher_logits or teacher_hidden and teacher_weight, "
                             "not both")
        for name, x in (("teacher_bias", teacher_bias), ("teacher_softcap", teacher_softcap)):
            if x is not None:
                raise ValueError(f"{name} applies to teacher_hidden @ teacher_weight.T; "
                                 "teacher_logits are used as given")
        _check_tensor("teacher_logits", teacher_logits)
        if teacher_logits.shape != (*lead, teacher_vocab):
            raise ValueError(
                f"teacher_logits must have shape student_hidden.shape[:-1] + (V,) = "
                f"{(*lead, teacher_vocab)}, got {tuple(teacher_logits.shape)}")
        if teacher_logits.device != student_hidden.device:
            raise ValueError(f"teacher_logits must be on student_hidden's device "
                             f"{student_hidden.device}, got {teacher_logits.device}")
    else:
        if teacher_hidden is None or teacher_weight is None:
            missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
            raise ValueError(f"{missing} is None: give teacher_hidden and teacher_weight, "
                             "or teacher_logits")
        _check_layer("teacher", teacher_hidden, teacher_weight, teacher_bias, teacher_vocab)
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(
                f"teacher_hidden must have student_hidden's leading shape {tuple(lead)}, got "
                f"{tuple(teacher_hidden.shape)}")
        if teacher_hidden.device != student_hidden.device:
            raise ValueError(f"teacher_hidden must be on student_hidden's device "
                             f"{student_hidden.device}, got {teacher_hidden.device}")
    vocab = vocab if vocab_size is None else vocab_size  # the columns used from here on
    caps = {}
    for name, c in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        caps[name] = None if c is None else _check_positive(name, c)
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.shape != lead:
            raise ValueError(f"labels must have shape student_hidden.shape[:-1] = {tuple(lead)}, "
                             f"got {tuple(labels.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is None:
        chunk_size = chunk_rows(n, student_hidden.shape[-1], vocab, student_hidden.dtype)
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    chunk_size = max(1, min(chunk_size, n))

    options = dict(divergence=divergence, beta=beta, skew=skew, alpha=alpha, ab_alpha=ab_alpha,
                   ab_beta=ab_beta, temperature=temperature,
                   teacher_temperature=teacher_temperature, temperature_scale=temperature_scale,
                   kd_weight=kd_weight, ce_weight=ce_weight, ignore_index=ignore_index,
                   impl=impl)
    sh = _flat(student_hidden, n)
    th = None if teacher_hidden is None else _flat(teacher_hidden, n)
    tl = None if teacher_logits is None else _flat(teacher_logits, n)
    flat_labels = None if labels is None else labels.reshape(n)
    if n == 0:  # no chunk will call kd_loss: validate the options on empty logits
        empty = sh.new_zeros((0, vocab))
        kd_loss(empty, empty if tl is None else tl[:, :vocab], flat_labels, **options)
    cfg = _Config(kd=tuple(options.items()), reduction=reduction,
                  student_softcap=caps["student_softcap"],
                  teacher_softcap=caps["teacher_softcap"], chunk=chunk_size,
                  # batchmean: the first dim of the logits (V for a single row, as kd_loss)
                  batch=lead[0] if lead else vocab, grad_enabled=torch.is_grad_enabled(),
                  vocab=vocab)
    out = _LinearKD.apply(sh, student_weight, student_bias, th, teacher_weight, teacher_bias,
                          tl, flat_labels, cfg)
    return out.reshape(lead) if reduction == "none" else out
