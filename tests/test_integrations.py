"""kdkernels.integrations.trl.generalized_jsd_loss gives TRL's GKD loss: values and gradients
against a float64 formula written here from the definition (always), and against TRL's own
`GKDTrainer.generalized_jsd_loss` when trl is installed (the `trl` extra; CI installs it),
including the documented one-liner that makes a GKD trainer use it."""

from __future__ import annotations

import math
import os
import types
import warnings

import pytest
import torch
from _device import DEVICE, float64_device
from torch import nn

from kdkernels import _dispatch
from kdkernels.integrations.trl import generalized_jsd_loss

pytestmark = pytest.mark.usefixtures("tensors_on_device")

# --------------------------------------------------------------------------------------
# the definition (arXiv:2306.13649, Eq. 1, in TRL's conventions), float64
# --------------------------------------------------------------------------------------


def gkd_formula(s, t, labels=None, beta=0.5, temperature=1.0, reduction="batchmean",
                num_items_in_batch=None):
    """Per token: p = softmax(t / T) (teacher), q = softmax(s / T) (student);
    beta = 0: KL(p || q); beta = 1: KL(q || p); else, with m = beta p + (1 - beta) q,
    beta KL(p || m) + (1 - beta) KL(q || m). Tokens whose label is -100 are dropped; the
    sum over the rest is divided by num_items_in_batch if given, else per `reduction`:
    batchmean by the unmasked tokens (at least 1; without labels by s.shape[0]), mean by
    the number of elements of the unmasked (tokens, V) terms, sum not at all."""
    lq = torch.log_softmax(s / temperature, -1)
    lp = torch.log_softmax(t / temperature, -1)
    q, p = lq.exp(), lp.exp()
    if beta == 0:
        row = (p * (lp - lq)).sum(-1)
    elif beta == 1:
        row = (q * (lq - lp)).sum(-1)
    else:
        lm = torch.log(beta * p + (1 - beta) * q)
        row = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    if labels is not None:
        row = row[labels != -100]
    total = row.sum()
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / (max(row.numel(), 1) if labels is not None else s.shape[0])
    assert reduction == "mean"
    return total / (row.numel() * s.shape[-1])


def _inputs(dtype=torch.float64, batch=3, seq=7, vocab=311, masked=True, device=DEVICE):
    """Drawn on the CPU (the same values on every machine), then moved to `device`."""
    s = torch.randn(batch, seq, vocab, dtype=torch.float64, device="cpu").mul(2).to(device, dtype)
    t = torch.randn(batch, seq, vocab, dtype=torch.float64, device="cpu").mul(2).to(device, dtype)
    labels = torch.randint(0, vocab, (batch, seq), device="cpu").to(device)
    if masked:  # a prompt (masked) and right padding (masked), as GKD's collator makes them
        labels[:, :2] = -100
        labels[0, -3:] = -100
    return s, t, labels


def _dtype_tol(impl):
    """float64 where the implementation has it on the test device (then only rounding
    separates it from the formula), else float32 inputs compared with the float64 formula at
    float32 precision."""
    # ext: float64 on the CPU only
    if torch.float64 in _dispatch.supported_dtypes(impl, DEVICE):
        return torch.float64, dict(rtol=1e-9, atol=1e-12)
    return torch.float32, dict(rtol=2e-5, atol=2e-6)


def _value_and_grads(fn, s, t, labels, **kw):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = fn(s, t, labels, **kw)
    out.backward(torch.tensor(0.7, dtype=out.dtype, device=out.device))  # a non-unit one
    return out.detach(), s.grad, t.grad


CASES = [
    dict(beta=0.0),
    dict(beta=1.0),
    dict(beta=0.5),
    dict(beta=0.1, temperature=2.0),
    dict(beta=0.9, reduction="sum"),
    dict(beta=0.5, reduction="mean", temperature=0.5),
    dict(beta=0.3, num_items_in_batch=11),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
def test_against_the_formula(impl, kw, with_labels):
    dtype, tol = _dtype_tol(impl)
    s, t, labels = _inputs(dtype)
    labels = labels if with_labels else None
    got = _value_and_grads(generalized_jsd_loss, s, t, labels, impl=impl, **kw)
    want = _value_and_grads(gkd_formula, s.double(), t.double(), labels, **kw)
    for g, w, what in zip(got, want, ("loss", "student gradient", "teacher gradient"),
                          strict=True):
        torch.testing.assert_close(g.double(), w, msg=what, **tol)


def test_every_token_masked(impl):
    # batchmean divides by at least one token: 0 with zero gradients, not nan
    s, t, labels = _inputs(_dtype_tol(impl)[0])
    labels[:] = -100
    out, gs, gt = _value_and_grads(generalized_jsd_loss, s, t, labels, impl=impl)
    assert out.item() == 0.0 and not gs.any() and not gt.any()
    # mean over no elements: nan, as torch's mean of an empty selection
    assert math.isnan(generalized_jsd_loss(s, t, labels, reduction="mean", impl=impl).item())


def test_label_values_only_mask(impl):
    # any label other than -100 counts, in or out of [0, V) (no hard-label term reads it)
    s, t, labels = _inputs(_dtype_tol(impl)[0], vocab=50)
    wide = torch.where(labels == -100, labels, labels + 1000)
    a = generalized_jsd_loss(s, t, labels, impl=impl)
    b = generalized_jsd_loss(s, t, wide, impl=impl)
    assert a.item() == b.item()


def test_vocab_size_for_a_padded_teacher(impl):
    dtype, tol = _dtype_tol(impl)
    s, t, labels = _inputs(dtype, vocab=300)
    t_padded = torch.cat([t, torch.randn(*t.shape[:-1], 12, dtype=t.dtype)], -1)
    got = generalized_jsd_loss(s, t_padded, labels, vocab_size=300, impl=impl)
    want = gkd_formula(s.double(), t.double(), labels)
    torch.testing.assert_close(got.double(), want, **tol)


def test_rejects_what_it_does_not_compute():
    s, t, labels = _inputs()
    with pytest.raises(ValueError, match="reduction must be one of"):
        generalized_jsd_loss(s, t, labels, reduction="none")
    with pytest.raises(ValueError, match="logits_are_probs"):
        generalized_jsd_loss(s.softmax(-1), t.softmax(-1), labels, logits_are_probs=True)


# --------------------------------------------------------------------------------------
# against TRL itself
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gkd_trainer():
    """TRL's GKDTrainer class (trl.experimental.gkd in current TRL, trl before)."""
    pytest.importorskip("trl", reason="trl is not installed (pip install 'kdkernels[trl]')")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:
            from trl import GKDTrainer
    return GKDTrainer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_against_trl(gkd_trainer, impl, dtype, kw):
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("impl='triton' has no float64")
    device = float64_device(impl) if dtype == torch.float64 else DEVICE
    s, t, labels = _inputs(dtype, device=device)
    got = _value_and_grads(generalized_jsd_loss, s, t, labels, impl=impl, **kw)
    want = _value_and_grads(gkd_trainer.generalized_jsd_loss, s, t, labels, **kw)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    for g, w, what in zip(got, want, ("loss", "student gradient", "teacher gradient"),
                          strict=True):
        torch.testing.assert_close(g.to(w.dtype), w, msg=what, **tol)


class _TinyLM(nn.Module):
    """input_ids -> .logits, enough of a causal LM for GKDTrainer.compute_loss."""

    def __init__(self, vocab=97, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.head(torch.tanh(self.embed(input_ids))))


def test_one_liner_makes_gkd_trainer_use_it(gkd_trainer, monkeypatch):
    # GKDTrainer.compute_loss on a trainer object without its __init__ (which needs a
    # dataset and a tokenizer): only teacher_model and beta are read
    student, teacher = _TinyLM(), _TinyLM()
    trainer = gkd_trainer.__new__(gkd_trainer)
    trainer.__dict__.update(teacher_model=teacher, beta=0.4)
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def loss_and_grads():
        student.zero_grad()
        loss = gkd_trainer.compute_loss(trainer, student, inputs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    want = loss_and_grads()
    import kdkernels.integrations.trl

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return kdkernels.integrations.trl.generalized_jsd_loss(*args, **kwargs)

    # the documented one-liner (wrapped here only to count the calls)
    monkeypatch.setattr(gkd_trainer, "generalized_jsd_loss", staticmethod(counted))
    got = loss_and_grads()
    assert calls, "GKDTrainer.compute_loss did not call kdkernels"
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
