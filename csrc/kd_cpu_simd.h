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
// softplus(d) and softplus(d) + sigmoid(-d) by tables (kd_math.h kd_has_softplus_tables),
// defined below it
inline Vectorized<float> kd_softplus(const Vectorized<float>& d);
inline Vectorized<float> kd_softplus_sigm(const Vectorized<float>& d);
#endif
}  // namespace kd

#include "kd_math.h"

namespace kd {

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline constexpr bool kd_has_softplus_tables<Vectorized<float>> = true;
// psi's polynomial on [k, k + 1]: coefficient i of interval k at [i][k mod 32]; max
// error in float32 4.42e-08 (softplus_tables.py)
alignas(64) inline constexpr float kSoftplus[7][32] = {
    {0x1.e5747p-2f, 0x1.9c7e9p-3f, 0x1.4321e2p-4f, 0x1.e76e4cp-6f, 0x1.6a0334p-7f,
     0x1.0b48ecp-8f, 0x1.89d254p-10f, 0x1.21e534p-11f, 0x1.aaa924p-13f, 0x1.39f088p-14f,
     0x1.cdfa86p-16f, 0x1.53e866p-17f, 0x1.f42e96p-19f, 0x1.700386p-20f, 0x1.0ec5p-21f,
     0x1.8e7136p-23f, 0x1.8e7136p-23f, 0x1.0ec5p-21f, 0x1.700386p-20f, 0x1.f42e96p-19f,
     0x1.53e866p-17f, 0x1.cdfa86p-16f, 0x1.39f088p-14f, 0x1.aaa924p-13f, 0x1.21e534p-11f,
     0x1.89d254p-10f, 0x1.0b48ecp-8f, 0x1.6a0334p-7f, 0x1.e76e4cp-6f, 0x1.4321e2p-4f,
     0x1.9c7e9p-3f, 0x1.e5747p-2f},
    {-0x1.829a0ep-2f, -0x1.759b84p-3f, -0x1.36b70ap-4f, -0x1.e04064p-6f, -0x1.68052ap-7f,
     -0x1.0abd98p-8f, -0x1.8986aap-10f, -0x1.21d0b8p-11f, -0x1.aa9e1p-13f, -0x1.39ed8ep-14f,
     -0x1.cdf8eep-16f, -0x1.53e7fep-17f, -0x1.f42e64p-19f, -0x1.70037ep-20f, -0x1.0ec5p-21f,
     -0x1.8e713cp-23f, 0x1.8e713cp-23f, 0x1.0ec5p-21f, 0x1.70037ep-20f, 0x1.f42e64p-19f,
     0x1.53e7fep-17f, 0x1.cdf8eep-16f, 0x1.39ed8ep-14f, 0x1.aa9e1p-13f, 0x1.21d0b8p-11f,
     0x1.8986aap-10f, 0x1.0abd98p-8f, 0x1.68052ap-7f, 0x1.e04064p-6f, 0x1.36b70ap-4f,
     0x1.759b84p-3f, 0x1.829a0ep-2f},
    {0x1.e14998p-4f, 0x1.3173bcp-4f, 0x1.1f250ep-5f, 0x1.d22c9ap-7f, 0x1.64108ap-8f,
     0x1.09a7a8p-9f, 0x1.88ef6cp-11f, 0x1.21a7b2p-12f, 0x1.aa87d4p-14f, 0x1.39e786p-15f,
     0x1.cdf5a8p-17f, 0x1.53e718p-18f, 0x1.f42de6p-20f, 0x1.70035ap-21f, 0x1.0ec4f6p-22f,
     0x1.8e7134p-24f, 0x1.8e7134p-24f, 0x1.0ec4f6p-22f, 0x1.70035ap-21f, 0x1.f42de6p-20f,
     0x1.53e718p-18f, 0x1.cdf5a8p-17f, 0x1.39e786p-15f, 0x1.aa87d4p-14f, 0x1.21a7b2p-12f,
     0x1.88ef6cp-11f, 0x1.09a7a8p-9f, 0x1.64108ap-8f, 0x1.d22c9ap-7f, 0x1.1f250ep-5f,
     0x1.3173bcp-4f, 0x1.e14998p-4f},
    {-0x1.3a33f8p-7f, -0x1.02accp-6f, -0x1.44cdccp-7f, -0x1.249256p-8f, -0x1.d04f1ep-10f,
     -0x1.5f4e42p-11f, -0x1.05279cp-12f, -0x1.81c15ap-14f, -0x1.1c3838p-15f, -0x1.a272fep-17f,
     -0x1.33ef98p-18f, -0x1.c52a2ap-20f, -0x1.4d6dbp-21f, -0x1.eaa68ap-23f, -0x1.690072p-24f,
     -0x1.099c5p-25f, 0x1.099c5p-25f, 0x1.690072p-24f, 0x1.eaa68ap-23f, 0x1.4d6dbp-21f,
     0x1.c52a2ap-20f, 0x1.33ef98p-18f, 0x1.a272fep-17f, 0x1.1c3838p-15f, 0x1.81c15ap-14f,
     0x1.05279cp-12f, 0x1.5f4e42p-11f, 0x1.d04f1ep-10f, 0x1.249256p-8f, 0x1.44cdccp-7f,
     0x1.02accp-6f, 0x1.3a33f8p-7f},
    {-0x1.0714c6p-8f, 0x1.561286p-11f, 0x1.bbaf9cp-10f, 0x1.01bf06p-10f, 0x1.bbcdeep-12f,
     0x1.59955p-13f, 0x1.039746p-14f, 0x1.80e8ep-16f, 0x1.1bfe64p-17f, 0x1.a254fp-19f,
     0x1.33e864p-20f, 0x1.c527a2p-22f, 0x1.4d6e04p-23f, 0x1.eaa834p-25f, 0x1.6901fep-26f,
     0x1.099d88p-27f, 0x1.099d88p-27f, 0x1.6901fep-26f, 0x1.eaa834p-25f, 0x1.4d6e04p-23f,
     0x1.c527a2p-22f, 0x1.33e864p-20f, 0x1.a254fp-19f, 0x1.1bfe64p-17f, 0x1.80e8ep-16f,
     0x1.039746p-14f, 0x1.59955p-13f, 0x1.bbcdeep-12f, 0x1.01bf06p-10f, 0x1.bbaf9cp-10f,
     0x1.561286p-11f, -0x1.0714c6p-8f},
    {0x1.b86582p-11f, 0x1.4672f2p-11f, -0x1.2afc7ap-14f, -0x1.323128p-13f, -0x1.4482e2p-14f,
     -0x1.0d9ee6p-15f, -0x1.9e5554p-17f, -0x1.35b2dep-18f, -0x1.ca5ed8p-20f, -0x1.51f7acp-21f,
     -0x1.f1b6bcp-23f, -0x1.6e4d76p-24f, -0x1.0d89f4p-25f, -0x1.8ca58cp-27f, -0x1.23d72ap-28f,
     -0x1.ad7362p-30f, 0x1.ad7362p-30f, 0x1.23d72ap-28f, 0x1.8ca58cp-27f, 0x1.0d89f4p-25f,
     0x1.6e4d76p-24f, 0x1.f1b6bcp-23f, 0x1.51f7acp-21f, 0x1.ca5ed8p-20f, 0x1.35b2dep-18f,
     0x1.9e5554p-17f, 0x1.0d9ee6p-15f, 0x1.4482e2p-14f, 0x1.323128p-13f, 0x1.2afc7ap-14f,
     -0x1.4672f2p-11f, -0x1.b86582p-11f},
    {0x1.836feep-13f, -0x1.52b738p-13f, -0x1.aca1b2p-15f, 0x1.32f84ap-17f, 0x1.5ba62cp-17f,
     0x1.4e59fcp-18f, 0x1.0cf774p-19f, 0x1.989352p-21f, 0x1.301c1ep-22f, 0x1.c16738p-24f,
     0x1.4b2adep-25f, 0x1.e79904p-27f, 0x1.66d472p-28f, 0x1.08086p-29f, 0x1.848a36p-31f,
     0x1.1ddfeap-32f, 0x1.1ddfeap-32f, 0x1.848a36p-31f, 0x1.08086p-29f, 0x1.66d472p-28f,
     0x1.e79904p-27f, 0x1.4b2adep-25f, 0x1.c16738p-24f, 0x1.301c1ep-22f, 0x1.989352p-21f,
     0x1.0cf774p-19f, 0x1.4e59fcp-18f, 0x1.5ba62cp-17f, 0x1.32f84ap-17f, -0x1.aca1b2p-15f,
     -0x1.52b738p-13f, 0x1.836feep-13f},
};
// psi's polynomial on [k, k + 1]: coefficient i of interval k at [i][k mod 32]; max
// error in float32 8.73e-08 (softplus_tables.py)
alignas(64) inline constexpr float kSoftplusSigm[7][32] = {
    {0x1.b4073ap-1f, 0x1.890d0ap-2f, 0x1.3cec7ap-3f, 0x1.e3d75ap-5f, 0x1.69042ep-6f,
     0x1.0b034p-7f, 0x1.89ac7cp-9f, 0x1.21daf4p-10f, 0x1.aaa396p-12f, 0x1.39ef08p-13f,
     0x1.cdf9b4p-15f, 0x1.53e82ep-16f, 0x1.f42e78p-18f, 0x1.70037ep-19f, 0x1.0ec4fep-20f,
     0x1.8e7134p-22f, 0x1.361216p-46f, 0x1.1e641cp-43f, 0x1.088506p-40f, 0x1.e8a2d4p-38f,
     0x1.c350e8p-35f, 0x1.a0d71cp-32f, 0x1.80fb94p-29f, 0x1.63857cp-26f, 0x1.4837cep-23f,
     0x1.2ec4e4p-20f, 0x1.16b028p-17f, 0x1.fe0bcp-15f, 0x1.cb791p-12f, 0x1.8d5a16p-9f,
     0x1.37186ap-6f, 0x1.8b69aap-4f},
    {-0x1.399f6cp-1f, -0x1.5387a4p-2f, -0x1.2aee0ap-3f, -0x1.d9367cp-5f, -0x1.660adap-6f,
     -0x1.0a32ap-7f, -0x1.893b0cp-9f, -0x1.21bc36p-10f, -0x1.aa92f4p-12f, -0x1.39ea8cp-13f,
     -0x1.cdf74ep-15f, -0x1.53e78cp-16f, -0x1.f42e28p-18f, -0x1.70036ep-19f, -0x1.0ec4fcp-20f,
     -0x1.8e713ap-22f, 0x1.3613dcp-45f, 0x1.1e65bcp-42f, 0x1.08867cp-39f, 0x1.e8a556p-37f,
     0x1.c352bap-34f, 0x1.a0d78ep-31f, 0x1.80f8ep-28f, 0x1.637b2ep-25f, 0x1.481ab4p-22f,
     0x1.2e78fep-19f, 0x1.15eff8p-16f, 0x1.fa50cp-14f, 0x1.c27a06p-11f, 0x1.791fe4p-8f,
     0x1.109efap-5f, 0x1.23ea88p-3f},
    {0x1.2b94dap-3f, 0x1.f375bap-4f, 0x1.095cdp-4f, 0x1.c48272p-6f, 0x1.60270ap-7f,
     0x1.0892dap-8f, 0x1.88586ap-10f, 0x1.217eb4p-11f, 0x1.aa719ep-13f, 0x1.39e182p-14f,
     0x1.cdf268p-16f, 0x1.53e636p-17f, 0x1.f42d6cp-19f, 0x1.700338p-20f, 0x1.0ec4ecp-21f,
     0x1.8e712ep-23f, 0x1.361314p-45f, 0x1.1e64fep-42f, 0x1.0885bep-39f, 0x1.e8a3aap-37f,
     0x1.c35072p-34f, 0x1.a0d396p-31f, 0x1.80f08ep-28f, 0x1.6367ccp-25f, 0x1.47eb78p-22f,
     0x1.2e0406p-19f, 0x1.14cdb6p-16f, 0x1.f4bf8ap-14f, 0x1.b544dep-11f, 0x1.5c83f6p-8f,
     0x1.bdc6fcp-6f, 0x1.6b697ep-4f},
    {0x1.a7dc02p-8f, -0x1.2d699ap-6f, -0x1.1153fp-6f, -0x1.1329bp-7f, -0x1.c60ecp-9f,
     -0x1.5c715cp-10f, -0x1.045eeep-11f, -0x1.81544p-13f, -0x1.1c1aa4p-14f, -0x1.a262f8p-16f,
     -0x1.33eb42p-17f, -0x1.c527dp-19f, -0x1.4d6d0ep-20f, -0x1.eaa632p-22f, -0x1.69005ap-23f,
     -0x1.099c48p-24f, 0x1.9cfc8p-46f, 0x1.7d7264p-43f, 0x1.6050aep-40f, 0x1.4567f8p-37f,
     0x1.2c8cp-34f, 0x1.1592b6p-31f, 0x1.00523p-28f, 0x1.d9384ep-26f, 0x1.b465b4p-23f,
     0x1.915c0ap-20f, 0x1.6e73d2p-17f, 0x1.480bfp-14f, 0x1.168a68p-11f, 0x1.9bcee6p-9f,
     0x1.afdfcap-7f, 0x1.a42af8p-6f},
    {-0x1.126c22p-7f, -0x1.434362p-9f, 0x1.116216p-9f, 0x1.c273d2p-10f, 0x1.a7cd8cp-11f,
     0x1.53e87cp-12f, 0x1.020726p-13f, 0x1.800ee2p-15f, 0x1.1bc34p-16f, 0x1.a234e4p-18f,
     0x1.33dfb8p-19f, 0x1.c522fp-21f, 0x1.4d6ccp-22f, 0x1.eaa784p-24f, 0x1.6901cep-25f,
     0x1.099d7cp-26f, 0x1.9d1cfp-47f, 0x1.7d904ap-44f, 0x1.606c2p-41f, 0x1.4580ep-38f,
     0x1.2ca1e6p-35f, 0x1.15a426p-32f, 0x1.005b5p-29f, 0x1.d9261cp-27f, 0x1.b3fd1ep-24f,
     0x1.90209p-21f, 0x1.6b3522p-18f, 0x1.400612p-15f, 0x1.0428e6p-12f, 0x1.549b0cp-10f,
     0x1.ee4ca6p-9f, 0x1.6aeb7ap-12f},
    {-0x1.15ba88p-12f, 0x1.9fe52ap-10f, 0x1.efb996p-13f, -0x1.a44ca8p-13f, -0x1.24916cp-13f,
     -0x1.044cbcp-14f, -0x1.99257ap-16f, -0x1.3447ccp-17f, -0x1.c99992p-19f, -0x1.51c234p-20f,
     -0x1.f199c6p-22f, -0x1.6e45ap-23f, -0x1.0d87d4p-24f, -0x1.8ca466p-26f, -0x1.23d6dap-27f,
     -0x1.ad7336p-29f, 0x1.58c56ap-48f, 0x1.3e70c4p-45f, 0x1.261e7ep-42f, 0x1.0fa6aap-39f,
     0x1.f5c6e4p-37f, 0x1.cf5f08p-34f, 0x1.abc4c6p-31f, 0x1.8a8f34p-28f, 0x1.6b1258p-25f,
     0x1.4bf664p-22f, 0x1.2a454ep-19f, 0x1.ff1744p-17f, 0x1.802b4ep-14f, 0x1.8d5b08p-12f,
     0x1.65c8dep-12f, -0x1.fdd424p-10f},
    {0x1.6e1066p-11f, -0x1.2dd93cp-13f, -0x1.621fb8p-13f, -0x1.e0b384p-18f, 0x1.0be92ep-16f,
     0x1.362b84p-17f, 0x1.06253ap-18f, 0x1.94d39cp-20f, 0x1.2f16e8p-21f, 0x1.c0d986p-23f,
     0x1.4b047cp-24f, 0x1.e7843cp-26f, 0x1.66ced2p-27f, 0x1.0806dap-28f, 0x1.848964p-30f,
     0x1.1ddfb2p-31f, 0x1.c8fcc2p-50f, 0x1.a615dap-47f, 0x1.85d87ep-44f, 0x1.680f84p-41f,
     0x1.4c879ap-38f, 0x1.330cdap-35f, 0x1.1b637p-32f, 0x1.053668p-29f, 0x1.dfdafp-27f,
     0x1.b48e64p-24f, 0x1.82e78p-21f, 0x1.3ef3f4p-18f, 0x1.ab252ap-16f, 0x1.179dbcp-14f,
     -0x1.779536p-13f, -0x1.58b0dcp-12f},
};
// A function of the mixture's log-ratio d as base + psi (softplus_tables.py): base = max(d, 0)
// (mix_relu's, clamped) for d >= 0 and NEG for d < 0, psi by a degree-6 polynomial of
// each unit interval [k, k + 1] of [-16, 16] in r = d - k - 1/2, its coefficients picked by
// two-register permutes at floor(d) mod 32, d clamped into the range: past 16 psi is below
// 2.3e-7, under half an ulp of base; below -16 softplus + sigmoid(-d) is 1 within 1e-14 and
// softplus (e^d) is given as 0. psi is small and smooth on each side of 0, where base has its
// kink, so the split keeps its bits. 7 permutes and 6 multiply-adds, where exp(-|d|)
// and a log1p take 19 multiplies and permutes (21 with the sigmoid's reciprocal): the
// mixture's gradient element is bound by them. NaN d gives the value at -16 (finite; its weight is 0), +-inf
// the clamped ends.
template <const float (&TABLE)[7][32], int NEG>
inline Vectorized<float> softplus_table(const Vectorized<float>& v) {
  const __m512 d = kd_clamp(v, -16.f, 0x1.fffffep+3f);  // below 16; NaN -> -16
  constexpr int FLOOR = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
  const __m512i k = _mm512_cvt_roundps_epi32(d, FLOOR);  // its low 5 bits index the table
  // d - floor(d) is exact but on [-1, 0), where it rounds by at most 2^-25
  const __m512 r = _mm512_sub_ps(_mm512_sub_ps(d, _mm512_roundscale_ps(d, FLOOR)),
                                 _mm512_set1_ps(0.5f));
  auto coef = [&](int i) {
    return _mm512_permutex2var_ps(_mm512_load_ps(TABLE[i]), k, _mm512_load_ps(TABLE[i] + 16));
  };
  __m512 h = _mm512_fmadd_ps(coef(6), r, coef(5));
  for (int i = 4; i >= 0; --i) h = _mm512_fmadd_ps(h, r, coef(i));
  const __m512 relu = mix_relu<true, float>(v);
  // softplus below -16 (e^d, where psi stays at its value at -16): 0, off by e^d <= 1.1e-7
  // and falling (jsd's gradient there is q (x - softplus) with x near 0 when p and q part)
  if (NEG == 0)
    return _mm512_maskz_add_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(-16.f), _CMP_GE_OQ), relu, h);
  // d >= 0 exactly where floor(d) >= 0 (a NaN d went to -16 and tests false here too)
  const __mmask16 pos = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_GE_OQ);
  return _mm512_add_ps(_mm512_mask_blend_ps(pos, _mm512_set1_ps(float(NEG)), relu), h);
}
// within 2.5 and 1.3 ulps of float64 on [-16, 30] (measured every 3.3e-6 and beside every
// integer)
inline Vectorized<float> kd_softplus(const Vectorized<float>& d) {
  return softplus_table<kSoftplus, 0>(d);
}
inline Vectorized<float> kd_softplus_sigm(const Vectorized<float>& d) {
  return softplus_table<kSoftplusSigm, 1>(d);
}
#endif

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
