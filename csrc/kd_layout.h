// kd_layout.h: what the CPU kernels (kd_cpu.cpp) and the CUDA kernels (kd_cuda.cu) share
// besides the math (kd_math.h): the columns of the per-row statistics table and the loss
// parameters. Both are defined in Python (kdkernels/_stats.py: Col, kdkernels/_spec.py:
// LossSpec.as_args) and mirrored here; tests/test_layout.py checks this file against them.
#pragma once

#include <cstdint>

namespace kd {

// Columns of the (N, NSTAT) statistics table of a column range (kdkernels/_stats.py).
enum Stat : int {
  ST_MS = 0,  // student: max of the RAW logits s over the range (-inf when none is finite)
  ST_LS,      // student: log sum exp((s - ms) / Ts)
  ST_MT,      // teacher: max of the raw logits t
  ST_LT,      // teacher: log sum exp((t - mt) / Tt)
  ST_M1,      // student at T = 1 (cross-entropy): max of s (= ST_MS: maxima are raw)
  ST_L1,      // log sum exp(s - m1)
  ST_LABEL,   // s[label] when the label falls in the range, else 0
  ST_DIV,     // KL kinds: D (finished); mixture: A = sum p (lp - lm)
  ST_B,       // mixture: B = sum q (lq - lm)
  ST_UQ,      // mixture: sum q u
  ST_UP,      // mixture: sum p u
  ST_ACC,     // KL kinds: sum e^(zw') (zw' - zo') over the range, z' = (x - m) / T
  NSTAT
};

// The LossSpec as LossSpec.as_args() passes it (kind parsed to kd_math.h's Kind).
struct Params {
  int kind;
  double mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight;
  int64_t ignore_index;
};

}  // namespace kd
