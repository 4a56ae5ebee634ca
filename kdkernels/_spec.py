"""The normalized description of a loss that every backend implements.

`functional.py` turns the user's arguments into a `LossSpec`; backends (reference, triton,
ext, distributed) receive only this, plus logits already reshaped to (rows, V).

Every divergence is one of three kinds (q = student, p = teacher, both softmaxes):

    forward_kl   KL(p || q)
    reverse_kl   KL(q || p)
    mixture      coef_p * KL(p || m) + coef_q * KL(q || m),   m = mix * p + (1 - mix) * q

jsd(beta)            -> mixture(mix=beta, coef_p=beta, coef_q=1-beta); beta=0 / 1 are exactly
                        forward / reverse KL (GKD's convention), so they map to those kinds.
skew_forward_kl(lam) -> KL(p || lam p + (1-lam) q) = mixture(mix=lam, coef_p=1, coef_q=0);
                        lam=0 is forward KL.
skew_reverse_kl(lam) -> KL(q || lam q + (1-lam) p) = mixture(mix=1-lam, coef_p=0, coef_q=1);
                        lam=0 is reverse KL.

Gradients of the mixture kind (derived in reference.py) need four per-row scalars,
A = KL(p||m), B = KL(q||m), Uq = sum q*u, Up = sum p*u with u = (coef_p p + coef_q q) / m.
"""

from __future__ import annotations

from dataclasses import dataclass

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
REDUCTIONS = ("none", "sum", "mean", "batchmean", "token_mean")
KINDS = ("forward_kl", "reverse_kl", "mixture")


@dataclass(frozen=True)
class Divergence:
    kind: str  # one of KINDS
    mix: float = 0.0  # weight of the teacher p in m = mix * p + (1 - mix) * q
    coef_p: float = 0.0  # weight of KL(p || m)
    coef_q: float = 0.0  # weight of KL(q || m)

    @staticmethod
    def from_user(name: str, beta: float, skew: float) -> Divergence:
        if name == "forward_kl":
            return Divergence("forward_kl")
        if name == "reverse_kl":
            return Divergence("reverse_kl")
        if name == "jsd":
            if beta == 0.0:
                return Divergence("forward_kl")
            if beta == 1.0:
                return Divergence("reverse_kl")
            return Divergence("mixture", mix=beta, coef_p=beta, coef_q=1.0 - beta)
        if name == "skew_forward_kl":
            if skew == 0.0:
                return Divergence("forward_kl")
            return Divergence("mixture", mix=skew, coef_p=1.0, coef_q=0.0)
        if name == "skew_reverse_kl":
            if skew == 0.0:
                return Divergence("reverse_kl")
            return Divergence("mixture", mix=1.0 - skew, coef_p=0.0, coef_q=1.0)
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {name!r}")


@dataclass(frozen=True)
class LossSpec:
    """What one row's loss is: kd_scale * D(p || q) + ce_weight * CE(student @ T=1, label).

    Rows whose label equals ignore_index contribute 0 (value and gradient).
    """

    div: Divergence
    inv_ts: float  # 1 / student temperature: zs = s * inv_ts
    inv_tt: float  # 1 / teacher temperature: zt = t * inv_tt
    kd_scale: float  # kd_weight, times temperature**2 when temperature_scale
    ce_weight: float = 0.0  # weight of the hard-label cross-entropy (needs labels)
    ignore_index: int = -100

    @property
    def ce_shares_student(self) -> bool:
        """Cross-entropy is taken at T = 1, so at inv_ts == 1 its (max, log-sum) pair is the
        student's own and no third pair is accumulated."""
        return self.inv_ts == 1.0

    def as_args(self) -> tuple:
        """The spec as the primitive arguments of the kernels' op schemas, in one order:
        (kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight, ignore_index)."""
        d = self.div
        return (d.kind, float(d.mix), float(d.coef_p), float(d.coef_q), float(self.inv_ts),
                float(self.inv_tt), float(self.kd_scale), float(self.ce_weight),
                int(self.ignore_index))
