// kd_sparse_cuda.cuh: CUDA kernels of the sparse-teacher ops (schemas and CPU kernels in
// kd_sparse_cpu.cpp, which states the math). Included by kd_cuda.cu inside its namespace, so
// the kernels share its 128-bit packs, for_elements, the block reductions and the host
// dispatch; kd_cuda.cu's TORCH_LIBRARY_IMPL registers the two ops.
//
//   kd_sparse_partial  stats kernel (a block per (row, split): the student's online (raw max,
//                      sum) at Ts and, with a separate CE pair, at T = 1) -> finalize (a thread
//                      per row merges the splits and writes the table row). 1 read of s.
//   kd_sparse_grads    one kernel: a block writes its columns of gs elementwise, then, after a
//                      barrier, rewrites the columns its slots name with the whole value
//                      recomputed plus the slot's weight (rounded to s's dtype once; ids are
//                      duplicate-free, so no two threads write one column). 1 read of s,
//                      1 write of gs, O(K) per row.
// s may be row-strided (a column slice of wider logits): rows are `stride` elements apart;
// packs are used where s's and gs's rows are 16-byte aligned at the same column.
// Math in float32; float64 logits are served on the CPU only (kdkernels/ext.py).

constexpr int SPARSE_NPART = 4;  // floats per partial state: ms, ss, m1, s1

template <class TS>
__global__ void __launch_bounds__(THREADS) kd_sparse_stats_kernel(
    const TS* __restrict__ s,             // (N, v) student logits, rows `stride` apart
    const int64_t* __restrict__ labels,   // (N,) labels or nullptr
    float* __restrict__ part,             // (N, splits, SPARSE_NPART) partial states out
    int64_t v, int64_t stride, int64_t chunk, float its, bool ce_sep, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t b = int64_t(blockIdx.y) * chunk, e = min(v, b + chunk);
  float* out = part + (row * gridDim.y + blockIdx.y) * SPARSE_NPART;
  if (labels && labels[row] == ignore_index) return;  // finalize writes the ignored row
  const TS* sr = s + row * stride;
  float ms = kd_neg_inf<float>(), ss = 0.f, s1 = 0.f;
  for_elements(b, e, row_pack_head<TS, TS>(sr, nullptr), [&](int64_t i, int cnt) {
    float xs[PACK];
    load_any(sr + i, cnt, xs);
    const float nms = kd_max(ms, pack_max(xs, cnt));
    lse_rebase(ss, ref_move(ms, nms, its));
    if (ce_sep) lse_rebase(s1, ref_move(ms, nms, 1.f));
    ms = nms;
    const float rs = safe_ref(ms);
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      if (k < cnt) {
        lse_add(xs[k], rs, its, ss);
        if (ce_sep) lse_add(xs[k], rs, s1);
      }
    }
  });
  // a NaN the pack maxima dropped is in the sum; a +inf maximum makes the sum NaN too
  // (inf - inf) and stays +inf, as the table's maxima are defined (kdkernels/_stats.py)
  if (ss != ss && ms != INFINITY) ms = NAN;
  float m1 = ms;
  block_merge_lse(ms, ss, its);
  if (ce_sep) {
    __syncthreads();  // block_merge_lse's shared slots are read by warp 0 above
    block_merge_lse(m1, s1, 1.f);
  }
  if (threadIdx.x == 0) out[0] = ms, out[1] = ss, out[2] = m1, out[3] = s1;
}

// A thread per row: merge the splits and write the table row (kd_layout.h): the student's
// pairs, LABEL, the teacher's empty pair, 0 sums; an ignored row is kd_partial's (0) with the
// teacher's pair empty.
template <class TS>
__global__ void kd_sparse_finalize_kernel(
    const TS* __restrict__ s,             // (N, v) student logits (for s[label])
    const int64_t* __restrict__ labels,   // (N,) global ids, or nullptr
    const float* __restrict__ part,       // (N, splits, SPARSE_NPART)
    float* __restrict__ stats,            // (N, NSTAT) out
    int64_t n, int64_t v, int64_t stride, int64_t offset, int splits, bool ce_sep,
    int64_t ignore_index, float its) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  float* st = stats + row * NSTAT;
  for (int c = 0; c < NSTAT; ++c) st[c] = 0.f;
  st[ST_MT] = st[ST_LT] = kd_neg_inf<float>();
  const int64_t lab = labels ? labels[row] : -1;
  if (labels && lab == ignore_index) return;
  float ms = kd_neg_inf<float>(), ss = 0.f, m1 = kd_neg_inf<float>(), s1 = 0.f;
  for (int k = 0; k < splits; ++k) {
    const float* q = part + (row * splits + k) * SPARSE_NPART;
    lse_merge(ms, ss, q[0], q[1], its);
    if (ce_sep) lse_merge(m1, s1, q[2], q[3], 1.f);
  }
  st[ST_MS] = ms;
  st[ST_LS] = kd_log(ss);
  st[ST_M1] = ms;  // raw: the same maximum at any temperature
  st[ST_L1] = ce_sep ? kd_log(s1) : st[ST_LS];
  const int64_t col = lab - offset;
  st[ST_LABEL] = labels && col >= 0 && col < v ? to_f(s[row * stride + col]) : 0.f;
}

// c_q q + c_1 (q1 - onehot) of one raw logit x (the dense part of sparse_grads' value)
__device__ __forceinline__ float sparse_grad_value(float x, bool onehot, float ms, float ls,
                                                   float m1, float l1, float c_q, float c_1,
                                                   float its, bool ce, bool ce_sep) {
  const float q = kd_exp((x - ms) * its - ls);
  float g = c_q * q;
  if (ce) g += c_1 * ((ce_sep ? kd_exp((x - m1) - l1) : q) - (onehot ? 1.f : 0.f));
  return g;
}

template <class TS>
__global__ void __launch_bounds__(THREADS) kd_sparse_grad_kernel(
    const TS* __restrict__ s,             // (N, v) student logits, rows `stride` apart
    const int64_t* __restrict__ labels,   // (N,) global ids, or nullptr
    const float* __restrict__ stats,      // (N, NSTAT) the rows' global merged statistics
    const float* __restrict__ coef,       // (N, 2): c_q, c_1
    const int64_t* __restrict__ ids,      // (N, k) global slot ids, -1 = empty
    const float* __restrict__ w,          // (N, k) slot weights
    TS* __restrict__ gs,                  // (N, v) out, contiguous
    int64_t v, int64_t stride, int64_t chunk, int64_t k, int64_t offset, float its, bool ce,
    bool ce_sep, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t b = int64_t(blockIdx.y) * chunk, e = min(v, b + chunk);
  const TS* sr = s + row * stride;
  TS* gsr = gs + row * v;
  const int64_t h = row_pack_head<TS, TS>(sr, nullptr, gsr, nullptr);
  const int64_t lab = labels ? labels[row] : -1;
  if (labels && lab == ignore_index) {
    const float zero[PACK] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for_elements(b, e, h, [&](int64_t i, int cnt) {
      if (cnt == PACK) {
        store_pack(gsr + i, zero);
      } else {
        gsr[i] = TS(0.f);
      }
    });
    return;
  }
  const float* st = stats + row * NSTAT;
  const float ms = safe_ref(st[ST_MS]), ls = st[ST_LS];
  const float m1 = safe_ref(st[ST_M1]), l1 = st[ST_L1];
  const float c_q = coef[2 * row], c_1 = ce ? coef[2 * row + 1] : 0.f;
  const int64_t label = lab - offset;  // the one-hot's column (outside [0, v): none)
  for_elements(b, e, h, [&](int64_t i, int cnt) {
    float xs[PACK], os[PACK];
    load_any(sr + i, cnt, xs);
#pragma unroll
    for (int j = 0; j < PACK; ++j)
      if (j < cnt)
        os[j] = sparse_grad_value(xs[j], ce && i + j == label, ms, ls, m1, l1, c_q, c_1, its,
                                  ce, ce_sep);
    if (cnt == PACK) {
      store_pack(gsr + i, os);
    } else {
      gsr[i] = TS(os[0]);
    }
  });
  // every thread's stores of the block's columns come before the slots' rewrites
  __syncthreads();
  for (int64_t j = threadIdx.x; j < k; j += THREADS) {
    const int64_t id = ids[row * k + j], col = id - offset;
    if (id < 0 || col < b || col >= e) continue;
    const float g = sparse_grad_value(to_f(sr[col]), ce && col == label, ms, ls, m1, l1, c_q,
                                      c_1, its, ce, ce_sep);
    gsr[col] = TS(g + w[row * k + j]);
  }
}

// Labels' values, as check_cuda_inputs checks them for a column range (ids >= 0).
void check_sparse_cuda_labels(const c10::optional<at::Tensor>& labels, const Params& pr) {
  if (labels.has_value() && labels->numel() > 0 &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    at::_assert_async(bad_labels(*labels, -1, pr).any().logical_not(),
                      "kdkernels: a label is outside the vocabulary and is not ignore_index");
  } else {
    check_label_values(labels, -1, pr);
  }
}

at::Tensor kd_sparse_partial_cuda(const at::Tensor& s, const c10::optional<at::Tensor>& labels,
                                  KD_PARAMS_DECL, int64_t offset) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  TORCH_CHECK(s.is_cuda(), "kdkernels CUDA: s must be a CUDA tensor");
  check_sparse_logits(s, labels, pr, false);
  TORCH_CHECK(offset >= 0, "kdkernels: offset must be >= 0, got ", offset);
  check_sparse_cuda_labels(labels, pr);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t n = s.size(0), v = s.size(1);
  auto stats = at::empty({n, NSTAT}, s.options().dtype(at::kFloat));
  if (n == 0) return stats;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Split sp_ = choose_split(n, v, s.get_device());
  const int64_t* lab = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  const bool ce_sep = lab && pr.ce_weight != 0 && pr.inv_ts != 1.0;
  auto part = at::empty({n, sp_.splits, SPARSE_NPART}, s.options().dtype(at::kFloat));
  const int64_t stride = n > 1 ? s.stride(0) : v;
  dispatch_half_types(s.scalar_type(), "s", [&](auto sz) {
    using TS = decltype(sz);
    const TS* sp_s = static_cast<const TS*>(s.data_ptr());
    kd_sparse_stats_kernel<TS><<<dim3(unsigned(n), unsigned(sp_.splits)), THREADS, 0, stream>>>(
        sp_s, lab, part.data_ptr<float>(), v, stride, sp_.chunk, float(pr.inv_ts), ce_sep,
        pr.ignore_index);
    KD_CUDA_CHECK(cudaGetLastError());
    kd_sparse_finalize_kernel<TS><<<int((n + 127) / 128), 128, 0, stream>>>(
        sp_s, lab, part.data_ptr<float>(), stats.data_ptr<float>(), n, v, stride, offset,
        sp_.splits, ce_sep, pr.ignore_index, float(pr.inv_ts));
    KD_CUDA_CHECK(cudaGetLastError());
  });
  return stats;
}

at::Tensor kd_sparse_grads_cuda(const at::Tensor& s, const c10::optional<at::Tensor>& labels,
                                const at::Tensor& stats, const at::Tensor& coef,
                                const at::Tensor& ids, const at::Tensor& w, KD_PARAMS_DECL,
                                int64_t offset) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  TORCH_CHECK(s.is_cuda(), "kdkernels CUDA: s must be a CUDA tensor");
  check_sparse_logits(s, labels, pr, false);
  TORCH_CHECK(offset >= 0, "kdkernels: offset must be >= 0, got ", offset);
  check_sparse_rows(s, stats, coef, ids, w, at::kFloat);
  check_sparse_cuda_labels(labels, pr);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t n = s.size(0), v = s.size(1), k = ids.size(1);
  auto gs = at::empty({n, v}, s.options());
  if (n == 0) return gs;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Split sp_ = choose_split(n, v, s.get_device());
  const int64_t* lab = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  const bool ce = lab && pr.ce_weight != 0;
  const int64_t stride = n > 1 ? s.stride(0) : v;
  dispatch_half_types(s.scalar_type(), "s", [&](auto sz) {
    using TS = decltype(sz);
    kd_sparse_grad_kernel<TS><<<dim3(unsigned(n), unsigned(sp_.splits)), THREADS, 0, stream>>>(
        static_cast<const TS*>(s.data_ptr()), lab, stats.data_ptr<float>(),
        coef.data_ptr<float>(), ids.data_ptr<int64_t>(), w.data_ptr<float>(),
        static_cast<TS*>(gs.data_ptr()), v, stride, sp_.chunk, k, offset, float(pr.inv_ts), ce,
        ce && pr.inv_ts != 1.0, pr.ignore_index);
    KD_CUDA_CHECK(cudaGetLastError());
  });
  return gs;
}
