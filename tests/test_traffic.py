"""The memory-traffic counter of bench/traffic.py (interpreted tl.load / tl.store bytes).

The counter is checked on kernels whose traffic is known exactly from their code (the
Triton softmax and kl_div kernels: see the traffic notes at the top of their files), at odd
widths, so that counting whole tiles instead of masked-in lanes would fail. Then the
targets of bench/traffic.py are checked on the kd_loss kernels.
"""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` at the repo root
from bench import traffic as tr  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="counts bytes through the Triton interpreter (TRITON_INTERPRET=1, set on CPU "
    "by conftest.py); on a GPU run `python -m bench.traffic`, which starts its own process",
)

sm = importlib.import_module("kdkernels.triton.softmax")
kl = importlib.import_module("kdkernels.triton.kl_div")

BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}


def _softmax_traffic(x, log):
    x = x.detach().clone().requires_grad_()
    with tr.count_traffic() as fwd:
        y = sm.softmax(x, 0.5, log)
    g = torch.randn_like(y)
    with tr.count_traffic() as bwd:
        y.backward(g)
    return fwd, bwd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_one_tile_exact(dtype, log):
    """V <= BLOCK: x read once, y written once; backward reads g and y once, writes dx."""
    n, v = 3, 1001  # BLOCK = 1024: 23 masked-off lanes per row must not count
    b = BYTES[dtype]
    fwd, bwd = _softmax_traffic(torch.randn(n, v, dtype=dtype), log)
    assert (fwd.read, fwd.write) == (n * v * b, n * v * b)
    assert (bwd.read, bwd.write) == (2 * n * v * b, n * v * b)
    assert fwd.uncounted == bwd.uncounted == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_several_tiles_exact(monkeypatch, dtype, log):
    """V > BLOCK: forward reads x twice; backward's first loop reads g and y (softmax,
    sum g y) or g alone (log_softmax, sum g), its second loop reads both and writes dx."""
    monkeypatch.setattr(sm, "MAX_BLOCK", 256)
    n, v = 2, 1001  # 4 tiles, the last one ragged
    b = BYTES[dtype]
    fwd, bwd = _softmax_traffic(torch.randn(n, v, dtype=dtype), log)
    assert (fwd.read, fwd.write) == (2 * n * v * b, n * v * b)
    first = (1 if log else 2) * n * v * b
    assert (bwd.read, bwd.write) == (first + 2 * n * v * b, n * v * b)


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logprob"])
def test_kl_div_sum_writes_no_elementwise_tensor(log_target):
    """Scalar reduction: x and y read once; the only stores are one fp32 partial sum per
    program of the persistent grid (the "no elementwise tensor" claim, in bytes)."""
    n = 3 * kl.BLOCK * kl.CPU_PROGRAMS + 5  # programs loop over several tiles
    x = torch.randn(n).log_softmax(0).to(torch.bfloat16)
    y = torch.rand(n, dtype=torch.float32)
    with tr.count_traffic() as fwd:
        kl.kl_div(x, y, log_target, True)
    assert fwd.read == n * (2 + 4)
    assert fwd.write == kl.CPU_PROGRAMS * 4


def test_kl_div_backward_reads_only_what_it_needs():
    """d/dx only (the F.kl_div training case): read y and g, write dx; x is not read."""
    n = 5003
    x = torch.randn(n).log_softmax(0).requires_grad_()
    y = torch.rand(n)
    out = kl.kl_div(x, y, False, False)
    with tr.count_traffic() as bwd:
        out.backward(torch.randn(n))
    assert (bwd.read, bwd.write) == (2 * n * 4, n * 4)


def test_counter_restores_the_interpreter():
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    with tr.count_traffic():
        assert "create_masked_load" in vars(builder)
    assert "create_masked_load" not in vars(builder)
    assert "create_masked_store" not in vars(builder)
    # outside the block nothing is counted
    with tr.count_traffic() as t:
        pass
    sm.softmax(torch.randn(2, 10), 1.0, False)
    assert t.total == 0


def test_table_and_csv(tmp_path):
    res = tr.measure(["softmax", "kl_div"], ["bf16"], [(2, 300)])
    text = tr.format_table(res)
    assert "softmax" in text and "kl_div" in text
    softmax = next(r for r in res if r.function == "softmax")
    assert softmax.fwd_b == pytest.approx(4.0)  # 2 B read + 2 B written per element
    assert tr.main(["--function", "softmax", "--dtype", "fp32", "--shape", "2x77",
                    "--csv", str(tmp_path / "t.csv")]) == 0
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("softmax,T=2,fp32,2,77,")


# --------------------------------------------------------------------------------------
# the targets on the kd_loss kernels (bfloat16, teacher without gradient)
# --------------------------------------------------------------------------------------

KD_MISSING = importlib.util.find_spec("kdkernels.triton.kd") is None


@pytest.mark.skipif(KD_MISSING, reason="kdkernels/triton/kd.py does not exist yet")
@pytest.mark.parametrize("shape", [(4, 4096), (3, 5003), (2, 32000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("divergence", tr.DIVERGENCES)
# numpy's notes on -inf - -inf and log(0) inside the interpreted kd kernels (masked lanes)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_kd_loss_traffic_targets(divergence, shape):
    r = tr.measure_kd_loss(divergence, "bf16", *shape)
    both, fwd = tr.TARGETS_BF16[divergence]
    assert r.fwd.total > 0 and r.bwd.total > 0, "nothing counted: kernels not interpreted?"
    assert r.total_b <= both, f"{divergence}: fwd+bwd {r.total_b:.2f} B/elem > {both}"
    if fwd is not None:
        assert r.fwd_b <= fwd, f"{divergence}: forward {r.fwd_b:.2f} B/elem > {fwd}"
    # the two-pass floor, 10 B: s and t read in forward and again in backward, d s written
    assert r.total_b >= 10.0, "counted less than the bytes the math must move"


# --------------------------------------------------------------------------------------
# the sparse (top-k) teacher loss: the student is the only N x V tensor
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 32000), (3, 5003)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tail,ce_weight", [("bucket", 0.0), ("bucket", 0.5), ("none", 0.0)])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_sparse_kd_loss_traffic_target(tail, ce_weight, shape):
    """bfloat16 forward + backward at most 6.5 B per student element: the logits read once
    for the statistics (2 B), once more and the gradient written in the backward (4 B),
    with cross-entropy at Ts != 1 in the same passes. renormalize without cross-entropy
    moves no N x V bytes at all (the K gathered logits only)."""
    import kdkernels as kd

    n, v = shape
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g).to(torch.bfloat16).requires_grad_()
    ids, lp = kd.topk_logprobs(torch.randn(n, v, generator=g), 64)
    labels = torch.randint(0, v, (n,), generator=g)

    def loss(tail, ce_weight):
        return kd.sparse_kd_loss(s, ids, lp, labels, tail=tail, temperature=2.0,
                                 ce_weight=ce_weight, impl="triton")

    fwd, bwd = tr._run(lambda: loss(tail, ce_weight))
    total = (fwd.total + bwd.total) / (n * v)
    assert fwd.total > 0 and bwd.total > 0, "nothing counted: kernels not interpreted?"
    assert total <= 6.5, f"{tail}: fwd+bwd {total:.2f} B/elem > 6.5"
    assert total >= 6.0, "counted less than the bytes the math must move"
    s.grad = None
    fwd, bwd = tr._run(lambda: loss("renormalize", 0.0))
    assert fwd.total + bwd.total < n * 64 * 8
