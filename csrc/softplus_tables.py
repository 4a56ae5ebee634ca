"""The tables of kd_softplus and kd_softplus_sigm's AVX-512 overloads (kd_cpu_simd.h).

Both functions of the mixture's log-ratio d are split as base + psi, base = max(d, 0) for
d >= 0 and a constant for d < 0, so that psi is small and smooth on each side of 0 (base
takes the kink):
  softplus(d)                   base 0:  psi = log1p(e^-|d|)                     in (0, log 2]
  softplus(d) + sigmoid(-d)     base 1:  psi = log1p(e^-|d|) + sigmoid(-|d|), d >= 0
                                               log1p(e^-|d|) - sigmoid(-|d|), d < 0
On each unit interval [k, k + 1], k = -16..15, psi is a degree-6 polynomial in r = d - k - 1/2
(least squares on Chebyshev nodes, within a factor ~2 of the minimax error). psi's nearest
singularities are at d = +-i pi (the sigmoid's poles, log1p(e^-d)'s branch points), so on an
interval of half-width 1/2 the error falls like (pi / 0.5 + sqrt((pi / 0.5)^2 + 1))^-n =
12.6^-n. Past +-16 psi is below 2.3e-7 (e^-16 twice) and d is clamped into the table's range.

Run: python csrc/softplus_tables.py  (numpy only; psi in float64 is exact to ~1e-16, far
below float32's rounding). Prints both tables as C++.
"""

import numpy as np

DEGREE = 6
LO, HI = -16, 16
NODES = 256


def psi_softplus(d):
    return np.log1p(np.exp(-np.abs(d)))


def psi_softplus_sigm(d):
    e = np.exp(-np.abs(d))
    s = e / (1 + e)  # sigmoid(-|d|)
    return np.log1p(e) + np.where(d >= 0, s, -s)


def on_side(k, d):
    # an interval's own side of 0: k < 0 has d < 0 throughout, its right end approached from
    # below
    return np.minimum(d, -1e-300) if k < 0 else d


def fit(psi, k):
    r = 0.5 * np.cos(np.pi * (np.arange(NODES) + 0.5) / NODES)
    a = np.stack([r**j for j in range(DEGREE + 1)], 1)
    c, *_ = np.linalg.lstsq(a, psi(on_side(k, k + 0.5 + r)), rcond=None)
    return c.astype(np.float32)


def horner32(c, r):
    h = np.full_like(r, c[-1], dtype=np.float32)
    for cj in c[-2::-1]:
        # a multiply-add rounds once: exact float64 product and sum, then float32
        h = (h.astype(np.float64) * r.astype(np.float64) + np.float64(cj)).astype(np.float32)
    return h


def hexf(x):
    m, e = float(x).hex().split("p")
    return f"{m.rstrip('0').rstrip('.')}p{e}f"


def table(name, psi):
    coefs = {k: fit(psi, k) for k in range(LO, HI)}
    r = np.linspace(-0.5, 0.5, 4001).astype(np.float32)
    worst = max(
        float(np.max(np.abs(horner32(c, r) - psi(on_side(k, r.astype(np.float64) + k + 0.5)))))
        for k, c in coefs.items()
    )
    # the permute's index is floor(d) mod 32: entry j holds interval k = j (j < 16), j - 32
    order = [j if j < 16 else j - 32 for j in range(32)]
    print("// psi's polynomial on [k, k + 1]: coefficient i of interval k at [i][k mod 32]; max")
    print(f"// error in float32 {worst:.2e} (softplus_tables.py)")
    print(f"alignas(64) inline constexpr float {name}[{DEGREE + 1}][32] = {{")
    for i in range(DEGREE + 1):
        vals = [hexf(coefs[k][i]) for k in order]
        lines = [", ".join(vals[j : j + 5]) for j in range(0, 32, 5)]
        print("    {" + ",\n     ".join(lines) + "},")
    print("};")


if __name__ == "__main__":
    table("kSoftplus", psi_softplus)
    table("kSoftplusSigm", psi_softplus_sigm)
