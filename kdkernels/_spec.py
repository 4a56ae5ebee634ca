"""The normalized description of a loss that every backend implements.

`functional.py` turns the user's arguments into a `LossSpec`; backends (reference, triton,
ext, distributed) receive only this, plus logits already reshaped to (rows, V).

Every divergence is one of these kinds (q = student, p = teacher, both softmaxes):

    forward_kl          KL(p || q)
    reverse_kl          KL(q || p)
    mixture             coef_p * KL(p || m) + coef_q * KL(q || m),   m = mix * p + (1 - mix) * q
    soft_cross_entropy  -sum p log q = KL(p || q) + H(p)
    forward_reverse_kl  coef_p * KL(p || q) + coef_q * KL(q || p)
    tvd                 0.5 * sum |p - q|
    alpha_beta          -1/(a b) sum (p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)),
                        a = coef_p, b = coef_q (both > 0)

The first two and soft_cross_entropy, forward_reverse_kl are one-pass kinds (online sums
against running maxima, ONE_PASS_KINDS); mixture, tvd and alpha_beta need the row's
softmaxes before their sums (a second pass, TWO_PASS_KINDS: mix_partial in _stats.py).

jsd(beta)            -> mixture(mix=beta, coef_p=beta, coef_q=1-beta); beta=0 / 1 are exactly
                        forward / reverse KL (GKD's convention), so they map to those kinds.
skew_forward_kl(lam) -> KL(p || lam p + (1-lam) q) = mixture(mix=lam, coef_p=1, coef_q=0);
                        lam=0 is forward KL.
skew_reverse_kl(lam) -> KL(q || lam q + (1-lam) p) = mixture(mix=1-lam, coef_p=0, coef_q=1);
                        lam=0 is reverse KL.

Gradients of the mixture kind (derived in reference.py) need four per-row scalars,
A = KL(p||m), B = KL(q||m), Uq = sum q*u, Up = sum p*u with u = (coef_p p + coef_q q) / m.

soft_cross_entropy        -> soft_cross_entropy (torchtune's ForwardKLLoss; the gradient
                             w.r.t. the student is forward KL's, q - p)
forward_reverse_kl(alpha) -> forward_reverse_kl(coef_p=alpha, coef_q=1-alpha); alpha = 1 / 0
                             are exactly forward / reverse KL and map to those kinds.
                             alpha = 0.5 is symmetric (torchtune's SymmetricKLLoss, whose
                             sym_kl_ratio is 1 - alpha).
tvd                       -> tvd (Liger's LigerTVDLoss on the softmaxes)
alpha_beta(ab_alpha, ab_beta) -> alpha_beta(coef_p=ab_alpha, coef_q=ab_beta): the
                             alpha-beta divergence of ABKD (Cichocki, Cruces and Amari's
                             AB-divergence). Its limits ab_beta -> 0 at ab_alpha = 1 and
                             ab_alpha -> 0 at ab_beta = 1 are forward / reverse KL, and
                             those two points map to the KL kinds; other points with a zero
                             exponent are log-limits that are not implemented (rejected).
                             (0.5, 0.5) is 4 (1 - sum sqrt(p q)) = 2 sum (sqrt p - sqrt q)^2,
                             four times the squared Hellinger distance; ab_alpha + ab_beta = 1
                             is Amari's alpha-divergence.
"""

from __future__ import annotations

from dataclasses import dataclass

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "soft_cross_entropy", "tvd", "forward_reverse_kl", "alpha_beta")
REDUCTIONS = ("none", "sum", "mean", "batchmean", "token_mean")
KINDS = ("forward_kl", "reverse_kl", "mixture", "soft_cross_entropy", "forward_reverse_kl",
         "tvd", "alpha_beta")
ONE_PASS_KINDS = ("forward_kl", "reverse_kl", "soft_cross_entropy", "forward_reverse_kl")
TWO_PASS_KINDS = ("mixture", "tvd", "alpha_beta")


@dataclass(frozen=True)
class Divergence:
    kind: str  # one of KINDS
    mix: float = 0.0  # weight of the teacher p in m = mix * p + (1 - mix) * q
    coef_p: float = 0.0  # weight of KL(p || m)
    coef_q: float = 0.0  # weight of KL(q || m)

    @staticmethod
    def from_user(name: str, beta: float, skew: float, alpha: float = 0.5,
                  ab_alpha: float = 0.5, ab_beta: float = 0.5) -> Divergence:
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
        if name == "soft_cross_entropy":
            return Divergence("soft_cross_entropy")
        if name == "tvd":
            return Divergence("tvd")
        if name == "forward_reverse_kl":
            if alpha == 1.0:
                return Divergence("forward_kl")
            if alpha == 0.0:
                return Divergence("reverse_kl")
            return Divergence("forward_reverse_kl", coef_p=alpha, coef_q=1.0 - alpha)
        if name == "alpha_beta":
            if (ab_alpha, ab_beta) == (1.0, 0.0):
                return Divergence("forward_kl")
            if (ab_alpha, ab_beta) == (0.0, 1.0):
                return Divergence("reverse_kl")
            if not (ab_alpha > 0.0 and ab_beta > 0.0):
                raise ValueError(
                    "alpha_beta needs ab_alpha > 0 and ab_beta > 0 (or the KL points "
                    f"(1, 0), (0, 1)), got ab_alpha={ab_alpha}, ab_beta={ab_beta}")
            return Divergence("alpha_beta", coef_p=ab_alpha, coef_q=ab_beta)
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
