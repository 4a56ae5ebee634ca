"""pytest-benchmark suite over the providers of `python -m bench`, at small shapes.

    pytest bench                         # CPU shapes (~1 min); GPU shapes skip without CUDA
    pytest bench --benchmark-disable     # every target once: only the correctness checks
    pytest bench -m gpu                  # on a GPU machine: the real shapes, GB/s in extra_info

Every benchmark first checks its provider's loss and gradient against float64 (bench.truth's
ground truth, DESIGN.md §1 written in float64). Error model: a provider may be off by at most
twice the error of the eager float32/bf16 pipeline on the same inputs, plus a floor of
2 * eps(dtype) * |value| * log2(terms summed) -- the bound of a pairwise-summed reduction
(the loss sums N*V terms; each gradient entry depends on a logsumexp over V terms). The
floor keeps a lucky, near-exact eager result from failing a correct kernel.

The same file tests the measuring tools themselves: the CPU memory meter against known
allocations, the command line end to end, and the subcommand dispatcher.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench import cli, measure, providers, report
from bench.truth import ground_truth

CPU = torch.device("cpu")
CUDA = torch.device("cuda")

CPU_CASE = (128, 8192, torch.float32)  # N, V, dtype: ~10-50 ms per eager step on 2 cores
GPU_CASES = [  # the GPU targets' shape and two other real vocabularies
    (8192, 128256, torch.bfloat16),
    (4096, 152064, torch.bfloat16),
    (8192, 32000, torch.float32),
]
MODES = ("forward", "full")
STEP_PROVIDERS = [p for p in providers.PROVIDERS if p not in providers.COPIES]

_INPUTS: dict = {}
_TRUTH: dict = {}
_FNS: dict = {}
_EAGER_ERR: dict = {}


def _cfg(n, v, dtype, device):
    return providers.Config(n, v, dtype, device, temperature=2.0)


def _inputs(cfg):
    key = (cfg.n, cfg.v, cfg.dtype, cfg.device)
    if key not in _INPUTS:
        _INPUTS.clear()  # one shape at a time: GPU shapes are GBs
        _TRUTH.clear()
        _FNS.clear()
        _EAGER_ERR.clear()
        _INPUTS[key] = providers.make_inputs(cfg, seed=0)
    return _INPUTS[key]


def _truth(cfg, divergence):
    key = (cfg, divergence)
    if key not in _TRUTH:
        s, t = _inputs(cfg)
        _TRUTH[key] = ground_truth(s, t, divergence, cfg, grad_rows=64, need_grad=True)
    return _TRUTH[key]


def _fn(provider, cfg, divergence):
    """Loss functions are cached so a compiled provider compiles once for all its modes."""
    key = (provider, cfg, divergence)
    if key not in _FNS:
        _FNS[key] = providers.make_loss(provider, divergence, cfg)
    return _FNS[key]


def _errors(fn, cfg, divergence):
    """(loss error, gradient error) of one forward+backward against float64."""
    s, t = _inputs(cfg)
    truth = _truth(cfg, divergence)
    s.grad = None
    loss = fn(s, t)
    loss.backward()
    loss_err = abs(float(loss.detach().double()) - truth.loss)
    grad_err = float((s.grad[truth.rows].double() - truth.grad).abs().max())
    s.grad = None
    return loss_err, grad_err


def _check_accuracy(provider, cfg, divergence):
    key = (cfg, divergence)
    if key not in _EAGER_ERR:
        _EAGER_ERR[key] = _errors(_fn("eager", cfg, divergence), cfg, divergence)
    eager_loss_err, eager_grad_err = _EAGER_ERR[key]
    truth = _truth(cfg, divergence)
    eps = torch.finfo(cfg.dtype).eps
    loss_tol = 2 * eager_loss_err + 2 * eps * abs(truth.loss) * math.log2(cfg.n * cfg.v)
    grad_tol = (2 * eager_grad_err
                + 2 * eps * float(truth.grad.abs().max()) * math.log2(cfg.v))
    loss_err, grad_err = _errors(_fn(provider, cfg, divergence), cfg, divergence)
    assert loss_err <= loss_tol, (provider, divergence, loss_err, loss_tol, eager_loss_err)
    assert grad_err <= grad_tol, (provider, divergence, grad_err, grad_tol, eager_grad_err)


def _bench_step(benchmark, provider, cfg, divergence, mode, rounds):
    ok, why = providers.availability(provider, cfg, explicit=False)
    if not ok:
        pytest.skip(f"{provider}: {why}")
    _check_accuracy(provider, cfg, divergence)
    s, t = _inputs(cfg)
    fn = _fn(provider, cfg, divergence)
    backward = mode == "full"

    def reset():
        s.grad = None

    def target():
        loss = fn(s, t)
        if backward:
            loss.backward()
        if cfg.device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{cfg.n}x{cfg.v} {providers.dtype_name(cfg.dtype)} {divergence} {mode}"
    benchmark.extra_info["bytes_moved"] = providers.bytes_moved(divergence, mode, cfg)
    benchmark.pedantic(target, setup=reset, rounds=rounds, warmup_rounds=1)
    reset()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        benchmark.extra_info["GBps"] = benchmark.extra_info["bytes_moved"] / median / 1e9
        bw = measure.peak_bandwidth(cfg.device)
        if bw:
            benchmark.extra_info["bw_fraction"] = benchmark.extra_info["bytes_moved"] / median / bw


def _bench_copy(benchmark, provider, cfg, rounds):
    s, t = _inputs(cfg)
    sd = s.detach()
    buf = torch.empty_like(t)
    out = {}

    def target():
        out["y"] = torch.add(sd, t, out=buf) if provider == "copy_prealloc" else torch.add(sd, t)
        if cfg.device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{cfg.n}x{cfg.v} {providers.dtype_name(cfg.dtype)} copy"
    benchmark.extra_info["bytes_moved"] = providers.bytes_moved("forward_kl", "copy", cfg)
    benchmark.pedantic(target, rounds=rounds, warmup_rounds=1)
    torch.testing.assert_close(out["y"], sd + t, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# CPU shapes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", STEP_PROVIDERS)
def test_cpu_forward_kl(benchmark, provider, mode):
    _bench_step(benchmark, provider, _cfg(*CPU_CASE, CPU), "forward_kl", mode, rounds=3)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("provider", ["kd-torch", "kd-ext", "eager"])
def test_cpu_other_divergences(benchmark, provider, divergence):
    _bench_step(benchmark, provider, _cfg(*CPU_CASE, CPU), divergence, "full", rounds=3)


@pytest.mark.parametrize("provider", providers.COPIES)
def test_cpu_copy_floor(benchmark, provider):
    _bench_copy(benchmark, provider, _cfg(*CPU_CASE, CPU), rounds=3)


# --------------------------------------------------------------------------------------
# GPU shapes (skipped without CUDA)
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", STEP_PROVIDERS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_gpu_forward_kl(benchmark, case, provider, mode):
    _bench_step(benchmark, provider, _cfg(*case, CUDA), "forward_kl", mode, rounds=20)


@pytest.mark.gpu
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("provider", ["kd-triton", "kd-ext", "eager"])
def test_gpu_other_divergences(benchmark, provider, divergence):
    _bench_step(benchmark, provider, _cfg(*GPU_CASES[0], CUDA), divergence, "full", rounds=20)


@pytest.mark.gpu
@pytest.mark.parametrize("provider", providers.COPIES)
def test_gpu_copy_floor(benchmark, provider):
    _bench_copy(benchmark, provider, _cfg(*GPU_CASES[0], CUDA), rounds=20)


# --------------------------------------------------------------------------------------
# The measuring tools
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", providers.DIVERGENCES)
def test_ground_truth_matches_eager_and_reference(divergence):
    """The three formulas of one loss agree in float64: bench's ground truth (logsumexp
    written out), the eager F.kl_div pipeline, and kdkernels' reference; beta and skew are
    asymmetric so a swapped convention would show."""
    import kdkernels as kd

    cfg = providers.Config(16, 1000, torch.float32, CPU, temperature=2.0, beta=0.3, skew=0.2)
    s, t = providers.make_inputs(cfg, seed=1)
    truth = ground_truth(s, t, divergence, cfg, grad_rows=8, need_grad=True)
    assert truth.rows.numel() == 8
    candidates = {
        "eager": lambda x: providers.eager_loss(x, t.double(), divergence, cfg),
        "reference": lambda x: kd.kd_loss(
            x, t.double(), divergence=divergence, beta=cfg.beta, skew=cfg.skew,
            temperature=cfg.temperature, reduction="batchmean", impl="torch"),
    }
    for name, f in candidates.items():
        x = s.detach().double().requires_grad_()
        loss = f(x)
        loss.backward()
        assert abs(float(loss.detach()) - truth.loss) < 1e-12, name
        torch.testing.assert_close(x.grad[truth.rows], truth.grad, rtol=1e-10, atol=1e-15)


def test_cpu_memory_meter_is_exact():
    """Peak and net of the profiler's allocator events equal the bytes allocated; a block
    allocated in one profiled call and freed in the next counts negative there (forward ->
    backward). c10 cannot report the free of a block allocated while no profiler ran (it
    never learned its size), which is why measure_memory starts both of its calls with only
    the inputs live."""
    mib = 1 << 20

    def f():
        a = torch.empty(8 * mib, dtype=torch.uint8)
        b = torch.empty(16 * mib, dtype=torch.uint8)
        del a
        c = torch.empty(4 * mib, dtype=torch.uint8)
        return [b, c]

    held, peak, net = measure.profile_peak(f)
    assert (peak, net) == (24 * mib, 20 * mib)

    def g():
        held.pop(0)  # frees b, allocated during the previous call
        return torch.empty(6 * mib, dtype=torch.uint8)

    d, peak, net = measure.profile_peak(g)
    assert (peak, net) == (0, 6 * mib - 16 * mib)
    del d


def test_cpu_memory_meter_sees_backward_and_step():
    """measure_memory on x -> (x * 2).exp().sum(): forward keeps exp's output for backward
    (one tensor) after a transient second one; backward allocates the gradient."""
    x = torch.randn(1 << 18, requires_grad=True)  # 1 MiB float32
    nbytes = x.numel() * 4

    loss, mem = measure.measure_memory(lambda: (x * 2).exp().sum(), CPU, backward=True)
    assert x.grad is not None and torch.isfinite(loss)
    assert 2 * nbytes <= mem.forward < 2 * nbytes + 4096  # x*2 and exp() live together
    assert nbytes <= mem.backward  # the gradient, at least
    assert mem.full >= max(mem.forward, nbytes + mem.backward)


def test_cli_quick_run(tmp_path, capsys):
    """`python -m bench --quick` end to end: table, targets, CSV with the machine comment
    lines, and a PNG; the rows it reports are accurate and count the gradient's memory."""
    out = tmp_path / "run.csv"
    rc = cli.main(["--quick", "--providers", "kd-torch,eager,copy_floor", "--reps", "2",
                    "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Targets (same run;" in text and "kd-torch time / eager time" in text
    info, rows = report.read_csv(out)
    for key in ("machine", "cpu", "torch", "triton", "date", "command"):
        assert key in info, key
    got = {(r["provider"], r["mode"]) for r in rows}
    want = {(p, m) for p in ("kd-torch", "eager") for m in providers.MODES}
    assert want | {("copy_floor", "full")} == got
    nv32 = 128 * 4096 * 4
    for r in rows:
        assert float(r["median_s"]) > 0
        if r["provider"] == "copy_floor":
            assert int(r["peak_extra_bytes"]) == nv32  # one fresh N x V output
            continue
        assert float(r["loss_abs_err"]) < 1e-4
        if r["mode"] != "forward":
            assert float(r["grad_abs_err"]) < 1e-6
        if r["mode"] == "full":
            assert int(r["peak_extra_bytes"]) >= nv32  # the gradient is counted
    eager_full = next(r for r in rows if r["provider"] == "eager" and r["mode"] == "full")
    assert float(eager_full["time_vs_eager"]) == 1.0
    png = out.with_suffix(".png")
    assert png.exists() and png.stat().st_size > 10_000


def test_cli_every_divergence_as_a_ratio_to_forward_kl(tmp_path, capsys):
    """`--divergence all` times every divergence of kdkernels (_spec.DIVERGENCES, so one
    added there shows up here) and prints each as a ratio to the same provider's forward KL."""
    from kdkernels import _spec

    out = tmp_path / "all.csv"
    rc = cli.main(["--n", "8", "--v", "67", "--divergence", "all", "--providers",
                   "kd-torch,kd-ext", "--mode", "full", "--reps", "2", "--grad-rows", "4",
                   "--no-plot", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out.splitlines()
    start = text.index("time / the same provider's forward_kl (full, medians):")
    head, _, *body = text[start + 1:start + 5]
    assert head.split() == ["provider", *_spec.DIVERGENCES]
    ratios = {line.split()[0]: line.split()[1:] for line in body[:2]}
    assert set(ratios) == {"kd-torch", "kd-ext"}
    for cells in ratios.values():
        assert cells[0] == "1.00" and len(cells) == len(_spec.DIVERGENCES)
        assert all(float(c) > 0 for c in cells)
    # the bounded ratios carry their target (no verdict: not the target shape)
    line = next(x for x in text if "reference skew_forward_kl vs its forward KL" in x)
    assert "target <= 2.5" in line and line.endswith("(not the target shape)")


def test_divergence_ratios_from_rows():
    """The ratio matrix divides each row's median by its provider's forward_kl median; a
    provider without a forward_kl row shows '-'; one divergence alone gives no matrix."""
    rows = [measure.Row("kd-ext", "forward_kl", "full", [0.2, 0.4, 0.3]),
            measure.Row("kd-ext", "jsd", "full", [0.45]),
            measure.Row("eager", "jsd", "full", [2.0])]
    lines = report.divergence_ratios(rows).splitlines()
    assert lines[1].split() == ["provider", "forward_kl", "jsd"]
    assert lines[3].split() == ["kd-ext", "1.00", "1.50"]
    assert lines[4].split() == ["eager", "-", "-"]
    assert report.divergence_ratios(rows[:1]) == ""


def test_subcommand_dispatch(monkeypatch, capsys):
    """A subcommand whose module is missing prints a clear message and exits 2; a present
    one receives the rest of the command line."""
    import sys
    import types

    from bench import __main__ as entry

    monkeypatch.setitem(entry.SUBCOMMANDS, "nosuchtool", "a tool not written yet")
    assert entry.main(["nosuchtool", "--x"]) == 2
    assert "bench/nosuchtool.py is not part of this checkout" in capsys.readouterr().err

    seen = {}
    fake = types.ModuleType("bench.faketool")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "bench.faketool", fake)
    monkeypatch.setitem(entry.SUBCOMMANDS, "faketool", "test double")
    assert entry.main(["faketool", "--a", "1"]) == 0
    assert seen["argv"] == ["--a", "1"]


def test_targets_are_ratios_of_the_rows_with_verdicts():
    """The closing targets are computed from the rows and compared with their bounds."""
    cfg = providers.Config(2048, 128256, torch.float32, CPU)
    nv = 2048 * 128256 * 4
    rows = [measure.Row("eager", "forward_kl", "full", [4.9], 5 * nv),
            measure.Row("kd-torch", "forward_kl", "full", [5.0], int(1.2 * nv)),
            measure.Row("kd-ext", "forward_kl", "full", [0.7], nv),
            measure.Row("compile_chunked", "forward_kl", "full", [0.93], 2 * nv),
            measure.Row("copy_floor", "-", "full", [0.38], nv),
            measure.Row("kd-ext", "jsd", "full", [1.4], nv)]
    text = "\n".join(report.targets(rows, cfg))

    def verdict(label):
        words = next(x for x in text.splitlines() if label in x).split()
        return words[-1], float(words[-5])  # "... <value> target <op> <target> <verdict>"

    assert verdict("reference time vs eager") == ("MISSED", pytest.approx(5.0 / 4.9, abs=0.01))
    assert verdict("reference memory") == ("met", pytest.approx(1.2, abs=0.01))
    assert verdict("extension vs eager") == ("met", pytest.approx(7.0, abs=0.01))
    assert verdict("extension vs compiled chunked loss") == (
        "met", pytest.approx(0.93 / 0.7, abs=0.01))
    assert verdict("extension vs copy floor") == ("met", pytest.approx(0.7 / 0.38, abs=0.01))
    assert verdict("extension memory") == ("met", pytest.approx(1.0, abs=0.01))
    assert verdict("extension jsd vs its forward KL") == ("MISSED", pytest.approx(2.0, abs=0.01))
    assert "kd-ext jsd / forward_kl" in text  # the formula is shown next to the name


def test_cuda_run_judges_only_the_triton_targets(monkeypatch):
    """A CUDA run shows the CPU-stated targets' ratios without a verdict (their shape is CPU
    float32 N=2048) and judges the Triton targets, which are stated for CUDA."""
    cfg = providers.Config(8192, 128256, torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(report, "peak_bandwidth", lambda device: 4.8e12)
    nv = 8192 * 128256 * 4
    moved = 5 * 8192 * 128256 * 2  # read s, t twice, write ds: bfloat16
    rows = [measure.Row("eager", "forward_kl", "full", [16.7e-3], 5 * nv // 2),
            measure.Row("kd-ext", "forward_kl", "full", [3.8e-3], nv // 2),
            measure.Row("kd-triton", "forward_kl", "full", [3.9e-3], nv // 2,
                        bytes_moved=moved),
            measure.Row("kd-ext", "jsd", "full", [7.5e-3], nv // 2)]
    text = report.targets(rows, cfg)

    def said(label):
        return next(x for x in text if label in x)

    for label in ("extension vs eager", "extension memory", "extension jsd vs its forward KL"):
        assert said(label).endswith("(not the target shape)"), said(label)
    assert said("Triton memory bandwidth").endswith("MISSED")  # 0.56 of 4.8 TB/s
    assert said("Triton vs eager").endswith("met")  # 4.3x


# --------------------------------------------------------------------------------------
# python -m bench distributed: the plumbing at a tiny shape, and the targets
# --------------------------------------------------------------------------------------


def test_distributed_compares_impls_on_the_same_shards(tmp_path, capsys):
    """Two gloo ranks, an uneven split (67 = 34 + 33), both impls: one row per impl with
    the same loss (the same sharded problem), a peak that counts at least the rank's
    gradient, the two targets shown without a verdict (not their shape), and a CSV."""
    import csv

    from bench import distributed as bd

    out = tmp_path / "dist.csv"
    rc = bd.main(["--world", "2", "--rows", "8", "--vocab", "67", "--steps", "2",
                  "--warmup", "0", "--impl", "torch", "ext", "--csv", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert [r["impl"] for r in rows] == ["torch", "ext"]
    for r in rows:
        assert (r["world"], r["rows"], r["vocab"], r["widths"]) == ("2", "8", "67", "34/33")
        assert float(r["step_ms"]) > 0 and float(r["unsharded_ms"]) > 0
        assert int(r["peak_extra_B"]) >= 8 * 34 * 4  # the larger rank's gradient, at least
        assert float(r["peak_x_local_nv_fp32"]) >= 1.0
        assert r["ops"] == "all_gather+all_gather"  # the call header, then the statistics
        for key in ("machine", "cpu", "torch", "date", "command"):
            assert r[key], key
    assert float(rows[0]["loss"]) == pytest.approx(float(rows[1]["loss"]), rel=1e-5)
    for name in ("vocab-parallel extension vs reference",
                 "vocab-parallel extension memory per rank"):
        line = next(x for x in text.splitlines() if name in x)
        assert line.endswith("(not the target shape)"), line


def test_distributed_targets_at_their_shape():
    """At the stated shape the targets carry verdicts from the measured ratios."""
    from bench import distributed as bd

    base = {**bd.TARGET, "widths": "64128/64128"}
    rows = [{**base, "impl": "torch", "step_ms": 900.0, "peak_x_local_nv_fp32": 1.3},
            {**base, "impl": "ext", "step_ms": 250.0, "peak_x_local_nv_fp32": 1.12}]

    def verdict(lines, name):
        words = next(x for x in lines if name in x).split()
        return words[-1], float(words[-5])

    lines = bd.targets(rows)
    assert verdict(lines, "extension vs reference") == ("met", pytest.approx(3.6))
    assert verdict(lines, "memory per rank") == ("MISSED", pytest.approx(1.12))
    rows[1]["step_ms"], rows[1]["peak_x_local_nv_fp32"] = 450.0, 1.0
    lines = bd.targets(rows)
    assert verdict(lines, "extension vs reference") == ("MISSED", pytest.approx(2.0))
    assert verdict(lines, "memory per rank") == ("met", pytest.approx(1.0))
    assert bd.targets(rows[:1])[1].split()[-5] == "n/a"  # no ext row: no ratio


@pytest.mark.parametrize("op,value,want", [("<=", 1.0, "met"), ("<", 1.0, "MISSED"),
                                           ("<", 0.07, "met"), (">=", 3.0, "met"),
                                           (">", 3.0, "MISSED"), (">", 3.5, "met")])
def test_verdict_for_every_comparison(op, value, want):
    from bench.report import verdict

    assert verdict(value, op, 1.0 if op.startswith("<") else 3.0) == want


# --------------------------------------------------------------------------------------
# python -m bench sparse: the plumbing at a tiny shape, and the targets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", ["renormalize", "bucket", "none"])
def test_sparse_tiny_run_agrees_with_eager(tail, capsys):
    """Every provider runs; the sparse loss equals the eager top-k formula of scripts; the
    peak counts at least the student's gradient; the targets show no verdict off-shape."""
    from bench import sparse as bs

    x = bs.make_inputs(16, 300, 8, torch.float32, CPU, 0)
    cfg = dict(tail=tail, divergence="forward_kl", beta=0.5, temperature=2.0)
    rows, notes = bs.run(x, cfg, ["eager", "dense", "kd-torch"], 1, CPU, torch.float32,
                         "torch", log=lambda *a, **k: None)
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"eager", "dense", "kd-torch"}, notes
    assert by["kd-torch"]["loss"] == pytest.approx(by["eager"]["loss"], rel=1e-5)
    for r in rows:
        assert r["median"] > 0 and r["peak"] >= 16 * 300 * 4
    rc = bs.main(["--n", "16", "--v", "300", "--k", "8", "--reps", "1", "--tail", tail,
                  "--providers", "eager", "kd-torch", "kd-ext"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "kd-torch" in text and "|loss - eager|" in text
    for name in ("extension vs eager", "extension vs dense kd_loss", "extension memory"):
        line = next(x for x in text.splitlines() if name in x)
        assert line.endswith("(not the target shape)"), line


def test_sparse_targets_at_their_shape():
    from bench import sparse as bs

    nv = 2048 * 128256 * 4
    shape = {**bs.TARGET, "beta": 0.5}
    rows = [dict(provider="eager", median=6.0, peak=3 * nv),
            dict(provider="dense", median=1.5, peak=nv),
            dict(provider="kd-ext", median=1.0, peak=int(1.02 * nv))]

    def verdict(lines, name):
        words = next(x for x in lines if name in x).split()
        return words[-1], float(words[-5])

    lines = bs.targets(rows, shape, CPU)
    assert verdict(lines, "extension vs eager") == ("met", pytest.approx(6.0))
    assert verdict(lines, "extension vs dense") == ("met", pytest.approx(1 / 1.5, abs=0.005))
    assert verdict(lines, "extension memory") == ("met", pytest.approx(1.02))
    rows[2].update(median=1.3, peak=int(1.2 * nv))
    lines = bs.targets(rows, shape, CPU)
    assert verdict(lines, "extension vs eager") == ("MISSED", pytest.approx(6 / 1.3, abs=0.005))
    assert verdict(lines, "extension vs dense") == ("MISSED", pytest.approx(1.3 / 1.5, abs=0.005))
    assert verdict(lines, "extension memory") == ("MISSED", pytest.approx(1.2))
    assert bs.targets(rows[:2], shape, CPU)[1].split()[-5] == "n/a"  # no ext row
