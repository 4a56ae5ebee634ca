// kd_sparse_cpu.cpp: the sparse-teacher ops (schemas and CPU kernels); the CUDA kernels are in
// kd_sparse_cuda.cuh. The sparse loss (kdkernels/sparse.py) does its per-row math on the K
// gathered columns in torch and needs two things over the (N, V) student logits, a column
// range [offset, offset + Vr) of each row at a time:
//
//   kd_sparse_partial  the student's columns of the statistics table (kd_layout.h) exactly as
//                      kd_partial fills them: MS, LS at Ts, M1, L1 at T = 1 (the student's
//                      pair when Ts = 1), LABEL = s[label]; the teacher's pair is the empty
//                      range's (MT = LT = -inf), the divergence sums 0. Ignored rows are
//                      kd_partial's (0) with the empty teacher pair.
//   kd_sparse_grads    given the GLOBAL merged table and the row scalars coef = (c_q, c_1),
//                      the slots' GLOBAL ids (-1 = empty, duplicate-free) and weights w:
//                        gs_j = c_q q_j + c_1 (q1_j - [j = label]) + sum_k [ids_k = j] w_k
//                      q = exp((s - MS) / Ts - LS), q1 = exp((s - M1) - L1) (= q at Ts = 1).
//                      Ignored rows get 0.
//
// Both reuse kd_math.h's online (raw max, sum) statistics and kd_cpu_simd.h's tiles, as the
// dense kernels of kd_cpu.cpp do. A row is read once by each op. The gradient's sparse terms
// (the slots' weights, the label's one-hot) are sorted by column first (K log K per row) and
// added where their vector or tile is formed, before it is stored once: float32 rows in one
// pass, each vector from s straight to a streaming store into a gradient advised to huge
// pages (as kd_cpu.cpp's backward); other dtypes through tiles in the accumulation type.
// s may be a column slice of wider logits (row stride >= Vr): rows are addressed by stride.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

// the vector overloads of kd_math.h's primitives, then kd_math.h, then the tile I/O
#include "kd_cpu_simd.h"
#include "kd_checks.h"

namespace kd {
namespace {

constexpr int64_t TILE = 1024;

at::ScalarType acc_type(const at::Tensor& s) {
  return s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t grain(int64_t v) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(v, 1)); }

// The student's statistics of one row's range into st[0:NSTAT] (the student half of
// kd_cpu.cpp's stats_row). label: the label's column in the range, or -1.
template <class A>
void sparse_stats_row(const void* s, at::ScalarType ss, int64_t v, int64_t label, bool ce_sep,
                      A its, A* st) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  alignas(64) A xs[TILE];
  A ms = kd_neg_inf<A>();
  V sum(0), s1(0);
  const V vits(its);
  for (int64_t off = 0; off < v; off += TILE) {
    const int64_t n = std::min(TILE, v - off);
    const int64_t np = round_up<A>(n);
    const A nms = kd_max_nan(ms, load_tile<A>(s, ss, off, n, xs));
    const NextTile nx(s, ss, off + TILE, v);
    lse_rebase(sum, ref_move(ms, nms, its));
    if (ce_sep) lse_rebase(s1, ref_move(ms, nms, A(1)));
    ms = nms;
    const V vms(safe_ref(ms));
    for (int64_t i = 0; i < np; i += W) {
      nx.touch(i);
      lse_add(V::loadu(xs + i), vms, vits, sum);
    }
    if (ce_sep)
      for (int64_t i = 0; i < np; i += W) lse_add(V::loadu(xs + i), vms, s1);
  }
  std::fill(st, st + NSTAT, A(0));
  st[ST_MS] = ms;
  st[ST_LS] = kd_log(hsum(sum));
  st[ST_MT] = st[ST_LT] = kd_neg_inf<A>();
  st[ST_M1] = ms;
  st[ST_L1] = ce_sep ? kd_log(hsum(s1)) : st[ST_LS];
  st[ST_LABEL] = label >= 0 ? load_one<A>(s, ss, label) : A(0);
}

// gs of one row's range (see the top): g[r] of the row's GLOBAL statistics st, coef, and its
// sparse terms (column in the range, value) sorted by column: the slots' weights and, with
// CE, the label's -c_1.
template <class A>
void sparse_grad_row(const void* s, void* gs, at::ScalarType ss, int64_t v, bool ce,
                     bool ce_sep, A its, const A* st, A c_q, A c_1,
                     const std::vector<std::pair<int64_t, A>>& terms) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  // q = exp(lq), lq = (s - ms) / Ts - ls (safe_ref keeps -inf rows NaN-free); at Ts = 1
  // q1 = q and the two terms are one: (c_q + c_1) q
  const A ms = safe_ref(st[ST_MS]), ls = st[ST_LS];
  const A m1 = safe_ref(st[ST_M1]), l1 = st[ST_L1];
  const V vq(ce && !ce_sep ? c_q + c_1 : c_q), v1(c_1), vm1(m1), vl1(l1);
  size_t k = 0;
  if constexpr (std::is_same_v<A, float>) {
    if (ss == at::kFloat) {
      // float32: one pass, each vector read from s, formed and streamed to gs (store_vec
      // skips the read-for-ownership of every output line, as the dense backward does); the
      // few vectors that hold a sparse term go through a small buffer first
      const float* x = static_cast<const float*>(s);
      float* out = static_cast<float*>(gs);
      const V vms(ms), vits(its), vls(ls);
      for (int64_t i = 0; i < v; i += W) {
        const int64_t n = std::min(W, v - i);
        if (i + TILE < v) __builtin_prefetch(x + i + TILE, 0, 3);  // see NextTile
        const V xs = n == W ? V::loadu(x + i) : V::loadu(x + i, n);
        V g = vq * kd_exp((xs - vms) * vits - vls);
        if (ce_sep) g = g + v1 * ce_grad(xs, vm1, vl1, V(0));
        if (n == W && (k == terms.size() || terms[k].first >= i + W)) {
          store_vec(g, out + i);
          continue;
        }
        alignas(64) A buf[W];
        g.store(buf);
        for (; k < terms.size() && terms[k].first < i + n; ++k) buf[terms[k].first - i] += terms[k].second;
        V::loadu(buf).store(out + i, n);
      }
      store_fence();
      return;
    }
  }
  // other dtypes: tiles converted to A (kd_cpu_simd.h), rounded to s's dtype once when stored
  alignas(64) A g[TILE];
  alignas(64) A z1[TILE];
  for (int64_t off = 0; off < v; off += TILE) {
    const int64_t n = std::min(TILE, v - off);
    const int64_t np = round_up<A>(n);
    load_logp<A>(s, ss, off, n, g, ms, its, ls);
    if (ce_sep) load_tile<A>(s, ss, off, n, z1, false);
    const NextTile nx(s, ss, off + TILE, v);
    for (int64_t i = 0; i < np; i += W) {
      nx.touch(i);
      V x = vq * kd_exp(V::loadu(g + i));
      if (ce_sep) x = x + v1 * ce_grad(V::loadu(z1 + i), vm1, vl1, V(0));
      x.store(g + i);
    }
    for (; k < terms.size() && terms[k].first < off + n; ++k) g[terms[k].first - off] += terms[k].second;
    store_tile<A>(gs, ss, off, n, g);
  }
}

// The sparse terms of row r in the range [offset, offset + v): the slots whose GLOBAL id
// falls there, as (column, weight), and the label's (column, -c_1) when it has one; sorted by
// column (a slot may share the label's column: both terms are added).
template <class A>
void row_terms(const int64_t* ids, const A* w, int64_t kk, int64_t offset, int64_t v,
               int64_t label, A c_1, std::vector<std::pair<int64_t, A>>& out) {
  out.clear();
  for (int64_t k = 0; k < kk; ++k) {
    const int64_t c = ids[k] - offset;
    if (ids[k] >= 0 && c >= 0 && c < v) out.emplace_back(c, w[k]);
  }
  if (label >= 0) out.emplace_back(label, -c_1);
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
}

// The label's column in the range (-1 when outside or none) and whether the row is ignored.
std::pair<int64_t, bool> row_label(const int64_t* lab, int64_t i, int64_t offset, int64_t v,
                                   const Params& pr) {
  if (!lab) return {-1, false};
  const int64_t l = lab[i];
  if (l == pr.ignore_index) return {-1, true};
  return {l - offset >= 0 && l - offset < v ? l - offset : -1, false};
}

at::Tensor kd_sparse_partial_cpu(const at::Tensor& s, const c10::optional<at::Tensor>& labels,
                                 KD_PARAMS_DECL, int64_t offset) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_sparse_logits(s, labels, pr, true);
  TORCH_CHECK(offset >= 0, "kdkernels: offset must be >= 0, got ", offset);
  check_label_values(labels, -1, pr);
  const auto acc = acc_type(s);
  const int64_t n = s.size(0), v = s.size(1);
  auto stats = at::empty({n, NSTAT}, s.options().dtype(acc));
  const int64_t* lab = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  const bool ce = lab && pr.ce_weight != 0;
  const bool ce_sep = ce && pr.inv_ts != 1.0;
  const int64_t stride = s.stride(0);
  const size_t es = c10::elementSize(s.scalar_type());
  const char* sp = static_cast<const char*>(s.data_ptr());
  auto run = [&](auto zero) {
    using A = decltype(zero);
    A* out = stats.data_ptr<A>();
    at::parallel_for(0, n, grain(v), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        A* st = out + i * NSTAT;
        const auto [label, ignored] = row_label(lab, i, offset, v, pr);
        if (ignored) {  // kd_partial's ignored row, with the teacher's pair empty
          std::fill(st, st + NSTAT, A(0));
          st[ST_MT] = st[ST_LT] = kd_neg_inf<A>();
          continue;
        }
        sparse_stats_row<A>(sp + i * stride * es, s.scalar_type(), v, label, ce_sep,
                            A(pr.inv_ts), st);
      }
    });
  };
  if (acc == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
  return stats;
}

at::Tensor kd_sparse_grads_cpu(const at::Tensor& s, const c10::optional<at::Tensor>& labels,
                               const at::Tensor& stats, const at::Tensor& coef,
                               const at::Tensor& ids, const at::Tensor& w, KD_PARAMS_DECL,
                               int64_t offset) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_sparse_logits(s, labels, pr, true);
  TORCH_CHECK(offset >= 0, "kdkernels: offset must be >= 0, got ", offset);
  const auto acc = acc_type(s);
  check_sparse_rows(s, stats, coef, ids, w, acc);
  check_label_values(labels, -1, pr);
  const int64_t n = s.size(0), v = s.size(1), kk = ids.size(1);
  auto gs = at::empty({n, v}, s.options());
  advise_huge_pages(gs);
  const int64_t* lab = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  const bool ce = lab && pr.ce_weight != 0;
  const bool ce_sep = ce && pr.inv_ts != 1.0;
  const int64_t stride = s.stride(0);
  const auto ss = s.scalar_type();
  const size_t es = c10::elementSize(ss);
  const char* sp = static_cast<const char*>(s.data_ptr());
  char* gp = static_cast<char*>(gs.data_ptr());
  const int64_t* idp = ids.data_ptr<int64_t>();
  auto run = [&](auto zero) {
    using A = decltype(zero);
    const A* stp = stats.data_ptr<A>();
    const A* cp = coef.data_ptr<A>();
    const A* wp = w.data_ptr<A>();
    at::parallel_for(0, n, grain(v), [&](int64_t b, int64_t e) {
      std::vector<std::pair<int64_t, A>> terms;
      for (int64_t i = b; i < e; ++i) {
        void* out = gp + i * v * es;
        const auto [label, ignored] = row_label(lab, i, offset, v, pr);
        if (ignored) {
          std::memset(out, 0, v * es);
          continue;
        }
        const A c_1 = ce ? cp[2 * i + 1] : A(0);
        row_terms<A>(idp + i * kk, wp + i * kk, kk, offset, v, ce ? label : -1, c_1, terms);
        sparse_grad_row<A>(sp + i * stride * es, out, ss, v, ce, ce_sep, A(pr.inv_ts),
                           stp + i * NSTAT, cp[2 * i], c_1, terms);
      }
    });
  };
  if (acc == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
  return gs;
}

}  // namespace
}  // namespace kd

// The spec as LossSpec.as_args() passes it (kd_cpu.cpp's KD_SPEC_SCHEMA).
#define KD_SPARSE_SPEC_SCHEMA                                                           \
  "str kind, float mix, float coef_p, float coef_q, float inv_ts, float inv_tt, "        \
  "float kd_scale, float ce_weight, int ignore_index"

TORCH_LIBRARY_FRAGMENT(kdkernels, m) {
  // the student's statistics (N, NSTAT) of the columns [offset, offset + Vr) of rows; s may
  // be row-strided; the teacher's pair is empty (-inf)
  m.def("kd_sparse_partial(Tensor s, Tensor? labels, " KD_SPARSE_SPEC_SCHEMA
        ", int offset) -> Tensor");
  // gs (N, Vr) of a range given global stats, coef (N, 2) = (c_q, c_1), slot ids (N, K)
  // (global, -1 = empty) and weights w (N, K)
  m.def("kd_sparse_grads(Tensor s, Tensor? labels, Tensor stats, Tensor coef, Tensor ids, "
        "Tensor w, " KD_SPARSE_SPEC_SCHEMA ", int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("kd_sparse_partial", &kd::kd_sparse_partial_cpu);
  m.impl("kd_sparse_grads", &kd::kd_sparse_grads_cpu);
}
