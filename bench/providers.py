"""What `python -m bench` times: the providers, their configuration and inputs.

  kd-torch, kd-triton, kd-ext
      kd.kd_loss(s, t, divergence=..., temperature=T, reduction="batchmean", impl=...), for
      every impl that can run on this device (kd-triton only on CUDA: on CPU Triton runs
      under its interpreter, which is for tests, not timing).
  eager
      the pipeline users write today,
          F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T*T
      and for the other divergences the same style of eager PyTorch (DESIGN.md §1).
  compile
      torch.compile(eager).
  compile_chunked
      torch.compile of a loop over row chunks of the eager formula (reduction="sum", divided
      by N at the end): what a user who knows about chunking writes with PyTorch alone.
  copy_floor
      torch.add(s, t): read s and t once and write one fresh N x V tensor. The bandwidth limit
      of a fused single pass that writes the gradient once (mode "full" only). The output is
      freshly allocated each time, as every kernel's gradient is, so the OS page faults that
      a new N x V buffer costs are part of the floor.
  copy_prealloc
      torch.add(s, t, out=buf) with buf allocated once: the same traffic without the
      allocation; shows what the page faults of a fresh N x V buffer cost on this machine.

Bytes moved (for GB/s): what a fused two-pass design must move, per logit element: forward
reads s and t (x2 for jsd/skew, which need the normalizers first), backward reads s and t and
writes d s; the copy floor reads two and writes one. Eager's GB/s is therefore "effective".
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdkernels import _spec

# every divergence the library offers: one added there is benchmarked (kd-* providers) and
# shown in the ratios to forward KL without a change here
DIVERGENCES = _spec.DIVERGENCES
# kd_loss's defaults for the parametrized ones: alpha = 0.5 (symmetric),
# (ab_alpha, ab_beta) = (0.5, 0.5)
FR_ALPHA, AB = 0.5, (0.5, 0.5)
MODES = ("forward", "backward", "full")
KD_IMPLS = ("torch", "triton", "ext")
PROVIDERS = (
    "kd-torch", "kd-triton", "kd-ext", "eager", "compile", "compile_chunked",
    "copy_floor", "copy_prealloc",
)
COMPILED = ("compile", "compile_chunked")
COPIES = ("copy_floor", "copy_prealloc")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Elements per chunk of the compiled chunked loss: 2**25 float32 = 128 MiB per temporary, i.e.
# 256 rows of a 128256 vocabulary (8 chunks at N = 2048, unrolled by dynamo).
COMPILED_CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class Config:
    n: int
    v: int
    dtype: torch.dtype
    device: torch.device
    temperature: float = 2.0
    beta: float = 0.5
    skew: float = 0.1


def log_or_minus_inf(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def canonical(divergence: str, beta: float, skew: float) -> tuple[str, float]:
    """(kind, a): jsd(beta=0|1) and skew(0) are forward/reverse KL exactly (GKD/TRL)."""
    if divergence == "jsd":
        if beta == 0.0:
            return "forward_kl", 0.0
        if beta == 1.0:
            return "reverse_kl", 0.0
        return "jsd", beta
    if divergence == "skew_forward_kl" and skew == 0.0:
        return "forward_kl", 0.0
    if divergence == "skew_reverse_kl" and skew == 0.0:
        return "reverse_kl", 0.0
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return divergence, skew


def eager_loss(s, t, divergence: str, cfg: Config, reduction: str = "batchmean"):
    """The eager pipeline a user writes today (mixtures in log space, as TRL's GKD loss)."""
    T = cfg.temperature
    kind, a = canonical(divergence, cfg.beta, cfg.skew)
    if kind == "forward_kl":  # KL(p || q), the F.kl_div line of every distillation script
        loss = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction=reduction)
    elif kind == "reverse_kl":  # KL(q || p)
        loss = F.kl_div(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1),
                        reduction=reduction, log_target=True)
    elif kind in ("soft_cross_entropy", "tvd", "forward_reverse_kl", "alpha_beta"):
        loss = _eager_other(s, t, kind, T, reduction)
    else:
        lq = F.log_softmax(s / T, -1)
        lp = F.log_softmax(t / T, -1)
        if kind == "jsd":  # a KL(p || m) + (1 - a) KL(q || m), m = a p + (1 - a) q
            lm = torch.logaddexp(lp + log_or_minus_inf(a), lq + log_or_minus_inf(1.0 - a))
            loss = (a * F.kl_div(lm, lp, reduction=reduction, log_target=True)
                    + (1.0 - a) * F.kl_div(lm, lq, reduction=reduction, log_target=True))
        elif kind == "skew_forward_kl":  # KL(p || a p + (1 - a) q)
            lm = torch.logaddexp(lp + log_or_minus_inf(a), lq + log_or_minus_inf(1.0 - a))
            loss = F.kl_div(lm, lp, reduction=reduction, log_target=True)
        elif kind == "skew_reverse_kl":  # KL(q || a q + (1 - a) p)
            lm = torch.logaddexp(lq + log_or_minus_inf(a), lp + log_or_minus_inf(1.0 - a))
            loss = F.kl_div(lm, lq, reduction=reduction, log_target=True)
        else:
            raise NotImplementedError(f"no eager formula for {divergence!r} in bench")
    return loss * (T * T)


def _eager_other(s, t, kind: str, T: float, reduction: str):
    """The eager lines of the tools that define these (torchtune, Liger, ABKD's code)."""
    lq = F.log_softmax(s / T, -1)
    lp = F.log_softmax(t / T, -1)
    if kind == "soft_cross_entropy":  # torchtune's ForwardKLLoss: -sum p log q
        rows = -(lp.exp() * lq).sum(-1)
    elif kind == "tvd":  # Liger's TVD on the softmaxes
        rows = 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    elif kind == "forward_reverse_kl":
        rows = (FR_ALPHA * F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
                + (1 - FR_ALPHA) * F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1))
    else:  # alpha_beta, from p^a q^b and the powers' sums
        a, b = AB
        rows = -(torch.exp(a * lp + b * lq) - a / (a + b) * torch.exp((a + b) * lp)
                 - b / (a + b) * torch.exp((a + b) * lq)).sum(-1) / (a * b)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / s.shape[0]  # batchmean


def chunked_loss(s, t, divergence: str, cfg: Config, rows_per_chunk: int):
    """The eager formula over row chunks, summed, divided by N (batchmean)."""
    n = s.shape[0]
    total = eager_loss(s[:rows_per_chunk], t[:rows_per_chunk], divergence, cfg, "sum")
    for i in range(rows_per_chunk, n, rows_per_chunk):
        j = i + rows_per_chunk
        total = total + eager_loss(s[i:j], t[i:j], divergence, cfg, "sum")
    return total / n



def make_loss(provider: str, divergence: str, cfg: Config):
    """A function (s, t) -> scalar loss for `provider`; None for the copy providers."""
    if provider.startswith("kd-"):
        import kdkernels as kd

        return functools.partial(
            kd.kd_loss, divergence=divergence, beta=cfg.beta, skew=cfg.skew,
            temperature=cfg.temperature, reduction="batchmean", impl=provider[3:],
        )
    if provider == "eager":
        return functools.partial(eager_loss, divergence=divergence, cfg=cfg)
    if provider == "compile":
        return torch.compile(functools.partial(eager_loss, divergence=divergence, cfg=cfg))
    if provider == "compile_chunked":
        rows = max(1, COMPILED_CHUNK_ELEMENTS // cfg.v)
        rows = 1 << (rows.bit_length() - 1)  # a power of two: equal chunks for most N
        return torch.compile(functools.partial(
            chunked_loss, divergence=divergence, cfg=cfg, rows_per_chunk=rows))
    raise ValueError(f"unknown provider {provider!r}")


def availability(provider: str, cfg: Config, explicit: bool) -> tuple[bool, str]:
    """Can `provider` run here? (ok, why not)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    if not provider.startswith("kd-"):
        return True, ""
    impl = provider[3:]
    if impl == "triton" and cfg.device.type != "cuda":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if not (explicit and interpreted):
            return False, ("Triton kernels need a CUDA device; on CPU they run only under "
                           "TRITON_INTERPRET=1 (the tests' interpreter), far too slow to time "
                           "(ask for it with --providers kd-triton and TRITON_INTERPRET=1)")
    try:
        from kdkernels import _dispatch

        _dispatch.resolve(impl, cfg.device, (cfg.dtype,))
    except Exception as e:  # a backend being built may fail in any way: report, go on
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def bytes_moved(divergence: str, mode: str, cfg: Config) -> int:
    """Bytes a fused two-pass design must move (DESIGN.md §2), per the module docstring."""
    es = torch.empty((), dtype=cfg.dtype).element_size()
    kind, _ = canonical(divergence, cfg.beta, cfg.skew)
    # one-pass kinds read s and t once; the two-pass ones (mixtures, tvd, alpha_beta) twice
    one_pass = ("forward_kl", "reverse_kl", "soft_cross_entropy", "forward_reverse_kl")
    fwd = 2 if kind in one_pass else 4
    per = {"forward": fwd, "backward": 3, "full": fwd + 3, "copy": 3}[mode]
    return per * es * cfg.n * cfg.v


def make_inputs(cfg: Config, seed: int):
    """Student and teacher logits ~ N(0, 2^2): softmax at T=2 neither flat nor one-hot.
    Drawn on the benchmark's device (GPU shapes are GBs), in float32, then cast."""
    g = torch.Generator(device=cfg.device).manual_seed(seed)
    out = []
    for _ in range(2):
        x = torch.randn(cfg.n, cfg.v, generator=g, device=cfg.device).mul_(2.0)
        out.append(x.to(dtype=cfg.dtype))
        del x
    s, t = out
    return s.requires_grad_(), t


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")
