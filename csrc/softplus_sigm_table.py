"""The table of kd_softplus_sigm's AVX-512 overload (kd_cpu_simd.h): prints it as C++.

phi(d) = softplus(d) + sigmoid(-d) is split as phi = base + psi, base = max(d, 0) for d >= 0
and 1 for d < 0, so psi is small and smooth on each side of 0:
    d >= 0: psi = log1p(e^-d) + e^-d / (1 + e^-d)   in (0, log 2 + 1/2]
    d <  0: psi = log1p(e^d)  - e^d / (1 + e^d)     in [0, log 2 - 1/2)
On each unit interval [k, k + 1], k = -16..15, psi is a degree-6 polynomial in r = d - k - 1/2
(least squares on Chebyshev nodes, within a factor ~2 of the minimax error). psi's nearest
singularities are the poles of the sigmoid at d = +-i pi, so an interval of half-width 1/2
converges like (pi / 0.5 + sqrt((pi / 0.5)^2 + 1))^-n = 12.6^-n. Past +-16, psi is below
2.3e-7 (e^-16 twice): d is clamped into the table's range there.

Run: python csrc/softplus_sigm_table.py  (numpy only; float64 evaluation of psi is exact to
~1e-16, far below float32's rounding).
"""

import numpy as np

DEGREE = 6
LO, HI = -16, 16
NODES = 256


def psi(d):
    e = np.exp(-np.abs(d))
    s = e / (1 + e)  # the smaller sigmoid
    return np.log1p(e) + np.where(d >= 0, s, -s)


def fit(k):
    r = 0.5 * np.cos(np.pi * (np.arange(NODES) + 0.5) / NODES)
    # the interval's own side of 0 (k < 0: d < 0 throughout, its right end approached from below)
    d = np.minimum(k + 0.5 + r, -1e-300) if k < 0 else k + 0.5 + r
    a = np.stack([r**j for j in range(DEGREE + 1)], 1)
    c, *_ = np.linalg.lstsq(a, psi(d), rcond=None)
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


def main():
    coefs = {k: fit(k) for k in range(LO, HI)}
    worst = 0.0
    for k, c in coefs.items():
        r = np.linspace(-0.5, 0.5, 4001).astype(np.float32)
        d = r.astype(np.float64) + k + 0.5
        d = np.minimum(d, -1e-300) if k < 0 else d
        worst = max(worst, float(np.max(np.abs(horner32(c, r) - psi(d)))))
    # the permute's index is floor(d) mod 32: entry j holds interval k = j (j < 16), j - 32
    order = [j if j < 16 else j - 32 for j in range(32)]
    print(f"// psi's polynomial on [k, k + 1] (degree {DEGREE}): coefficient i of interval k at")
    print(f"// [i][k mod 32]; max error in float32 {worst:.2e} (softplus_sigm_table.py)")
    print(f"alignas(64) inline constexpr float kSoftplusSigm[{DEGREE + 1}][32] = {{")
    for i in range(DEGREE + 1):
        vals = [hexf(coefs[k][i]) for k in order]
        lines = [", ".join(vals[j : j + 5]) for j in range(0, 32, 5)]
        print("    {" + ",\n     ".join(lines) + "},")
    print("};")


if __name__ == "__main__":
    main()
