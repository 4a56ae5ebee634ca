// kd_cuda.cu: CUDA kernels of the kdkernels ops (schemas in kd_cpu.cpp).
//
// Math: kd_math.h (shared with the CPU kernel, which executes and tests it on every machine).
//   loss = kd_scale * D(p || q) + ce_weight * (lse1 - s[label]),  0 for ignored rows,
//   D from online (reference, sum, acc) triples; gradients dD/dzs, dD/dzt scaled by g / T.
//
// Work layout. Grid (rows, splits): a block of THREADS threads handles one vocabulary chunk
// of one row; splits > 1 only when there are too few rows to fill the GPU (the vocab split).
// Each thread walks its elements in packs of PACK = 8 (128-bit loads: 2 x float4 for float32,
// 1 x uint4 for 16-bit types) from the row's first 16-byte-aligned column on, with single
// elements before it and after the last pack (for_elements), moves its references once per
// pack and accumulates with kd_math.h's element functions. Threads merge their partial
// triples exactly (kl_merge) through warp shuffles and shared memory; a block writes one
// partial state per (row, split) and a finalize kernel (a thread per row) merges the splits
// and writes the row's statistics (same layout as the CPU op) and loss.
//   forward/reverse KL   stats kernel -> finalize                      (1 read of s, t)
//   mixture              stats -> finalize -> mixture sums -> finalize (2 reads)
//   backward             one elementwise kernel: read s, t, write grad_s (, grad_t)
//   kd_partial           stats -> finalize (no loss): a column range's statistics
//   kd_mix_partial       mixture sums -> their per-row sum, given global statistics
// The stats table is kd_layout.h's (N, NSTAT) float32; labels are global vocabulary ids and
// `offset` is the tensors' first column in the row.
// float64 logits are served by the PyTorch path (kdkernels/ext.py). Student and teacher are
// read each in its own dtype when the teacher's is the student's or float32 (the kernels are
// instantiated for those pairs); a teacher of another 16-bit dtype is converted to float32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "kd_checks.h"
#include "kd_layout.h"
#include "kd_math.h"

namespace kd {
namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int PACK = 8;
constexpr int NPART = 8;  // floats per partial state: ms, ss, mt, st, acc, m1, s1, accb
                          // (accb: soft_cross_entropy / forward_reverse_kl; else unused)

#define KD_CUDA_CHECK(expr)                                                               \
  do {                                                                                    \
    cudaError_t err_ = (expr);                                                            \
    TORCH_CHECK(err_ == cudaSuccess, "kdkernels CUDA error: ", cudaGetErrorString(err_)); \
  } while (0)

// ---- 128-bit packs -------------------------------------------------------------------------

template <class T>
__device__ __forceinline__ float to_f(T x) {
  return static_cast<float>(x);
}

// Element in the accumulation type A (float64 stays float64; the rest go through float).
template <class A, class T>
__device__ __forceinline__ A to_a(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return A(x);
  } else {
    return A(static_cast<float>(x));
  }
}

template <class T>
__device__ __forceinline__ void load_pack(const T* p, float* out) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
    out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  } else {
    const uint4 u = reinterpret_cast<const uint4*>(p)[0];
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < PACK; ++k) out[k] = to_f(e[k]);
  }
}

template <class T>
__device__ __forceinline__ void store_pack(T* p, const float* v) {
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int k = 0; k < PACK; ++k) e[k] = T(v[k]);
    reinterpret_cast<uint4*>(p)[0] = u;
  }
}

// ---- block reductions ------------------------------------------------------------------------

__device__ __forceinline__ KLPart<float> shfl_part(const KLPart<float>& p, int off) {
  KLPart<float> o;
  o.ms = __shfl_xor_sync(0xffffffffu, p.ms, off);
  o.ss = __shfl_xor_sync(0xffffffffu, p.ss, off);
  o.mt = __shfl_xor_sync(0xffffffffu, p.mt, off);
  o.st = __shfl_xor_sync(0xffffffffu, p.st, off);
  o.acc = __shfl_xor_sync(0xffffffffu, p.acc, off);
  return o;
}

// Exact merge of every thread's partial KL state (raw maxima, inverse temperatures its,
// itt); the result is valid in thread 0.
template <bool REV>
__device__ KLPart<float> block_merge_kl(KLPart<float> p, float its, float itt) {
  __shared__ KLPart<float> sh[WARPS];
  for (int off = 16; off > 0; off >>= 1) p = kl_merge<REV>(p, shfl_part(p, off), its, itt);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < WARPS ? sh[lane] : kl_part_empty<float>();
    for (int off = 16; off > 0; off >>= 1) p = kl_merge<REV>(p, shfl_part(p, off), its, itt);
  }
  return p;
}

__device__ __forceinline__ KL2Part<float> shfl_part2(const KL2Part<float>& p, int off) {
  KL2Part<float> o;
  o.ms = __shfl_xor_sync(0xffffffffu, p.ms, off);
  o.ss = __shfl_xor_sync(0xffffffffu, p.ss, off);
  o.mt = __shfl_xor_sync(0xffffffffu, p.mt, off);
  o.st = __shfl_xor_sync(0xffffffffu, p.st, off);
  o.acc = __shfl_xor_sync(0xffffffffu, p.acc, off);
  o.accb = __shfl_xor_sync(0xffffffffu, p.accb, off);
  return o;
}

// block_merge_kl for the SOFT_CE / FR_KL states (kd_math.h kl2_merge); valid in thread 0.
template <int K>
__device__ KL2Part<float> block_merge_kl2(KL2Part<float> p, float its, float itt) {
  __shared__ KL2Part<float> sh[WARPS];
  for (int off = 16; off > 0; off >>= 1) p = kl2_merge<K>(p, shfl_part2(p, off), its, itt);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < WARPS ? sh[lane] : kl2_part_empty<float>();
    for (int off = 16; off > 0; off >>= 1) p = kl2_merge<K>(p, shfl_part2(p, off), its, itt);
  }
  return p;
}

// Exact merge of (raw m, sum) pairs of inverse temperature inv_t; valid in thread 0.
__device__ void block_merge_lse(float& m, float& s, float inv_t) {
  __shared__ float shm[WARPS], shs[WARPS];
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2, inv_t);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shm[warp] = m, shs[warp] = s;
  __syncthreads();
  if (warp == 0) {
    m = lane < WARPS ? shm[lane] : kd_neg_inf<float>();
    s = lane < WARPS ? shs[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
      lse_merge(m, s, m2, s2, inv_t);
    }
  }
}

template <class A>
__device__ A block_sum(A x) {
  __shared__ A sh[WARPS];
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  x = threadIdx.x < WARPS ? sh[threadIdx.x] : A(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// The first column h of a row at which a pack is 16-byte aligned in x (elements of es
// bytes), or -1 when no column is (x not even element-aligned). A pack is PACK elements of
// 2 or 4 bytes, a multiple of 16 bytes, so every column h + k PACK is aligned too.
__device__ __forceinline__ int64_t pack_head(const void* x, int es) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(x);
  if (a % es != 0) return -1;
  return int64_t((16 - a % 16) % 16 / es);
}

// Whether packs starting at column h are 16-byte aligned in x too (nullptr: no array).
__device__ __forceinline__ bool packs_aligned(const void* x, int es, int64_t h) {
  return x == nullptr || (reinterpret_cast<uintptr_t>(x) + uint64_t(h) * es) % 16 == 0;
}

// The column from which packs are aligned in every array of a row (s and t, gs and gt when
// written), or -1 when none is: then the row is read element by element.
template <class TS, class TT>
__device__ __forceinline__ int64_t row_pack_head(const TS* s, const TT* t,
                                                 const TS* gs = nullptr,
                                                 const TT* gt = nullptr) {
  const int64_t h = pack_head(s, sizeof(TS));
  if (h < 0) return -1;
  const bool ok = packs_aligned(t, sizeof(TT), h) && packs_aligned(gs, sizeof(TS), h) &&
                  packs_aligned(gt, sizeof(TT), h);
  return ok ? h : -1;
}

// Elements [b, e) of a row, thread-strided: single elements up to the first pack-aligned
// column (h + k PACK, h from row_pack_head; none when h < 0), packs of PACK (128-bit loads),
// then single elements. Any V and any row offset (V = 50257, a sliced shard) keeps the
// packs; only up to PACK - 1 elements at each end of a block's range go one by one.
// f(offset, count) is called with count == PACK or 1.
template <class F>
__device__ __forceinline__ void for_elements(int64_t b, int64_t e, int64_t h, F&& f) {
  int64_t a = e;  // start of the packs
  int64_t npk = 0;
  if (h >= 0) {
    a = min(e, b + ((h - b) % PACK + PACK) % PACK);
    npk = (e - a) / PACK;
  }
  for (int64_t j = b + threadIdx.x; j < a; j += THREADS) f(j, 1);
  for (int64_t k = threadIdx.x; k < npk; k += THREADS) f(a + k * PACK, PACK);
  for (int64_t j = a + npk * PACK + threadIdx.x; j < e; j += THREADS) f(j, 1);
}

// Raw logits of a pack (cnt == PACK) or of one element, in float.
template <class T>
__device__ __forceinline__ void load_any(const T* p, int cnt, float* out) {
  if (cnt == PACK) {
    load_pack(p, out);
  } else {
    out[0] = to_f(p[0]);
  }
}

__device__ __forceinline__ float pack_max(const float* x, int cnt) {
  float m = x[0];
#pragma unroll
  for (int k = 1; k < PACK; ++k)
    if (k < cnt) m = kd_max(m, x[k]);
  return m;
}

// ---- forward: statistics pass ----------------------------------------------------------------

template <int K, class TS, class TT>
__global__ void __launch_bounds__(THREADS) kd_stats_kernel(
    const TS* __restrict__ s,             // (N, V) student logits, rows ss apart
    const TT* __restrict__ t,             // (N, V) teacher logits, rows ts apart
    const int64_t* __restrict__ labels,   // (N,) labels or nullptr
    float* __restrict__ part,             // (N, splits, NPART) partial states out
    int64_t v, int64_t ss, int64_t ts, int64_t chunk, float its, float itt, bool ce_sep,
    int64_t ignore_index) {
  constexpr bool REV = K == REVERSE_KL;
  const int64_t row = blockIdx.x;
  const int64_t b = int64_t(blockIdx.y) * chunk, e = min(v, b + chunk);
  float* out = part + (row * gridDim.y + blockIdx.y) * NPART;
  if (labels && labels[row] == ignore_index) return;  // finalize writes 0 for ignored rows
  const TS* sr = s + row * ss;
  const TT* tr = t + row * ts;
  KLPart<float> p = kl_part_empty<float>();
  float s1 = 0.f;  // CE's sum exp(s - ms) at T = 1 (its maximum is the student's, raw)
  for_elements(b, e, row_pack_head(sr, tr), [&](int64_t i, int cnt) {
    float xs[PACK], xt[PACK];
    load_any(sr + i, cnt, xs);
    load_any(tr + i, cnt, xt);
    const float nms = kd_max(p.ms, pack_max(xs, cnt)), nmt = kd_max(p.mt, pack_max(xt, cnt));
    kl_rebase<REV>(p.ss, p.st, p.acc, ref_move(p.ms, nms, its), ref_move(p.mt, nmt, itt));
    if (ce_sep) lse_rebase(s1, ref_move(p.ms, nms, 1.f));
    p.ms = nms;
    p.mt = nmt;
    const float rs = safe_ref(p.ms), rt = safe_ref(p.mt);
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      if (k < cnt) {
        if (K == MIXTURE) {
          lse_add(xs[k], rs, its, p.ss);
          lse_add(xt[k], rt, itt, p.st);
        } else {
          kl_add<REV>(xs[k], xt[k], rs, rt, its, itt, p.ss, p.st, p.acc);
        }
        if (ce_sep) lse_add(xs[k], rs, s1);
      }
    }
  });
  // a NaN logit may have been dropped by the pack maxima (fmax-like), never by the sums
  // (exp(NaN) = NaN): mark the side's maximum NaN, as the table's contract says, once per
  // thread; the merges below keep it (kd_max_nan)
  if (p.ss != p.ss) p.ms = NAN;
  if (p.st != p.st) p.mt = NAN;
  float m1 = p.ms;
  p = block_merge_kl<REV>(p, its, itt);
  if (ce_sep) block_merge_lse(m1, s1, 1.f);
  if (threadIdx.x == 0) {
    out[0] = p.ms, out[1] = p.ss, out[2] = p.mt, out[3] = p.st, out[4] = p.acc;
    out[5] = p.ms, out[6] = s1;
  }
}

// A thread per row: merge the splits and write the statistics of the row's range (columns
// [offset, offset + v) of the vocabulary, layout kd_layout.h); with `loss` (whole rows,
// offset 0) also DIV = D and, except for the mixture, the loss.
template <int K, class T>
__global__ void kd_finalize_kernel(
    const T* __restrict__ s,              // (N, V) student logits, rows ss apart (s[label])
    const int64_t* __restrict__ labels,   // (N,) global ids, or nullptr
    const float* __restrict__ part,       // (N, splits, NPART)
    float* __restrict__ stats,            // (N, NSTAT) out
    float* __restrict__ loss,             // (N,) out, or nullptr (a range's statistics)
    int64_t n, int64_t v, int64_t ss, int64_t offset, int splits, bool ce, bool ce_sep,
    int64_t ignore_index, float its, float itt, float kd_scale, float ce_weight) {
  constexpr bool REV = K == REVERSE_KL;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  float* st = stats + row * NSTAT;
  const int64_t lab = labels ? labels[row] : -1;
  if (labels && lab == ignore_index) {
    for (int c = 0; c < NSTAT; ++c) st[c] = 0.f;
    if (loss) loss[row] = 0.f;
    return;
  }
  KLPart<float> p = kl_part_empty<float>();
  float m1 = kd_neg_inf<float>(), s1 = 0.f;
  for (int k = 0; k < splits; ++k) {
    const float* q = part + (row * splits + k) * NPART;
    KLPart<float> o;
    o.ms = q[0], o.ss = q[1], o.mt = q[2], o.st = q[3], o.acc = q[4];
    p = kl_merge<REV>(p, o, its, itt);
    if (ce_sep) lse_merge(m1, s1, q[5], q[6], 1.f);
  }
  st[ST_MS] = p.ms;
  st[ST_LS] = kd_log(p.ss);
  st[ST_MT] = p.mt;
  st[ST_LT] = kd_log(p.st);
  st[ST_M1] = p.ms;  // raw: the same maximum at any temperature
  st[ST_L1] = ce_sep ? kd_log(s1) : st[ST_LS];
  const int64_t col = lab - offset;  // the label's column in the range
  st[ST_LABEL] = labels && col >= 0 && col < v ? to_f(s[row * ss + col]) : 0.f;
  st[ST_DIV] = st[ST_B] = st[ST_UQ] = st[ST_UP] = 0.f;
  st[ST_ACC] = K == MIXTURE ? 0.f : p.acc;
  if (K != MIXTURE && loss) {
    const float d = kl_value<REV>(p.ss, p.st, p.acc);
    st[ST_DIV] = d;
    float l = kd_scale * d;
    // CE = (m1 - s[label]) + l1: the close pair first (exact at |s| ~ 1e4)
    if (ce) l += ce_weight * ((st[ST_M1] - st[ST_LABEL]) + st[ST_L1]);
    // a NaN, a +inf or no finite logit on a side: NaN (kd_math.h's non-finite policy)
    loss[row] = row_has_softmax(p.ms, p.mt) ? l : NAN;
  }
}

// ---- forward: mixture pass 2 -------------------------------------------------------------------

template <class TS, class TT>
__global__ void __launch_bounds__(THREADS) kd_mix_kernel(
    const TS* __restrict__ s,             // (N, V) student logits, rows ss apart
    const TT* __restrict__ t,             // (N, V) teacher logits, rows ts apart
    const int64_t* __restrict__ labels,   // (N,) or nullptr
    const float* __restrict__ stats,      // (N, NSTAT) the rows' global statistics
    float* __restrict__ part,             // (N, splits, 4) partial A, B, Uq, Up out
    int64_t v, int64_t ss, int64_t ts, int64_t chunk, float its, float itt, int64_t ignore_index,
    MixCoef<float> c, bool unit_sums) {
  const int64_t row = blockIdx.x;
  const int64_t b = int64_t(blockIdx.y) * chunk, e = min(v, b + chunk);
  if (labels && labels[row] == ignore_index) return;
  const float* st = stats + row * NSTAT;
  // lq = (s - ms) / Ts - log Ss: never through a rounded lse (cancellation at |s| ~ 1e4)
  const float ms = safe_ref(st[ST_MS]), ls = st[ST_LS], mt = safe_ref(st[ST_MT]), lt = st[ST_LT];
  const TS* sr = s + row * ss;
  const TT* tr = t + row * ts;
  float sa = 0.f, sb = 0.f, suq = 0.f, sup = 0.f;
  for_elements(b, e, row_pack_head(sr, tr), [&](int64_t i, int cnt) {
    float xs[PACK], xt[PACK];
    load_any(sr + i, cnt, xs);
    load_any(tr + i, cnt, xt);
#pragma unroll
    for (int k = 0; k < PACK; ++k)
      if (k < cnt) {
        const float lq = (xs[k] - ms) * its - ls, lp = (xt[k] - mt) * itt - lt;
        mix_add(lq, lp, c, sa, sb, suq, sup);
        if (unit_sums && c.unit_u) {  // u = 1: the range's sum q u is its sum of q
          suq += kd_exp(lq);
          sup += kd_exp(lp);
        }
      }
  });
  sa = block_sum(sa);
  sb = block_sum(sb);
  suq = block_sum(suq);
  sup = block_sum(sup);
  if (threadIdx.x == 0) {
    float* out = part + (row * gridDim.y + blockIdx.y) * 4;
    out[0] = sa, out[1] = sb, out[2] = suq, out[3] = sup;
  }
}

__global__ void kd_mix_finalize_kernel(
    const int64_t* __restrict__ labels,   // (N,) or nullptr
    const float* __restrict__ part,       // (N, splits, 4)
    float* __restrict__ stats,            // (N, NSTAT) in/out
    float* __restrict__ loss,             // (N,) out
    int64_t n, int splits, bool ce, int64_t ignore_index, float kd_scale, float ce_weight,
    float coef_p, float coef_q, bool unit_u) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  if (labels && labels[row] == ignore_index) return;  // zeroed by kd_finalize_kernel
  float a = 0.f, bb = 0.f, uq = 0.f, up = 0.f;
  for (int k = 0; k < splits; ++k) {
    const float* q = part + (row * splits + k) * 4;
    a += q[0], bb += q[1], uq += q[2], up += q[3];
  }
  float* st = stats + row * NSTAT;
  // jsd (unit_u): u = 1, so sum q u = sum q = 1 (the kernel skipped those sums)
  st[ST_DIV] = a, st[ST_B] = bb, st[ST_UQ] = unit_u ? 1.f : uq, st[ST_UP] = unit_u ? 1.f : up;
  const float d = (coef_p != 0.f ? coef_p * a : 0.f) + (coef_q != 0.f ? coef_q * bb : 0.f);
  float l = kd_scale * d;
  if (ce) l += ce_weight * ((st[ST_M1] - st[ST_LABEL]) + st[ST_L1]);
  loss[row] = row_has_softmax(st[ST_MS], st[ST_MT]) ? l : NAN;
}

// A thread per row: the mixture's pass-2 sums of a range, the splits added in order.
__global__ void kd_mix_sums_kernel(const float* __restrict__ part,  // (N, splits, 4)
                                   float* __restrict__ out,         // (N, 4) out
                                   int64_t n, int splits) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  float a = 0.f, b = 0.f, uq = 0.f, up = 0.f;
  for (int k = 0; k < splits; ++k) {
    const float* q = part + (row * splits + k) * 4;
    a += q[0], b += q[1], uq += q[2], up += q[3];
  }
  out[row * 4] = a, out[row * 4 + 1] = b, out[row * 4 + 2] = uq, out[row * 4 + 3] = up;
}

// ---- forward: soft_cross_entropy, forward_reverse_kl (one pass) --------------------------------

// kd_stats_kernel for K = SOFT_CE / FR_KL: the state carries a second accumulator (accb,
// FR_KL's reverse KL), written in the partial state's free slot 7.
template <int K, class TS, class TT>
__global__ void __launch_bounds__(THREADS) kd_stats2_kernel(
    const TS* __restrict__ s, const TT* __restrict__ t, const int64_t* __restrict__ labels,
    float* __restrict__ part, int64_t v, int64_t ss, int64_t ts, int64_t chunk, float its,
    float itt, bool ce_sep, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t b = int64_t(blockIdx.y) * chunk, e = min(v, b + chunk);
  float* out = part + (row * gridDim.y + blockIdx.y) * NPART;
  if (labels && labels[row] == ignore_index) return;
  const TS* sr = s + row * ss;
  const TT* tr = t + row * ts;
  KL2Part<float> p = kl2_part_empty<float>();
  float s1 = 0.f;
  for_elements(b, e, row_pack_head(sr, tr), [&](int64_t i, int cnt) {
    float xs[PACK], xt[PACK];
    load_any(sr + i, cnt, xs);
    load_any(tr + i, cnt, xt);
    const float nms = kd_max(p.ms, pack_max(xs, cnt)), nmt = kd_max(p.mt, pack_max(xt, cnt));
    kl2_rebase<K>(p.ss, p.st, p.acc, p.accb, ref_move(p.ms, nms, its),
                  ref_move(p.mt, nmt, itt));
    if (ce_sep) lse_rebase(s1, ref_move(p.ms, nms, 1.f));
    p.ms = nms;
    p.mt = nmt;
    const float rs = safe_ref(p.ms), rt = safe_ref(p.mt);
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      if (k < cnt) {
        kl2_add<K>(xs[k], xt[k], rs, rt, its, itt, p.ss, p.st, p.acc, p.accb);
        if (ce_sep) lse_add(xs[k], rs, s1);
      }
    }
  });
  if (p.ss != p.ss) p.ms = NAN;
  if (p.st != p.st) p.mt = NAN;
  float m1 = p.ms;
  p = block_merge_kl2<K>(p, its, itt);
  if (ce_sep) block_merge_lse(m1, s1, 1.f);
  if (threadIdx.x == 0) {
    out[0] = p.ms, out[1] = p.ss, out[2] = p.mt, out[3] = p.st, out[4] = p.acc;
    out[5] = p.ms, out[6] = s1, out[7] = p.accb;
  }
}

// kd_finalize_kernel for K = SOFT_CE / FR_KL: DIV, B = (D, 0) or (F, R) with `loss`, else
// the range's raw accumulators (ACC, and B for FR_KL) as _stats.py's table.
template <int K, class T>
__global__ void kd_finalize2_kernel(
    const T* __restrict__ s, const int64_t* __restrict__ labels,
    const float* __restrict__ part, float* __restrict__ stats, float* __restrict__ loss,
    int64_t n, int64_t v, int64_t ss, int64_t offset, int splits, bool ce, bool ce_sep,
    int64_t ignore_index, float its, float itt, float kd_scale, float ce_weight, float cf,
    float cr) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  float* st = stats + row * NSTAT;
  const int64_t lab = labels ? labels[row] : -1;
  if (labels && lab == ignore_index) {
    for (int c = 0; c < NSTAT; ++c) st[c] = 0.f;
    if (loss) loss[row] = 0.f;
    return;
  }
  KL2Part<float> p = kl2_part_empty<float>();
  float m1 = kd_neg_inf<float>(), s1 = 0.f;
  for (int k = 0; k < splits; ++k) {
    const float* q = part + (row * splits + k) * NPART;
    KL2Part<float> o;
    o.ms = q[0], o.ss = q[1], o.mt = q[2], o.st = q[3], o.acc = q[4], o.accb = q[7];
    p = kl2_merge<K>(p, o, its, itt);
    if (ce_sep) lse_merge(m1, s1, q[5], q[6], 1.f);
  }
  st[ST_MS] = p.ms;
  st[ST_LS] = kd_log(p.ss);
  st[ST_MT] = p.mt;
  st[ST_LT] = kd_log(p.st);
  st[ST_M1] = p.ms;
  st[ST_L1] = ce_sep ? kd_log(s1) : st[ST_LS];
  const int64_t col = lab - offset;
  st[ST_LABEL] = labels && col >= 0 && col < v ? to_f(s[row * ss + col]) : 0.f;
  st[ST_DIV] = st[ST_UQ] = st[ST_UP] = 0.f;
  st[ST_B] = K == FR_KL ? p.accb : 0.f;
  st[ST_ACC] = p.acc;
  if (loss) {
    float dv[2];
    const float d = kl2_value<K>(p.ss, p.st, p.acc, p.accb, cf, cr, dv);
    st[ST_DIV] = dv[0];
    st[ST_B] = dv[1];
    float l = kd_scale * d;
    if (ce) l += ce_weight * ((st[ST_M1] - st[ST_LABEL]) + st[ST_L1]);
    loss[row] = row_has_softmax(p.ms, p.mt) ? l : NAN;
  }
}

// ---- forward: tvd, alpha_beta pass 2 -------------------------------------------------------------

// kd_mix_kernel for K = TVD / ALPHA_BETA: the range's (D or T, 0, UQ, UP) sums (pw_add).
template <int K, class TS, class TT>
__global__ void __launch_bounds__(THREADS) kd_pw_kernel(
    const TS* __restrict__ s, const TT* __restrict__ t, const int64_t* __restrict__ labels,
    const float* __restrict__ stats, float* __restrict__ part, int64_t v, int64_t ss,
    int64_t ts, int64_t chunk, float its, float itt, int64_t ignore_index, float coef_p,
    float coef_q) {
  const int64_t row = blockIdx.x;
  const int64_t b = int64_t(blockIdx.y) * chunk, e = min(v, b + chunk);
  if (labels && labels[row] == ignore_index) return;
  const float* st = stats + row * NSTAT;
  const float ms = safe_ref(st[ST_MS]), ls = st[ST_LS], mt = safe_ref(st[ST_MT]), lt = st[ST_LT];
  const PwCoef<float> c = pw_coef(coef_p, coef_q);
  const TS* sr = s + row * ss;
  const TT* tr = t + row * ts;
  float sd = 0.f, suq = 0.f, sup = 0.f;
  for_elements(b, e, row_pack_head(sr, tr), [&](int64_t i, int cnt) {
    float xs[PACK], xt[PACK];
    load_any(sr + i, cnt, xs);
    load_any(tr + i, cnt, xt);
#pragma unroll
    for (int k = 0; k < PACK; ++k)
      if (k < cnt) {
        const float lq = (xs[k] - ms) * its - ls, lp = (xt[k] - mt) * itt - lt;
        pw_add<K>(lq, lp, c, sd, suq, sup);
      }
  });
  sd = block_sum(sd);
  suq = block_sum(suq);
  sup = block_sum(sup);
  if (threadIdx.x == 0) {
    float* out = part + (row * gridDim.y + blockIdx.y) * 4;
    out[0] = sd, out[1] = 0.f, out[2] = suq, out[3] = sup;
  }
}

template <int K>
__global__ void kd_pw_finalize_kernel(
    const int64_t* __restrict__ labels, const float* __restrict__ part,
    float* __restrict__ stats, float* __restrict__ loss, int64_t n, int splits, bool ce,
    int64_t ignore_index, float kd_scale, float ce_weight) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  if (labels && labels[row] == ignore_index) return;  // zeroed by kd_finalize_kernel
  float sd = 0.f, uq = 0.f, up = 0.f;
  for (int k = 0; k < splits; ++k) {
    const float* q = part + (row * splits + k) * 4;
    sd += q[0], uq += q[2], up += q[3];
  }
  float* st = stats + row * NSTAT;
  st[ST_DIV] = sd, st[ST_B] = 0.f, st[ST_UQ] = uq, st[ST_UP] = up;
  float l = kd_scale * (K == TVD ? 0.5f * sd : sd);
  if (ce) l += ce_weight * ((st[ST_M1] - st[ST_LABEL]) + st[ST_L1]);
  loss[row] = row_has_softmax(st[ST_MS], st[ST_MT]) ? l : NAN;
}

// ---- backward ----------------------------------------------------------------------------------

template <int K, class TS, class TT>
__global__ void __launch_bounds__(THREADS) kd_grad_kernel(
    const float* __restrict__ grad,       // (N,) upstream row gradients, nullptr = 1
    const TS* s,                          // (N, V) student logits (may alias gs: fused op)
    const TT* __restrict__ t,             // (N, V) teacher logits
    const int64_t* __restrict__ labels,   // (N,) global ids, or nullptr
    const float* __restrict__ stats,      // (N, NSTAT) the rows' global finished statistics
    TS* gs,                               // (N, V) grad of s out
    TT* __restrict__ gt,                  // (N, V) grad of t out, or nullptr
    int64_t v, int64_t ss, int64_t ts, int64_t gss, int64_t gts,  // row strides of s..gt
    int64_t offset, int64_t chunk, float its, float itt, bool ce,
    int64_t ignore_index, float kd_scale, float ce_weight, MixCoef<float> c, float coef_p,
    float coef_q) {
  constexpr bool REV = K == REVERSE_KL;
  const int64_t row = blockIdx.x;
  const int64_t b = int64_t(blockIdx.y) * chunk, e = min(v, b + chunk);
  const TS* sr = s + row * ss;
  const TT* tr = t + row * ts;
  TS* gsr = gs + row * gss;
  TT* gtr = gt ? gt + row * gts : nullptr;
  const int64_t h = row_pack_head(sr, tr, gsr, gtr);
  const int64_t lab = labels ? labels[row] : -1;
  if (labels && lab == ignore_index) {
    const float zero[PACK] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for_elements(b, e, h, [&](int64_t i, int cnt) {
      if (cnt == PACK) {
        store_pack(gsr + i, zero);
        if (gtr) store_pack(gtr + i, zero);
      } else {
        gsr[i] = TS(0.f);
        if (gtr) gtr[i] = TT(0.f);
      }
    });
    return;
  }
  const float* st = stats + row * NSTAT;
  const float g = grad ? grad[row] : 1.f;
  const float cs = g * kd_scale * its, ct = g * kd_scale * itt, cce = ce ? g * ce_weight : 0.f;
  const float ms = safe_ref(st[ST_MS]), ls = st[ST_LS], mt = safe_ref(st[ST_MT]), lt = st[ST_LT];
  const float m1 = safe_ref(st[ST_M1]), l1 = st[ST_L1];
  const float D = st[ST_DIV], B = st[ST_B], Uq = st[ST_UQ], Up = st[ST_UP];
  const PwCoef<float> pwc = pw_coef(coef_p, coef_q);
  for_elements(b, e, h, [&](int64_t i, int cnt) {
    float xs[PACK], xt[PACK], os[PACK], ot[PACK];
    load_any(sr + i, cnt, xs);
    load_any(tr + i, cnt, xt);
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      if (k < cnt) {
        const float lq = (xs[k] - ms) * its - ls, lp = (xt[k] - mt) * itt - lt;
        float a, bt;
        if constexpr (K == MIXTURE) {
          mix_grad(lq, lp, c, D, B, Uq, Up, a, bt);
        } else if constexpr (K == SOFT_CE || K == FR_KL) {
          kl2_grad<K>(lq, lp, D, B, coef_p, coef_q, a, bt);
        } else if constexpr (K == TVD || K == ALPHA_BETA) {
          pw_grad<K>(lq, lp, pwc, Uq, Up, a, bt);
        } else {
          kl_grad<REV>(lq, lp, D, a, bt);
        }
        a *= cs;
        // softmax(s) at T = 1 from the raw logit and the T = 1 pair (M1 = MS, raw)
        if (ce) a += cce * ce_grad(xs[k], m1, l1, (i + k == lab - offset) ? 1.f : 0.f);
        os[k] = a;
        ot[k] = bt * ct;
      }
    }
    if (cnt == PACK) {
      store_pack(gsr + i, os);
      if (gtr) store_pack(gtr + i, ot);
    } else {
      gsr[i] = TS(os[0]);
      if (gtr) gtr[i] = TT(ot[0]);
    }
  });
}

// ---- kl_div --------------------------------------------------------------------------------------

template <class T, class A>
__global__ void kl_div_kernel(const T* __restrict__ x,  // (n,) log-probabilities
                              const T* __restrict__ y,  // (n,) targets
                              T* __restrict__ out,      // (n,) terms out
                              int64_t n, bool log_target) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = T(kl_div_term(to_a<A>(x[i]), to_a<A>(y[i]), log_target));
}

// The sum in two fixed-order stages, so it is bitwise reproducible (float atomics are not):
// each block writes the float64 sum of its grid-strided terms to part[block], then one block
// sums the partials. float64 accumulation keeps 10^9-term sums exact to float32 (a float32
// running sum drifts by ~n * eps); one double add per element is free in this memory-bound
// loop, even on GPUs with slow float64.
template <class T, class A>
__global__ void __launch_bounds__(THREADS) kl_div_sum_kernel(
    const T* __restrict__ x,    // (n,) log-probabilities
    const T* __restrict__ y,    // (n,) targets
    double* __restrict__ part,  // (gridDim.x,) per-block partial sums out
    int64_t n, bool log_target) {
  double acc = 0;
#pragma unroll 1  // unrolled, the float64 instance spills 16 bytes on sm_90
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    acc += double(kl_div_term(to_a<A>(x[i]), to_a<A>(y[i]), log_target));
  acc = block_sum(acc);
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

template <class A>
__global__ void __launch_bounds__(THREADS) kl_div_sum_finish_kernel(
    const double* __restrict__ part,  // (parts,) per-block partial sums
    A* __restrict__ out,              // () the sum, in the accumulation dtype
    int parts) {
  double acc = 0;
  for (int i = threadIdx.x; i < parts; i += THREADS) acc += part[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = A(acc);
}

template <class T, class A>
__global__ void kl_div_backward_kernel(const A* __restrict__ grad,  // () or (n,) upstream
                                       const T* __restrict__ x,     // (n,) log-probabilities
                                       const T* __restrict__ y,     // (n,) targets
                                       T* __restrict__ gx,          // (n,) or nullptr
                                       T* __restrict__ gy,          // (n,) or nullptr
                                       int64_t n, bool scalar, bool log_target) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    A dx, dy;
    kl_div_grad(to_a<A>(x[i]), to_a<A>(y[i]), log_target, dx, dy);
    const A g = scalar ? grad[0] : grad[i];
    if (gx) gx[i] = T(dx * g);
    if (gy) gy[i] = T(dy * g);
  }
}

// ---- softmax ---------------------------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(THREADS) softmax_kernel(const T* __restrict__ x,  // (N, V)
                                                          T* __restrict__ y,        // (N, V) out
                                                          int64_t v, float inv_t, bool log) {
  const T* xr = x + int64_t(blockIdx.x) * v;
  T* yr = y + int64_t(blockIdx.x) * v;
  float m = kd_neg_inf<float>(), sum = 0.f;  // raw maximum, sum exp((x - m) / T)
  for (int64_t i = threadIdx.x; i < v; i += THREADS) {
    const float x = to_f(xr[i]);
    const float nm = kd_max_nan(m, x);
    lse_rebase(sum, ref_move(m, nm, inv_t));
    m = nm;
    lse_add(x, safe_ref(m), inv_t, sum);
  }
  block_merge_lse(m, sum, inv_t);
  __shared__ float ref, lsum;
  // a row with a NaN, a +inf or nothing finite (m not finite) has no softmax: NaN throughout
  if (threadIdx.x == 0) ref = safe_ref(m), lsum = kd_finite(m) ? kd_log(sum) : NAN;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < v; i += THREADS) {
    // (x - m) / T - log S: the raw difference first (kd_math.h)
    const float l = (to_f(xr[i]) - ref) * inv_t - lsum;
    yr[i] = T(log ? l : kd_exp(l));
  }
}

template <class T>
__global__ void __launch_bounds__(THREADS) softmax_backward_kernel(
    const T* __restrict__ g,  // (N, V) upstream gradient
    const T* __restrict__ y,  // (N, V) forward output
    T* __restrict__ gx,       // (N, V) out
    int64_t v, float inv_t, bool log) {
  const int64_t off = int64_t(blockIdx.x) * v;
  float r = 0.f;
  for (int64_t i = threadIdx.x; i < v; i += THREADS)
    r += log ? to_f(g[off + i]) : to_f(g[off + i]) * to_f(y[off + i]);
  r = block_sum(r);
  __shared__ float rs;
  if (threadIdx.x == 0) rs = r;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < v; i += THREADS)
    gx[off + i] = T(softmax_grad(to_f(y[off + i]), to_f(g[off + i]), rs, log) * inv_t);
}

// ---- host ------------------------------------------------------------------------------------

template <class F>
void dispatch_half_types(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, "kdkernels CUDA: ", what, " must be float32, bfloat16 or float16, got ",
                  st);
  }
}

template <class F>
void dispatch_all_types(at::ScalarType st, const char* what, F&& f) {
  if (st == at::kDouble) return f(double{});
  dispatch_half_types(st, what, f);
}

template <class F>
void dispatch_kind(int kind, F&& f) {
  if (kind == FORWARD_KL) return f(std::integral_constant<int, FORWARD_KL>{});
  if (kind == REVERSE_KL) return f(std::integral_constant<int, REVERSE_KL>{});
  return f(std::integral_constant<int, MIXTURE>{});
}

// dispatch_kind over every kind (the backward kernel serves them all)
template <class F>
void dispatch_kind_all(int kind, F&& f) {
  if (kind == SOFT_CE) return f(std::integral_constant<int, SOFT_CE>{});
  if (kind == FR_KL) return f(std::integral_constant<int, FR_KL>{});
  if (kind == TVD) return f(std::integral_constant<int, TVD>{});
  if (kind == ALPHA_BETA) return f(std::integral_constant<int, ALPHA_BETA>{});
  dispatch_kind(kind, f);
}

int sm_count(int device) {
  int n = 0;
  KD_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

struct Split {
  int splits;
  int64_t chunk;
};

// One block per row when rows fill the GPU; otherwise split each row's vocabulary into
// chunks (multiples of PACK, at least 4096 elements) so ~2 blocks per SM are busy.
Split choose_split(int64_t n, int64_t v, int device) {
  const int64_t want = 2 * int64_t(sm_count(device));
  int64_t splits = 1;
  if (n < want) splits = std::min<int64_t>((want + n - 1) / std::max<int64_t>(n, 1),
                                           std::max<int64_t>(1, v / 4096));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
  // chunk >= PACK, so an empty row (v = 0: an empty range) is one block with no elements
  int64_t chunk = std::max<int64_t>((v + splits - 1) / splits, 1);
  chunk = (chunk + PACK - 1) / PACK * PACK;
  splits = std::max<int64_t>((v + chunk - 1) / chunk, 1);
  return {int(std::max<int64_t>(splits, 1)), std::max<int64_t>(chunk, PACK)};
}

// Calls f(TS{}, TT{}) with the element types of s and t (t from teacher_for: s's dtype or
// float32).
template <class F>
void dispatch_pair(const at::Tensor& s, const at::Tensor& t, F&& f) {
  dispatch_half_types(s.scalar_type(), "s", [&](auto sz) {
    if (t.scalar_type() == s.scalar_type()) return f(sz, sz);
    TORCH_CHECK(t.scalar_type() == at::kFloat, "kdkernels CUDA: t must be s's dtype or ",
                "float32 here, got ", t.scalar_type());
    f(sz, float{});
  });
}

// whole: the tensors are whole rows (labels in [0, V)); else a column range (labels >= 0)
void check_cuda_inputs(const at::Tensor& s, const at::Tensor& t,
                       const c10::optional<at::Tensor>& labels, const Params& pr, bool whole) {
  TORCH_CHECK(s.is_cuda() && t.is_cuda(), "kdkernels CUDA: s and t must be CUDA tensors");
  check_inputs(s, t, labels, pr, false);
  const int64_t v = whole ? s.size(1) : -1;
  if (labels.has_value() && labels->numel() > 0 &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    // a CUDA graph is being captured, where a host sync is not allowed: a device-side
    // assert instead (as F.cross_entropy's), which names no row
    at::_assert_async(bad_labels(*labels, v, pr).any().logical_not(),
                      "kdkernels: a label is outside the vocabulary and is not ignore_index");
  } else {
    check_label_values(labels, v, pr);
  }
}

// run_forward of SOFT_CE, FR_KL (one pass with two accumulators), TVD and ALPHA_BETA (the
// mixture's pass 1, then kd_pw_kernel when the row is whole).
void run_forward2(const at::Tensor& s, const at::Tensor& t, const int64_t* lab,
                  const Params& pr, int64_t offset, at::Tensor* loss, at::Tensor& stats) {
  const int64_t n = s.size(0), v = s.size(1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Split sp_ = choose_split(n, v, s.get_device());
  const bool ce = pr.ce_weight != 0 && lab != nullptr;
  const bool ce_sep = ce && pr.inv_ts != 1.0;
  auto part = at::empty({n, sp_.splits, NPART}, s.options().dtype(at::kFloat));
  const dim3 grid(unsigned(n), unsigned(sp_.splits));
  const int fin_blocks = int((n + 127) / 128);
  float* lossp = loss ? loss->data_ptr<float>() : nullptr;
  const float its = float(pr.inv_ts), itt = float(pr.inv_tt);
  dispatch_pair(s, t, [&](auto sz, auto tz) {
    using TS = decltype(sz);
    using TT = decltype(tz);
    const TS* sp_s = static_cast<const TS*>(s.data_ptr());
    const TT* sp_t = static_cast<const TT*>(t.data_ptr());
    dispatch_kind_all(pr.kind, [&](auto kz) {
      constexpr int K = decltype(kz)::value;
      if constexpr (K == SOFT_CE || K == FR_KL) {
        kd_stats2_kernel<K, TS, TT><<<grid, THREADS, 0, stream>>>(
            sp_s, sp_t, lab, part.data_ptr<float>(), v, s.stride(0), t.stride(0), sp_.chunk,
            its, itt, ce_sep, pr.ignore_index);
        KD_CUDA_CHECK(cudaGetLastError());
        kd_finalize2_kernel<K, TS><<<fin_blocks, 128, 0, stream>>>(
            sp_s, lab, part.data_ptr<float>(), stats.data_ptr<float>(), lossp, n, v,
            s.stride(0), offset, sp_.splits, ce, ce_sep, pr.ignore_index, its, itt, float(pr.kd_scale),
            float(pr.ce_weight), float(pr.coef_p), float(pr.coef_q));
        KD_CUDA_CHECK(cudaGetLastError());
      } else if constexpr (K == TVD || K == ALPHA_BETA) {
        kd_stats_kernel<MIXTURE, TS, TT><<<grid, THREADS, 0, stream>>>(
            sp_s, sp_t, lab, part.data_ptr<float>(), v, s.stride(0), t.stride(0), sp_.chunk,
            its, itt, ce_sep, pr.ignore_index);
        KD_CUDA_CHECK(cudaGetLastError());
        kd_finalize_kernel<MIXTURE, TS><<<fin_blocks, 128, 0, stream>>>(
            sp_s, lab, part.data_ptr<float>(), stats.data_ptr<float>(), lossp, n, v,
            s.stride(0), offset, sp_.splits, ce, ce_sep, pr.ignore_index, its, itt, float(pr.kd_scale),
            float(pr.ce_weight));
        KD_CUDA_CHECK(cudaGetLastError());
        if (lossp) {
          auto part2 = at::empty({n, sp_.splits, 4}, s.options().dtype(at::kFloat));
          kd_pw_kernel<K, TS, TT><<<grid, THREADS, 0, stream>>>(
              sp_s, sp_t, lab, stats.data_ptr<float>(), part2.data_ptr<float>(), v,
              s.stride(0), t.stride(0), sp_.chunk, its, itt, pr.ignore_index, float(pr.coef_p), float(pr.coef_q));
          KD_CUDA_CHECK(cudaGetLastError());
          kd_pw_finalize_kernel<K><<<fin_blocks, 128, 0, stream>>>(
              lab, part2.data_ptr<float>(), stats.data_ptr<float>(), lossp, n, sp_.splits, ce,
              pr.ignore_index, float(pr.kd_scale), float(pr.ce_weight));
          KD_CUDA_CHECK(cudaGetLastError());
        }
      }
    });
  });
}

// Pass 1 over the columns [offset, offset + v) of rows: fills stats (N, NSTAT); with `loss`
// (whole rows, offset 0) also the loss and, for the mixture, pass 2.
void run_forward(const at::Tensor& s, const at::Tensor& t, const int64_t* lab, const Params& pr,
                 int64_t offset, at::Tensor* loss, at::Tensor& stats) {
  const int64_t n = s.size(0), v = s.size(1);
  if (n == 0) return;
  if (pr.kind > MIXTURE) return run_forward2(s, t, lab, pr, offset, loss, stats);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Split sp_ = choose_split(n, v, s.get_device());
  const bool ce = pr.ce_weight != 0 && lab != nullptr;
  const bool ce_sep = ce && pr.inv_ts != 1.0;
  auto part = at::empty({n, sp_.splits, NPART}, s.options().dtype(at::kFloat));
  const dim3 grid(unsigned(n), unsigned(sp_.splits));
  const int fin_blocks = int((n + 127) / 128);
  float* lossp = loss ? loss->data_ptr<float>() : nullptr;
  dispatch_pair(s, t, [&](auto sz, auto tz) {
    using TS = decltype(sz);
    using TT = decltype(tz);
    const TS* sp_s = static_cast<const TS*>(s.data_ptr());
    const TT* sp_t = static_cast<const TT*>(t.data_ptr());
    dispatch_kind(pr.kind, [&](auto kz) {
      constexpr int K = decltype(kz)::value;
      kd_stats_kernel<K, TS, TT><<<grid, THREADS, 0, stream>>>(
          sp_s, sp_t, lab, part.data_ptr<float>(), v, s.stride(0), t.stride(0), sp_.chunk,
          float(pr.inv_ts), float(pr.inv_tt), ce_sep, pr.ignore_index);
      KD_CUDA_CHECK(cudaGetLastError());
      kd_finalize_kernel<K, TS><<<fin_blocks, 128, 0, stream>>>(
          sp_s, lab, part.data_ptr<float>(), stats.data_ptr<float>(), lossp, n, v, s.stride(0),
          offset,
          sp_.splits, ce, ce_sep, pr.ignore_index, float(pr.inv_ts), float(pr.inv_tt),
          float(pr.kd_scale), float(pr.ce_weight));
      KD_CUDA_CHECK(cudaGetLastError());
      if constexpr (K == MIXTURE) {
        if (lossp) {
          auto part2 = at::empty({n, sp_.splits, 4}, s.options().dtype(at::kFloat));
          kd_mix_kernel<TS, TT><<<grid, THREADS, 0, stream>>>(
              sp_s, sp_t, lab, stats.data_ptr<float>(), part2.data_ptr<float>(), v, s.stride(0),
              t.stride(0), sp_.chunk, float(pr.inv_ts), float(pr.inv_tt), pr.ignore_index,
              mix_coef_of<float>(pr.mix, pr.coef_p, pr.coef_q), false);
          KD_CUDA_CHECK(cudaGetLastError());
          kd_mix_finalize_kernel<<<fin_blocks, 128, 0, stream>>>(
              lab, part2.data_ptr<float>(), stats.data_ptr<float>(), lossp, n, sp_.splits, ce,
              pr.ignore_index, float(pr.kd_scale), float(pr.ce_weight), float(pr.coef_p),
              float(pr.coef_q), mix_coef_of<float>(pr.mix, pr.coef_p, pr.coef_q).unit_u);
          KD_CUDA_CHECK(cudaGetLastError());
        }
      }
    });
  });
}

// The mixture's pass-2 sums (N, 4) of a range given the rows' global statistics.
void run_mix_sums(const at::Tensor& s, const at::Tensor& t, const Params& pr,
                  const at::Tensor& stats, at::Tensor& out) {
  const int64_t n = s.size(0), v = s.size(1);
  if (n == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Split sp_ = choose_split(n, v, s.get_device());
  auto part = at::empty({n, sp_.splits, 4}, s.options().dtype(at::kFloat));
  const dim3 grid(unsigned(n), unsigned(sp_.splits));
  if (pr.kind == TVD || pr.kind == ALPHA_BETA) {
    // tvd / alpha_beta: their pass-2 sums, added over the splits as the mixture's
    dispatch_pair(s, t, [&](auto sz, auto tz) {
      using TS = decltype(sz);
      using TT = decltype(tz);
      auto launch = [&](auto kz) {
        constexpr int K = decltype(kz)::value;
        kd_pw_kernel<K, TS, TT><<<grid, THREADS, 0, stream>>>(
            static_cast<const TS*>(s.data_ptr()), static_cast<const TT*>(t.data_ptr()),
            nullptr, stats.data_ptr<float>(), part.data_ptr<float>(), v, s.stride(0),
            t.stride(0), sp_.chunk, float(pr.inv_ts), float(pr.inv_tt), pr.ignore_index,
            float(pr.coef_p),
            float(pr.coef_q));
      };
      if (pr.kind == TVD) {
        launch(std::integral_constant<int, TVD>{});
      } else {
        launch(std::integral_constant<int, ALPHA_BETA>{});
      }
      KD_CUDA_CHECK(cudaGetLastError());
    });
    kd_mix_sums_kernel<<<int((n + 127) / 128), 128, 0, stream>>>(part.data_ptr<float>(),
                                                               out.data_ptr<float>(), n,
                                                               sp_.splits);
    KD_CUDA_CHECK(cudaGetLastError());
    return;
  }
  dispatch_pair(s, t, [&](auto sz, auto tz) {
    using TS = decltype(sz);
    using TT = decltype(tz);
    kd_mix_kernel<TS, TT><<<grid, THREADS, 0, stream>>>(
        static_cast<const TS*>(s.data_ptr()), static_cast<const TT*>(t.data_ptr()), nullptr,
        stats.data_ptr<float>(), part.data_ptr<float>(), v, s.stride(0), t.stride(0), sp_.chunk,
        float(pr.inv_ts),
        float(pr.inv_tt), pr.ignore_index, mix_coef_of<float>(pr.mix, pr.coef_p, pr.coef_q),
        true);
    KD_CUDA_CHECK(cudaGetLastError());
    kd_mix_sums_kernel<<<int((n + 127) / 128), 128, 0, stream>>>(part.data_ptr<float>(),
                                                               out.data_ptr<float>(), n,
                                                               sp_.splits);
    KD_CUDA_CHECK(cudaGetLastError());
  });
}

// gs, gt: the gradients' buffers, rows gss, gts elements apart (gt may be nullptr)
void run_backward(const float* grad, const at::Tensor& s, const at::Tensor& t,
                  const int64_t* lab, const at::Tensor& stats, const Params& pr, int64_t offset,
                  void* gs, void* gt, int64_t gss, int64_t gts) {
  const int64_t n = s.size(0), v = s.size(1);
  if (n == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Split sp_ = choose_split(n, v, s.get_device());
  const bool ce = pr.ce_weight != 0 && lab != nullptr;
  const dim3 grid(unsigned(n), unsigned(sp_.splits));
  dispatch_pair(s, t, [&](auto sz, auto tz) {
    using TS = decltype(sz);
    using TT = decltype(tz);
    dispatch_kind_all(pr.kind, [&](auto kz) {
      constexpr int K = decltype(kz)::value;
      kd_grad_kernel<K, TS, TT><<<grid, THREADS, 0, stream>>>(
          grad, static_cast<const TS*>(s.data_ptr()), static_cast<const TT*>(t.data_ptr()),
          lab, stats.data_ptr<float>(), static_cast<TS*>(gs), static_cast<TT*>(gt), v,
          s.stride(0), t.stride(0), gss, gts, offset,
          sp_.chunk, float(pr.inv_ts), float(pr.inv_tt), ce, pr.ignore_index,
          float(pr.kd_scale), float(pr.ce_weight),
          mix_coef_of<float>(pr.mix, pr.coef_p, pr.coef_q), float(pr.coef_p), float(pr.coef_q));
      KD_CUDA_CHECK(cudaGetLastError());
    });
  });
}

// The teacher as the kernels read it: in its own dtype when that is the student's or float32
// (the pairs with kernels: no copy, no rounding of a float32 teacher to the student's
// dtype), else converted to float32 (exact for the 16-bit dtypes).
at::Tensor teacher_for(const at::Tensor& t, const at::Tensor& s) {
  const auto tt = t.scalar_type();
  return tt == s.scalar_type() || tt == at::kFloat ? t : t.to(at::kFloat);
}

const int64_t* labels_ptr(const c10::optional<at::Tensor>& labels) {
  return labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> kd_forward_cuda(const at::Tensor& s, const at::Tensor& t_in,
                                                   const c10::optional<at::Tensor>& labels,
                                                   KD_PARAMS_DECL) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_cuda_inputs(s, t_in, labels, pr, true);
  const c10::cuda::CUDAGuard guard(s.device());
  const at::Tensor t = teacher_for(t_in, s);
  const int64_t n = s.size(0);
  auto loss = at::empty({n}, s.options().dtype(at::kFloat));
  auto stats = at::empty({n, NSTAT}, s.options().dtype(at::kFloat));
  run_forward(s, t, labels_ptr(labels), pr, 0, &loss, stats);
  return {loss, stats};
}

at::Tensor kd_partial_cuda(const at::Tensor& s, const at::Tensor& t_in,
                           const c10::optional<at::Tensor>& labels, KD_PARAMS_DECL,
                           int64_t offset) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_cuda_inputs(s, t_in, labels, pr, false);
  TORCH_CHECK(offset >= 0, "kdkernels: offset must be >= 0, got ", offset);
  const c10::cuda::CUDAGuard guard(s.device());
  const at::Tensor t = teacher_for(t_in, s);
  auto stats = at::empty({s.size(0), NSTAT}, s.options().dtype(at::kFloat));
  run_forward(s, t, labels_ptr(labels), pr, offset, nullptr, stats);
  return stats;
}

at::Tensor kd_mix_partial_cuda(const at::Tensor& s, const at::Tensor& t_in,
                               const at::Tensor& stats, KD_PARAMS_DECL, int64_t offset) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  TORCH_CHECK(s.is_cuda() && t_in.is_cuda(), "kdkernels CUDA: s and t must be CUDA tensors");
  check_logits(s, t_in, pr, false);
  TORCH_CHECK(two_pass(pr.kind),
              "kdkernels: mix_partial needs a two-pass kind (mixture, tvd, alpha_beta), got '",
              kind, "'");
  TORCH_CHECK(offset >= 0, "kdkernels: offset must be >= 0, got ", offset);
  check_stats(stats, s.size(0), at::kFloat);
  TORCH_CHECK(stats.device() == s.device(), "kdkernels: stats must be on s's device");
  const c10::cuda::CUDAGuard guard(s.device());
  const at::Tensor t = teacher_for(t_in, s);
  auto out = at::empty({s.size(0), 4}, s.options().dtype(at::kFloat));
  run_mix_sums(s, t, pr, stats, out);
  return out;
}

void check_cuda_backward(const at::Tensor& grad_loss, const at::Tensor& s,
                         const at::Tensor& t_in, const c10::optional<at::Tensor>& labels,
                         const at::Tensor& stats, const Params& pr, int64_t offset) {
  check_cuda_inputs(s, t_in, labels, pr, false);
  TORCH_CHECK(offset >= 0, "kdkernels: offset must be >= 0, got ", offset);
  const int64_t n = s.size(0);
  check_stats(stats, n, at::kFloat);
  TORCH_CHECK(stats.device() == s.device(), "kdkernels: stats must be on s's device");
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == n,
              "kdkernels: grad_loss must have shape (", n, ",), got ", grad_loss.sizes());
}

std::tuple<at::Tensor, at::Tensor> kd_backward_cuda(const at::Tensor& grad_loss,
                                                    const at::Tensor& s, const at::Tensor& t_in,
                                                    const c10::optional<at::Tensor>& labels,
                                                    const at::Tensor& stats, KD_PARAMS_DECL,
                                                    int64_t offset, bool need_teacher) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_cuda_backward(grad_loss, s, t_in, labels, stats, pr, offset);
  const c10::cuda::CUDAGuard guard(s.device());
  const at::Tensor t = teacher_for(t_in, s);
  auto g = grad_loss.to(at::kFloat).contiguous();
  auto gs = at::empty_like(s);
  // grad_t is written in the dtype the kernel reads t in; converted back below if it differs
  auto gt = need_teacher ? at::empty_like(t) : at::empty({0}, t_in.options());
  run_backward(g.data_ptr<float>(), s, t, labels_ptr(labels), stats, pr, offset, gs.data_ptr(),
               need_teacher ? gt.data_ptr() : nullptr, gs.stride(0),
               need_teacher ? gt.stride(0) : 0);
  if (need_teacher && gt.scalar_type() != t_in.scalar_type()) gt = gt.to(t_in.scalar_type());
  return {gs, gt};
}

// kd_backward into given buffers (any row stride: e.g. the first columns of a full-width
// gradient, whose padding columns the caller zeroes).
void kd_backward_out_cuda(const at::Tensor& grad_loss, const at::Tensor& s,
                          const at::Tensor& t_in, const c10::optional<at::Tensor>& labels,
                          const at::Tensor& stats, KD_PARAMS_DECL, int64_t offset,
                          at::Tensor& grad_s, const c10::optional<at::Tensor>& grad_t) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_cuda_backward(grad_loss, s, t_in, labels, stats, pr, offset);
  check_grad_out("grad_s", grad_s, s);
  if (grad_t.has_value()) check_grad_out("grad_t", *grad_t, t_in);
  const c10::cuda::CUDAGuard guard(s.device());
  const at::Tensor t = teacher_for(t_in, s);
  auto g = grad_loss.to(at::kFloat).contiguous();
  // a teacher read as float32 (another 16-bit dtype) gets its gradient in float32 first
  at::Tensor gt;
  if (grad_t.has_value())
    gt = t.scalar_type() == t_in.scalar_type() ? *grad_t : at::empty_like(t);
  run_backward(g.data_ptr<float>(), s, t, labels_ptr(labels), stats, pr, offset,
               grad_s.data_ptr(), gt.defined() ? gt.data_ptr() : nullptr, grad_s.stride(0),
               gt.defined() ? gt.stride(0) : 0);
  if (gt.defined() && !gt.is_same(*grad_t)) grad_t->copy_(gt);
}

std::tuple<at::Tensor, at::Tensor> kd_fused_cuda(at::Tensor& s, const at::Tensor& t_in,
                                                 const c10::optional<at::Tensor>& labels,
                                                 KD_PARAMS_DECL, bool need_teacher) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_cuda_inputs(s, t_in, labels, pr, true);
  const c10::cuda::CUDAGuard guard(s.device());
  const at::Tensor t = teacher_for(t_in, s);
  const int64_t n = s.size(0);
  auto loss = at::empty({n}, s.options().dtype(at::kFloat));
  auto stats = at::empty({n, NSTAT}, s.options().dtype(at::kFloat));
  auto gt = need_teacher ? at::empty_like(t) : at::empty({0}, t_in.options());
  const int64_t* lab = labels_ptr(labels);
  run_forward(s, t, lab, pr, 0, &loss, stats);
  // each element is read before it is overwritten, by the same thread
  run_backward(nullptr, s, t, lab, stats, pr, 0, s.data_ptr(),
               need_teacher ? gt.data_ptr() : nullptr, s.stride(0),
               need_teacher ? gt.stride(0) : 0);
  if (need_teacher && gt.scalar_type() != t_in.scalar_type()) gt = gt.to(t_in.scalar_type());
  return {loss, gt};
}

int blocks_for(int64_t n) {
  return int(std::max<int64_t>(1, std::min<int64_t>((n + THREADS - 1) / THREADS, 65535)));
}

at::Tensor common(const at::Tensor& x, at::ScalarType st) {
  return (x.scalar_type() == st ? x : x.to(st)).contiguous();
}

at::Tensor kl_div_cuda(const at::Tensor& x_in, const at::Tensor& y_in, bool log_target) {
  TORCH_CHECK(x_in.dim() == 1 && y_in.sizes() == x_in.sizes(),
              "kdkernels: kl_div input and target must be 1-D of the same length");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto st = c10::promoteTypes(x_in.scalar_type(), y_in.scalar_type());
  const at::Tensor x = common(x_in, st), y = common(y_in, st);
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  dispatch_all_types(st, "kl_div input", [&](auto tz) {
    using T = decltype(tz);
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    kl_div_kernel<T, A><<<blocks_for(n), THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const T*>(x.data_ptr()), static_cast<const T*>(y.data_ptr()),
        static_cast<T*>(out.data_ptr()), n, log_target);
    KD_CUDA_CHECK(cudaGetLastError());
  });
  return out;
}

at::Tensor kl_div_sum_cuda(const at::Tensor& x_in, const at::Tensor& y_in, bool log_target) {
  TORCH_CHECK(x_in.dim() == 1 && y_in.sizes() == x_in.sizes(),
              "kdkernels: kl_div input and target must be 1-D of the same length");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto st = c10::promoteTypes(x_in.scalar_type(), y_in.scalar_type());
  const at::Tensor x = common(x_in, st), y = common(y_in, st);
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::zeros({}, x.options().dtype(acc));
  const int64_t n = x.numel();
  if (n == 0) return out;
  const int blocks = int(std::min<int64_t>(blocks_for(n), 4096));
  auto part = at::empty({blocks}, x.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_all_types(st, "kl_div input", [&](auto tz) {
    using T = decltype(tz);
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    kl_div_sum_kernel<T, A><<<blocks, THREADS, 0, stream>>>(
        static_cast<const T*>(x.data_ptr()), static_cast<const T*>(y.data_ptr()),
        part.data_ptr<double>(), n, log_target);
    KD_CUDA_CHECK(cudaGetLastError());
    kl_div_sum_finish_kernel<A><<<1, THREADS, 0, stream>>>(
        part.data_ptr<double>(), static_cast<A*>(out.data_ptr()), blocks);
    KD_CUDA_CHECK(cudaGetLastError());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> kl_div_backward_cuda(const at::Tensor& grad,
                                                        const at::Tensor& x_in,
                                                        const at::Tensor& y_in, bool log_target,
                                                        bool need_x, bool need_y) {
  TORCH_CHECK(x_in.dim() == 1 && y_in.sizes() == x_in.sizes(),
              "kdkernels: kl_div input and target must be 1-D of the same length");
  TORCH_CHECK(grad.dim() == 0 || grad.sizes() == x_in.sizes(),
              "kdkernels: kl_div grad must be 0-d or of input's shape");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto st = c10::promoteTypes(x_in.scalar_type(), y_in.scalar_type());
  const at::Tensor x = common(x_in, st), y = common(y_in, st);
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  auto g = grad.to(acc).contiguous();
  auto gx = need_x ? at::empty_like(x) : at::empty({0}, x_in.options());
  auto gy = need_y ? at::empty_like(y) : at::empty({0}, y_in.options());
  const int64_t n = x.numel();
  if (n > 0) {
    dispatch_all_types(st, "kl_div input", [&](auto tz) {
      using T = decltype(tz);
      using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
      kl_div_backward_kernel<T, A>
          <<<blocks_for(n), THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
              static_cast<const A*>(g.data_ptr()), static_cast<const T*>(x.data_ptr()),
              static_cast<const T*>(y.data_ptr()),
              need_x ? static_cast<T*>(gx.data_ptr()) : nullptr,
              need_y ? static_cast<T*>(gy.data_ptr()) : nullptr, n, grad.dim() == 0,
              log_target);
      KD_CUDA_CHECK(cudaGetLastError());
    });
  }
  if (need_x && gx.scalar_type() != x_in.scalar_type()) gx = gx.to(x_in.scalar_type());
  if (need_y && gy.scalar_type() != y_in.scalar_type()) gy = gy.to(y_in.scalar_type());
  return {gx, gy};
}

at::Tensor softmax_cuda(const at::Tensor& x, double inv_t, bool log) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "kdkernels: softmax x must be 2-D contiguous");
  TORCH_CHECK(inv_t > 0, "kdkernels: softmax inv_t must be > 0, got ", inv_t);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  if (x.numel() == 0) return y;
  dispatch_half_types(x.scalar_type(), "x", [&](auto tz) {
    using T = decltype(tz);
    softmax_kernel<T><<<unsigned(x.size(0)), THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const T*>(x.data_ptr()), static_cast<T*>(y.data_ptr()), x.size(1),
        float(inv_t), log);
    KD_CUDA_CHECK(cudaGetLastError());
  });
  return y;
}

at::Tensor softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& y, double inv_t,
                                 bool log) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && grad.sizes() == y.sizes(),
              "kdkernels: softmax backward needs 2-D contiguous y and grad of its shape");
  const c10::cuda::CUDAGuard guard(y.device());
  auto g = grad.to(y.scalar_type()).contiguous();
  auto gx = at::empty_like(y);
  if (y.numel() == 0) return gx;
  dispatch_half_types(y.scalar_type(), "y", [&](auto tz) {
    using T = decltype(tz);
    softmax_backward_kernel<T>
        <<<unsigned(y.size(0)), THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
            static_cast<const T*>(g.data_ptr()), static_cast<const T*>(y.data_ptr()),
            static_cast<T*>(gx.data_ptr()), y.size(1), float(inv_t), log);
    KD_CUDA_CHECK(cudaGetLastError());
  });
  return gx;
}

// ---- sparse teachers ---------------------------------------------------------------------------

#include "kd_sparse_cuda.cuh"

}  // namespace
}  // namespace kd

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("kd_forward", &kd::kd_forward_cuda);
  m.impl("kd_partial", &kd::kd_partial_cuda);
  m.impl("kd_mix_partial", &kd::kd_mix_partial_cuda);
  m.impl("kd_backward", &kd::kd_backward_cuda);
  m.impl("kd_backward_out", &kd::kd_backward_out_cuda);
  m.impl("kd_fused_", &kd::kd_fused_cuda);
  m.impl("kl_div", &kd::kl_div_cuda);
  m.impl("kl_div_sum", &kd::kl_div_sum_cuda);
  m.impl("kl_div_backward", &kd::kl_div_backward_cuda);
  m.impl("softmax", &kd::softmax_cuda);
  m.impl("softmax_backward", &kd::softmax_backward_cuda);
  m.impl("kd_sparse_partial", &kd::kd_sparse_partial_cuda);
  m.impl("kd_sparse_grads", &kd::kd_sparse_grads_cuda);
}
