// kd_cpu.cpp: the kdkernels op schemas (TORCH_LIBRARY) and their CPU kernels.
//
// Math: see kd_math.h (every formula lives there). Loss of one row:
//   loss = kd_scale * D(p || q) + ce_weight * (lse1 - s[label]),  0 for ignored rows.
//
// Layout of a row's work. Rows run in parallel (at::parallel_for); a row is read in tiles of
// TILE elements. Each tile is converted to the accumulation type (float; double for float64
// logits) and copied into small stack buffers (L1-resident), so one kernel serves every pair
// of input dtypes. The tile's maximum of the RAW logits moves the row's references once per
// tile (kl_rebase); then the tile's elements are accumulated with Vectorized lanes against
// fixed references, each shifted logit formed as (x - m) * inv_t (kd_math.h). The vocabulary
// tail is padded with -inf in both logits, which by the padding rule contributes exactly 0
// (no scalar tail loop). Second passes (mixture pass 2, backward) load the tiles already
// shifted to log-probabilities lq, lp (load_logp). Every loop over a tile asks for the next
// tile's lines as it goes (NextTile, kd_cpu_simd.h), so memory and arithmetic overlap.
//
// Speed of the mixture's element loops: they are bound by arithmetic, not memory, and on the
// AVX-512 machine measured mostly by their count of multiplies and multiply-adds (one 512-bit
// one a cycle): in cache, pass 2 takes 16 cycles a vector, half of them -log(1 - z)'s
// polynomial (jsd's, which needs no sigmoid, is 2 atanh(s) instead: kd_math.h
// log1p_atanh_poly). Hence the weights' exp by a table and 6 multiply-adds (kd_cpu_simd.h
// kd_exp_nonpos), the larger sigmoid as 1 - z, row constants folded before the loop, and
// selects on mask registers (kd_nonneg). On AVX-512, jsd's and skew reverse KL's student
// gradients take their function of the log-ratio whole, from a table of polynomials picked
// by permutes (kd_cpu_simd.h softplus_table: 13 multiplies and permutes where exp(-|d|),
// log1p and the sigmoid take 19 to 21); in cache skew reverse KL's gradient element went
// from 10.6 to 8.0-8.7 ns a vector. A permute takes the multiply unit too: a table pays
// only where it replaces more than its permutes. An element is also one long dependency chain, of
// which the out-of-order window holds only a few: Estrin's scheme for log1p (kd_math.h
// log1p_unit_poly) and for the general exp (kd_cpu_simd.h kd_exp); -log(1 - z)
// (log1m_half_poly), where fewer operations at a deeper chain measured no slower, by its
// even and odd parts.
//
// Passes over memory (N x V each):
//   forward  forward/reverse KL: 1 read of s and t.  mixture: 1 for whole rows: pass 1
//            keeps its exps and the difference of the shifted logits in a per-thread row
//            buffer (Kept), from which pass 2 forms p, q and the log-ratio with a multiply or
//            an add each (no exp, no second read of s and t). A column range (kd_mix_partial)
//            reads s and t again in its pass 2.
//   backward 1 read of s and t, 1 write of grad_s (and grad_t when asked), in the input
//            dtype, already multiplied by the row's upstream gradient.
//   fused    (kd_fused_, inplace_backward) forward then backward of each row while it is in
//            cache; the gradient (upstream gradient 1) overwrites s. The mixture's backward
//            there forms its element from the forward's kept work (Kept) as pass 2 does: no
//            second read of s and t and none of their exps.
// Memory: no N x V temporaries; outputs are written once, float32 ones with non-temporal
// stores (store_vec), and fresh gradient buffers are advised to transparent huge pages
// (first-touch page faults of a 1 GB gradient otherwise cost about as much as writing it).
// Threads: at::parallel_for is OpenMP in torch's CPU builds, so ext_build.py builds with
// -fopenmp.
// Per-row statistics (the `stats` table, N x NSTAT in the accumulation type, columns of
// kd_layout.h = kdkernels/_stats.py) hold what backward needs: raw maxima and log-sums of
// both sides (never lse = m / T + log S rounded into one number: lp = (t - mt) / Tt - log St
// keeps precision for logits of +-1e4 at any T), the T = 1 statistics for CE, s[label], the
// KL accumulator and the divergence scalars.
// Column ranges: kd_partial (pass 1), kd_mix_partial (the mixture's pass 2 given global
// statistics) and kd_backward take the columns [offset, offset + Vr) of rows as (N, Vr)
// tensors, with GLOBAL labels; kdkernels/_stats.py merges and finishes the ranges' tables.
// kd_forward and kd_fused_ are the whole row as one range, finished here.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// the vector overloads of kd_math.h's primitives, then kd_math.h, then the tile I/O
#include "kd_cpu_simd.h"
#include "kd_checks.h"

namespace kd {
namespace {

constexpr int64_t TILE = 1024;

// One row's inputs/outputs (the columns [offset, offset + v) of a row of a wider
// vocabulary for the range ops): base pointers already offset to the row.
struct Row {
  const void* s;  // (v,) student logits, dtype ss
  const void* t;  // (v,) teacher logits, dtype tt
  void* gs;       // (v,) grad of s (dtype ss) or nullptr
  void* gt;       // (v,) grad of t (dtype tt) or nullptr
  at::ScalarType ss, tt;
  int64_t v;
  bool ce;        // the row has a CE term (labels given, ce_weight != 0, not ignored)
  int64_t label;  // the label's column in this range, -1 when none (or no labels)
};

// Calls f(fast, unit, sides) (std::bool_constant, std::bool_constant, MixSides constant) with
// the mixture element path of these coefficients (kd_math.h mix_elem): FAST where one exp
// gives p and q, UNIT for jsd (u = 1), SIDES MIX_P for skew forward KL (cq = 0) and MIX_Q for
// skew reverse KL (cp = 0).
template <int SIDES>
using mix_sides = std::integral_constant<int, SIDES>;
template <class S, class F>
void with_mix_mode(const MixCoef<S>& c, const F& f) {
  using yes = std::true_type;
  using no = std::false_type;
  if (c.one_exp && c.unit_u) return f(yes{}, yes{}, mix_sides<MIX_BOTH>{});
  if (c.one_exp && mix_sides_match<MIX_P>(c)) return f(yes{}, no{}, mix_sides<MIX_P>{});
  if (c.one_exp && mix_sides_match<MIX_Q>(c)) return f(yes{}, no{}, mix_sides<MIX_Q>{});
  if (c.one_exp) return f(yes{}, no{}, mix_sides<MIX_BOTH>{});
  f(no{}, no{}, mix_sides<MIX_BOTH>{});
}

// ---- forward of one row -------------------------------------------------------------------

// Pass 1's work on a whole row, kept for pass 2 of the mixture (forward_row): es, et hold
// exp(zs), exp(zt) of every element, zs = (s - ref) inv_ts and zt alike against the side's
// running reference of its tile, dz holds zt - zs, and refs[2k], refs[2k + 1] are those
// references (raw running maxima, safe_ref'd where used) for tile k. Pass 2 then forms
// q = es exp((ref - ms) / Ts - ls) and p alike with one multiply each instead of an exp
// (the element is bound by its transcendental functions; see the top), and the log-ratio
// d = lp - lq + logit as dz plus a constant of the tile, without reading s and t again.
// es, et, dz have room for round_up(v, TILE) elements, refs for 2 per tile.
template <class A>
struct Kept {
  A* es;
  A* et;
  A* dz;
  A* refs;
};

// The factor of pass 1's kept exps against reference `ref` that gives the log-probability's
// exp, exp((x - m) inv_t - l): exp((ref - m) inv_t - l), references made safe as pass 1 and
// 2 make them; 0 for a tile whose reference is -inf (its kept exps are all 0).
template <class A>
A kept_factor(A ref, A m, A inv_t, A l) {
  return ref == kd_neg_inf<A>() ? A(0) : kd_exp((ref - safe_ref(m)) * inv_t - l);
}

// Tile off of a row's kept work against the row's GLOBAL statistics g, as pass 2 and the
// fused backward read it: q(i) and p(i) are the kept exps times wq and wp (the caller's
// weights) turned into q and p, d(i) the log-ratio d = lp - lq + logit (lq = zs + (ref_s -
// ms) / Ts - ls and lp alike, so d = dz + a constant of the tile).
template <class A>
struct KeptTile {
  using V = Vectorized<A>;
  const A* es;
  const A* et;
  const A* dz;
  V fq, fp, cd;
  V q(int64_t i) const { return V::loadu(es + i) * fq; }
  V p(int64_t i) const { return V::loadu(et + i) * fp; }
  V d(int64_t i) const { return V::loadu(dz + i) + cd; }
};

template <class A>
KeptTile<A> kept_tile(const Kept<A>& k, int64_t off, const A* g, A its, A itt, A logit, A wq,
                      A wp) {
  const A* ref = k.refs + 2 * (off / TILE);
  const A ms = safe_ref(g[ST_MS]), ls = g[ST_LS], mt = safe_ref(g[ST_MT]), lt = g[ST_LT];
  const A cd = ((safe_ref(ref[1]) - mt) * itt - lt) - ((safe_ref(ref[0]) - ms) * its - ls);
  return {k.es + off, k.et + off, k.dz + off,
          Vectorized<A>(kept_factor(ref[0], g[ST_MS], its, ls) * wq),
          Vectorized<A>(kept_factor(ref[1], g[ST_MT], itt, lt) * wp), Vectorized<A>(cd + logit)};
}

// Pass 1's side columns of a row's statistics (kd_layout.h): the (raw maximum, log-sum)
// pairs of both sides from their running maxima and sums, the T = 1 pair for CE (the
// student's pair unless ce_sep, then the T = 1 sum s1 against the same maximum) and
// s[label]. The divergence columns are the caller's.
template <class A>
void put_pairs(const Row& r, A* st, A ms, A ss, A mt, A stt, A s1, bool ce_sep) {
  st[ST_MS] = ms;
  st[ST_LS] = kd_log(ss);
  st[ST_MT] = mt;
  st[ST_LT] = kd_log(stt);
  st[ST_M1] = ms;
  st[ST_L1] = ce_sep ? kd_log(s1) : st[ST_LS];
  st[ST_LABEL] = r.label >= 0 ? load_one<A>(r.s, r.ss, r.label) : A(0);
}

// Pass 1 of every kind: fills st[0:NSTAT] with the statistics of the row's range (layout of
// kd_layout.h: MS..L1, LABEL, ACC; DIV, B, UQ, UP = 0). Returns sum exp(zs - ms) and
// sum exp(zt - mt) (the log-sums before their log, for kl_value).
// keep (MIXTURE, whole rows): where pass 1's exps are kept for pass 2, or nullptr.
template <class A, int K>
std::pair<A, A> stats_row(const Row& r, const Params& pr, A* st, Kept<A>* keep = nullptr) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  constexpr bool REV = K == REVERSE_KL;
  alignas(64) A xs[TILE];
  alignas(64) A xt[TILE];
  const A its = A(pr.inv_ts), itt = A(pr.inv_tt);
  // the T = 1 log-sum differs from the student's; its maximum is the student's (raw)
  const bool ce_sep = r.ce && pr.inv_ts != 1.0;
  const A ninf = kd_neg_inf<A>();
  A ms = ninf, mt = ninf;
  V ss(0), stt(0), acc(0), s1(0);
  const V vits(its), vitt(itt);
  for (int64_t off = 0; off < r.v; off += TILE) {
    const int64_t n = std::min(TILE, r.v - off);
    const int64_t np = round_up<A>(n);
    const A ts = load_tile<A>(r.s, r.ss, off, n, xs);
    const A tt = load_tile<A>(r.t, r.tt, off, n, xt);
    const NextTile ns(r.s, r.ss, off + TILE, r.v), nt(r.t, r.tt, off + TILE, r.v);
    const A nms = kd_max_nan(ms, ts), nmt = kd_max_nan(mt, tt);
    if (K == MIXTURE) {
      lse_rebase(ss, ref_move(ms, nms, its));
      lse_rebase(stt, ref_move(mt, nmt, itt));
    } else {
      kl_rebase<REV>(ss, stt, acc, ref_move(ms, nms, its), ref_move(mt, nmt, itt));
    }
    if (ce_sep) lse_rebase(s1, ref_move(ms, nms, A(1)));
    ms = nms;
    mt = nmt;
    const V vms(safe_ref(ms)), vmt(safe_ref(mt));
    if (K == MIXTURE && keep) {
      A* es = keep->es + off;
      A* et = keep->et + off;
      A* dz = keep->dz + off;
      for (int64_t i = 0; i < np; i += W) {
        ns.touch(i);
        nt.touch(i);
        // lse_add's terms and the difference of their arguments, stored
        const V zs = (V::loadu(xs + i) - vms) * vits;
        const V zt = (V::loadu(xt + i) - vmt) * vitt;
        const V e_s = kd_exp_nonpos(zs);
        const V e_t = kd_exp_nonpos(zt);
        ss = ss + e_s;
        stt = stt + e_t;
        e_s.store(es + i);
        e_t.store(et + i);
        (zt - zs).store(dz + i);
      }
      keep->refs[2 * (off / TILE)] = ms;
      keep->refs[2 * (off / TILE) + 1] = mt;
    } else if (K == MIXTURE) {
      for (int64_t i = 0; i < np; i += W) {
        ns.touch(i);
        nt.touch(i);
        lse_add(V::loadu(xs + i), vms, vits, ss);
        lse_add(V::loadu(xt + i), vmt, vitt, stt);
      }
    } else {
      for (int64_t i = 0; i < np; i += W) {
        ns.touch(i);
        nt.touch(i);
        kl_add<REV>(V::loadu(xs + i), V::loadu(xt + i), vms, vmt, vits, vitt, ss, stt, acc);
      }
    }
    if (ce_sep)
      for (int64_t i = 0; i < np; i += W) lse_add(V::loadu(xs + i), vms, s1);
  }
  const A ss_ = hsum(ss), st_ = hsum(stt);
  put_pairs<A>(r, st, ms, ss_, mt, st_, ce_sep ? hsum(s1) : A(0), ce_sep);
  st[ST_DIV] = st[ST_B] = st[ST_UQ] = st[ST_UP] = A(0);
  st[ST_ACC] = K == MIXTURE ? A(0) : hsum(acc);
  return {ss_, st_};
}

// Pass 2 of the mixture over the row's range given the row's GLOBAL statistics g:
// out[0:4] = (A, B, Uq, Up) sums over the range (kd_layout.h's DIV, B, UQ, UP). For jsd
// (unit_u, u = 1) Uq and Up are the range's sums of q and p (so the ranges of a row add up
// to 1, the whole row's value) when unit_sums, else left 0 (the caller knows they are 1).
// keep: pass 1's kept work on the whole row (forward_row, unit_sums false), or nullptr.
template <class A>
void mix_row(const Row& r, const Params& pr, const A* g, A* out, bool unit_sums,
             const Kept<A>* keep = nullptr) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  alignas(64) A zs[TILE];
  alignas(64) A zt[TILE];
  const A its = A(pr.inv_ts), itt = A(pr.inv_tt);
  const MixCoef<A> c = mix_coef_of<A>(pr.mix, pr.coef_p, pr.coef_q);
  V sa(0), sb(0), suq(0), sup(0);
  // lq = (s - ms) / Ts - log Ss (load_logp): never through a rounded lse
  const A ms = safe_ref(g[ST_MS]), ls = g[ST_LS], mt = safe_ref(g[ST_MT]), lt = g[ST_LT];
  with_mix_mode(c, [&](auto fast, auto unit, auto sides) {
    constexpr bool F = decltype(fast)::value, U = decltype(unit)::value;
    constexpr int SD = decltype(sides)::value;
    // the FAST kept path is given a p and (1-a) q (mix_elem), so its sums of p terms carry a
    // factor a and those of q terms 1 - a, divided out once at the end
    const A wp = F && keep ? c.a : A(1), wq = F && keep ? c.one_ma : A(1);
    for (int64_t off = 0; off < r.v; off += TILE) {
      const int64_t n = std::min(TILE, r.v - off);
      const int64_t np = round_up<A>(n);
      V a(sa), b(sb), uq(suq), up(sup);  // local: no spills of the captured sums
      if (keep) {
        const KeptTile<A> k = kept_tile(*keep, off, g, its, itt, c.logit, wq, wp);
        for (int64_t i = 0; i < np; i += W)
          mix_add<F, U, SD, true>(V(0), k.d(i), c, a, b, uq, up, k.q(i), k.p(i));
      } else {
        load_logp<A>(r.s, r.ss, off, n, zs, ms, its, ls);  // lq
        load_logp<A>(r.t, r.tt, off, n, zt, mt, itt, lt);  // lp
        const NextTile ns(r.s, r.ss, off + TILE, r.v), nt(r.t, r.tt, off + TILE, r.v);
        for (int64_t i = 0; i < np; i += W) {
          ns.touch(i);
          nt.touch(i);
          mix_add<F, U, SD>(V::loadu(zs + i), V::loadu(zt + i), c, a, b, uq, up);
        }
      }
      if (c.unit_u && unit_sums) {
        // u = 1: sum q u = sum q (padding is exp(-inf) = 0)
        for (int64_t i = 0; i < np; i += W) {
          uq = uq + kd_exp_nonpos(V::loadu(zs + i));
          up = up + kd_exp_nonpos(V::loadu(zt + i));
        }
      }
      sa = a, sb = b, suq = uq, sup = up;
    }
    if (F && keep) {
      sa = sa / V(wp);
      sb = sb / V(wq);
      suq = suq / V(wq);
      sup = sup / V(wp);
    }
    if constexpr (SD != MIX_BOTH) {  // one side: u's constant, left out of the element
      suq = suq * V(mix_u_unit<SD>(c));
      sup = sup * V(mix_u_unit<SD>(c));
    }
  });
  out[0] = hsum(sa);
  out[1] = hsum(sb);
  out[2] = hsum(suq);
  out[3] = hsum(sup);
}

// The whole row (offset 0): fills st[0:NSTAT] (DIV = D for the KL kinds; A, B, Uq, Up for
// the mixture) and returns the row loss (row must not be ignored).
template <class A, int K>
A forward_row(const Row& r, const Params& pr, A* st, Kept<A>* keep = nullptr) {
  constexpr bool REV = K == REVERSE_KL;
  const auto [ss, stt] = stats_row<A, K>(r, pr, st, keep);
  A d;
  if (K == MIXTURE) {
    mix_row<A>(r, pr, st, st + ST_DIV, false, keep);
    const MixCoef<A> c = mix_coef_of<A>(pr.mix, pr.coef_p, pr.coef_q);
    if (c.unit_u) st[ST_UQ] = st[ST_UP] = A(1);  // jsd: u = 1, so sum q u = sum q = 1
    d = (c.cp != A(0) ? c.cp * st[ST_DIV] : A(0)) + (c.cq != A(0) ? c.cq * st[ST_B] : A(0));
  } else {
    d = kl_value<REV>(ss, stt, st[ST_ACC]);
    st[ST_DIV] = d;
  }
  A loss = A(pr.kd_scale) * d;
  // CE = (m1 - s[label]) + l1: m1 and s[label] are close (the label is likely), so their
  // difference is exact where m1 + l1 would round at |s| ~ 1e4
  if (r.ce) loss += A(pr.ce_weight) * ((st[ST_M1] - st[ST_LABEL]) + st[ST_L1]);
  // a NaN, a +inf or no finite logit on a side (its maximum is not finite): NaN (kd_math.h)
  if (!row_has_softmax(st[ST_MS], st[ST_MT])) loss = A(NAN);
  return loss;
}

// ---- soft_cross_entropy, forward_reverse_kl (one pass), tvd, alpha_beta (two passes) ------

// Pass 1 of SOFT_CE / FR_KL (stats_row's layout; FR_KL's reverse accumulator in ST_B).
// Returns sum exp(zs - ms) and sum exp(zt - mt).
template <class A, int K>
std::pair<A, A> kl2_stats_row(const Row& r, const Params& pr, A* st) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  alignas(64) A xs[TILE];
  alignas(64) A xt[TILE];
  const A its = A(pr.inv_ts), itt = A(pr.inv_tt);
  const bool ce_sep = r.ce && pr.inv_ts != 1.0;
  const A ninf = kd_neg_inf<A>();
  A ms = ninf, mt = ninf;
  V ss(0), stt(0), acc(0), accb(0), s1(0);
  const V vits(its), vitt(itt);
  for (int64_t off = 0; off < r.v; off += TILE) {
    const int64_t n = std::min(TILE, r.v - off);
    const int64_t np = round_up<A>(n);
    const A ts = load_tile<A>(r.s, r.ss, off, n, xs);
    const A tt = load_tile<A>(r.t, r.tt, off, n, xt);
    const NextTile ns(r.s, r.ss, off + TILE, r.v), nt(r.t, r.tt, off + TILE, r.v);
    const A nms = kd_max_nan(ms, ts), nmt = kd_max_nan(mt, tt);
    kl2_rebase<K>(ss, stt, acc, accb, ref_move(ms, nms, its), ref_move(mt, nmt, itt));
    if (ce_sep) lse_rebase(s1, ref_move(ms, nms, A(1)));
    ms = nms;
    mt = nmt;
    const V vms(safe_ref(ms)), vmt(safe_ref(mt));
    V a(acc), b(accb), ls(ss), lt(stt);  // local: no spills of the captured sums
    for (int64_t i = 0; i < np; i += W) {
      ns.touch(i);
      nt.touch(i);
      kl2_add<K>(V::loadu(xs + i), V::loadu(xt + i), vms, vmt, vits, vitt, ls, lt, a, b);
    }
    acc = a, accb = b, ss = ls, stt = lt;
    if (ce_sep)
      for (int64_t i = 0; i < np; i += W) lse_add(V::loadu(xs + i), vms, s1);
  }
  const A ss_ = hsum(ss), st_ = hsum(stt);
  put_pairs<A>(r, st, ms, ss_, mt, st_, ce_sep ? hsum(s1) : A(0), ce_sep);
  st[ST_DIV] = st[ST_UQ] = st[ST_UP] = A(0);
  st[ST_B] = K == FR_KL ? hsum(accb) : A(0);
  st[ST_ACC] = hsum(acc);
  return {ss_, st_};
}

// Pass 2 of TVD / ALPHA_BETA over the row's range given its GLOBAL statistics g:
// out[0:4] = (D or T, 0, UQ, UP) sums over the range (kd_math.h's pw_add).
template <class A, int K>
void pw_row(const Row& r, const Params& pr, const A* g, A* out) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  alignas(64) A zs[TILE];
  alignas(64) A zt[TILE];
  const A its = A(pr.inv_ts), itt = A(pr.inv_tt);
  const PwCoef<A> c = pw_coef(A(pr.coef_p), A(pr.coef_q));
  V sd(0), suq(0), sup(0);
  const A ms = safe_ref(g[ST_MS]), ls = g[ST_LS], mt = safe_ref(g[ST_MT]), lt = g[ST_LT];
  for (int64_t off = 0; off < r.v; off += TILE) {
    const int64_t n = std::min(TILE, r.v - off);
    const int64_t np = round_up<A>(n);
    load_logp<A>(r.s, r.ss, off, n, zs, ms, its, ls);  // lq
    load_logp<A>(r.t, r.tt, off, n, zt, mt, itt, lt);  // lp
    const NextTile ns(r.s, r.ss, off + TILE, r.v), nt(r.t, r.tt, off + TILE, r.v);
    V d(sd), uq(suq), up(sup);
    for (int64_t i = 0; i < np; i += W) {
      ns.touch(i);
      nt.touch(i);
      pw_add<K>(V::loadu(zs + i), V::loadu(zt + i), c, d, uq, up);
    }
    sd = d, suq = uq, sup = up;
  }
  out[0] = hsum(sd);
  out[1] = A(0);
  out[2] = hsum(suq);
  out[3] = hsum(sup);
}

// Pass 1 of any kind: the KL kinds' own, the lse pairs for the two-pass kinds.
template <class A, int K>
std::pair<A, A> stats_any(const Row& r, const Params& pr, A* st) {
  if constexpr (K == SOFT_CE || K == FR_KL) {
    return kl2_stats_row<A, K>(r, pr, st);
  } else if constexpr (K == TVD || K == ALPHA_BETA) {
    return stats_row<A, MIXTURE>(r, pr, st);
  } else {
    return stats_row<A, K>(r, pr, st);
  }
}

// forward_row of the kinds above: fills st (finished: DIV, B, UQ, UP as _stats.finish) and
// returns the row loss.
template <class A, int K>
A forward_row2(const Row& r, const Params& pr, A* st) {
  const auto [ss, stt] = stats_any<A, K>(r, pr, st);
  A d;
  if constexpr (K == TVD || K == ALPHA_BETA) {
    pw_row<A, K>(r, pr, st, st + ST_DIV);
    d = K == TVD ? A(0.5) * st[ST_DIV] : st[ST_DIV];
  } else {
    A dv[2];
    d = kl2_value<K>(ss, stt, st[ST_ACC], st[ST_B], A(pr.coef_p), A(pr.coef_q), dv);
    st[ST_DIV] = dv[0];
    st[ST_B] = dv[1];
  }
  A loss = A(pr.kd_scale) * d;
  if (r.ce) loss += A(pr.ce_weight) * ((st[ST_M1] - st[ST_LABEL]) + st[ST_L1]);
  if (!row_has_softmax(st[ST_MS], st[ST_MT])) loss = A(NAN);
  return loss;
}

// ---- backward of one row ------------------------------------------------------------------

// Writes g * d loss / d s of the row's range into r.gs (and / d t into r.gt when not null),
// given the row's GLOBAL finished statistics st (DIV = D, or A, B, Uq, Up).
// keep (MIXTURE, the fused forward and backward of a whole row): pass 1's work on the row,
// kept by its forward. The element is then formed from the kept exps and log-ratio as pass 2
// forms it (mix_row), without reading s and t again and without their two exps; used on the
// FAST path of rows with a softmax on both sides and no hard-label term (whose gradient needs
// the student's T = 1 softmax), else the logits are read as below.
template <class A, int K>
void backward_row(const Row& r, const Params& pr, const A* st, A g,
                  const Kept<A>* keep = nullptr) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  constexpr bool REV = K == REVERSE_KL;
  alignas(64) A zs[TILE];
  alignas(64) A zt[TILE];
  alignas(64) A z1[TILE];
  const A its = A(pr.inv_ts), itt = A(pr.inv_tt);
  const bool ce = r.ce;
  const bool ce_sep = ce && pr.inv_ts != 1.0;
  const A cs = g * A(pr.kd_scale) * its;  // chain rule: dD/dzs / Ts
  const A ct = g * A(pr.kd_scale) * itt;
  const A cce = ce ? g * A(pr.ce_weight) : A(0);
  const A D = st[ST_DIV], B = st[ST_B], Uq = st[ST_UQ], Up = st[ST_UP];
  const MixCoef<A> c = mix_coef_of<A>(pr.mix, pr.coef_p, pr.coef_q);
  const PwCoef<A> pwc = pw_coef(A(pr.coef_p), A(pr.coef_q));
  // lq = (s - ms) / Ts - log Ss (load_logp), never s / Ts - lse with lse rounded; safe_ref
  // keeps -inf rows NaN-free
  const A ms = safe_ref(st[ST_MS]), ls = st[ST_LS], mt = safe_ref(st[ST_MT]), lt = st[ST_LT];
  // CE's softmax(s) = exp((z1 - m1) - l1): z1 = s raw (ce_sep); else the T = 1 statistics
  // are the student's and softmax(s) = exp(lq), so z1 = lq, m1 = l1 = 0
  const A m1 = ce_sep ? safe_ref(st[ST_M1]) : A(0), l1 = ce_sep ? st[ST_L1] : A(0);
  // element gradient (lane type X): the same code for the vector body and the label fix-up;
  // NT: whether the teacher's gradient is formed at all; its constants captured by value
  // (fast, unit, sides: the mixture's element path, see with_mix_mode)
  auto elem = [=](auto nt, auto fast, auto unit, auto sides, auto lq, auto lp, auto z1v,
                  auto onehot, auto& gsv, auto& gtv) {
    using X = std::decay_t<decltype(lq)>;
    constexpr bool NT = decltype(nt)::value;
    constexpr bool F = decltype(fast)::value, U = decltype(unit)::value;
    constexpr int SD = decltype(sides)::value;
    if constexpr (K == MIXTURE) {
      // cs, ct folded into the mixture's row constants
      mix_grad<NT, F, U, SD, true>(lq, lp, c, D, B, Uq, Up, gsv, gtv, cs, ct);
    } else if constexpr (K == SOFT_CE || K == FR_KL) {
      kl2_grad<K, NT>(lq, lp, D, B, A(pr.coef_p), A(pr.coef_q), gsv, gtv);
    } else if constexpr (K == TVD || K == ALPHA_BETA) {
      pw_grad<K, NT>(lq, lp, pwc, Uq, Up, gsv, gtv);
    } else {
      kl_grad<REV, NT>(lq, lp, X(D), gsv, gtv);
    }
    if constexpr (K != MIXTURE) {
      gsv = gsv * X(cs);
      gtv = gtv * X(ct);
    }
    if (ce) gsv = gsv + X(cce) * ce_grad(z1v, X(m1), X(l1), onehot);
  };
  // float32 outputs are stored in place from the vector loop; others go through a buffer
  A* gs_direct = nullptr;
  A* gt_direct = nullptr;
  if constexpr (std::is_same_v<A, float>) {
    if (r.ss == at::kFloat) gs_direct = static_cast<A*>(r.gs);
    if (r.gt && r.tt == at::kFloat) gt_direct = static_cast<A*>(r.gt);
  }
  // One vector of the gradients at column off + i of a tile of n: float32 outputs stored
  // directly, the others into the tile buffers (read already) for flush. Captured by value,
  // as el below.
  A* const zsb = zs;
  A* const ztb = zt;
  const auto put = [gs_direct, gt_direct, zsb, ztb](auto nt, const V& gsv, const V& gtv,
                                                    int64_t off, int64_t i, int64_t n) {
    const auto one = [&](const V& g, A* direct, A* buf) {
      if (direct && i + W <= n) {
        store_vec(g, direct + off + i);
      } else if (direct) {
        g.store(direct + off + i, n - i);
      } else {
        g.store(buf + i);
      }
    };
    one(gsv, gs_direct, zsb);
    if (decltype(nt)::value) one(gtv, gt_direct, ztb);
  };
  const auto flush = [&](auto nt, int64_t off, int64_t n) {
    if (!gs_direct) store_tile<A>(r.gs, r.ss, off, n, zs);
    if (decltype(nt)::value && !gt_direct) store_tile<A>(r.gt, r.tt, off, n, zt);
  };
  auto tiles = [&](auto nt, auto fast, auto unit, auto sides) {
    // a copy of the element's constants local to this loop: the vector stores may alias any
    // memory, so constants read through references would be reloaded for every vector
    const auto el = elem;
    for (int64_t off = 0; off < r.v; off += TILE) {
      const int64_t n = std::min(TILE, r.v - off);
      const int64_t np = round_up<A>(n);
      load_logp<A>(r.s, r.ss, off, n, zs, ms, its, ls);  // lq
      load_logp<A>(r.t, r.tt, off, n, zt, mt, itt, lt);  // lp
      const NextTile ns(r.s, r.ss, off + TILE, r.v), nxt(r.t, r.tt, off + TILE, r.v);
      const A* z1p = zs;
      if (ce_sep) {
        load_tile<A>(r.s, r.ss, off, n, z1, false);
        z1p = z1;
      }
      for (int64_t i = 0; i < np; i += W) {
        ns.touch(i);
        nxt.touch(i);
        V gsv, gtv;
        el(nt, fast, unit, sides, V::loadu(zs + i), V::loadu(zt + i), V::loadu(z1p + i), V(0),
           gsv, gtv);
        put(nt, gsv, gtv, off, i, n);
      }
      flush(nt, off, n);
    }
  };
  // the kept path (see above): pass 2's element (mix_elem's FAST GIVEN path: q and p come
  // as (1-a) q and a p, whose factors ks / (1-a) and kt / a take out)
  auto kept_tiles = [&](auto nt, auto unit, auto sides) {
    constexpr bool NT = decltype(nt)::value, U = decltype(unit)::value;
    constexpr int SD = decltype(sides)::value;
    constexpr bool LOG = mix_grad_log<NT, SD>();
    const A ks = cs / c.one_ma, kt = ct / c.a;
    for (int64_t off = 0; off < r.v; off += TILE) {
      const int64_t n = std::min(TILE, r.v - off);
      const int64_t np = round_up<A>(n);
      const KeptTile<A> k = kept_tile(*keep, off, st, its, itt, c.logit, c.one_ma, c.a);
      for (int64_t i = 0; i < np; i += W) {
        const MixElem<V> e = mix_elem<NT, true, U, SD, LOG, true>(V(0), k.d(i), c, k.q(i), k.p(i));
        V gsv, gtv;
        mix_grad_fast<NT, U, SD>(e, c, D, B, Uq, Up, gsv, gtv, ks, kt);
        put(nt, gsv, gtv, off, i, n);
      }
      flush(nt, off, n);
    }
  };
  auto run = [&](auto fast, auto unit, auto sides) {
    bool kept = false;
    if constexpr (K == MIXTURE && decltype(fast)::value) {
      kept = keep && !ce && row_has_softmax(st[ST_MS], st[ST_MT]);
      if (kept && r.gt) {
        kept_tiles(std::true_type{}, unit, sides);
      } else if (kept) {
        kept_tiles(std::false_type{}, unit, sides);
      }
    }
    if (!kept && r.gt) {
      tiles(std::true_type{}, fast, unit, sides);
    } else if (!kept) {
      tiles(std::false_type{}, fast, unit, sides);
    }
    store_fence();
    if (ce && r.label >= 0) {
      // the label's element again, with its one-hot term (s[label] from stats: s may be gone)
      const A sl = st[ST_LABEL];
      const A tl = load_one<A>(r.t, r.tt, r.label);
      A gsv, gtv;
      const A lql = (sl - ms) * its - ls;
      elem(std::false_type{}, fast, unit, sides, lql, (tl - mt) * itt - lt, ce_sep ? sl : lql,
           A(1), gsv, gtv);
      store_one<A>(r.gs, r.ss, r.label, gsv);
    }
  };
  if constexpr (K == MIXTURE) {
    with_mix_mode(c, run);
  } else {
    run(std::false_type{}, std::false_type{}, mix_sides<MIX_BOTH>{});
  }
}

template <class A>
void zero_row(void* base, at::ScalarType st, int64_t v) {
  if (base) std::memset(base, 0, v * c10::elementSize(st));
}

// ---- op plumbing --------------------------------------------------------------------------

at::ScalarType acc_type(const at::Tensor& s) {
  return s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t grain(int64_t v) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(v, 1)); }

// What run_rows does to each row.
enum class Op {
  FORWARD,   // whole rows: loss, stats
  PARTIAL,   // a range: stats (pass 1)
  MIX,       // a range: the mixture's pass-2 sums given global stats
  BACKWARD,  // a range: gradients given global stats
  FUSED,     // whole rows: loss, stats, then gradients (upstream gradient 1)
};

// Outputs (and the stats input) of one run_rows call; unused ones are nullptr.
template <class A>
struct Job {
  Op op;
  int64_t offset;   // the tensors' first column in the row's vocabulary (labels are global)
  A* loss;          // (N,)
  A* stats;         // (N, NSTAT): out (FORWARD, PARTIAL, FUSED), in (MIX, BACKWARD)
  A* sums;          // (N, 4) out (MIX)
  const A* grad;    // (N,) upstream row gradients (BACKWARD)
  void* gs;         // (N, V) in s's dtype (BACKWARD, FUSED)
  void* gt;         // (N, V) in t's dtype, or nullptr
  int64_t gs_stride, gt_stride;  // elements between the rows of gs, gt
};

template <class A, int K>
void run_rows(const at::Tensor& s, const at::Tensor& t, const int64_t* lab, const Params& pr,
              const Job<A>& job) {
  const int64_t n = s.size(0), v = s.size(1);
  const auto ss = s.scalar_type(), tt = t.scalar_type();
  const size_t es = c10::elementSize(ss), et = c10::elementSize(tt);
  const char* sp = static_cast<const char*>(s.data_ptr());
  const char* tp = static_cast<const char*>(t.data_ptr());
  // row strides (elements): the rows may be the first columns of wider logits
  const int64_t s_stride = s.stride(0), t_stride = t.stride(0);
  const Op op = job.op;
  const bool fwd = op == Op::FORWARD || op == Op::FUSED;
  const bool bwd = op == Op::BACKWARD || op == Op::FUSED;
  at::parallel_for(0, n, grain(v), [&](int64_t b, int64_t e) {
    // the mixture's whole-row forward keeps pass 1's exps for pass 2 (Kept): a row's worth
    // per thread
    std::vector<A> kept_buf;
    Kept<A> kept{nullptr, nullptr, nullptr, nullptr};
    if (K == MIXTURE && fwd) {
      const int64_t vp = (v + TILE - 1) / TILE * TILE;
      kept_buf.resize(3 * vp + 2 * (vp / TILE));
      A* kb = kept_buf.data();
      kept = {kb, kb + vp, kb + 2 * vp, kb + 3 * vp};
    }
    for (int64_t i = b; i < e; ++i) {
      Row r;
      r.s = sp + i * s_stride * es;
      r.t = tp + i * t_stride * et;
      r.gs = job.gs ? static_cast<char*>(job.gs) + i * job.gs_stride * es : nullptr;
      r.gt = job.gt ? static_cast<char*>(job.gt) + i * job.gt_stride * et : nullptr;
      r.ss = ss;
      r.tt = tt;
      r.v = v;
      r.ce = false;
      r.label = -1;
      bool ignored = false;
      if (lab) {
        const int64_t l = lab[i];  // checked by check_label_values
        ignored = l == pr.ignore_index;
        r.ce = !ignored && pr.ce_weight != 0;
        if (!ignored && l - job.offset >= 0 && l - job.offset < v) r.label = l - job.offset;
      }
      A* st = job.stats ? job.stats + i * NSTAT : nullptr;
      if (ignored) {
        // every output of the row is 0 (its loss, statistics and gradients)
        if (job.loss) job.loss[i] = A(0);
        if (st && op != Op::BACKWARD) std::fill(st, st + NSTAT, A(0));
        if (job.sums) std::fill(job.sums + i * 4, job.sums + i * 4 + 4, A(0));
        if (bwd) {
          zero_row<A>(r.gs, ss, v);
          zero_row<A>(r.gt, tt, v);
        }
        continue;
      }
      if constexpr (K <= MIXTURE) {
        if (fwd) job.loss[i] = forward_row<A, K>(r, pr, st, kept.es ? &kept : nullptr);
        if (op == Op::PARTIAL) stats_row<A, K>(r, pr, st);
        if (op == Op::MIX) mix_row<A>(r, pr, st, job.sums + i * 4, true);
      } else {
        if (fwd) job.loss[i] = forward_row2<A, K>(r, pr, st);
        if (op == Op::PARTIAL) stats_any<A, K>(r, pr, st);
        if (op == Op::MIX) pw_row<A, K>(r, pr, st, job.sums + i * 4);
      }
      if (bwd) {
        // fused: the row's forward has just kept pass 1's work (Kept)
        const Kept<A>* fk = op == Op::FUSED && kept.es ? &kept : nullptr;
        backward_row<A, K>(r, pr, st, job.grad ? job.grad[i] : A(1), fk);
      }
    }
  });
}

template <class A>
void dispatch_rows(const at::Tensor& s, const at::Tensor& t, const int64_t* lab,
                   const Params& pr, const Job<A>& job) {
  switch (pr.kind) {
    case FORWARD_KL:
      return run_rows<A, FORWARD_KL>(s, t, lab, pr, job);
    case REVERSE_KL:
      return run_rows<A, REVERSE_KL>(s, t, lab, pr, job);
    case SOFT_CE:
      return run_rows<A, SOFT_CE>(s, t, lab, pr, job);
    case FR_KL:
      return run_rows<A, FR_KL>(s, t, lab, pr, job);
    case TVD:
      return run_rows<A, TVD>(s, t, lab, pr, job);
    case ALPHA_BETA:
      return run_rows<A, ALPHA_BETA>(s, t, lab, pr, job);
    default:
      return run_rows<A, MIXTURE>(s, t, lab, pr, job);
  }
}

// Runs `job` with its pointers filled from these tensors in the accumulation type. whole:
// the tensors are whole rows, so labels are checked in [0, V); else (a column range) >= 0.
// gs, gt: the gradients' buffers (rows gs_stride, gt_stride elements apart).
void run_job(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& labels,
             const Params& pr, Op op, int64_t offset, bool whole, at::Tensor* loss,
             at::Tensor* stats, at::Tensor* sums, const at::Tensor* grad, void* gs, void* gt,
             int64_t gs_stride = 0, int64_t gt_stride = 0) {
  check_label_values(labels, whole ? s.size(1) : -1, pr);
  const int64_t* lab = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  auto fill = [&](auto zero) {
    using A = decltype(zero);
    Job<A> j{op,
             offset,
             loss ? loss->data_ptr<A>() : nullptr,
             stats ? stats->data_ptr<A>() : nullptr,
             sums ? sums->data_ptr<A>() : nullptr,
             grad ? grad->data_ptr<A>() : nullptr,
             gs,
             gt,
             gs_stride,
             gt_stride};
    dispatch_rows<A>(s, t, lab, pr, j);
  };
  if (acc_type(s) == at::kDouble) {
    fill(0.0);
  } else {
    fill(0.0f);
  }
}

std::tuple<at::Tensor, at::Tensor> kd_forward_cpu(const at::Tensor& s, const at::Tensor& t,
                                                  const c10::optional<at::Tensor>& labels,
                                                  KD_PARAMS_DECL) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_inputs(s, t, labels, pr, true);
  const auto acc = acc_type(s);
  const int64_t n = s.size(0);
  auto loss = at::empty({n}, s.options().dtype(acc));
  auto stats = at::empty({n, NSTAT}, s.options().dtype(acc));
  run_job(s, t, labels, pr, Op::FORWARD, 0, true, &loss, &stats, nullptr, nullptr, nullptr,
          nullptr);
  return {loss, stats};
}

at::Tensor kd_partial_cpu(const at::Tensor& s, const at::Tensor& t,
                          const c10::optional<at::Tensor>& labels, KD_PARAMS_DECL,
                          int64_t offset) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_inputs(s, t, labels, pr, true);
  TORCH_CHECK(offset >= 0, "kdkernels: offset must be >= 0, got ", offset);
  auto stats = at::empty({s.size(0), NSTAT}, s.options().dtype(acc_type(s)));
  run_job(s, t, labels, pr, Op::PARTIAL, offset, false, nullptr, &stats, nullptr, nullptr,
          nullptr, nullptr);
  return stats;
}

at::Tensor kd_mix_partial_cpu(const at::Tensor& s, const at::Tensor& t, const at::Tensor& stats,
                              KD_PARAMS_DECL, int64_t offset) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_logits(s, t, pr, true);
  TORCH_CHECK(two_pass(pr.kind),
              "kdkernels: mix_partial needs a two-pass kind (mixture, tvd, alpha_beta), got '",
              kind, "'");
  TORCH_CHECK(offset >= 0, "kdkernels: offset must be >= 0, got ", offset);
  check_stats(stats, s.size(0), acc_type(s));
  auto sums = at::empty({s.size(0), 4}, s.options().dtype(acc_type(s)));
  at::Tensor st = stats;
  run_job(s, t, c10::nullopt, pr, Op::MIX, offset, false, nullptr, &st, &sums, nullptr,
          nullptr, nullptr);
  return sums;
}

void check_backward(const at::Tensor& grad_loss, const at::Tensor& s, const at::Tensor& t,
                    const c10::optional<at::Tensor>& labels, const at::Tensor& stats,
                    const Params& pr, int64_t offset) {
  check_inputs(s, t, labels, pr, true);
  TORCH_CHECK(offset >= 0, "kdkernels: offset must be >= 0, got ", offset);
  const int64_t n = s.size(0);
  check_stats(stats, n, acc_type(s));
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == n,
              "kdkernels: grad_loss must have shape (", n, ",), got ", grad_loss.sizes());
}

// The gradients of the rows' range into gs and gt (nullptr: none), rows of any stride.
void backward_into(const at::Tensor& grad_loss, const at::Tensor& s, const at::Tensor& t,
                   const c10::optional<at::Tensor>& labels, const at::Tensor& stats,
                   const Params& pr, int64_t offset, const at::Tensor& gs,
                   const at::Tensor* gt) {
  auto g = grad_loss.to(acc_type(s)).contiguous();
  at::Tensor st = stats;  // read only
  run_job(s, t, labels, pr, Op::BACKWARD, offset, false, nullptr, &st, nullptr, &g,
          gs.data_ptr(), gt ? gt->data_ptr() : nullptr, gs.stride(0), gt ? gt->stride(0) : 0);
}

std::tuple<at::Tensor, at::Tensor> kd_backward_cpu(const at::Tensor& grad_loss,
                                                   const at::Tensor& s, const at::Tensor& t,
                                                   const c10::optional<at::Tensor>& labels,
                                                   const at::Tensor& stats, KD_PARAMS_DECL,
                                                   int64_t offset, bool need_teacher) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_backward(grad_loss, s, t, labels, stats, pr, offset);
  auto gs = at::empty_like(s);
  auto gt = need_teacher ? at::empty_like(t) : at::empty({0}, t.options());
  advise_huge_pages(gs);
  if (need_teacher) advise_huge_pages(gt);
  backward_into(grad_loss, s, t, labels, stats, pr, offset, gs, need_teacher ? &gt : nullptr);
  return {gs, gt};
}

// kd_backward into given buffers (any row stride: e.g. the first columns of a full-width
// gradient, whose padding columns the caller zeroes).
void kd_backward_out_cpu(const at::Tensor& grad_loss, const at::Tensor& s, const at::Tensor& t,
                         const c10::optional<at::Tensor>& labels, const at::Tensor& stats,
                         KD_PARAMS_DECL, int64_t offset, at::Tensor& grad_s,
                         const c10::optional<at::Tensor>& grad_t) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_backward(grad_loss, s, t, labels, stats, pr, offset);
  check_grad_out("grad_s", grad_s, s);
  if (grad_t.has_value()) check_grad_out("grad_t", *grad_t, t);
  backward_into(grad_loss, s, t, labels, stats, pr, offset, grad_s,
                grad_t.has_value() ? &*grad_t : nullptr);
}

// Forward and backward (upstream gradient 1 per row) in one visit of each row; the gradient
// of s overwrites s.
std::tuple<at::Tensor, at::Tensor> kd_fused_cpu(at::Tensor& s, const at::Tensor& t,
                                                const c10::optional<at::Tensor>& labels,
                                                KD_PARAMS_DECL, bool need_teacher) {
  const Params pr = make_params(KD_PARAMS_ARGS);
  check_inputs(s, t, labels, pr, true);
  const auto acc = acc_type(s);
  const int64_t n = s.size(0);
  auto loss = at::empty({n}, s.options().dtype(acc));
  auto stats = at::empty({n, NSTAT}, s.options().dtype(acc));
  auto gt = need_teacher ? at::empty_like(t) : at::empty({0}, t.options());
  if (need_teacher) advise_huge_pages(gt);
  run_job(s, t, labels, pr, Op::FUSED, 0, true, &loss, &stats, nullptr, nullptr, s.data_ptr(),
          need_teacher ? gt.data_ptr() : nullptr, s.stride(0), need_teacher ? gt.stride(0) : 0);
  return {loss, gt};
}

// ---- kl_div -------------------------------------------------------------------------------

void check_pair(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 1 && y.dim() == 1 && x.size(0) == y.size(0),
              "kdkernels: kl_div input and target must be 1-D of the same length, got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(),
              "kdkernels: kl_div input and target must be contiguous");
}

template <class F>
void for_chunks(int64_t n, const F& f) {
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) { f(b, e); });
}

at::Tensor kl_div_cpu(const at::Tensor& x, const at::Tensor& y, bool log_target) {
  check_pair(x, y);
  const auto out_t = c10::promoteTypes(x.scalar_type(), y.scalar_type());
  auto out = at::empty(x.sizes(), x.options().dtype(out_t));
  const auto xs = x.scalar_type(), ys = y.scalar_type();
  const void* xp = x.data_ptr();
  const void* yp = y.data_ptr();
  void* op = out.data_ptr();
  if (out_t == at::kDouble) {
    for_chunks(x.numel(), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        store_one<double>(op, out_t, i,
                          kl_div_term(load_one<double>(xp, xs, i), load_one<double>(yp, ys, i),
                                      log_target));
    });
  } else {
    for_chunks(x.numel(), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        store_one<float>(op, out_t, i,
                         kl_div_term(load_one<float>(xp, xs, i), load_one<float>(yp, ys, i),
                                     log_target));
    });
  }
  return out;
}

// The sum is accumulated in float64 whatever the input dtype: a float32 running sum over a
// thread's share of 10^8 terms loses ~1% (each add rounds relative to the running total),
// while a double add per element costs nothing next to the term's log. Terms are formed in
// A (float32 unless an input is float64), as the elementwise op forms them.
template <class A>
double kl_div_sum_impl(const at::Tensor& x, const at::Tensor& y, bool log_target) {
  const auto xs = x.scalar_type(), ys = y.scalar_type();
  const void* xp = x.data_ptr();
  const void* yp = y.data_ptr();
  return at::parallel_reduce(
      0, x.numel(), 16384, 0.0,
      [&](int64_t b, int64_t e, double acc) {
        for (int64_t i = b; i < e; ++i)
          acc += double(kl_div_term(load_one<A>(xp, xs, i), load_one<A>(yp, ys, i), log_target));
        return acc;
      },
      [](double a, double b) { return a + b; });
}

at::Tensor kl_div_sum_cpu(const at::Tensor& x, const at::Tensor& y, bool log_target) {
  check_pair(x, y);
  const auto out_t = c10::promoteTypes(x.scalar_type(), y.scalar_type());
  const auto acc = out_t == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({}, x.options().dtype(acc));
  if (acc == at::kDouble) {
    *out.data_ptr<double>() = kl_div_sum_impl<double>(x, y, log_target);
  } else {
    *out.data_ptr<float>() = float(kl_div_sum_impl<float>(x, y, log_target));
  }
  return out;
}

// grad is 0-d (the sum's upstream gradient) or x's shape (elementwise terms).
std::tuple<at::Tensor, at::Tensor> kl_div_backward_cpu(const at::Tensor& grad,
                                                       const at::Tensor& x,
                                                       const at::Tensor& y, bool log_target,
                                                       bool need_x, bool need_y) {
  check_pair(x, y);
  TORCH_CHECK(grad.dim() == 0 || grad.sizes() == x.sizes(),
              "kdkernels: kl_div grad must be 0-d or of input's shape ", x.sizes(), ", got ",
              grad.sizes());
  const auto acc_t =
      c10::promoteTypes(x.scalar_type(), y.scalar_type()) == at::kDouble ? at::kDouble
                                                                         : at::kFloat;
  auto g = grad.to(acc_t).contiguous();
  auto gx = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  auto gy = need_y ? at::empty_like(y) : at::empty({0}, y.options());
  const auto xs = x.scalar_type(), ys = y.scalar_type();
  const void* xp = x.data_ptr();
  const void* yp = y.data_ptr();
  void* gxp = need_x ? gx.data_ptr() : nullptr;
  void* gyp = need_y ? gy.data_ptr() : nullptr;
  const bool scalar = grad.dim() == 0;
  auto run = [&](auto zero) {
    using A = decltype(zero);
    const A* gp = g.data_ptr<A>();
    for_chunks(x.numel(), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        A dx, dy;
        kl_div_grad(load_one<A>(xp, xs, i), load_one<A>(yp, ys, i), log_target, dx, dy);
        const A gi = scalar ? gp[0] : gp[i];
        if (gxp) store_one<A>(gxp, xs, i, dx * gi);
        if (gyp) store_one<A>(gyp, ys, i, dy * gi);
      }
    });
  };
  if (acc_t == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
  return {gx, gy};
}

// ---- softmax / log_softmax with a temperature --------------------------------------------

at::Tensor softmax_cpu(const at::Tensor& x, double inv_t, bool log) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "kdkernels: softmax x must be 2-D contiguous");
  TORCH_CHECK(inv_t > 0, "kdkernels: softmax inv_t must be > 0, got ", inv_t);
  auto y = at::empty_like(x);
  const int64_t n = x.size(0), v = x.size(1);
  const auto xs = x.scalar_type();
  const size_t es = c10::elementSize(xs);
  auto run = [&](auto zero) {
    using A = decltype(zero);
    using V = Vectorized<A>;
    constexpr int64_t W = V::size();
    at::parallel_for(0, n, grain(v), [&](int64_t b, int64_t e) {
      alignas(64) A z[TILE];
      for (int64_t i = b; i < e; ++i) {
        const void* xr = static_cast<const char*>(x.data_ptr()) + i * v * es;
        void* yr = static_cast<char*>(y.data_ptr()) + i * v * es;
        const A it = A(inv_t);
        const V vit(it);
        A m = kd_neg_inf<A>();
        V sum(0);
        for (int64_t off = 0; off < v; off += TILE) {
          const int64_t nn = std::min(TILE, v - off);
          const A tm = load_tile<A>(xr, xs, off, nn, z);
          const NextTile nx(xr, xs, off + TILE, v);
          const A nm = kd_max_nan(m, tm);
          lse_rebase(sum, ref_move(m, nm, it));
          m = nm;
          const V vm(safe_ref(m));
          for (int64_t j = 0; j < round_up<A>(nn); j += W) {
            nx.touch(j);
            lse_add(V::loadu(z + j), vm, vit, sum);
          }
        }
        // a row with a NaN, a +inf or nothing finite (m not finite) has no softmax: NaN
        // throughout (stored as is: the vector exp need not keep a NaN)
        if (!kd_finite(m)) {
          std::fill(z, z + TILE, A(NAN));
          for (int64_t off = 0; off < v; off += TILE)
            store_tile<A>(yr, xs, off, std::min(TILE, v - off), z);
          continue;
        }
        // y = (x - m) / T - log S: the raw difference first (see kd_math.h)
        const V vm(m), vl(kd_log(hsum(sum)));
        for (int64_t off = 0; off < v; off += TILE) {
          const int64_t nn = std::min(TILE, v - off);
          load_tile<A>(xr, xs, off, nn, z, false);
          const NextTile nx(xr, xs, off + TILE, v);
          for (int64_t j = 0; j < round_up<A>(nn); j += W) {
            nx.touch(j);
            const V l = (V::loadu(z + j) - vm) * vit - vl;
            (log ? l : kd_exp(l)).store(z + j);
          }
          store_tile<A>(yr, xs, off, nn, z);
        }
      }
    });
  };
  if (xs == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
  return y;
}

at::Tensor softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& y, double inv_t,
                                bool log) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous(), "kdkernels: softmax y must be 2-D contiguous");
  TORCH_CHECK(grad.sizes() == y.sizes(), "kdkernels: softmax grad must have y's shape ",
              y.sizes(), ", got ", grad.sizes());
  const int64_t n = y.size(0), v = y.size(1);
  auto gin = grad.contiguous();
  auto gx = at::empty_like(y);
  const auto ys = y.scalar_type(), gst = gin.scalar_type();
  auto run = [&](auto zero) {
    using A = decltype(zero);
    at::parallel_for(0, n, grain(v), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const void* yr = static_cast<const char*>(y.data_ptr()) + i * v * c10::elementSize(ys);
        const void* gr =
            static_cast<const char*>(gin.data_ptr()) + i * v * c10::elementSize(gst);
        void* out = static_cast<char*>(gx.data_ptr()) + i * v * c10::elementSize(ys);
        A r = 0;
        for (int64_t j = 0; j < v; ++j) {
          const A gj = load_one<A>(gr, gst, j);
          r += log ? gj : gj * load_one<A>(yr, ys, j);
        }
        for (int64_t j = 0; j < v; ++j) {
          const A d = softmax_grad(load_one<A>(yr, ys, j), load_one<A>(gr, gst, j), r, log);
          store_one<A>(out, ys, j, d * A(inv_t));
        }
      }
    });
  };
  if (ys == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
  return gx;
}

}  // namespace
}  // namespace kd

#define KD_SPEC_SCHEMA                                                                  \
  "str kind, float mix, float coef_p, float coef_q, float inv_ts, float inv_tt, "        \
  "float kd_scale, float ce_weight, int ignore_index"

TORCH_LIBRARY(kdkernels, m) {
  // row losses (N,) and per-row statistics (N, NSTAT) for kd_backward
  m.def("kd_forward(Tensor s, Tensor t, Tensor? labels, " KD_SPEC_SCHEMA
        ") -> (Tensor, Tensor)");
  // statistics (N, NSTAT) of the columns [offset, offset + Vr) of rows (labels: global ids)
  m.def("kd_partial(Tensor s, Tensor t, Tensor? labels, " KD_SPEC_SCHEMA
        ", int offset) -> Tensor");
  // the mixture's pass-2 sums (N, 4) = (A, B, Uq, Up) over a range, given global stats
  m.def("kd_mix_partial(Tensor s, Tensor t, Tensor stats, " KD_SPEC_SCHEMA
        ", int offset) -> Tensor");
  // (grad_s, grad_t) of a range given global finished stats; grad_t is empty (0,) unless
  // need_teacher
  m.def("kd_backward(Tensor grad_loss, Tensor s, Tensor t, Tensor? labels, Tensor stats, "
        KD_SPEC_SCHEMA ", int offset, bool need_teacher) -> (Tensor, Tensor)");
  // kd_backward written into grad_s, grad_t (any row stride; grad_t only when given)
  m.def("kd_backward_out(Tensor grad_loss, Tensor s, Tensor t, Tensor? labels, Tensor stats, "
        KD_SPEC_SCHEMA ", int offset, Tensor(a!) grad_s, Tensor(b!)? grad_t) -> ()");
  // (loss, grad_t); s is overwritten by its gradient for an upstream gradient of 1 per row
  m.def("kd_fused_(Tensor(a!) s, Tensor t, Tensor? labels, " KD_SPEC_SCHEMA
        ", bool need_teacher) -> (Tensor, Tensor)");
  m.def("kl_div(Tensor x, Tensor y, bool log_target) -> Tensor");
  m.def("kl_div_sum(Tensor x, Tensor y, bool log_target) -> Tensor");
  m.def("kl_div_backward(Tensor grad, Tensor x, Tensor y, bool log_target, bool need_x, "
        "bool need_y) -> (Tensor, Tensor)");
  m.def("softmax(Tensor x, float inv_t, bool log) -> Tensor");
  m.def("softmax_backward(Tensor grad, Tensor y, float inv_t, bool log) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("kd_forward", &kd::kd_forward_cpu);
  m.impl("kd_partial", &kd::kd_partial_cpu);
  m.impl("kd_mix_partial", &kd::kd_mix_partial_cpu);
  m.impl("kd_backward", &kd::kd_backward_cpu);
  m.impl("kd_backward_out", &kd::kd_backward_out_cpu);
  m.impl("kd_fused_", &kd::kd_fused_cpu);
  m.impl("kl_div", &kd::kl_div_cpu);
  m.impl("kl_div_sum", &kd::kl_div_sum_cpu);
  m.impl("kl_div_backward", &kd::kl_div_backward_cpu);
  m.impl("softmax", &kd::softmax_cpu);
  m.impl("softmax_backward", &kd::softmax_backward_cpu);
}
