// kd_math.h: the math of every kdkernels loss, shared by the CPU kernel (kd_cpu.cpp) and the
// CUDA kernels (kd_cuda.cu). The formulas live here and nowhere else.
//
// Non-finite inputs, one policy for every divergence and backend (kdkernels/reference.py and
// kdkernels/_stats.py follow it too), as PyTorch's log_softmax behaves:
//   - a NaN or a +inf logit in a row (student or teacher) makes the row's loss NaN;
//   - a row whose student or teacher logits are all -inf has no softmax: its loss is NaN;
//   - -inf entries of a row that has finite ones are exact: padding (-inf in both) adds 0,
//     q = 0 where p > 0 makes forward KL +inf (the true value), mixtures stay finite;
//   - an ignored row (label == ignore_index) gives 0 and a gradient of exactly 0, whatever
//     its logits;
//   - softmax / log_softmax of a row with a NaN, a +inf or nothing but -inf is NaN.
// How: a side's running maximum of the raw logits is NaN once a NaN is seen (kd_max_nan, per
// tile, pack or merge: a flag per row, never a test per element) and +inf once a +inf is, so
// the statistics table's maxima carry the row's state: a row whose student or teacher
// maximum is not finite (NaN, +inf, or -inf: nothing finite) gets the loss NaN when it is
// finished (row_has_softmax). The element masks below (where(weight > 0, ...)) and clamps
// may drop a NaN element; they never decide the loss of such a row.
//
// One row (q = softmax(zs) student, p = softmax(zt) teacher, zs = s / Ts, zt = t / Tt):
//
//   Online statistics. A side x in {s, t} keeps a reference m_x, the largest RAW logit seen so
//   far (the statistics table's maxima are raw, kdkernels/_stats.py), and
//   S_x = sum exp((x - m_x) / T_x), so lse_x = m_x / T_x + log S_x. Every shifted logit is
//   formed as (x - m) * inv_t: the difference first, exact near the maximum where the mass
//   is, then the scale, so log-probabilities keep full precision at |x| ~ 1e4 for any T
//   (x / T - m / T would carry a rounding of |x / T| into every probability). Below, "z - m"
//   stands for that scaled difference. When the reference moves from m to m' >= m, every
//   exp((x - m) / T) gets the factor c = exp((m - m') / T) and every shifted logit the
//   additive change delta = (m - m') / T (ref_move). A reference of -inf means "nothing
//   finite seen": sums are 0 and are reset, never multiplied by exp(inf) or shifted by
//   inf - inf.
//
//   forward_kl  D = sum p (lp - lq),  lp - lq = (zt - mt) - (zs - ms) - log St + log Ss
//               so D = acc / St - log St + log Ss with acc = sum e_t ((zt - mt) - (zs - ms)),
//               e_t = exp(zt - mt) (shifted logits as above). acc sums SHIFTED differences
//               (no cancellation against lse: logits of +-1e4 keep full precision). When
//               refs move:
//               acc' = c_t (acc + (delta_t - delta_s) St)                       (kl_rebase)
//               dD/dzs = q - p,   dD/dzt = p (lp - lq - D)
//   reverse_kl  the same with the roles of s and t swapped:
//               dD/dzs = q (lq - lp - D),   dD/dzt = p - q
//   mixture     m = a p + (1-a) q (a = mix), D = cp KL(p||m) + cq KL(q||m) = cp A + cq B.
//               With d = lp - lq + log a - log(1-a) (the log-odds of the two parts of m):
//                 lp - lm = -log a - softplus(-d),     lq - lm = -log(1-a) - softplus(d)
//                 p / m = sigmoid(d) / a,              q / m = sigmoid(-d) / (1-a)
//               so log m is formed in log space and u = (cp p + cq q) / m = kp sig(d) +
//               kq sig(-d) (kp = cp/a, kq = cq/(1-a)) is bounded: q u, p u never overflow.
//               Row scalars (pass 2, after lse_s, lse_t of pass 1):
//                 A = sum p (lp - lm), B = sum q (lq - lm), Uq = sum q u, Up = sum p u
//               Gradient (derived in kdkernels/reference.py):
//                 dD/dzs = cq q (lq - lm - B) - (1-a) q (u - Uq)
//                 dD/dzt = cp p (lp - lm - A) -   a   p (u - Up)
//   soft_cross_entropy  D = -sum p lq = acc / St + log Ss, acc = sum e_t (-(zs - ms)) (forward
//               KL's accumulator without its zt term: acc' = c_t (acc - delta_s St));
//               dD/dzs = q - p,   dD/dzt = p (-lq - D)
//   forward_reverse_kl  both KL accumulators in one pass (forward's acc, reverse's accb),
//               F, R their values, D = cf F + cr R (cf = coef_p, cr = coef_q);
//               dD/dzs = cf (q - p) + cr q (lq - lp - R)
//               dD/dzt = cf p (lp - lq - F) + cr (p - q)
//   tvd         pass 2: T = sum |p - q|, Sq = sum g q, Sp = sum g p, g = sgn(q - p) (0 at
//               p = q); D = T / 2; dD/dzs = q (g - Sq) / 2,  dD/dzt = -p (g - Sp) / 2
//   alpha_beta  (a, b > 0) x = p^a q^b = exp(a lp + b lq), yp = p^(a+b), yq = q^(a+b)
//               pass 2: D = sum -(x - a/(a+b) yp - b/(a+b) yq) / (a b) (terms >= 0),
//               Gq = sum (x - yq), Gp = sum (x - yp)
//               dD/dzs = -(x - yq - q Gq) / a,  dD/dzt = -(x - yp - p Gp) / b
//   CE (T = 1)  CE = lse1 - s[label],  dCE/ds = softmax(s) - onehot(label)
//   Chain rule  d/ds = dD/dzs / Ts, d/dt = dD/dzt / Tt (the callers scale).
//
// Masking: an entry whose weight (p, q) is 0 contributes 0 to every sum and gradient (selects,
// never 0 * inf): vocabulary padding (-inf in both logits) vanishes, and q = 0 with p > 0
// gives +inf for forward KL, the true value.
//
// The element functions are templates over the lane type W: float / double here and on the
// GPU, at::vec::Vectorized<float|double> on the CPU. They call kd_exp, kd_exp_nonpos, kd_log,
// kd_log1p_unit, kd_log1m_half, kd_log1p_atanh, kd_rcp, kd_nabs, kd_max, kd_clamp, kd_where
// and kd_nonneg unqualified; a vector backend declares overloads for its type in namespace
// kd BEFORE including this header (kd_cpu.cpp does).
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

namespace kd {

enum Kind : int {
  FORWARD_KL = 0,
  REVERSE_KL = 1,
  MIXTURE = 2,
  SOFT_CE = 3,     // soft_cross_entropy: one pass, ACC (kl2_* below)
  FR_KL = 4,       // forward_reverse_kl: one pass, ACC and B (kl2_* below)
  TVD = 5,         // two passes: pw_* below
  ALPHA_BETA = 6,  // two passes: pw_* below
};

// kinds whose pass 2 (mix_partial) needs the row's softmaxes first
constexpr bool two_pass(int k) { return k == MIXTURE || k == TVD || k == ALPHA_BETA; }

// ---- scalar primitives -------------------------------------------------------------------

KD_HD float kd_exp(float x) { return expf(x); }
KD_HD double kd_exp(double x) { return exp(x); }
KD_HD float kd_log(float x) { return logf(x); }
KD_HD double kd_log(double x) { return log(x); }
// 1 / x; the CPU vector overload may be an approximation refined to a few ulps (kd_cpu_simd.h)
KD_HD float kd_rcp(float x) { return 1.f / x; }
KD_HD double kd_rcp(double x) { return 1.0 / x; }
KD_HD float kd_abs(float x) { return fabsf(x); }
KD_HD double kd_abs(double x) { return fabs(x); }
KD_HD float kd_nabs(float x) { return -fabsf(x); }  // -|x|
KD_HD double kd_nabs(double x) { return -fabs(x); }
KD_HD float kd_max(float a, float b) { return a > b ? a : b; }
KD_HD double kd_max(double a, double b) { return a > b ? a : b; }
KD_HD float kd_where(bool c, float a, float b) { return c ? a : b; }
KD_HD double kd_where(bool c, double a, double b) { return c ? a : b; }
KD_HD bool kd_nonneg(float x) { return x >= 0.f; }  // false for NaN
KD_HD bool kd_nonneg(double x) { return x >= 0.0; }
// exp(x) for x <= 0 (an element's weight), a NaN x giving 0: clamped from below only, where
// exp is 0 in the type (NaN goes to the bound). The CPU's AVX-512 overload is a cheaper exp
// made for this range (kd_cpu_simd.h).
KD_HD float kd_exp_nonpos(float x) { return expf(x > -104.f ? x : -104.f); }
KD_HD double kd_exp_nonpos(double x) { return exp(x > -746.0 ? x : -746.0); }
// x clamped to [lo, hi]; NaN goes to lo (kd_max(NaN, b) = b likewise)
KD_HD float kd_clamp(float x, float lo, float hi) {
  x = x > lo ? x : lo;
  return x < hi ? x : hi;
}
KD_HD double kd_clamp(double x, double lo, double hi) {
  x = x > lo ? x : lo;
  return x < hi ? x : hi;
}

// max(a, b) that is NaN when a or b is: for the running maxima, which carry a NaN logit
// into the statistics table (see the non-finite policy above); scalars only, once per tile,
// pack or merge.
template <class S>
KD_HD S kd_max_nan(S a, S b) {
  return (a > b || a != a) ? a : b;
}

// -inf < x < +inf (false for NaN)
template <class S>
KD_HD bool kd_finite(S x) {
  return x > S(-INFINITY) && x < S(INFINITY);
}

// log(1 + x) for x in [0, 1] without a general log or a division: x * P(x), P the degree-8
// least-squares Chebyshev fit of log1p(x) / x on [0, 1] (max error 2.2e-8; evaluated in
// float32, 1.4e-7 absolute = 2 ulps of log 2, and exact at 0). Used by the mixture
// (x = exp(-|d|)), where a general log was the costliest step of an element.
// Evaluated by Estrin's scheme (pairs, then powers x^2, x^4, x^8): 4 dependent multiply-adds
// instead of Horner's 9. The element's dependency chain (exp, then this, then the sums) is
// what bounds the CPU loop (out-of-order windows hold only a few elements' chains), so its
// depth, not the operation count, is the cost.
template <class W>
KD_HD W log1p_unit_poly(W x) {
  const W x2 = x * x;
  const W x4 = x2 * x2;
  const W p01 = W(-4.999950148e-01f) * x + W(9.999999705e-01f);
  const W p23 = W(-2.484436645e-01f) * x + W(3.331927083e-01f);
  const W p45 = W(-1.367474517e-01f) * x + W(1.911141886e-01f);
  const W p67 = W(-2.958833878e-02f) * x + W(7.836138836e-02f);
  const W p03 = p23 * x2 + p01;
  const W p47 = p67 * x2 + p45;
  const W p07 = p47 * x4 + p03;
  return (W(5.253416053e-03f) * (x4 * x4) + p07) * x;
}
KD_HD float kd_log1p_unit(float x) { return log1p_unit_poly(x); }
KD_HD double kd_log1p_unit(double x) { return log1p(x); }  // float64: full precision

// -log(1 - z) for z in [0, 1/2], the same way: z * P(z), P the degree-8 fit of -log(1-z) / z
// with P(0) = 1 (max error 5.9e-9), evaluated as E(z^2) + z O(z^2), its even and odd parts by
// Horner's scheme in z^2: a square and 8 multiply-adds where Estrin's scheme takes 11
// operations, at a chain two steps deeper; more accurate in float32 (8.2e-8 absolute against
// 1.2e-7 by Estrin's) and no slower where measured (the mixture's second pass). log1p's
// polynomial above keeps Estrin's scheme: on [0, 1] its even and odd parts have opposite
// signs and cancel, so this form loses accuracy there (1.75e-7 against 1.5e-7).
// The mixture's given-exps path (mix_elem) reaches log1p(exp(-|d|)) as -log(1 - z) with z =
// min(a p, (1-a) q) / (a p + (1-a) q), whose reciprocal it shares with the sigmoid, and its
// backward as z = exp(-|d|) / (1 + exp(-|d|)), the smaller sigmoid.
template <class W>
KD_HD W log1m_half_poly(W z) {
  const W z2 = z * z;
  W e = W(1.791859508e+00f) * z2 + W(1.904269814e+00f);
  e = e * z2 + W(3.464949131e-01f);
  e = e * z2 + W(3.344981670e-01f);
  e = e * z2 + W(1.0f);
  W o = W(-2.439033031e+00f) * z2 + W(-5.004770160e-01f);
  o = o * z2 + W(2.317543626e-01f);
  o = o * z2 + W(4.999715388e-01f);
  return (o * z + e) * z;
}
KD_HD float kd_log1m_half(float z) { return log1m_half_poly(z); }
KD_HD double kd_log1m_half(double z) { return -log1p(-z); }  // float64: full precision

// log1p(x) for x = small / big in [0, 1] (two weights, the smaller over the larger) as
// 2 atanh(s) = log((1 + s) / (1 - s)), s = small / (2 big + small) in [0, 1/3]: s Q(s^2),
// Q the degree-4 fit of 2 atanh(s) / s in s^2 on [0, 1/9] (max error 1.1e-8; in float32,
// with s's own rounding, 1.5e-7 absolute against -log(1 - z)'s 2.0e-7 with z's). s^2 <= 1/9
// converges so fast that 4 multiply-adds do what -log(1 - z) takes 9 for: the mixture's
// second pass for jsd, which needs no sigmoid (mix_elem), takes this reciprocal instead of
// 1 / (small + big).
template <class W>
KD_HD W log1p_atanh_poly(W s) {
  const W w = s * s;
  W q = W(2.771335542e-01f) * w + W(2.805163562e-01f);
  q = q * w + W(4.001951218e-01f);
  q = q * w + W(6.666641831e-01f);
  q = q * w + W(2.0f);
  return s * q;
}
KD_HD float kd_log1p_atanh(float s) { return log1p_atanh_poly(s); }
KD_HD double kd_log1p_atanh(double s) { return log1p(2 * s / (1 - s)); }  // float64: full

// the smallest normal number of S
template <class S>
KD_HD S kd_tiny() {
  return sizeof(S) == sizeof(float) ? S(1.17549435e-38f) : S(2.2250738585072014e-308);
}

template <class S>
KD_HD S kd_neg_inf() {
  return S(-INFINITY);
}

// ---- online statistics -------------------------------------------------------------------

// How sums taken against raw reference `from` change when it moves to `to` (to >= from), for
// a side of inverse temperature inv_t.
template <class S>
struct RefMove {
  S scale;  // exp((from - to) inv_t): factor of every exp((x - from) inv_t)
  S delta;  // (from - to) inv_t: change of every shifted logit (x - from) inv_t
};

template <class S>
KD_HD RefMove<S> ref_move(S from, S to, S inv_t) {
  RefMove<S> r;
  if (from == to || from == kd_neg_inf<S>()) {
    // nothing moved, or nothing was accumulated: keep (or reset) without inf arithmetic
    r.scale = from == to ? S(1) : S(0);
    r.delta = S(0);
  } else {
    r.delta = (from - to) * inv_t;
    r.scale = kd_exp(r.delta);
  }
  return r;
}

// The shift that element terms use: the reference, or 0 while nothing finite has been seen
// (then every exp(z - 0) of that side is exp(-inf) = 0 and no -inf - -inf appears).
template <class S>
KD_HD S safe_ref(S m) {
  return m == kd_neg_inf<S>() ? S(0) : m;
}

// Running (sum exp((x - m) inv_t)) of one side after its reference moved.
template <class W, class S>
KD_HD void lse_rebase(W& sum, RefMove<S> r) {
  sum = sum * W(r.scale);
}

// One raw logit x (element or lane) into sum exp((x - m) inv_t); m a safe reference >= x.
template <class W>
KD_HD void lse_add(W x, W m, W inv_t, W& sum) {
  sum = sum + kd_exp_nonpos((x - m) * inv_t);
}

// The same at T = 1 (cross-entropy's statistics).
template <class W>
KD_HD void lse_add(W x, W m, W& sum) {
  sum = sum + kd_exp_nonpos(x - m);
}

// c * acc for the weighting side's factor c, except that c = 0 (the factor underflowed, or
// nothing was accumulated) gives 0 even when acc = +inf: the range's weights are then 0, as
// they underflow to 0 in the unsplit sum, so it contributes nothing (never 0 * inf = NaN).
// A NaN acc stays NaN.
template <class W, class S>
KD_HD W kl_scale_acc(W acc, S c) {
  if (c == S(0)) return kd_where(acc == acc, W(0), acc);
  return W(c) * acc;
}

// forward (REVERSE = false) / reverse KL running state after the references moved:
// acc' = c_w (acc + (delta_w - delta_o) S_w), w the weighting side (t for forward KL).
template <bool REVERSE, class W, class S>
KD_HD void kl_rebase(W& ss, W& st, W& acc, RefMove<S> rs, RefMove<S> rt) {
  if (REVERSE) {
    acc = kl_scale_acc(acc + W(rs.delta - rt.delta) * ss, rs.scale);
  } else {
    acc = kl_scale_acc(acc + W(rt.delta - rs.delta) * st, rt.scale);
  }
  ss = ss * W(rs.scale);
  st = st * W(rt.scale);
}

// One element (or lane) of raw logits xs, xt into the running KL state; ms, mt are safe
// references >= xs, xt; its, itt the inverse temperatures. One subtraction and one
// multiplication per logit: (x - m) * inv_t.
template <bool REVERSE, class W>
KD_HD void kl_add(W xs, W xt, W ms, W mt, W its, W itt, W& ss, W& st, W& acc) {
  W ds = (xs - ms) * its;
  W dt = (xt - mt) * itt;
  W es = kd_exp_nonpos(ds);
  W et = kd_exp_nonpos(dt);
  ss = ss + es;
  st = st + et;
  if (REVERSE) {
    acc = acc + kd_where(es > W(0), es * (ds - dt), W(0));
  } else {
    acc = acc + kd_where(et > W(0), et * (dt - ds), W(0));
  }
}

// A partial KL state (one shard of a row's vocabulary, or one thread's elements).
template <class S>
struct KLPart {
  S ms, ss, mt, st, acc;
};

template <class S>
KD_HD KLPart<S> kl_part_empty() {
  KLPart<S> p;
  p.ms = p.mt = kd_neg_inf<S>();
  p.ss = p.st = p.acc = S(0);
  return p;
}

// Exact merge of two partial states: move both to the larger (raw) references, then add.
template <bool REVERSE, class S>
KD_HD KLPart<S> kl_merge(KLPart<S> a, KLPart<S> b, S its, S itt) {
  S ms = kd_max_nan(a.ms, b.ms);
  S mt = kd_max_nan(a.mt, b.mt);
  kl_rebase<REVERSE>(a.ss, a.st, a.acc, ref_move(a.ms, ms, its), ref_move(a.mt, mt, itt));
  kl_rebase<REVERSE>(b.ss, b.st, b.acc, ref_move(b.ms, ms, its), ref_move(b.mt, mt, itt));
  KLPart<S> r;
  r.ms = ms;
  r.mt = mt;
  r.ss = a.ss + b.ss;
  r.st = a.st + b.st;
  r.acc = a.acc + b.acc;
  return r;
}

// Exact merge of two (raw m, sum) pairs of one side of inverse temperature inv_t.
template <class S>
KD_HD void lse_merge(S& m, S& sum, S m2, S sum2, S inv_t) {
  S mm = kd_max_nan(m, m2);
  sum = sum * ref_move(m, mm, inv_t).scale + sum2 * ref_move(m2, mm, inv_t).scale;
  m = mm;
}

// Whether a row with these (raw) student and teacher maxima has both softmaxes: both finite.
// Else its loss is NaN (the non-finite policy above).
template <class S>
KD_HD bool row_has_softmax(S ms, S mt) {
  return kd_finite(ms) && kd_finite(mt);
}

// D from the merged state: forward acc / St - log St + log Ss, reverse symmetric.
template <bool REVERSE, class S>
KD_HD S kl_value(S ss, S st, S acc) {
  if (REVERSE) return acc / ss - kd_log(ss) + kd_log(st);
  return acc / st - kd_log(st) + kd_log(ss);
}

// ---- gradients of forward / reverse KL ---------------------------------------------------
// lq, lp: log-probabilities of the element, d: the row's divergence. Unscaled (no 1/T, no g).

// NEED_T = false skips the teacher's gradient (gt is left 0).
template <bool REVERSE, bool NEED_T = true, class W>
KD_HD void kl_grad(W lq, W lp, W d, W& gs, W& gt) {
  W q = kd_exp_nonpos(lq);
  W p = kd_exp_nonpos(lp);
  gt = W(0);
  if (REVERSE) {
    gs = kd_where(q > W(0), q * (lq - lp - d), W(0));
    if (NEED_T) gt = p - q;
  } else {
    gs = q - p;
    if (NEED_T) gt = kd_where(p > W(0), p * (lp - lq - d), W(0));
  }
}

// ---- mixture -----------------------------------------------------------------------------

// Row constants of a mixture (a = mix in [0, 1]). logit is clamped to +-1e30 so a = 0 or 1
// (skew 1: KL of a distribution with itself) never forms inf - inf: finite + 1e30 = 1e30.
// unit_u: cp = a and cq = 1 - a (jsd), where u = (a p + (1-a) q) / m = 1 exactly: Uq = Up = 1
// and the u terms of the gradient vanish, so they are never formed.
// one_exp: |logit| <= MIX_FAST_LOGIT, where the FAST element path applies (mix_elem);
// r_pq = a / (1-a) = exp(logit) and r_qp = its inverse there.
constexpr double MIX_FAST_LOGIT = 20.0;

template <class S>
struct MixCoef {
  S a, one_ma, cp, cq, kp, kq, log_a, log_1ma, logit, r_pq, r_qp;  // one_ma = 1 - a
  bool unit_u, one_exp;
};

template <class S>
KD_HD MixCoef<S> mix_coef(S a, S cp, S cq) {
  MixCoef<S> c;
  c.a = a;
  c.one_ma = S(1) - a;
  c.cp = cp;
  c.cq = cq;
  c.kp = cp == S(0) ? S(0) : cp / a;
  c.kq = cq == S(0) ? S(0) : cq / c.one_ma;
  c.log_a = kd_log(a);
  c.log_1ma = kd_log(c.one_ma);
  S l = c.log_a - c.log_1ma;
  c.logit = l > S(1e30) ? S(1e30) : (l < S(-1e30) ? S(-1e30) : l);
  c.unit_u = cp == a && cq == c.one_ma;
  c.one_exp = kd_abs(c.logit) <= S(MIX_FAST_LOGIT);
  c.r_pq = c.one_exp ? kd_exp(c.logit) : S(0);
  c.r_qp = c.one_exp ? kd_exp(S(0) - c.logit) : S(0);
  return c;
}

// The row constants of a mixture from the op's float64 parameters, rounded to S field by
// field. mix_coef(S(a), ...) would round a first: a float32 a within rounding of 1 (skew
// reverse KL at skew 1e-8 has a = 1 - 1e-8) becomes 1, and its 1 - a, log(1 - a) and
// 1 / (1 - a) become 0, -inf and inf (an infinite loss where the answer is finite).
template <class S>
KD_HD MixCoef<S> mix_coef_of(double a, double cp, double cq) {
  const MixCoef<double> d = mix_coef(a, cp, cq);
  MixCoef<S> c;
  c.a = S(d.a);
  c.one_ma = S(d.one_ma);
  c.cp = S(d.cp);
  c.cq = S(d.cq);
  c.kp = S(d.kp);
  c.kq = S(d.kq);
  c.log_a = S(d.log_a);
  c.log_1ma = S(d.log_1ma);
  c.logit = S(d.logit);
  c.r_pq = S(d.r_pq);
  c.r_qp = S(d.r_qp);
  c.unit_u = d.unit_u;
  c.one_exp = d.one_exp;
  return c;
}

// The bound of max(+-d, 0) on the FAST path (mix_relu): exp(-mix_clamp() + MIX_FAST_LOGIT)
// is 0 in the lane type even with subnormals (float: below 2^-149 = e^-103.3; double: below
// e^-744.4).
template <class S>
KD_HD S mix_clamp() {
  return sizeof(S) == sizeof(float) ? S(200) : S(1000);
}

// Which KL terms of the mixture have a nonzero coefficient, when known at compile time (the
// FAST path of the CPU kernel): both (jsd and general mixtures), only KL(p || m) (cq = 0:
// skew forward KL) or only KL(q || m) (cp = 0: skew reverse KL). A missing side's log-ratio,
// its share of u and its sums are then never formed: for skew forward KL's student gradient
// (which needs no log-ratio at all) that removes the log1p from the element.
enum MixSides : int { MIX_BOTH = 0, MIX_P = 1, MIX_Q = 2 };

template <int SIDES, class S>
KD_HD bool mix_sides_match(const MixCoef<S>& c) {
  return SIDES == MIX_BOTH || (SIDES == MIX_P ? c.cq == S(0) : c.cp == S(0));
}

// u = 1 for every element (jsd): a compile-time fact on the FAST path, where with_mix_mode
// (kd_cpu.cpp) passes c.unit_u as UNIT, so the element loop holds no branch on it.
template <bool FAST, bool UNIT, class S>
KD_HD bool mix_unit(const MixCoef<S>& c) {
  return UNIT || (!FAST && c.unit_u);
}

// The constant of u on the FAST one-side paths (u = kp sigmoid(d) for MIX_P, kq sigmoid(-d)
// for MIX_Q), which the sums and gradients there leave out of their element; 1 for MIX_BOTH.
template <int SIDES, class S>
KD_HD S mix_u_unit(const MixCoef<S>& c) {
  return SIDES == MIX_P ? c.kp : (SIDES == MIX_Q ? c.kq : S(1));
}

// max(x, 0) (NaN -> 0), on the FAST path also clamped to mix_clamp (see mix_elem)
template <bool FAST, class S, class W>
KD_HD W mix_relu(W x) {
  return FAST ? kd_clamp(x, S(0), mix_clamp<S>()) : kd_max(x, W(0));
}

// Per-element pieces of the mixture: p, q, lp - lm, lq - lm, u (see the header comment).
// On the FAST one-side paths (MIX_P, MIX_Q) u is the sigmoid alone: its constant kp or kq
// (mix_u_unit) is the callers', applied once per row or folded into their row constants.
template <class W>
struct MixElem {
  W q, p, lp_lm, lq_lm, u;
  W sp_neg, sp_pos;  // softplus(-d) = -log a - (lp - lm), softplus(d) = -log(1-a) - (lq - lm)
};

// FAST = false: the general path (any a); zero-weight entries are masked by the callers.
// FAST = true (needs c.one_exp), two changes, both exact where the results are used:
//  - p and q from one exp: a p / ((1-a) q) = exp(d), so the smaller of the two is the larger
//    times exp(-|d|) (formed anyway for the log1p) times r_pq or r_qp. That saves one exp of
//    three (NEED_P = false: only q is needed, p is left unset, and q is exp(lq) as before).
//  - max(+-d, 0) clamped to C (mix_relu; C = mix_clamp): every log-ratio is finite, so no
//    masks are needed (0 * finite = 0). Where |d| > C the side the clamp changes has weight
//    exactly 0: if d < -C, p = q exp(d - logit) <= exp(-C + |logit|) = 0, and the same for q
//    if d > C. Padding (lp = lq = -inf, d = NaN) gives p = q = 0 (NaN d: exp(-|d|) = 0, the
//    sign test false, max(+-d, 0) = 0) and finite log-ratios.
//  UNIT = true (needs c.unit_u): u = 1 is known at compile time; with FAST, UNIT must be
//  c.unit_u (mix_unit).
//  SIDES (FAST only, needs mix_sides_match): the sides whose pieces are formed; NEED_LOG =
//  false skips the log-ratios (lp_lm, lq_lm, sp_*) altogether.
//  GIVEN = true: q and p are the caller's (gq, gp: pass 1's exps, kept), no exp forms them,
//  and so is the log-ratio: lp holds d = lp - lq + logit itself, lq is unused. With FAST,
//  gq and gp are (1-a) q and a p (the caller folds the factors into its own; e.q and e.p
//  carry them), and one reciprocal gives the sigmoids and the log1p's argument (see below).
template <bool NEED_P = true, bool FAST = false, bool UNIT = false, int SIDES = MIX_BOTH,
          bool NEED_LOG = true, bool GIVEN = false, class W, class S>
KD_HD MixElem<W> mix_elem(W lq, W lp, const MixCoef<S>& c, W gq = W(0), W gp = W(0)) {
  MixElem<W> e;
  const W d = GIVEN ? lp : lp - lq + W(c.logit);
  W ex;  // exp(-|d|) in [0, 1] (NaN -> 0), except on the FAST GIVEN path: not needed there
  if (!(FAST && GIVEN)) ex = kd_exp_nonpos(kd_nabs(d));
  const auto pos = kd_nonneg(d);  // false for NaN
  W l1, sig_pos, sig_neg;  // log1p(exp(-|d|)), sigmoid(d), sigmoid(-d)
  if (GIVEN) {
    e.q = gq;
    e.p = gp;
    if (FAST) {
      // the sigmoids are a p / m and (1-a) q / m (m = a p + (1-a) q), and exp(-|d|) is the
      // smaller of the two over the larger (exp(d) is their ratio), so log1p(exp(-|d|)) =
      // -log(1 - z), z = the smaller over m in [0, 1/2]: one reciprocal, no exp. m is kept
      // >= the smallest normal, so two zeros (padding, underflow) give 0 and 1/m is finite.
      // The larger sigmoid is 1 - z: a subtraction where a product would take a multiply.
      // Without sigmoids (UNIT: jsd) log1p(exp(-|d|)) = log1p(small / big) comes cheaper
      // from s = small / (2 big + small) (kd_log1p_atanh), with the same care for zeros.
      const W ap = gp, bq = gq;
      const W small = kd_where(pos, bq, ap);
      if (UNIT) {
        const W big = kd_where(pos, ap, bq);
        l1 = kd_log1p_atanh(small * kd_rcp(kd_max(big + big + small, W(kd_tiny<S>()))));
      } else {
        const W z = small * kd_rcp(kd_max(ap + bq, W(kd_tiny<S>())));
        l1 = kd_log1m_half(z);
        sig_pos = kd_where(pos, W(1) - z, z);
        sig_neg = kd_where(pos, z, W(1) - z);
      }
    }
  } else if (FAST && NEED_P) {
    W big = kd_exp_nonpos(kd_where(pos, lp, lq));
    W small = big * (ex * kd_where(pos, W(c.r_pq), W(c.r_qp)));
    e.p = kd_where(pos, big, small);
    e.q = kd_where(pos, small, big);
  } else {
    e.q = kd_exp_nonpos(lq);
    if (NEED_P) e.p = kd_exp_nonpos(lp);
  }
  if (FAST && !GIVEN && !UNIT) {
    // sigmoid(+-d) = 1 / (1 + e^-|d|) on the side d points to, z = e^-|d| / (1 + e^-|d|) on
    // the other: one reciprocal for both (a one-side path's unused one is never formed), and
    // z in [0, 1/2] gives log1p(e^-|d|) = -log(1 - z) by the cheaper of the two polynomials
    const W inv = kd_rcp(W(1) + ex);
    const W z = ex * inv;
    sig_pos = kd_where(pos, inv, z);
    sig_neg = kd_where(pos, z, inv);
    if (NEED_LOG) l1 = kd_log1m_half(z);
  } else if (!(FAST && GIVEN) && (!FAST || NEED_LOG)) {
    l1 = kd_log1p_unit(ex);
  }
  if (!FAST || NEED_LOG) {
    // softplus(-+d) = max(-+d, 0) + log1p(exp(-|d|))
    if (!FAST || SIDES != MIX_Q) {
      e.sp_neg = mix_relu<FAST, S>(W(0) - d) + l1;
      e.lp_lm = W(-c.log_a) - e.sp_neg;
    }
    if (!FAST || SIDES != MIX_P) {
      e.sp_pos = mix_relu<FAST, S>(d) + l1;
      e.lq_lm = W(-c.log_1ma) - e.sp_pos;
    }
  }
  if (mix_unit<FAST, UNIT>(c)) {
    e.u = W(1);
    return e;
  }
  if (!FAST) {  // the sigmoids as on the FAST path above
    const W inv = kd_rcp(W(1) + ex);
    sig_pos = kd_where(pos, inv, ex * inv);
    sig_neg = kd_where(pos, ex * inv, inv);
  }
  if (FAST && SIDES == MIX_P) {
    e.u = sig_pos;  // u / kp
  } else if (FAST && SIDES == MIX_Q) {
    e.u = sig_neg;  // u / kq
  } else {
    e.u = W(c.kp) * sig_pos + W(c.kq) * sig_neg;
  }
  return e;
}

// Pass-2 sums of the mixture. General path: terms of a side whose coefficient is 0 are
// skipped (their log-ratio may be inf at a = 0 or 1 and they are never used). FAST: every
// log-ratio is finite (see mix_elem), nothing is masked; a side SIDES leaves out keeps its
// sum at 0 (its coefficient is 0).
// GIVEN: q, p and d given (gq, gp, lp), see mix_elem.
// FAST with one side (MIX_P, MIX_Q): suq and sup are short of u's constant (mix_u_unit,
// see MixElem), which the caller applies once per row.
template <bool FAST = false, bool UNIT = false, int SIDES = MIX_BOTH, bool GIVEN = false,
          class W, class S>
KD_HD void mix_add(W lq, W lp, const MixCoef<S>& c, W& sa, W& sb, W& suq, W& sup,
                   W gq = W(0), W gp = W(0)) {
  MixElem<W> e = mix_elem<true, FAST, UNIT, SIDES, true, GIVEN>(lq, lp, c, gq, gp);
  if (FAST) {
    if (SIDES != MIX_Q) sa = sa + e.p * e.lp_lm;
    if (SIDES != MIX_P) sb = sb + e.q * e.lq_lm;
    if (!mix_unit<FAST, UNIT>(c)) {
      suq = suq + e.q * e.u;
      sup = sup + e.p * e.u;
    }
    return;
  }
  W pm = e.p > W(0);
  W qm = e.q > W(0);
  if (c.cp != S(0)) sa = sa + kd_where(pm, e.p * e.lp_lm, W(0));
  if (c.cq != S(0)) sb = sb + kd_where(qm, e.q * e.lq_lm, W(0));
  if (!c.unit_u) {  // else Uq = Up = 1: the caller's sums stay 0 and are never read
    suq = suq + kd_where(qm, e.q * e.u, W(0));
    sup = sup + kd_where(pm, e.p * e.u, W(0));
  }
}

// The FAST path's gradients from an element's pieces e (mix_elem), times ks and kt (the
// caller's chain-rule factors, folded into the row constants). Pieces from mix_elem's FAST
// GIVEN path (e.q = (1-a) q, e.p = a p) take ks / (1-a) and kt / a.
template <bool NEED_T, bool UNIT, int SIDES, class W, class S>
KD_HD void mix_grad_fast(const MixElem<W>& e, const MixCoef<S>& c, S A, S B, S Uq, S Up, W& gs,
                         W& gt, S ks, S kt) {
  // lq - lm - B = (-log(1-a) - B) - softplus(d) with the row constant formed once (one
  // step less on the element's chain); a side SIDES leaves out has coefficient 0
  gs = W(0);
  gt = W(0);
  if (UNIT) {
    if (SIDES != MIX_P) gs = (W(ks * c.cq) * e.q) * (W(-c.log_1ma - B) - e.sp_pos);
    if (NEED_T && SIDES != MIX_Q) gt = (W(kt * c.cp) * e.p) * (W(-c.log_a - A) - e.sp_neg);
    return;
  }
  // with u: cq q (lq - lm - B) - (1-a) q (u - Uq) = q (rq - cq softplus(d) - (1-a) u),
  // rq = cq (-log(1-a) - B) + (1-a) Uq a row constant: two multiply-adds and a multiply
  // where the unfolded form takes seven steps (the teacher's alike with p, a, Up); a
  // one-side path's u constant (mix_u_unit) is folded in too
  const S ku = mix_u_unit<SIDES>(c);
  const S rq = (SIDES != MIX_P ? c.cq * (-c.log_1ma - B) : S(0)) + c.one_ma * Uq;
  W hs = W(ks * rq) - W(ks * c.one_ma * ku) * e.u;
  if (SIDES != MIX_P) hs = hs - W(ks * c.cq) * e.sp_pos;
  gs = e.q * hs;
  if (NEED_T) {
    const S rp = (SIDES != MIX_Q ? c.cp * (-c.log_a - A) : S(0)) + c.a * Up;
    W ht = W(kt * rp) - W(kt * c.a * ku) * e.u;
    if (SIDES != MIX_Q) ht = ht - W(kt * c.cp) * e.sp_neg;
    gt = e.p * ht;
  }
}

// Lane types with tables of two functions of the log-ratio d (kd_softplus(d), and
// kd_softplus_sigm(d) = softplus(d) + sigmoid(-d)): the CPU's AVX-512 float32 lanes
// (kd_cpu_simd.h specializes this). mix_grad's FAST path takes jsd's and skew reverse KL's
// student gradients from them (see there); other lane types form the pieces by exps.
template <class W>
constexpr bool kd_has_softplus_tables = false;

// The log-ratios a gradient needs: the student's through cq, the teacher's through cp.
template <bool NEED_T, int SIDES>
constexpr bool mix_grad_log() {
  return SIDES != MIX_P || (NEED_T && SIDES != MIX_Q);
}

// SCALED: the gradients come out times ks and kt (the caller's chain-rule factors), which
// the FAST path folds into its row constants (one multiply fewer per element); without it
// ks and kt keep their defaults, 1.
template <bool NEED_T = true, bool FAST = false, bool UNIT = false, int SIDES = MIX_BOTH,
          bool SCALED = false, class W, class S>
KD_HD void mix_grad(W lq, W lp, const MixCoef<S>& c, S A, S B, S Uq, S Up, W& gs, W& gt,
                    S ks = S(1), S kt = S(1)) {
  if constexpr (FAST && !NEED_T && (UNIT || SIDES == MIX_Q) && kd_has_softplus_tables<W>) {
    // jsd's and skew reverse KL's student gradients take a function f of d whole (the lane
    // type's tables: one exp, for q, and a table where mix_elem forms two exps, a log1p and,
    // for skew, a reciprocal): softplus(d) = -log(1-a) - (lq - lm) for jsd (u = 1), and
    // softplus(d) + sigmoid(-d) for skew reverse KL (cp = 0), whose u = kq sigmoid(-d) enters
    // only in this sum since (1-a) kq = cq:
    //   dD/dzs = cq q (lq - lm - B) - (1-a) q (u - Uq) = q (rq - cq f(d)),
    //   rq = cq (-log(1-a) - B) + (1-a) Uq  (no u term for jsd).
    // ks rq is rounded once (a row constant), so where rq and cq f cancel the multiply-add
    // holds the only rounding.
    const double rq = double(c.cq) * (double(-c.log_1ma) - double(B)) +
                      (UNIT ? 0.0 : double(c.one_ma) * double(Uq));
    const W q = kd_exp_nonpos(lq);
    const W d = lp - lq + W(c.logit);
    const W f = UNIT ? kd_softplus(d) : kd_softplus_sigm(d);
    gs = q * (W(S(double(ks) * rq)) - W(ks * c.cq) * f);
    gt = W(0);
    return;
  }
  constexpr bool LOG = mix_grad_log<NEED_T, SIDES>();
  MixElem<W> e = mix_elem<NEED_T, FAST, UNIT, SIDES, LOG>(lq, lp, c);
  if (FAST) {
    mix_grad_fast<NEED_T, UNIT, SIDES>(e, c, A, B, Uq, Up, gs, gt, ks, kt);
    return;
  }
  W qm = e.q > W(0);
  gs = W(0);
  gt = W(0);
  if (!c.unit_u) gs = kd_where(qm, W(S(0) - c.one_ma) * e.q * (e.u - W(Uq)), W(0));
  if (c.cq != S(0)) gs = gs + kd_where(qm, W(c.cq) * e.q * (e.lq_lm - W(B)), W(0));
  if (NEED_T) {
    W pm = e.p > W(0);
    if (!c.unit_u) gt = kd_where(pm, W(S(0) - c.a) * e.p * (e.u - W(Up)), W(0));
    if (c.cp != S(0)) gt = gt + kd_where(pm, W(c.cp) * e.p * (e.lp_lm - W(A)), W(0));
  }
  if (SCALED) {
    gs = gs * W(ks);
    gt = gt * W(kt);
  }
}

// ---- soft cross-entropy and forward + reverse KL: one pass, two accumulators -------------
// K = SOFT_CE: acc = sum e_t (-(zs - ms)) (accb unused). K = FR_KL: acc as forward KL's,
// accb as reverse KL's.

template <int K, class W, class S>
KD_HD void kl2_rebase(W& ss, W& st, W& acc, W& accb, RefMove<S> rs, RefMove<S> rt) {
  if (K == SOFT_CE) {
    acc = kl_scale_acc(acc - W(rs.delta) * st, rt.scale);
  } else {
    acc = kl_scale_acc(acc + W(rt.delta - rs.delta) * st, rt.scale);
    accb = kl_scale_acc(accb + W(rs.delta - rt.delta) * ss, rs.scale);
  }
  ss = ss * W(rs.scale);
  st = st * W(rt.scale);
}

template <int K, class W>
KD_HD void kl2_add(W xs, W xt, W ms, W mt, W its, W itt, W& ss, W& st, W& acc, W& accb) {
  W ds = (xs - ms) * its;
  W dt = (xt - mt) * itt;
  W es = kd_exp_nonpos(ds);
  W et = kd_exp_nonpos(dt);
  ss = ss + es;
  st = st + et;
  if (K == SOFT_CE) {
    acc = acc + kd_where(et > W(0), et * (W(0) - ds), W(0));
  } else {
    W d = dt - ds;
    acc = acc + kd_where(et > W(0), et * d, W(0));
    accb = accb + kd_where(es > W(0), es * (W(0) - d), W(0));
  }
}

// A partial state of SOFT_CE / FR_KL (one shard of a row, or one thread's elements).
template <class S>
struct KL2Part {
  S ms, ss, mt, st, acc, accb;
};

template <class S>
KD_HD KL2Part<S> kl2_part_empty() {
  KL2Part<S> p;
  p.ms = p.mt = kd_neg_inf<S>();
  p.ss = p.st = p.acc = p.accb = S(0);
  return p;
}

// Exact merge of two partial states: move both to the larger (raw) references, then add.
template <int K, class S>
KD_HD KL2Part<S> kl2_merge(KL2Part<S> a, KL2Part<S> b, S its, S itt) {
  S ms = kd_max_nan(a.ms, b.ms);
  S mt = kd_max_nan(a.mt, b.mt);
  kl2_rebase<K>(a.ss, a.st, a.acc, a.accb, ref_move(a.ms, ms, its), ref_move(a.mt, mt, itt));
  kl2_rebase<K>(b.ss, b.st, b.acc, b.accb, ref_move(b.ms, ms, its), ref_move(b.mt, mt, itt));
  KL2Part<S> r;
  r.ms = ms;
  r.mt = mt;
  r.ss = a.ss + b.ss;
  r.st = a.st + b.st;
  r.acc = a.acc + b.acc;
  r.accb = a.accb + b.accb;
  return r;
}

// dv[0] = D (soft CE) or F, dv[1] = R (FR_KL); returns the row's divergence.
template <int K, class S>
KD_HD S kl2_value(S ss, S st, S acc, S accb, S cf, S cr, S* dv) {
  if (K == SOFT_CE) {
    dv[0] = (acc == S(0) ? S(0) : acc / st) + kd_log(ss);
    dv[1] = S(0);
    return dv[0];
  }
  dv[0] = (acc == S(0) ? S(0) : acc / st) - kd_log(st) + kd_log(ss);
  dv[1] = (accb == S(0) ? S(0) : accb / ss) - kd_log(ss) + kd_log(st);
  return cf * dv[0] + cr * dv[1];
}

// d = D (soft CE) or F, d2 = R (FR_KL); unscaled, as kl_grad
template <int K, bool NEED_T = true, class W, class S>
KD_HD void kl2_grad(W lq, W lp, S d, S d2, S cf, S cr, W& gs, W& gt) {
  W q = kd_exp_nonpos(lq);
  W p = kd_exp_nonpos(lp);
  gt = W(0);
  if (K == SOFT_CE) {
    gs = q - p;
    if (NEED_T) gt = kd_where(p > W(0), p * ((W(0) - lq) - W(d)), W(0));
  } else {
    gs = W(cf) * (q - p) + W(cr) * kd_where(q > W(0), q * (lq - lp - W(d2)), W(0));
    if (NEED_T) gt = W(cf) * kd_where(p > W(0), p * (lp - lq - W(d)), W(0)) + W(cr) * (p - q);
  }
}

// ---- tvd and alpha_beta: pass-2 sums and gradients from (lq, lp) -----------------------------
// Row constants: a, b the exponents (alpha_beta), wp = a / (a+b), wq = b / (a+b),
// k = -1 / (a b). Every power is an exp of a log-space sum, in [0, 1] for a, b > 0, and 0
// (not NaN) for padding; no masks are needed (tvd's g and |p - q| are 0 there too).

template <class S>
struct PwCoef {
  S a, b, ab, wp, wq, k, ia, ib;
};

template <class S>
KD_HD PwCoef<S> pw_coef(S a, S b) {
  PwCoef<S> c;
  c.a = a;
  c.b = b;
  c.ab = a + b;
  c.wp = c.ab > S(0) ? a / c.ab : S(0);
  c.wq = c.ab > S(0) ? b / c.ab : S(0);
  c.k = a * b != S(0) ? S(-1) / (a * b) : S(0);
  c.ia = a != S(0) ? S(-1) / a : S(0);
  c.ib = b != S(0) ? S(-1) / b : S(0);
  return c;
}

// sgn(x): 1, -1, or 0 where x == 0
template <class W>
KD_HD W pw_sign(W x) {
  return kd_where(x > W(0), W(1), kd_where(x < W(0), W(-1), W(0)));
}

template <int K, class W, class S>
KD_HD void pw_add(W lq, W lp, const PwCoef<S>& c, W& sd, W& suq, W& sup) {
  if (K == TVD) {
    W q = kd_exp_nonpos(lq);
    W p = kd_exp_nonpos(lp);
    W diff = q - p;
    W g = pw_sign(diff);
    sd = sd - kd_nabs(diff);
    suq = suq + g * q;
    sup = sup + g * p;
  } else {
    W x = kd_exp_nonpos(W(c.a) * lp + W(c.b) * lq);
    W yp = kd_exp_nonpos(W(c.ab) * lp);
    W yq = kd_exp_nonpos(W(c.ab) * lq);
    sd = sd + W(c.k) * (x - W(c.wp) * yp - W(c.wq) * yq);
    suq = suq + (x - yq);
    sup = sup + (x - yp);
  }
}

template <int K, bool NEED_T = true, class W, class S>
KD_HD void pw_grad(W lq, W lp, const PwCoef<S>& c, S Uq, S Up, W& gs, W& gt) {
  W q = kd_exp_nonpos(lq);
  gt = W(0);
  if (K == TVD) {
    W p = kd_exp_nonpos(lp);
    W g = pw_sign(q - p);
    gs = W(0.5f) * q * (g - W(Uq));
    if (NEED_T) gt = W(-0.5f) * p * (g - W(Up));
  } else {
    W x = kd_exp_nonpos(W(c.a) * lp + W(c.b) * lq);
    W yq = kd_exp_nonpos(W(c.ab) * lq);
    gs = W(c.ia) * (x - yq - q * W(Uq));
    if (NEED_T) {
      W p = kd_exp_nonpos(lp);
      W yp = kd_exp_nonpos(W(c.ab) * lp);
      gt = W(c.ib) * (x - yp - p * W(Up));
    }
  }
}

// ---- cross-entropy, kl_div, softmax ------------------------------------------------------

// d CE / d s_k = softmax(s)_k - onehot_k, softmax from the T = 1 statistics (m1, log S1).
template <class W>
KD_HD W ce_grad(W s, W m1, W log_s1, W onehot) {
  return kd_exp_nonpos((s - m1) - log_s1) - onehot;
}

// F.kl_div's term: y (log y - x), or exp(y) (y - x) for log-space targets; 0 log 0 = 0.
template <class S>
KD_HD S kl_div_term(S x, S y, bool log_target) {
  if (log_target) return kd_exp(y) * (y - x);
  S ylogy = y == S(0) ? S(0) : y * kd_log(y);
  return ylogy - y * x;
}

// (d term / dx, d term / dy); at y = 0 (probability target) d/dy = -inf, the true derivative.
template <class S>
KD_HD void kl_div_grad(S x, S y, bool log_target, S& gx, S& gy) {
  if (log_target) {
    S ey = kd_exp(y);
    gx = S(0) - ey;
    gy = ey * (y - x + S(1));
  } else {
    gx = S(0) - y;
    gy = kd_log(y) + S(1) - x;
  }
}

// softmax / log_softmax backward per element from the output y and the row sum
// r = sum g y (softmax) or sum g (log_softmax): dz = y (g - r) or g - exp(y) r.
template <class S>
KD_HD S softmax_grad(S y, S g, S r, bool log) {
  return log ? g - kd_exp(y) * r : y * (g - r);
}

}  // namespace kd
