// fastkd::distill_loss — the CUDA kernels of the fused temperature-softmax distillation loss, and the
// host-side choices of how to launch them. Same semantics as the CPU kernel (distill_loss.cpp) and the
// Triton kernel (kernels/distill_loss.py). distill_loss_cuda.cu registers the op and launches these; this
// header needs no torch headers, so tests/cuda_emu/ can run the kernels on the host.
//
// Math, per row (student logits x_s, teacher logits x_t, temperature T, c = loss_scale * row_scale[i]),
// in shifted form: u_s = (x_s - max x_s) / T, u_t = (x_t - max x_t) / T, Z = sum exp(u), q = exp(u_s) / Z_s,
// p = exp(u_t) / Z_t
//   KL        D = sum p (log p - log q) = sum p (u_t - u_s) + log Z_s - log Z_t
//             dD/ds = q - p                       dD/dt = p (log p - log q - D)
//   REVERSE   D = sum q (u_s - u_t) + log Z_t - log Z_s
//             dD/ds = q (log q - log p - D)       dD/dt = p - q
//   JSD(b)    m = b p + (1-b) q,  D = b KL(p||m) + (1-b) KL(q||m)
//             dD/ds = (1-b) q (log q - log m - KL(q||m))
//             dD/dt =  b    p (log p - log m - KL(p||m))
//   loss[i] = c D; the gradients written are (c/T) dD/ds and (c/T) dD/dt (chain rule through 1/T), in
//   the input dtype, so backward is one in-place scale (scale_grad_cuda.cu).
//   x - max is exact in floating point, so a common offset of the logits (1e6, 1e30) costs no
//   precision (the raw form sum p (t - s) + lse(s) - lse(t) cancels two numbers of the offset's size).
//   A zero probability contributes nothing (a masked vocabulary entry at -inf is legitimate; a -inf
//   student logit where the teacher has mass gives D = inf). NaN contract: NaN or +inf in a kept row,
//   or a row that is all -inf (undefined softmax), gives NaN loss and gradients for the row. A row with
//   c == 0 (ignored) is not read: loss 0, gradients 0, even if it holds NaN.
//
// Base-2 domain. Shifted logits are formed as u2 = (x - m) * log2(e) / T, so every exponential is one
// exp2 (the MUFU ex2 instruction for fp32) and natural-log quantities are recovered with one multiply
// by ln 2: log q = ln2 (s2 - log2 Z_s), KL = ln2 (sum p (t2 - s2) + log2(Z_s / Z_t)), the last term
// formed as one log2 of a ratio, not as the difference of two numbers of size ~log2 V.
//
// Online softmax (pass 1). Each thread keeps, per input, the running state (m, z) with m the maximum of
// its raw logits so far and z = sum 2^((x - m) k2), k2 = log2(e) / T, and for the input w that weights
// the KL (the teacher for KL, the student for reverse KL; o is the other one)
//   a = sum 2^(w2) (w2 - o2),   w2 = (x_w - m_w) k2, o2 = (x_o - m_o) k2 (relative to the current maxima).
// A new 16-byte vector first raises the maxima to the vector's (when they grow: z_w, a scale by
// f_w = 2^(-d_w) and a shifts by z_w (d_o - d_w), d = (m_new - m_old) k2), then adds its terms, so each
// element costs one exp2 per input. States combine the same way at the joint maxima, over the warp
// with shuffles and over the block through shared memory. Then log2 Z = log2 z at the row maximum and
// sum p (w2 - o2) = a / z_w.
//   -inf handling: an m of -inf contributes a factor 0 (never 2^(-inf - -inf) = NaN); a term with
//   2^(w2) == 0 adds 0 to a. NaN propagation: fmax ignores NaN, but 2^(NaN) = NaN enters z. +inf:
//   2^(inf - inf) = NaN. A row of all -inf keeps m = -inf, and (x - m) = NaN in the later passes.
//
// Passes and memory traffic. Pass 2 recomputes q and p from the logits and writes the gradients; JSD
// needs sum p log m before its gradients, so it has a third pass. Each logit is read from DRAM once:
//   * rows of up to kWarpRowVecs 16-byte vectors per input: one warp per row, 8 rows per block; the
//     re-reads of a row (a few KiB) hit L1/L2;
//   * longer rows: one 512-thread block per row (at most 64 registers a thread, so two blocks fit on
//     an SM when the shared memory allows). Pass 1 also copies the row into dynamic shared memory, as
//     much of it as fits (both inputs of a row of up to ~58K bf16 / ~29K fp32 elements with the 227 KiB
//     of an H100; rows of half that size leave room for two blocks per SM). Passes 2-3 read the cached
//     part from shared memory and the rest from L2. Each thread
//     re-reads exactly the vectors it loaded itself, so the cache needs no synchronisation; the later
//     passes walk the row backwards, so the uncached tail, loaded last, is re-read first while it is
//     still in L2. Loads of the cached part and the gradient stores use the streaming (evict-first)
//     cache hint so they do not push the uncached tail out of L2.
// Vector loads/stores are 16 bytes when the four row pointers share their alignment modulo 16 (then a
// few scalar head elements reach the boundary, a scalar tail follows); otherwise the row is processed
// element by element. All offsets are int64, so tensors of more than 2^31 elements work.
#pragma once

#include "cuda_device.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastkd {
namespace distill_cuda {

// Divergence codes: fastkd::Divergence of common.h (checked by distill_loss_cuda.cu), kept as plain ints here
// so that this header needs no torch headers.
constexpr int kKL = 0, kReverseKL = 1, kJSD = 2;

constexpr int kWarp = 32;
constexpr int kBlockThreads = 512;  // threads per row for long rows
constexpr int kWarpRows = 8;        // rows per block (one warp each) for short rows
constexpr int64_t kWarpRowVecs = 256;  // a row of at most this many 16-byte vectors per input -> one warp

template <typename acc_t>
struct Consts;
template <>
struct Consts<float> {
  static constexpr float kLn2 = 0.6931471805599453f;
};
template <>
struct Consts<double> {
  static constexpr double kLn2 = 0.6931471805599453;
};

__device__ __forceinline__ float dexp2(float x) { return exp2f(x); }  // ex2.approx under --use_fast_math
__device__ __forceinline__ double dexp2(double x) { return exp2(x); }
__device__ __forceinline__ float dlog2(float x) { return log2f(x); }
__device__ __forceinline__ double dlog2(double x) { return log2(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
// Per-row divisions in IEEE round-to-nearest even under --use_fast_math (which makes `/` the
// approximate div.full.f32, up to 2 ulp off): log2(Z_s / Z_t) of two equal sums must be exactly 0,
// or a uniform row at logits of 1e30 gets a gradient of ~1e-10 instead of 0 (test_plus_minus_1e30).
__device__ __forceinline__ float ddiv(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double ddiv(double a, double b) { return a / b; }
__device__ __forceinline__ float dmax(float a, float b) { return fmaxf(a, b); }  // NaN-ignoring
__device__ __forceinline__ double dmax(double a, double b) { return fmax(a, b); }
template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Running log-sum-exp state of one input (m: raw maximum, z: sum 2^((x - m) k2)); a is used only in
// the input that weights the KL (see the header).
template <typename acc_t>
struct Lse {
  acc_t m, z, a;
};

template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_identity() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0)};
}

template <typename acc_t>
struct Pair {
  Lse<acc_t> s, t;
};

// Moves the state of one input to the maximum M (>= its m): returns the factor f = 2^((m - M) k2)
// of its terms and d = (M - m) k2 the shift of their shifted logits (0, 1 when M == m).
template <typename acc_t>
__device__ __forceinline__ void lse_move(const Lse<acc_t>& x, acc_t M, acc_t k2, acc_t& f, acc_t& d) {
  if (!(M > x.m)) {  // unchanged (also M == m == -inf)
    f = acc_t(1);
    d = acc_t(0);
  } else {
    f = (x.m == neg_inf<acc_t>()) ? acc_t(0) : dexp2((x.m - M) * k2);
    d = (M - x.m) * k2;
  }
}

// a after both maxima moved: f_w (a + z_w (d_o - d_w)); nothing to move when z_w == 0.
template <typename acc_t>
__device__ __forceinline__ acc_t a_move(const Lse<acc_t>& w, acc_t f_w, acc_t d_w, acc_t d_o) {
  return (w.z == acc_t(0)) ? acc_t(0) : f_w * (w.a + w.z * (d_o - d_w));
}

template <int kDiv, typename acc_t>
__device__ __forceinline__ Pair<acc_t> pair_combine(const Pair<acc_t>& x, const Pair<acc_t>& y, acc_t k2) {
  const acc_t Ms = dmax(x.s.m, y.s.m), Mt = dmax(x.t.m, y.t.m);
  acc_t fxs, dxs, fxt, dxt, fys, dys, fyt, dyt;
  lse_move(x.s, Ms, k2, fxs, dxs);
  lse_move(x.t, Mt, k2, fxt, dxt);
  lse_move(y.s, Ms, k2, fys, dys);
  lse_move(y.t, Mt, k2, fyt, dyt);
  Pair<acc_t> r;
  r.s = {Ms, x.s.z * fxs + y.s.z * fys, acc_t(0)};
  r.t = {Mt, x.t.z * fxt + y.t.z * fyt, acc_t(0)};
  if constexpr (kDiv == 0) r.t.a = a_move(x.t, fxt, dxt, dxs) + a_move(y.t, fyt, dyt, dys);
  if constexpr (kDiv == 1) r.s.a = a_move(x.s, fxs, dxs, dxt) + a_move(y.s, fys, dys, dyt);
  return r;
}

// Adds n raw logits of each input to a running state pair.
template <int kDiv, int kN, typename acc_t>
__device__ __forceinline__ void pair_add(Pair<acc_t>& st, const acc_t (&xs)[kN], const acc_t (&xt)[kN], acc_t k2) {
  acc_t bs = xs[0], bt = xt[0];
#pragma unroll
  for (int i = 1; i < kN; ++i) {
    bs = dmax(bs, xs[i]);
    bt = dmax(bt, xt[i]);
  }
  if (bs > st.s.m || bt > st.t.m) {  // false for NaN: m never becomes NaN, z does
    acc_t fs, ds, ft, dt;
    lse_move(st.s, dmax(bs, st.s.m), k2, fs, ds);
    lse_move(st.t, dmax(bt, st.t.m), k2, ft, dt);
    if constexpr (kDiv == 0) st.t.a = a_move(st.t, ft, dt, ds);
    if constexpr (kDiv == 1) st.s.a = a_move(st.s, fs, ds, dt);
    st.s.z *= fs;
    st.t.z *= ft;
    st.s.m = dmax(bs, st.s.m);
    st.t.m = dmax(bt, st.t.m);
  }
  const acc_t shs = (st.s.m == neg_inf<acc_t>()) ? acc_t(0) : st.s.m;
  const acc_t sht = (st.t.m == neg_inf<acc_t>()) ? acc_t(0) : st.t.m;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const acc_t s2 = (xs[i] - shs) * k2, t2 = (xt[i] - sht) * k2;
    const acc_t es = dexp2(s2), et = dexp2(t2);
    st.s.z += es;
    st.t.z += et;
    if constexpr (kDiv == 0) st.t.a += (et == acc_t(0)) ? acc_t(0) : et * (t2 - s2);
    if constexpr (kDiv == 1) st.s.a += (es == acc_t(0)) ? acc_t(0) : es * (s2 - t2);
  }
}

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

template <int kDiv, typename acc_t>
__device__ __forceinline__ Pair<acc_t> warp_reduce(Pair<acc_t> v, acc_t k2) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    Pair<acc_t> w;
    w.s = {shfl_xor(v.s.m, o), shfl_xor(v.s.z, o), shfl_xor(v.s.a, o)};
    w.t = {shfl_xor(v.t.m, o), shfl_xor(v.t.z, o), shfl_xor(v.t.a, o)};
    v = pair_combine<kDiv>(v, w, k2);
  }
  return v;
}

template <typename acc_t>
__device__ __forceinline__ void warp_sum2(acc_t& x, acc_t& y) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    x += shfl_xor(x, o);
    y += shfl_xor(y, o);
  }
}

// Reduction over the threads that share a row: one warp (kGroup == 32) or the whole block. Every
// thread of the group gets the result. scratch: kGroup / 32 entries of shared memory.
template <int kGroup, int kDiv, typename acc_t>
__device__ __forceinline__ Pair<acc_t> group_reduce(Pair<acc_t> v, Pair<acc_t>* scratch, acc_t k2) {
  v = warp_reduce<kDiv>(v, k2);
  if constexpr (kGroup > kWarp) {
    constexpr int kWarps = kGroup / kWarp;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < kWarps) ? scratch[lane] : Pair<acc_t>{lse_identity<acc_t>(), lse_identity<acc_t>()};
    v = warp_reduce<kDiv>(v, k2);  // every warp reduces the kWarps partials itself: no second barrier round
    __syncthreads();     // scratch is reused by the next reduction
  }
  return v;
}

template <int kGroup, typename acc_t>
__device__ __forceinline__ void group_sum2(acc_t& x, acc_t& y, acc_t* scratch) {
  warp_sum2(x, y);
  if constexpr (kGroup > kWarp) {
    constexpr int kWarps = kGroup / kWarp;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) {
      scratch[2 * warp] = x;
      scratch[2 * warp + 1] = y;
    }
    __syncthreads();
    x = (lane < kWarps) ? scratch[2 * lane] : acc_t(0);
    y = (lane < kWarps) ? scratch[2 * lane + 1] : acc_t(0);
    warp_sum2(x, y);
    __syncthreads();
  }
}

template <typename scalar_t, typename acc_t>
struct Params {
  const scalar_t* s;      // student logits [N, V], rows contiguous (row stride V)
  const scalar_t* t;      // teacher logits [N, V]
  const acc_t* row_scale; // [N]: reduction weight of each row, 0 = ignored row
  acc_t* loss;            // out [N]: c * D per row
  scalar_t* gs;           // out [N, V]: (c/T) dD/ds, or nullptr
  scalar_t* gt;           // out [N, V]: (c/T) dD/dt, or nullptr
  int64_t N, V;
  acc_t k2;          // log2(e) / T: x2 = x * k2
  acc_t inv_t;       // 1 / T
  acc_t loss_scale;  // T^2 when scale_by_t2, else 1
  acc_t beta;        // JSD weight b
  int64_t cache_vecs;  // 16-byte vectors per input row cached in shared memory (block-per-row only)
  bool vec_ok;         // the four row pointers share their alignment modulo 16
};

// Row layout: [0, head) scalars, then nvec 16-byte vectors, then scalars up to V.
struct RowSplit {
  int64_t head, nvec, tail0;
};

template <typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const scalar_t* row, int64_t V, bool vec_ok) {
  constexpr int kN = Vec16<scalar_t>::kN;
  if (!vec_ok) return {V, 0, V};
  const int64_t head = head_to_align16(row, V);
  const int64_t nvec = (V - head) / kN;
  return {head, nvec, head + nvec * kN};
}

// The per-element gradient of pass 2 (KL / reverse KL) or pass 3 (JSD). s2, t2: base-2 shifted logits.
template <int kDiv, typename acc_t>
struct GradFn {
  acc_t lse2_s, lse2_t, D, cg, kl_p, kl_q, b1, b0;
  __device__ __forceinline__ void operator()(acc_t s2, acc_t t2, acc_t& g_s, acc_t& g_t) const {
    constexpr acc_t ln2 = Consts<acc_t>::kLn2;
    const acc_t ls2 = s2 - lse2_s, lt2 = t2 - lse2_t;
    const acc_t q = dexp2(ls2), p = dexp2(lt2);
    // D is kept in base 2 here (D / ln2): log p - log q - D = ln2 ((lt2 - ls2) - D2) cancels exactly
    // where it should (a one-hot p at logits of 1e30), which ln2 (lt2 - ls2) - D would not.
    if constexpr (kDiv == kKL) {
      g_s = (q - p) * cg;
      g_t = (p == acc_t(0)) ? acc_t(0) : p * ((lt2 - ls2) - D) * (ln2 * cg);
    } else if constexpr (kDiv == kReverseKL) {
      g_s = (q == acc_t(0)) ? acc_t(0) : q * ((ls2 - lt2) - D) * (ln2 * cg);
      g_t = (p - q) * cg;
    } else {
      const acc_t lm = dlog(b1 * p + b0 * q);
      g_s = (q == acc_t(0)) ? acc_t(0) : b0 * q * (ln2 * ls2 - lm - kl_q) * cg;
      g_t = (p == acc_t(0)) ? acc_t(0) : b1 * p * (ln2 * lt2 - lm - kl_p) * cg;
    }
  }
};

// One row, processed by the kGroup threads with index `tid` in [0, kGroup).
template <typename scalar_t, typename acc_t, int kDiv, int kGroup, bool kCache>
__device__ __forceinline__ void process_row(const Params<scalar_t, acc_t>& P, int64_t row, int tid,
                                            Pair<acc_t>* scratch, Vec16<scalar_t>* cache) {
  using V16 = Vec16<scalar_t>;
  constexpr int kN = V16::kN;
  constexpr acc_t ln2 = Consts<acc_t>::kLn2;
  const int64_t V = P.V;
  const int64_t off = row * V;  // int64
  const acc_t c = P.loss_scale * P.row_scale[row];
  scalar_t* gs = P.gs ? P.gs + off : nullptr;
  scalar_t* gt = P.gt ? P.gt + off : nullptr;
  const scalar_t* xs = P.s + off;
  const scalar_t* xt = P.t + off;
  const RowSplit sp = split_row(xs, V, P.vec_ok);

  if (c == acc_t(0)) {  // ignored row: nothing read, zeros written
    if (tid == 0) P.loss[row] = acc_t(0);
    V16 zero;
#pragma unroll
    for (int i = 0; i < kN; ++i) zero.v[i] = scalar_t(0);
    for (int64_t k = tid; k < sp.nvec; k += kGroup) {
      if (gs) store_vec_stream(gs + sp.head + k * kN, zero);
      if (gt) store_vec_stream(gt + sp.head + k * kN, zero);
    }
    for (int64_t j = tid; j < sp.head; j += kGroup) {
      if (gs) gs[j] = scalar_t(0);
      if (gt) gt[j] = scalar_t(0);
    }
    for (int64_t j = sp.tail0 + tid; j < V; j += kGroup) {
      if (gs) gs[j] = scalar_t(0);
      if (gt) gt[j] = scalar_t(0);
    }
    return;
  }

  const acc_t k2 = P.k2;
  const int64_t ncache = kCache ? P.cache_vecs : 0;

  // ---- pass 1: online sums of 2^((x - m) k2) per input (+ the KL / reverse-KL numerator)
  Pair<acc_t> st{lse_identity<acc_t>(), lse_identity<acc_t>()};
  auto add_scalar = [&](int64_t j) {
    const acc_t s1[1] = {static_cast<acc_t>(xs[j])};
    const acc_t t1[1] = {static_cast<acc_t>(xt[j])};
    pair_add<kDiv>(st, s1, t1, k2);
  };
  for (int64_t j = tid; j < sp.head; j += kGroup) add_scalar(j);
#pragma unroll 2
  for (int64_t k = tid; k < sp.nvec; k += kGroup) {
    const int64_t j = sp.head + k * kN;
    V16 vs, vt;
    if (kCache && k < ncache) {
      vs = load_vec_stream(xs + j);
      vt = load_vec_stream(xt + j);
      cache[k] = vs;
      cache[ncache + k] = vt;
    } else {
      vs = load_vec(xs + j);
      vt = load_vec(xt + j);
    }
    acc_t s[kN], t[kN];
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      s[i] = static_cast<acc_t>(vs.v[i]);
      t[i] = static_cast<acc_t>(vt.v[i]);
    }
    pair_add<kDiv>(st, s, t, k2);
  }
  for (int64_t j = sp.tail0 + tid; j < V; j += kGroup) add_scalar(j);
  st = group_reduce<kGroup, kDiv>(st, scratch, k2);

  // Row maxima (-inf for a row of all -inf: then x - m is NaN below, as the NaN contract says).
  const acc_t ms = st.s.m, mt = st.t.m;
  const acc_t lse2_s = dlog2(st.s.z), lse2_t = dlog2(st.t.z);
  // log2(Z_s / Z_t) for the loss, without the cancellation of two numbers of size ~log2(V):
  const acc_t lse2_diff = dlog2(ddiv(st.s.z, st.t.z));
  GradFn<kDiv, acc_t> fn{lse2_s, lse2_t, acc_t(0), c * P.inv_t, acc_t(0), acc_t(0), P.beta, acc_t(1) - P.beta};

  // Visits every element of the row as (j, s2, t2) for scalars and (j, s2[kN], t2[kN]) for vectors,
  // vectors in reverse order of pass 1 (see the header), cached ones from shared memory.
  auto for_row = [&](auto&& on_scalar, auto&& on_vec) {
    for (int64_t j = sp.tail0 + tid; j < V; j += kGroup)
      on_scalar(j, (static_cast<acc_t>(xs[j]) - ms) * k2, (static_cast<acc_t>(xt[j]) - mt) * k2);
    if (tid < sp.nvec) {
      for (int64_t k = tid + (sp.nvec - 1 - tid) / kGroup * kGroup; k >= 0; k -= kGroup) {
        const int64_t j = sp.head + k * kN;
        V16 vs, vt;
        if (kCache && k < ncache) {
          vs = cache[k];
          vt = cache[ncache + k];
        } else {
          vs = load_vec(xs + j);
          vt = load_vec(xt + j);
        }
        acc_t s[kN], t[kN];
#pragma unroll
        for (int i = 0; i < kN; ++i) {
          s[i] = (static_cast<acc_t>(vs.v[i]) - ms) * k2;
          t[i] = (static_cast<acc_t>(vt.v[i]) - mt) * k2;
        }
        on_vec(j, s, t);
      }
    }
    for (int64_t j = tid; j < sp.head; j += kGroup)
      on_scalar(j, (static_cast<acc_t>(xs[j]) - ms) * k2, (static_cast<acc_t>(xt[j]) - mt) * k2);
  };

  acc_t D;
  if constexpr (kDiv == kKL) {
    fn.D = ddiv(st.t.a, st.t.z) + lse2_diff;  // base 2
    D = ln2 * fn.D;
  } else if constexpr (kDiv == kReverseKL) {
    fn.D = ddiv(st.s.a, st.s.z) - lse2_diff;
    D = ln2 * fn.D;
  } else {
    // ---- JSD pass 2: KL(p||m) and KL(q||m)
    const acc_t b1 = fn.b1, b0 = fn.b0;
    acc_t kp = 0, kq = 0;
    auto acc_one = [&](acc_t s2, acc_t t2) {
      const acc_t ls2 = s2 - lse2_s, lt2 = t2 - lse2_t;
      const acc_t q = dexp2(ls2), p = dexp2(lt2);
      const acc_t lm = dlog(b1 * p + b0 * q);
      kp += (p == acc_t(0)) ? acc_t(0) : p * (ln2 * lt2 - lm);
      kq += (q == acc_t(0)) ? acc_t(0) : q * (ln2 * ls2 - lm);
    };
    for_row([&](int64_t, acc_t s2, acc_t t2) { acc_one(s2, t2); },
            [&](int64_t, const acc_t(&s)[kN], const acc_t(&t)[kN]) {
#pragma unroll
              for (int i = 0; i < kN; ++i) acc_one(s[i], t[i]);
            });
    group_sum2<kGroup>(kp, kq, reinterpret_cast<acc_t*>(scratch));
    fn.kl_p = kp;
    fn.kl_q = kq;
    D = b1 * kp + b0 * kq;
  }
  if (tid == 0) P.loss[row] = c * D;
  if (gs == nullptr && gt == nullptr) return;

  // ---- last pass: gradients
  for_row(
      [&](int64_t j, acc_t s2, acc_t t2) {
        acc_t a, b;
        fn(s2, t2, a, b);
        if (gs) gs[j] = static_cast<scalar_t>(a);
        if (gt) gt[j] = static_cast<scalar_t>(b);
      },
      [&](int64_t j, const acc_t(&s)[kN], const acc_t(&t)[kN]) {
        V16 os, ot;
#pragma unroll
        for (int i = 0; i < kN; ++i) {
          acc_t a, b;
          fn(s[i], t[i], a, b);
          os.v[i] = static_cast<scalar_t>(a);
          ot.v[i] = static_cast<scalar_t>(b);
        }
        if (gs) store_vec_stream(gs + j, os);
        if (gt) store_vec_stream(gt + j, ot);
      });
}

// Short rows: one warp per row, kWarpRows rows per block. No shared-memory cache.
template <typename scalar_t, typename acc_t, int kDiv>
__global__ void __launch_bounds__(kWarp * kWarpRows) distill_loss_warp_kernel(const Params<scalar_t, acc_t> P) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = threadIdx.x / kWarp;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRows + warp; row < P.N;
       row += static_cast<int64_t>(gridDim.x) * kWarpRows)
    process_row<scalar_t, acc_t, kDiv, kWarp, false>(P, row, lane, nullptr, nullptr);
}

// Long rows: one block per row; dynamic shared memory holds the first cache_vecs vectors of s and t.
template <typename scalar_t, typename acc_t, int kDiv>
__global__ void __launch_bounds__(kBlockThreads, 2) distill_loss_block_kernel(const Params<scalar_t, acc_t> P) {
  __shared__ Pair<acc_t> scratch[kBlockThreads / kWarp];
  FASTKD_DYNAMIC_SMEM(dyn_smem);
  auto* cache = reinterpret_cast<Vec16<scalar_t>*>(dyn_smem);
  // Every thread of the block runs the same rows, so the barriers inside process_row are uniform.
  for (int64_t row = blockIdx.x; row < P.N; row += gridDim.x)
    process_row<scalar_t, acc_t, kDiv, kBlockThreads, true>(P, row, threadIdx.x, scratch, cache);
}

// ---- host side: parameters and launch shape (used by distill_loss_cuda.cu and by the host emulation)

template <typename scalar_t, typename acc_t>
Params<scalar_t, acc_t> make_params(const scalar_t* s, const scalar_t* t, const acc_t* row_scale, acc_t* loss,
                                    scalar_t* gs, scalar_t* gt, int64_t N, int64_t V, double temperature,
                                    double beta, double loss_scale) {
  Params<scalar_t, acc_t> P;
  P.s = s;
  P.t = t;
  P.row_scale = row_scale;
  P.loss = loss;
  P.gs = gs;
  P.gt = gt;
  P.N = N;
  P.V = V;
  P.inv_t = static_cast<acc_t>(1.0 / temperature);
  P.k2 = static_cast<acc_t>(1.4426950408889634 / temperature);  // log2(e) / T
  P.loss_scale = static_cast<acc_t>(loss_scale);
  P.beta = static_cast<acc_t>(beta);
  P.cache_vecs = 0;
  // Rows are vectorised when all four arrays share their alignment modulo 16: then row i of each
  // starts at the same offset from a 16-byte boundary and one scalar head aligns them all.
  const auto mis = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16; };
  P.vec_ok = mis(s) == mis(t) && (gs == nullptr || mis(gs) == mis(s)) && (gt == nullptr || mis(gt) == mis(s));
  return P;
}

struct LaunchPlan {
  bool warp_per_row;   // distill_loss_warp_kernel (else distill_loss_block_kernel)
  int64_t cache_vecs;  // block kernel: 16-byte vectors per input cached in shared memory
  int64_t smem_bytes;  // block kernel: dynamic shared memory (2 inputs x 16 bytes x cache_vecs)
};

// smem_avail: the dynamic shared memory a block may use (opt-in maximum minus the static part).
template <typename scalar_t>
LaunchPlan plan_launch(int64_t V, bool vec_ok, int64_t smem_avail) {
  constexpr int64_t kN = Vec16<scalar_t>::kN;
  if (V <= kWarpRowVecs * kN) return {true, 0, 0};
  const int64_t vecs = vec_ok ? V / kN : 0;  // a row that does not vectorise is not cached
  const int64_t cache = std::max<int64_t>(0, std::min<int64_t>(vecs, smem_avail / 32));
  return {false, cache, cache * 32};
}

}  // namespace distill_cuda
}  // namespace fastkd
