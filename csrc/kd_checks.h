// kd_checks.h: the ops' argument handling shared by the CPU (kd_cpu.cpp) and CUDA
// (kd_cuda.cu) kernels: the spec's primitives to Params, and the checks of every input, so
// both devices reject the same bad input with the same message naming the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>

#include "kd_layout.h"
#include "kd_math.h"

namespace kd {

// The spec as the op schemas take it (KD_SPEC_SCHEMA in kd_cpu.cpp, LossSpec.as_args()).
#define KD_PARAMS_DECL                                                                   \
  const std::string &kind, double mix, double coef_p, double coef_q, double inv_ts,      \
      double inv_tt, double kd_scale, double ce_weight, int64_t ignore_index
#define KD_PARAMS_ARGS kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight, ignore_index

inline int parse_kind(const std::string& kind) {
  if (kind == "forward_kl") return FORWARD_KL;
  if (kind == "reverse_kl") return REVERSE_KL;
  if (kind == "mixture") return MIXTURE;
  if (kind == "soft_cross_entropy") return SOFT_CE;
  if (kind == "forward_reverse_kl") return FR_KL;
  if (kind == "tvd") return TVD;
  if (kind == "alpha_beta") return ALPHA_BETA;
  TORCH_CHECK(false, "kdkernels: kind must be forward_kl, reverse_kl, mixture, "
              "soft_cross_entropy, forward_reverse_kl, tvd or alpha_beta, got '", kind,
              "'");
  return -1;
}

inline Params make_params(KD_PARAMS_DECL) {
  return Params{parse_kind(kind), mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight,
                ignore_index};
}

// Rows the kernels read or write through a row stride: stride 1 along V, rows stride(0) >= V
// apart (any row stride: the first columns of wider logits are a view, never copied).
inline void check_rows(const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "kdkernels: ", name, " must be 2-D (rows, V), got ", x.sizes());
  const bool unit = x.size(1) <= 1 || x.stride(1) == 1;
  const bool apart = x.size(0) <= 1 || x.stride(0) >= x.size(1);
  TORCH_CHECK(unit && apart, "kdkernels: ", name,
              " must have rows of stride 1 along V (stride(1) == 1, stride(0) >= V), got "
              "strides ", x.strides());
}

// An output buffer of a gradient: like x (shape, dtype, device), any row stride.
inline void check_grad_out(const char* name, const at::Tensor& g, const at::Tensor& x) {
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type() &&
                  g.device() == x.device(),
              "kdkernels: ", name, " must have shape ", x.sizes(), ", dtype ", x.scalar_type(),
              " and device ", x.device(), ", got ", g.sizes(), " ", g.scalar_type(), " ",
              g.device());
  check_rows(name, g);
}

// Logits and spec. allow_double: whether float64 logits have kernels on this device.
inline void check_logits(const at::Tensor& s, const at::Tensor& t, const Params& pr,
                         bool allow_double) {
  TORCH_CHECK(s.dim() == 2, "kdkernels: s must be 2-D (rows, V), got ", s.sizes());
  TORCH_CHECK(t.sizes() == s.sizes(), "kdkernels: t must have s's shape ", s.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == s.device(), "kdkernels: t must be on s's device ", s.device(),
              ", got ", t.device());
  check_rows("s", s);
  check_rows("t", t);
  for (const auto* x : {&s, &t}) {
    const auto d = x->scalar_type();
    const bool ok = d == at::kFloat || d == at::kBFloat16 || d == at::kHalf ||
                    (allow_double && d == at::kDouble);
    TORCH_CHECK(ok, "kdkernels: ", x == &s ? "s" : "t", " must be ",
                allow_double ? "float32, float64, bfloat16 or float16"
                             : "float32, bfloat16 or float16 on this device",
                ", got ", d);
  }
  TORCH_CHECK(pr.inv_ts > 0 && pr.inv_tt > 0, "kdkernels: inv_ts and inv_tt must be > 0");
  TORCH_CHECK(pr.mix >= 0 && pr.mix <= 1, "kdkernels: mix must be in [0, 1], got ", pr.mix);
}

// Logits, spec and labels' metadata (not the label values: see check_label).
inline void check_inputs(const at::Tensor& s, const at::Tensor& t,
                         const c10::optional<at::Tensor>& labels, const Params& pr,
                         bool allow_double) {
  check_logits(s, t, pr, allow_double);
  if (labels.has_value()) {
    const auto& l = *labels;
    TORCH_CHECK(l.scalar_type() == at::kLong, "kdkernels: labels must be int64, got ",
                l.scalar_type());
    TORCH_CHECK(l.dim() == 1 && l.size(0) == s.size(0), "kdkernels: labels must have shape (",
                s.size(0), ",), got ", l.sizes());
    TORCH_CHECK(l.is_contiguous(), "kdkernels: labels must be contiguous");
    TORCH_CHECK(l.device() == s.device(), "kdkernels: labels must be on s's device ",
                s.device(), ", got ", l.device());
  } else {
    TORCH_CHECK(pr.ce_weight == 0, "kdkernels: ce_weight=", pr.ce_weight, " needs labels");
  }
}

// The (n, NSTAT) statistics a backward or a mixture pass 2 reads.
inline void check_stats(const at::Tensor& stats, int64_t n, at::ScalarType acc) {
  TORCH_CHECK(stats.scalar_type() == acc && stats.dim() == 2 && stats.size(0) == n &&
                  stats.size(1) == NSTAT && stats.is_contiguous(),
              "kdkernels: stats must be a contiguous (", n, ", ", NSTAT, ") ", acc,
              " table of row statistics, got ", stats.sizes(), " ", stats.scalar_type());
}

// One label's value: ignore_index, or a vocabulary id. Ops that see whole rows (offset 0,
// width v) know the vocabulary and check [0, v); range ops (v < 0) only see global ids and
// check >= 0.
inline void check_label(int64_t l, int64_t row, int64_t v, const Params& pr) {
  if (l == pr.ignore_index) return;
  TORCH_CHECK(l >= 0 && (v < 0 || l < v), "kdkernels: labels[", row, "] = ", l,
              " is outside [0, ", v < 0 ? std::string("V") : std::to_string(v),
              ") and is not ignore_index=", pr.ignore_index);
}

// The rows whose label is neither ignore_index nor an id check_label accepts: (N,) bool.
inline at::Tensor bad_labels(const at::Tensor& l, int64_t v, const Params& pr) {
  at::Tensor bad = l.lt(0);
  if (v >= 0) bad = bad.logical_or(l.ge(v));
  return bad.logical_and(l.ne(pr.ignore_index));
}

// Every label's value (check_label), before any kernel runs: one pass over the N labels
// and, on a GPU, one host sync (a device cannot raise an error naming the row).
inline void check_label_values(const c10::optional<at::Tensor>& labels, int64_t v,
                               const Params& pr) {
  if (!labels.has_value() || labels->numel() == 0) return;
  const at::Tensor& l = *labels;
  const at::Tensor bad = bad_labels(l, v, pr);
  if (!bad.any().item<bool>()) return;
  const int64_t row = bad.nonzero()[0][0].item<int64_t>();
  check_label(l[row].item<int64_t>(), row, v, pr);
}

}  // namespace kd

// ---- sparse teachers (kd_sparse_cpu.cpp, kd_sparse_cuda.cuh) -------------------------------

namespace kd {

// The student logits of a column range: (N, Vr) with unit column stride and any row stride
// >= Vr (a column slice of wider logits is read in place, never copied).
inline void check_sparse_logits(const at::Tensor& s, const c10::optional<at::Tensor>& labels,
                                const Params& pr, bool allow_double) {
  TORCH_CHECK(s.dim() == 2, "kdkernels: s must be 2-D (rows, Vr), got ", s.sizes());
  TORCH_CHECK((s.size(1) <= 1 || s.stride(1) == 1) &&
                  (s.size(0) <= 1 || s.stride(0) >= s.size(1)),
              "kdkernels: s must have unit column stride and a row stride >= Vr, got strides ",
              s.strides(), " for shape ", s.sizes());
  const auto d = s.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf ||
                  (allow_double && d == at::kDouble),
              "kdkernels: s must be ",
              allow_double ? "float32, float64, bfloat16 or float16"
                           : "float32, bfloat16 or float16 on this device",
              ", got ", d);
  TORCH_CHECK(pr.inv_ts > 0, "kdkernels: inv_ts must be > 0");
  if (labels.has_value()) {
    const auto& l = *labels;
    TORCH_CHECK(l.scalar_type() == at::kLong && l.dim() == 1 && l.size(0) == s.size(0) &&
                    l.is_contiguous() && l.device() == s.device(),
                "kdkernels: labels must be a contiguous int64 (", s.size(0), ",) tensor on ",
                s.device(), ", got ", l.scalar_type(), " ", l.sizes(), " on ", l.device());
  } else {
    TORCH_CHECK(pr.ce_weight == 0, "kdkernels: ce_weight=", pr.ce_weight, " needs labels");
  }
}

// The row scalars of sparse_grads: stats (N, NSTAT), coef (N, 2), ids (N, K) int64 and
// w (N, K), contiguous, on s's device; stats, coef and w in the accumulation type.
inline void check_sparse_rows(const at::Tensor& s, const at::Tensor& stats,
                              const at::Tensor& coef, const at::Tensor& ids, const at::Tensor& w,
                              at::ScalarType acc) {
  const int64_t n = s.size(0);
  check_stats(stats, n, acc);
  TORCH_CHECK(coef.scalar_type() == acc && coef.dim() == 2 && coef.size(0) == n &&
                  coef.size(1) == 2 && coef.is_contiguous(),
              "kdkernels: coef must be a contiguous (", n, ", 2) ", acc, " tensor, got ",
              coef.sizes(), " ", coef.scalar_type());
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == n &&
                  ids.is_contiguous(),
              "kdkernels: ids must be a contiguous int64 (", n, ", K) tensor, got ", ids.sizes(),
              " ", ids.scalar_type());
  TORCH_CHECK(w.scalar_type() == acc && w.sizes() == ids.sizes() && w.is_contiguous(),
              "kdkernels: w must be a contiguous ", acc, " tensor of ids' shape ", ids.sizes(),
              ", got ", w.sizes(), " ", w.scalar_type());
  for (const auto* x : {&stats, &coef, &ids, &w})
    TORCH_CHECK(x->device() == s.device(), "kdkernels: stats, coef, ids and w must be on s's ",
                "device ", s.device(), ", got ", x->device());
}

}  // namespace kd
