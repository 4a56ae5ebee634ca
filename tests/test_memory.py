"""No N x V temporary in impl="torch": every tensor allocated during forward + backward is
recorded with a TorchDispatchMode, and everything besides the gradient tensors must fit in
one chunk (reference.chunk_rows x V) or be per-row (the N x NCOL statistics table).
CHUNK_ELEMENTS is patched small so that a full N x V temporary would be many chunks and could
not hide under the bound.

The mode also tracks which allocations are still alive (through weak references to their
storages, which see C++ owners such as tensors saved for backward) and reports the peak of
live bytes allocated inside the call: the "extra memory" of forward + backward.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kdkernels as kd
from kdkernels import _common, reference
from kdkernels._stats import NCOL

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


def _storages(tree):
    return [x.untyped_storage() for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class AllocationRecorder(TorchDispatchMode):
    """Records every op output whose storage is new (not an input's: views and in-place ops
    allocate nothing), keeps the live ones as weak references, and tracks the peak of live
    allocated bytes. Allocations above `keep_above` bytes are kept (strongly) for inspection.
    """

    def __init__(self, keep_above: int):
        super().__init__()
        self.keep_above = keep_above
        self.allocations = []  # (op, nbytes)
        self.big = []  # (op, storage) of allocations above keep_above
        self.live = {}  # storage id -> (weak ref, nbytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {st._cdata for st in _storages((args, kwargs))}
        out = func(*args, **kwargs)
        # forget freed storages first: a new storage may reuse a freed one's address
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        for st in _storages(out):
            if st._cdata in inputs or st._cdata in self.live:
                continue
            nbytes = st.nbytes()
            self.allocations.append((str(func), nbytes))
            self.live[st._cdata] = (StorageWeakRef(st), nbytes)
            if nbytes > self.keep_above:
                self.big.append((str(func), st))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


ROWS, VOCAB = 128, 96
CHUNK_ROWS = 2  # CHUNK_ELEMENTS = 2 * VOCAB: a full N x V tensor is 64 chunks
# Chunk-sized float32 temporaries alive at once: measured 12 (forward KL) to 17 (jsd), the
# divergence math of a chunk (lq, lp, q, p, log m, q u, p u, products); 24 leaves room and is
# still far below one N x V float32 tensor (64 chunks).
LIVE_CHUNKS = 24
# Per-row tensors: the (N, NCOL) statistics table and its finished copy, the mixture's (N, 4)
# sums, and up to 16 single vectors (loss, labels, masks), of up to 8-byte elements.
LIVE_ROW_VECTORS = 2 * NCOL + 4 + 16
# Allocations above this are N x V-sized suspects: one chunk, or the statistics table (an
# N x NCOL float64 tensor), whichever is larger; one N x V float32 tensor is 4x the table.
BIG = max(CHUNK_ROWS * VOCAB * 4, ROWS * NCOL * 8)

@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", CHUNK_ROWS * VOCAB)
    assert reference.chunk_rows(ROWS, VOCAB) == CHUNK_ROWS


def _check_kd(shape, dtype, teacher_grad, **kwargs):
    s = torch.randn(shape, dtype=dtype, requires_grad=True)
    t = torch.randn(shape, dtype=dtype, requires_grad=teacher_grad)
    labels = torch.randint(0, VOCAB, shape[:-1])
    labels.view(-1)[::3] = -100
    chunk_bytes = CHUNK_ROWS * VOCAB * 4  # chunks compute in float32
    rec = AllocationRecorder(keep_above=BIG)
    with rec:
        loss = kd.kd_loss(s, t, labels, impl="torch", **kwargs)
        loss.backward(torch.randn_like(loss) if loss.dim() else None)
    grads = [g for g in (s.grad, t.grad) if g is not None]
    assert len(grads) == (2 if teacher_grad else 1)
    grad_ids = {g.untyped_storage()._cdata for g in grads}
    big = [(op, st.nbytes()) for op, st in rec.big if st._cdata not in grad_ids]
    assert not big, f"allocations larger than {BIG} B besides grads: {big}"
    assert len(rec.big) == len(grads), f"gradients were copied: {[op for op, _ in rec.big]}"
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    bound = grad_bytes + LIVE_CHUNKS * chunk_bytes + LIVE_ROW_VECTORS * ROWS * 8
    assert rec.peak <= bound, (
        f"peak live extra {rec.peak} B > {bound} B (gradients {grad_bytes} B; one N x V "
        f"float32 tensor is {ROWS * VOCAB * 4} B)"
    )
    return rec


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_no_full_temporary(small_chunks, divergence):
    _check_kd((ROWS, VOCAB), torch.float32, True, divergence=divergence, temperature=2.0,
              ce_weight=0.5)


@pytest.mark.parametrize("reduction", ["none", "token_mean"])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["frozen-teacher", "teacher-grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_kd_loss_no_full_temporary_variants(small_chunks, dtype, teacher_grad, reduction):
    """3-D logits (reshaped views), low-precision inputs, a frozen teacher."""
    _check_kd((4, ROWS // 4, VOCAB), dtype, teacher_grad, divergence="jsd", reduction=reduction)


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["frozen-teacher", "teacher-grad"])
def test_inplace_backward_allocates_no_student_gradient(small_chunks, teacher_grad):
    """inplace_backward=True writes d/ds over the logits: no N x V buffer for it at all."""
    s = torch.randn(ROWS, VOCAB, requires_grad=True)
    t = torch.randn(ROWS, VOCAB, requires_grad=teacher_grad)
    rec = AllocationRecorder(keep_above=BIG)
    with rec:
        kd.kd_loss(s, t, temperature=2.0, impl="torch", inplace_backward=True).backward()
    assert s.grad.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
    assert len(rec.big) == (1 if teacher_grad else 0), [op for op, _ in rec.big]


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_kl_div_scalar_reductions_no_elementwise_tensor(monkeypatch, reduction):
    """Scalar reductions never build the elementwise terms: the forward allocates at most
    one chunk; backward allocates the two gradients and chunk temporaries only."""
    chunk = 256
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", chunk)
    x = torch.randn(60, 100, requires_grad=True)
    y = (torch.rand(60, 100) + 0.01).requires_grad_()
    rec = AllocationRecorder(keep_above=chunk * 4)
    with rec:
        out = kd.kl_div(x, y, reduction=reduction, impl="torch")
        forward_big = list(rec.big)
        out.backward()
    assert out.dim() == 0
    assert not forward_big, [op for op, _ in forward_big]
    grad_ids = {x.grad.untyped_storage()._cdata, y.grad.untyped_storage()._cdata}
    assert len(rec.big) == 2 and all(st._cdata in grad_ids for _, st in rec.big)


def test_recorder_sees_the_eager_pipeline():
    """The measurement can fail: the eager F.kl_div pipeline builds several N x V tensors,
    and the recorder reports them."""
    s = torch.randn(ROWS, VOCAB, requires_grad=True)
    t = torch.randn(ROWS, VOCAB)
    rec = AllocationRecorder(keep_above=CHUNK_ROWS * VOCAB * 4)
    with rec:
        loss = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean")
        loss.backward()
    assert len(rec.big) >= 4
    assert rec.peak >= 3 * ROWS * VOCAB * 4
