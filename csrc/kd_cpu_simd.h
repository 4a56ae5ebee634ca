// kd_cpu_simd.h: the vector lanes and the tile I/O of the CPU kernels (kd_cpu.cpp).
//
// 1. at::vec::Vectorized<float|double> overloads of kd_math.h's primitives (kd_exp, kd_log,
//    kd_log1p_unit, kd_log1m_half, kd_log1p_atanh, kd_rcp, kd_nabs, kd_max, kd_clamp,
//    kd_where, kd_exp_nonpos, kd_nonneg), declared before kd_math.h is included so its
//    element templates find them. ATen builds Vectorized for the CPU capability ext_build.py
//    compiles for (AVX512 / AVX2 / none).
// 2. Tiles: a row is read in tiles converted from any input dtype to the accumulation type A
//    (float; double for float64 logits) as raw logits (load_tile) or as log-probabilities
//    (x - m) / T - l (load_logp), padded with -inf to whole vectors, and written back in the
//    output dtype (store_tile, store_vec); fresh outputs advised to huge pages
//    (advise_huge_pages).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kd {
// Vector overloads of kd_math.h's primitives, declared before the header so its templates
// find them.
using at::vec::Vectorized;
template <class T>
inline Vectorized<T> kd_exp(const Vectorized<T>& x) {
  // float32: ATen's 20-ulp exp (max relative error ~1.2e-6, several times faster than the
  // 1-ulp Sleef one; the losses' float32 sums carry errors of that order anyway).
  // float64: exp_u20 is the exact exp.
  return x.exp_u20();
}
// exp(x) for x <= 0 (an element's weight): a NaN x gives 0, as an argument below the
// smallest normal's log does, so a lane of padding or of a NaN logit carries no weight. Only
// the lower end is clamped (the compare is false for NaN, which the select sends to it).
template <class T>
inline Vectorized<T> kd_exp_nonpos(const Vectorized<T>& x) {
  return kd_exp(Vectorized<T>::blendv(Vectorized<T>(T(-746)), x, x > Vectorized<T>(T(-746))));
}
#if defined(CPU_CAPABILITY_AVX512)
// float32 on AVX-512: the same algorithm and constants as ATen's exp_u20 (exp(x) = 2^n e^r,
// n = floor(x log2 e + 1/2), r = x - n ln 2, e^r by its degree-5 polynomial, inputs below
// ln FLT_MIN give 0), with a shorter dependency chain: the polynomial by Estrin's scheme
// (3 dependent steps instead of 5), its factor 2 folded into the coefficients (exact), and
// 2^(n-1) built beside it. The mixture's element is one long chain (exp, log1p, sums) and
// the out-of-order window holds only a few of them, so depth is what costs.
inline Vectorized<float> kd_exp(const Vectorized<float>& v) {
  const __m512 x = _mm512_max_ps(_mm512_min_ps(v, _mm512_castsi512_ps(_mm512_set1_epi32(
                                                      0x42b17218))),  // ln FLT_MAX
                                 _mm512_castsi512_ps(_mm512_set1_epi32(0xc2aeac50)));
  const __mmask16 under = _mm512_cmp_ps_mask(v, _mm512_castsi512_ps(_mm512_set1_epi32(
                                                    0xc2aeac50)),  // ln FLT_MIN
                                             _CMP_LT_OS);
  // n = x log2 e rounded to nearest (ATen: floor(x log2 e + 1/2), the same but at ties) by
  // adding 1.5 * 2^23 inside the multiply-add: n sits in the low bits of t, and fx = t - 1.5
  // * 2^23 exactly (|n| <= 128), without a rounding instruction on the chain.
  const __m512 magic = _mm512_set1_ps(12582912.f);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_castsi512_ps(_mm512_set1_epi32(0x3fb8aa3b)),
                                   magic);  // log2 e
  const __m512 fx = _mm512_sub_ps(t, magic);
  const __m512 r =
      _mm512_fnmadd_ps(fx, _mm512_castsi512_ps(_mm512_set1_epi32(0x3f317218)), x);  // ln 2
  // 2 e^r = 2 + 2 c1 r + ... + 2 c5 r^5 (ATen's c1..c5)
  const __m512 r2 = _mm512_mul_ps(r, r);
  const __m512 p01 = _mm512_fmadd_ps(r, _mm512_set1_ps(2 * 0.999999701f), _mm512_set1_ps(2.f));
  const __m512 p23 =
      _mm512_fmadd_ps(r, _mm512_set1_ps(2 * 0.166676521f), _mm512_set1_ps(2 * 0.499991506f));
  const __m512 p45 =
      _mm512_fmadd_ps(r, _mm512_set1_ps(2 * 0.00828929059f), _mm512_set1_ps(2 * 0.0418978221f));
  const __m512 p = _mm512_fmadd_ps(_mm512_fmadd_ps(p45, r2, p23), r2, p01);
  // 2^(n-1) = (n + 126) << 23; the bits of t are 0x4B400000 + n, whose high part the shift
  // drops (0x4B400000 << 23 = 0 mod 2^32)
  const __m512i e =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(126)), 23);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~under), p, _mm512_castsi512_ps(e));
}
// 2^(j/32), j = 0..31, rounded to float32: kd_exp_nonpos's table
alignas(64) inline constexpr float kExp2Frac32[32] = {
    0x1.000000p+0f, 0x1.059b0ep+0f, 0x1.0b5586p+0f, 0x1.11301ep+0f, 0x1.172b84p+0f,
    0x1.1d4874p+0f, 0x1.2387a6p+0f, 0x1.29e9e0p+0f, 0x1.306fe0p+0f, 0x1.371a74p+0f,
    0x1.3dea64p+0f, 0x1.44e086p+0f, 0x1.4bfdaep+0f, 0x1.5342b6p+0f, 0x1.5ab07ep+0f,
    0x1.6247ecp+0f, 0x1.6a09e6p+0f, 0x1.71f75ep+0f, 0x1.7a1148p+0f, 0x1.82589ap+0f,
    0x1.8ace54p+0f, 0x1.93737cp+0f, 0x1.9c4918p+0f, 0x1.a5503cp+0f, 0x1.ae89fap+0f,
    0x1.b7f770p+0f, 0x1.c199bep+0f, 0x1.cb720ep+0f, 0x1.d5818ep+0f, 0x1.dfc974p+0f,
    0x1.ea4afap+0f, 0x1.f50766p+0f};
// exp(x) for the element weights (x <= 0) on AVX-512 float32, with fewer multiplies than the
// general exp above (the mixture's element is bound by its multiply-adds): exp(x) = 2^n
// 2^(j/32) e^r, k = 32 n + j = x 32 log2 e rounded (the magic-number add, as above), r = x -
// k ln2/32 (|r| <= ln2/64, rounding of ln 2 as in the general exp: 2.4e-7 relative at x =
// -87), 2^(j/32) from the table by one two-register permute (it reads the low 5 bits of t's
// bits, j), e^r = 1 + r + r^2/2 + r^3/6 (error r^4/24 < 6e-10), and 2^n added to the
// result's exponent bits. 6 multiply-adds where the general exp takes 8; within 2 ulps plus
// the reduction's error, where the general exp's polynomial allows 20 ulps.
// Results must be normal for the exponent add: x < -86.6 (e^x < 2.4e-38) gives 0, as does a
// NaN x; up to x = 88 the result is exact, above it undefined.
inline Vectorized<float> kd_exp_nonpos(const Vectorized<float>& v) {
  const __m512 lo = _mm512_set1_ps(-86.6f);
  const __m512 x = _mm512_max_ps(v, lo);
  const __m512 magic = _mm512_set1_ps(12582912.f);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(46.1662413084f), magic);  // 32 log2 e
  const __m512 r = _mm512_fnmadd_ps(_mm512_sub_ps(t, magic),
                                    _mm512_set1_ps(0.0216608493924982909f), x);  // ln2 / 32
  const __m512 tj = _mm512_permutex2var_ps(_mm512_load_ps(kExp2Frac32), _mm512_castps_si512(t),
                                           _mm512_load_ps(kExp2Frac32 + 16));
  __m512 q = _mm512_fmadd_ps(r, _mm512_set1_ps(1.f / 6), _mm512_set1_ps(0.5f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f));
  // 2^(j/32) e^r = T + (T r) q, q = (e^r - 1) / r
  const __m512 p = _mm512_fmadd_ps(_mm512_mul_ps(tj, r), q, tj);
  // n << 23 = bits 5.. of k moved to the exponent: t's bits are 0x4B400000 + k, whose high
  // part the shift by 18 drops (0x4B400000 << 18 = 0 mod 2^32)
  const __m512i n = _mm512_and_si512(_mm512_slli_epi32(_mm512_castps_si512(t), 18),
                                     _mm512_set1_epi32(int(0xff800000u)));
  return _mm512_castsi512_ps(_mm512_maskz_add_epi32(_mm512_cmp_ps_mask(v, lo, _CMP_GE_OQ),
                                                    _mm512_castps_si512(p), n));
}
#endif
template <class T>
inline Vectorized<T> kd_log(const Vectorized<T>& x) {
  return x.log();
}
template <class W>
inline W log1p_unit_poly(W x);  // kd_math.h
inline Vectorized<float> kd_log1p_unit(const Vectorized<float>& x) {
  return log1p_unit_poly(x);
}
inline Vectorized<double> kd_log1p_unit(const Vectorized<double>& x) {
  return (x + Vectorized<double>(1.0)).log();  // x in [0, 1]: absolute error 1 ulp of 1
}
template <class W>
inline W log1m_half_poly(W z);  // kd_math.h
inline Vectorized<float> kd_log1m_half(const Vectorized<float>& z) {
  return log1m_half_poly(z);
}
inline Vectorized<double> kd_log1m_half(const Vectorized<double>& z) {
  return Vectorized<double>(0.0) - (Vectorized<double>(1.0) - z).log();  // z in [0, 1/2]
}
template <class W>
inline W log1p_atanh_poly(W s);  // kd_math.h
inline Vectorized<float> kd_log1p_atanh(const Vectorized<float>& s) {
  return log1p_atanh_poly(s);
}
inline Vectorized<double> kd_log1p_atanh(const Vectorized<double>& s) {
  return (Vectorized<double>(2.0) * s / (Vectorized<double>(1.0) - s)).log1p();  // s <= 1/3
}
// 1 / x for the mixture's sigmoid (x in [1, 2]) and its exp(-|d|) from given p and q (x a
// normal number <= 1). float32: the hardware's reciprocal estimate (relative error 2^-14 on
// AVX-512, 1.5 * 2^-12 on AVX2, for normal x) and one Newton step r + r (1 - x r), which
// squares the error (2^-28, 2^-23: within 2 ulps); a division was the slowest instruction of
// the element (its latency sat on the chain). float64: the division.
inline Vectorized<float> kd_rcp(const Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.f)), r);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 r = _mm256_rcp_ps(x);
  return _mm256_fmadd_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(1.f)), r);
#else
  return Vectorized<float>(1.f) / x;
#endif
}
inline Vectorized<double> kd_rcp(const Vectorized<double>& x) {
  return Vectorized<double>(1.0) / x;
}
// -|x|: the sign bit set (one instruction)
inline Vectorized<float> kd_nabs(const Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_or_ps(x, _mm512_set1_ps(-0.f));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_or_ps(x, _mm256_set1_ps(-0.f));
#else
  return Vectorized<float>(0.f) - x.abs();
#endif
}
inline Vectorized<double> kd_nabs(const Vectorized<double>& x) {
  return Vectorized<double>(0.0) - x.abs();
}
// max and clamp without NaN propagation (a NaN x gives b, lo): the mixture's callers either
// mask NaN lanes or clamp them away, and the propagation costs 3 instructions a call.
inline Vectorized<float> kd_max(const Vectorized<float>& a, const Vectorized<float>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return Vectorized<float>::blendv(b, a, a > b);
#endif
}
inline Vectorized<double> kd_max(const Vectorized<double>& a, const Vectorized<double>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_pd(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_pd(a, b);
#else
  return Vectorized<double>::blendv(b, a, a > b);
#endif
}
inline Vectorized<float> kd_clamp(const Vectorized<float>& x, float lo, float hi) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
#else
  const Vectorized<float> h(hi), y = kd_max(x, Vectorized<float>(lo));
  return Vectorized<float>::blendv(h, y, y < h);
#endif
}
inline Vectorized<double> kd_clamp(const Vectorized<double>& x, double lo, double hi) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_min_pd(_mm512_max_pd(x, _mm512_set1_pd(lo)), _mm512_set1_pd(hi));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_min_pd(_mm256_max_pd(x, _mm256_set1_pd(lo)), _mm256_set1_pd(hi));
#else
  const Vectorized<double> h(hi), y = kd_max(x, Vectorized<double>(lo));
  return Vectorized<double>::blendv(h, y, y < h);
#endif
}
template <class T>
inline Vectorized<T> kd_where(const Vectorized<T>& c, const Vectorized<T>& a,
                              const Vectorized<T>& b) {
  return Vectorized<T>::blendv(b, a, c);
}
// x >= 0 (false for NaN) as a select mask. AVX-512 float32: the compare's mask register, which
// the select takes as is (ATen's compares widen a mask to a vector and its blend narrows it
// back: two instructions a select on the mixture's element).
template <class T>
inline Vectorized<T> kd_nonneg(const Vectorized<T>& x) {
  return x >= Vectorized<T>(T(0));
}
#if defined(CPU_CAPABILITY_AVX512)
struct Mask16 {
  __mmask16 m;
};
inline Mask16 kd_nonneg(const Vectorized<float>& x) {
  return {_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ)};
}
inline Vectorized<float> kd_where(Mask16 c, const Vectorized<float>& a,
                                  const Vectorized<float>& b) {
  return _mm512_mask_blend_ps(c.m, b, a);
}
#endif
}  // namespace kd

#include "kd_math.h"

namespace kd {

// The sum of a vector's lanes.
template <class A>
A hsum(const Vectorized<A>& v) {
  alignas(64) A buf[Vectorized<A>::size()];
  v.store(buf);
  A r = 0;
  for (int64_t i = 0; i < Vectorized<A>::size(); ++i) r += buf[i];
  return r;
}

// n rounded up to whole vectors of A.
template <class A>
constexpr int64_t round_up(int64_t n) {
  constexpr int64_t w = Vectorized<A>::size();
  return (n + w - 1) / w * w;
}

// ---- tile load / store: any input dtype <-> accumulation type A ---------------------------

// dst[0:np] = (dst - m) * inv_t - l in place (np a multiple of the lane count): the
// log-probabilities of raw logits given a side's (raw maximum, log-sum) pair, the difference
// first (exact near the maximum for any T), never through a rounded lse = m / T + log S
// (cancellation at |x| ~ 1e4). Done once per tile in L1 so the element loop's chain starts
// at lq, lp.
template <class A>
void shift_tile(A* dst, int64_t np, A m, A inv_t, A l) {
  using V = Vectorized<A>;
  const V vm(m), vi(inv_t), vl(l);
  for (int64_t i = 0; i < np; i += V::size())
    ((V::loadu(dst + i) - vm) * vi - vl).store(dst + i);
}

// dst[0:n] = src[off:off+n] (raw logits) in A, dst[n:round_up(n)] = -inf. Returns the
// tile's maximum (need_max), NaN when the tile holds a NaN (the side's running maximum
// carries it into the statistics table, where it marks the row), else -inf.
template <class A>
A load_tile(const void* base, at::ScalarType st, int64_t off, int64_t n, A* dst,
            bool need_max = true) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t np = round_up<A>(n);
  int64_t i = 0;
  // at::vec::maximum propagates NaN; so does kd_max_nan across the lanes. m covers dst[0:j0].
  V m(kd_neg_inf<A>());
  int64_t j0 = 0;
  if constexpr (std::is_same_v<A, float>) {
    if (st == at::kFloat && need_max) {
      // copy and maximum in one pass over the tile's whole vectors
      const float* p = static_cast<const float*>(base) + off;
      for (; i + W <= n; i += W) {
        const V x = V::loadu(p + i);
        x.store(dst + i);
        m = at::vec::maximum(m, x);
      }
      j0 = i;
    } else if (st == at::kFloat) {
      std::memcpy(dst, static_cast<const float*>(base) + off, n * sizeof(float));
      i = n;
    } else if (st == at::kBFloat16) {
      const c10::BFloat16* p = static_cast<const c10::BFloat16*>(base) + off;
      for (; i + W <= n; i += W) {
        V v;
        at::vec::load_to_float(p + i, v);
        v.store(dst + i);
      }
    } else if (st == at::kHalf) {
      const c10::Half* p = static_cast<const c10::Half*>(base) + off;
      for (; i + W <= n; i += W) {
        V v;
        at::vec::load_to_float(p + i, v);
        v.store(dst + i);
      }
    }
  } else {
    if (st == at::kDouble) {
      std::memcpy(dst, static_cast<const double*>(base) + off, n * sizeof(double));
      i = n;
    }
  }
  // tail (and uncommon dtype pairs, e.g. float64 teacher with a float32 student): scalar
  switch (st) {
    case at::kFloat:
      for (; i < n; ++i) dst[i] = A(static_cast<const float*>(base)[off + i]);
      break;
    case at::kDouble:
      for (; i < n; ++i) dst[i] = A(static_cast<const double*>(base)[off + i]);
      break;
    case at::kBFloat16:
      for (; i < n; ++i) dst[i] = A(float(static_cast<const c10::BFloat16*>(base)[off + i]));
      break;
    case at::kHalf:
      for (; i < n; ++i) dst[i] = A(float(static_cast<const c10::Half*>(base)[off + i]));
      break;
    default:
      TORCH_CHECK(false, "kdkernels: unsupported dtype ", st);
  }
  for (; i < np; ++i) dst[i] = kd_neg_inf<A>();
  if (!need_max) return kd_neg_inf<A>();
  for (int64_t j = j0; j < np; j += W) m = at::vec::maximum(m, V::loadu(dst + j));
  alignas(64) A buf[W];
  m.store(buf);
  A r = buf[0];
  for (int64_t j = 1; j < W; ++j) r = kd_max_nan(r, buf[j]);
  return r;
}

// dst[0:round_up(n)] = (src[off:off+n] - m) * inv_t - l: the tile's log-probabilities given
// the side's (raw maximum m, log-sum l) (see shift_tile); padding stays -inf. Fused into the
// load for float32.
template <class A>
void load_logp(const void* base, at::ScalarType st, int64_t off, int64_t n, A* dst, A m,
               A inv_t, A l) {
  if constexpr (std::is_same_v<A, float>) {
    if (st == at::kFloat) {
      using V = Vectorized<A>;
      constexpr int64_t W = V::size();
      const float* p = static_cast<const float*>(base) + off;
      const V vm(m), vi(inv_t), vl(l);
      int64_t i = 0;
      for (; i + W <= n; i += W) ((V::loadu(p + i) - vm) * vi - vl).store(dst + i);
      for (; i < n; ++i) dst[i] = (p[i] - m) * inv_t - l;
      for (; i < round_up<A>(n); ++i) dst[i] = kd_neg_inf<A>();
      return;
    }
  }
  load_tile<A>(base, st, off, n, dst, false);
  shift_tile(dst, round_up<A>(n), m, inv_t, l);
}

// The next tile of a row, asked for from the memory system line by line while this tile is
// computed: touch(i) beside the compute loop's vector i covers the next tile's element i
// onwards, a line (64 bytes) per float32 vector. A float32 tile is one 4 KB page, and the
// hardware's stream prefetchers stop at pages, so without it each tile began with demand
// misses and a loop took its memory time plus its arithmetic, not the larger of the two.
// Measured: prefetching a tile in one burst after its load gains about half as much.
// Prefetches never fault, so the lines past the row's end (at most a tile) are harmless.
struct NextTile {
  const char* p;  // the next tile's first element, nullptr when this tile is the last
  int64_t es;     // bytes per element
  NextTile(const void* base, at::ScalarType st, int64_t next, int64_t v)
      : p(next < v ? static_cast<const char*>(base) + next * int64_t(c10::elementSize(st))
                   : nullptr),
        es(int64_t(c10::elementSize(st))) {}
  void touch(int64_t i) const {
    if (p) __builtin_prefetch(p + i * es, 0, 3);
  }
};

// dst[off:off+n] = src[0:n] converted to dtype st.
template <class A>
void store_tile(void* base, at::ScalarType st, int64_t off, int64_t n, const A* src) {
  switch (st) {
    case at::kFloat: {
      float* p = static_cast<float*>(base) + off;
      if constexpr (std::is_same_v<A, float>) {
        std::memcpy(p, src, n * sizeof(float));
      } else {
        for (int64_t i = 0; i < n; ++i) p[i] = float(src[i]);
      }
      break;
    }
    case at::kDouble: {
      double* p = static_cast<double*>(base) + off;
      for (int64_t i = 0; i < n; ++i) p[i] = double(src[i]);
      break;
    }
    case at::kBFloat16: {
      c10::BFloat16* p = static_cast<c10::BFloat16*>(base) + off;
      if constexpr (std::is_same_v<A, float>) {
        at::vec::convert(src, p, n);
      } else {
        for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(float(src[i]));
      }
      break;
    }
    case at::kHalf: {
      c10::Half* p = static_cast<c10::Half*>(base) + off;
      if constexpr (std::is_same_v<A, float>) {
        at::vec::convert(src, p, n);
      } else {
        for (int64_t i = 0; i < n; ++i) p[i] = c10::Half(float(src[i]));
      }
      break;
    }
    default:
      TORCH_CHECK(false, "kdkernels: unsupported dtype ", st);
  }
}

template <class A>
A load_one(const void* base, at::ScalarType st, int64_t i) {
  switch (st) {
    case at::kFloat:
      return A(static_cast<const float*>(base)[i]);
    case at::kDouble:
      return A(static_cast<const double*>(base)[i]);
    case at::kBFloat16:
      return A(float(static_cast<const c10::BFloat16*>(base)[i]));
    case at::kHalf:
      return A(float(static_cast<const c10::Half*>(base)[i]));
    default:
      TORCH_CHECK(false, "kdkernels: unsupported dtype ", st);
  }
  return A(0);
}

template <class A>
void store_one(void* base, at::ScalarType st, int64_t i, A v) {
  store_tile<A>(base, st, i, 1, &v);
}

// Store of one gradient vector to its final place. float32 outputs are written directly with
// non-temporal stores when 64-byte aligned: the gradient is not read again soon, and streaming
// skips the read-for-ownership of every output cache line (1/3 less memory traffic).
template <class A>
inline void store_vec(const Vectorized<A>& v, A* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0) return _mm512_stream_ps(dst, v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0) return _mm256_stream_ps(dst, v);
  }
#endif
  v.store(dst);
}

inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // order the streaming stores before the op returns
#endif
}

// Ask the kernel for transparent huge pages on a fresh output (Linux, THP "madvise" mode):
// first-touch page faults of a 1 GB gradient otherwise cost as much as writing it.
inline void advise_huge_pages(const at::Tensor& x) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t HUGE = uintptr_t(2) << 20;
  const uintptr_t b = reinterpret_cast<uintptr_t>(x.data_ptr());
  const uintptr_t e = b + x.nbytes();
  const uintptr_t ab = (b + HUGE - 1) & ~(HUGE - 1);
  const uintptr_t ae = e & ~(HUGE - 1);
  if (ae > ab) madvise(reinterpret_cast<void*>(ab), ae - ab, MADV_HUGEPAGE);  // advice only
#else
  (void)x;
#endif
}

}  // namespace kd
