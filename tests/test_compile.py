"""torch.compile(fullgraph=True) of a small distillation step that calls kd.kd_loss (and
kl_div, softmax, log_softmax): the compiled loss and gradients equal eager ones. Backward
runs outside the compiled function (through the AOTAutograd graph), which is how a training
loop compiles its loss.
"""

import pytest
import torch

import kdkernels as kd

# tensors the tests create land on the device of the `device` fixture
pytestmark = pytest.mark.usefixtures("tensors_on_device")


def _step_and_check(impl):
    torch._dynamo.reset()
    student = torch.nn.Linear(16, 40)
    x = torch.randn(6, 16)
    teacher = torch.randn(6, 40, requires_grad=True)
    labels = torch.tensor([1, 2, -100, 4, 5, 39])

    def loss_fn(x, teacher, labels):
        # every public function in one graph: kd_loss, and the F.kl_div drop-in fed by the
        # temperature softmaxes
        logits = student(x)
        kd_term = kd.kd_loss(logits, teacher, labels, divergence="jsd", temperature=2.0,
                             ce_weight=0.5, impl=impl)
        log_q = kd.log_softmax(logits, 2.0, impl=impl)
        p = kd.softmax(teacher, 2.0, impl=impl)
        return kd_term + 0.5 * kd.kl_div(log_q, p, reduction="batchmean", impl=impl)

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        student.zero_grad()
        teacher.grad = None
        loss = fn(x, teacher, labels)
        (loss * 0.7).backward()
        results.append((loss.detach(), student.weight.grad.clone(), teacher.grad.clone()))
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_fullgraph(impl):
    _step_and_check(impl)


def _sparse_step_and_check(impl):
    """The top-k teacher loss in a compiled step: equal to eager, value and gradients (the
    student's weights and the teacher's log-probabilities)."""
    torch._dynamo.reset()
    student = torch.nn.Linear(16, 40)
    x = torch.randn(6, 16)
    ids = torch.stack([torch.randperm(40)[:5] for _ in range(6)])
    ids[1, -1] = -1
    lp = torch.log_softmax(torch.randn(6, 40), -1).gather(1, ids.clamp(min=0))
    lp.requires_grad_()
    labels = torch.tensor([1, 2, -100, 4, 5, 39])

    def loss_fn(x, lp):
        return kd.sparse_kd_loss(student(x), ids, lp, labels, tail="bucket",
                                 divergence="jsd", temperature=2.0, ce_weight=0.5, impl=impl)

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        student.zero_grad()
        lp.grad = None
        loss = fn(x, lp)
        (loss * 0.7).backward()
        results.append((loss.detach(), student.weight.grad.clone(), lp.grad.clone()))
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_sparse_fullgraph(impl):
    _sparse_step_and_check(impl)
