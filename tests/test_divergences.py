"""The divergences other distillation tools define (torchtune, Liger, ABKD): their parameters
against the float64 formulas of _formulas.py, and the tools' own definitions, reproduced from
their source, against kd_loss.

  torchtune ForwardKLLoss   -sum p log q per row, masked where the student logit is inf, mean
                            over rows whose label is not ignore_index: soft_cross_entropy
  torchtune-style SymmetricKLLoss(lambda)
                            (1 - lambda) ForwardKLLoss + lambda ReverseKLLoss, whose forward
                            term is the soft cross-entropy above: forward_reverse_kl with
                            alpha = 1 - lambda plus (1 - lambda) H(p) (the teacher's entropy,
                            a constant for the student: same student gradient)
  Liger LigerTVDLoss        0.5 |p - q| per element of probability rows, d/dp = 0.5 sgn(p - q)
                            with 0 where p == q: tvd on the softmaxes
"""

import pytest
import torch
import torch.nn.functional as F
from _device import float64_device
from _formulas import check_kd_loss, skip_unsupported

import kdkernels as kd

pytestmark = pytest.mark.usefixtures("tensors_on_device")


def logits(shape, dtype=torch.float32, scale=2.0):
    return (torch.randn(shape) * scale).to(dtype)


def labels_for(n, v):
    labels = torch.randint(0, v, (n,))
    labels[::3] = -100
    return labels


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_forward_reverse_kl_weights(impl, alpha):
    """alpha = 1 / 0 are exactly forward / reverse KL (their kinds), between them both."""
    shape = (5, 67)
    check_kd_loss(impl, logits(shape), logits(shape), labels_for(5, 67),
                  divergence="forward_reverse_kl", alpha=alpha, temperature=2.0,
                  ce_weight=0.5, reduction="none")


@pytest.mark.parametrize("ab", [(0.5, 0.5), (0.2, 0.7), (1.5, 0.5), (1.0, 0.0), (0.0, 1.0)])
def test_alpha_beta_parameters(impl, ab):
    shape = (5, 67)
    check_kd_loss(impl, logits(shape), logits(shape), labels_for(5, 67),
                  divergence="alpha_beta", ab_alpha=ab[0], ab_beta=ab[1], temperature=2.0,
                  teacher_temperature=1.5, ce_weight=0.5, reduction="none")


def test_alpha_beta_special_cases(impl):
    """(1/2, 1/2) is 2 sum (sqrt p - sqrt q)^2; (1, b -> 0) tends to forward KL and
    (a -> 0, 1) to reverse KL (the error is first order in the small exponent)."""
    skip_unsupported(impl, torch.float64)
    device = float64_device(impl)
    s, t = logits((4, 50), torch.float64).to(device), logits((4, 50), torch.float64).to(device)
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    hel = kd.kd_loss(s, t, divergence="alpha_beta", ab_alpha=0.5, ab_beta=0.5, impl=impl,
                     reduction="none")
    torch.testing.assert_close(hel, 2 * (p.sqrt() - q.sqrt()).square().sum(-1))
    fkl = (p * (p.log() - q.log())).sum(-1)
    rkl = (q * (q.log() - p.log())).sum(-1)
    for eps in (1e-3, 1e-4):
        near_f = kd.kd_loss(s, t, divergence="alpha_beta", ab_alpha=1.0, ab_beta=eps,
                            impl=impl, reduction="none")
        near_r = kd.kd_loss(s, t, divergence="alpha_beta", ab_alpha=eps, ab_beta=1.0,
                            impl=impl, reduction="none")
        assert (near_f - fkl).abs().max() < 50 * eps * fkl.abs().max()
        assert (near_r - rkl).abs().max() < 50 * eps * rkl.abs().max()


@pytest.mark.parametrize("ab", [(0.5, 0.0), (0.0, 0.5), (-0.5, 1.0), (0.0, 0.0)])
def test_alpha_beta_rejects_log_limits(ab):
    s = logits((2, 5))
    with pytest.raises(ValueError, match="ab_alpha"):
        kd.kd_loss(s, s, divergence="alpha_beta", ab_alpha=ab[0], ab_beta=ab[1])


def test_alpha_out_of_range():
    s = logits((2, 5))
    with pytest.raises(ValueError, match="alpha"):
        kd.kd_loss(s, s, divergence="forward_reverse_kl", alpha=1.5)


def _torchtune_forward_kl(s, t, labels, ignore_index=-100):
    # torchtune.modules.loss.ForwardKLLoss.forward (normalize=True)
    teacher_prob = F.softmax(t, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(s)
    student_logprob = F.log_softmax(s, dim=-1, dtype=torch.float32)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def _torchtune_reverse_kl(s, t, labels, ignore_index=-100):
    # the ReverseKLLoss that torchtune-derived SymmetricKLLoss combines (normalize=True)
    student_probs = F.softmax(s, dim=-1, dtype=torch.float32)
    student_logprobs = F.log_softmax(s, dim=-1, dtype=torch.float32)
    teacher_logprobs = F.log_softmax(t, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(t) | torch.isinf(s)
    prod_probs = torch.masked_fill(student_probs * teacher_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def test_torchtune_forward_kl_loss(impl):
    """torchtune's ForwardKLLoss is the soft cross-entropy, and so is its gradient."""
    s, t = logits((6, 97)), logits((6, 97))
    labels = labels_for(6, 97)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = kd.kd_loss(s1, t, labels, divergence="soft_cross_entropy", impl=impl)
    want = _torchtune_forward_kl(s2, t, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lam", [0.5, 0.9])
def test_torchtune_symmetric_kl_loss(impl, lam):
    """(1 - lam) ForwardKLLoss + lam ReverseKLLoss = forward_reverse_kl(alpha = 1 - lam) +
    (1 - lam) H(p): the same student gradient."""
    s, t = logits((6, 97)), logits((6, 97))
    labels = labels_for(6, 97)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = kd.kd_loss(s1, t, labels, divergence="forward_reverse_kl", alpha=1.0 - lam,
                     impl=impl)
    want = ((1 - lam) * _torchtune_forward_kl(s2, t, labels)
            + lam * _torchtune_reverse_kl(s2, t, labels))
    lp = torch.log_softmax(t.double(), -1)
    valid = labels != -100
    entropy = -(lp.exp() * lp).sum(-1)[valid].mean()
    torch.testing.assert_close(got.double() + (1 - lam) * entropy, want.double(), rtol=1e-5,
                               atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)


def _liger_tvd(p, q):
    # liger_kernel.ops.tvd._tv_distance_kernel, elementwise (reduction="none"): the loss
    # 0.5 |p - q| and its gradient w.r.t. p, 0.5 sgn(p - q) with 0 where p == q
    loss = 0.5 * torch.abs(p - q)
    grad = torch.where(p == q, 0.0, torch.where(p > q, 0.5, -0.5))
    return loss, grad


def test_liger_tvd(impl):
    """Liger's TVD of the softmaxes, its gradient w.r.t. the student's probabilities chained
    through the softmax; rows with p == q (equal logits) have the sub-gradient 0."""
    s, t = logits((5, 67)), logits((5, 67))
    s[0] = t[0]
    s = s.requires_grad_()
    got = kd.kd_loss(s, t, divergence="tvd", impl=impl, reduction="none")
    got.sum().backward()
    q = torch.softmax(s.detach().double(), -1)
    p = torch.softmax(t.double(), -1)
    loss, dq = _liger_tvd(q, p)
    torch.testing.assert_close(got.double(), loss.sum(-1), rtol=1e-5, atol=1e-6)
    # softmax's backward: dz = q (dq - sum dq q)
    want = q * (dq - (dq * q).sum(-1, keepdim=True))
    torch.testing.assert_close(s.grad.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(s.grad[0], torch.zeros_like(s.grad[0]))


def test_module_takes_the_new_keywords():
    """KDLoss reads its options off kd_loss's signature: alpha, ab_alpha, ab_beta too."""
    s, t = logits((4, 33)), logits((4, 33))
    for kw in (dict(divergence="forward_reverse_kl", alpha=0.3),
               dict(divergence="alpha_beta", ab_alpha=0.2, ab_beta=0.7)):
        got = kd.KDLoss(impl="torch", **kw)(s, t)
        torch.testing.assert_close(got, kd.kd_loss(s, t, impl="torch", **kw))


@pytest.mark.parametrize("divergence, weight", [("skew_reverse_kl", {"skew": 1e-8}),
                                                ("skew_forward_kl", {"skew": 1e-8}),
                                                ("jsd", {"beta": 1e-8}),
                                                ("jsd", {"beta": 1 - 1e-8})])
def test_mixture_weight_within_float32_rounding_of_0_or_1(impl, divergence, weight):
    """A mixture weight a whose 1 - a is below float32's resolution of 1 (skew reverse KL at
    skew 1e-8 mixes 1 - 1e-8 of the teacher) keeps its exact 1 - a, log(1 - a) and 1 / (1 - a):
    the loss and gradients are the float64 formula's, not inf."""
    s, t = logits((4, 300)), logits((4, 300))
    check_kd_loss(impl, s, t, divergence=divergence, **weight)
