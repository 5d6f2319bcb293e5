// fastkd::distill_loss — the CUDA kernels of the fused temperature-softmax distillation loss, and the
// host-side choices of how to launch them. Same semantics as the CPU kernel (distill_loss.cpp) and the
// Triton kernel (kernels/distill_loss.py). distill_loss.cu registers the op and launches these; this
// header needs no torch headers, so tests/cuda_emu/ can run the kernels on the host.
//
// Math, per row (student logits x_s, teacher logits x_t, temperature T, c = loss_scale * row_scale[i]):
//   s = x_s / T, t = x_t / T, q = softmax(s), p = softmax(t)
//   KL        D = sum p (log p - log q) = sum p (t - s) + lse(s) - lse(t)
//             dD/ds = q - p                       dD/dt = p (log p - log q - D)
//   REVERSE   D = sum q (s - t) + lse(t) - lse(s)
//             dD/ds = q (log q - log p - D)       dD/dt = p - q
//   JSD(b)    m = b p + (1-b) q,  D = b KL(p||m) + (1-b) KL(q||m)
//             dD/ds = (1-b) q (log q - log m - KL(q||m))
//             dD/dt =  b    p (log p - log m - KL(p||m))
//   loss[i] = c D; the gradients written are (c/T) dD/ds and (c/T) dD/dt (chain rule through 1/T), in
//   the input dtype, so backward is one in-place scale (scale_grad.cu).
//   A zero probability contributes nothing (a masked vocabulary entry at -inf is legitimate; a -inf
//   student logit where the teacher has mass gives D = inf); +inf or NaN in a kept row gives NaN. A
//   row with c == 0 (ignored) is not read: loss 0, gradients 0, even if it holds NaN.
//
// Base-2 domain. Logits are loaded as x2 = x * log2(e) / T, so every exponential is one exp2 (the
// MUFU ex2 instruction for fp32) and lse2 = log2 sum 2^x2 = lse / ln 2. Natural-log quantities are
// recovered with one multiply by ln 2:  log q = ln2 (s2 - lse2_s),  KL = ln2 (sum p (t2 - s2) + lse2_s - lse2_t),
// where lse2_s - lse2_t is formed as (M_s - M_t) + log2(z_s / z_t) (see below), not as the difference
// of two numbers of size ~log2 V, which would cost fp32 digits of a small loss.
//
// Online softmax (pass 1). Each thread keeps, per input, the running state (m, z, a):
//   m = max of its x2 so far, z = sum 2^(x2 - m), a = sum 2^(x2 - m) (x2 - y2)
// (a only for the input whose distribution weights the KL: the teacher for KL, the student for reverse
// KL). A new 16-byte vector first raises m to the vector's maximum (rescaling z and a by 2^(m_old - m),
// skipped when the maximum did not grow), then adds its terms, so each element costs one exp2. States
// combine as (m, z, a) (+) (m', z', a') = (M, z 2^(m-M) + z' 2^(m'-M), a 2^(m-M) + a' 2^(m'-M)) with
// M = max(m, m'), over the warp with shuffles and over the block through shared memory. Then
// lse2 = M + log2 z and sum p (x2 - y2) = a / z.
//   -inf handling: an m of -inf contributes a factor 0 (never 2^(-inf - -inf) = NaN); a term with
//   2^(x2 - m) == 0 adds 0 to a (so -inf - -inf is never formed). NaN propagation: fmax ignores NaN,
//   but 2^(NaN - m) = NaN enters z, and 0 * NaN = NaN survives every rescale, so lse2 becomes NaN.
//   +inf: m = +inf and 2^(inf - inf) = NaN.
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

// Divergence codes: fastkd::Divergence of common.h (checked by distill_loss.cu), kept as plain ints here
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
__device__ __forceinline__ float dmax(float a, float b) { return fmaxf(a, b); }  // NaN-ignoring
__device__ __forceinline__ double dmax(double a, double b) { return fmax(a, b); }
template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Running log-sum-exp state of one input (base 2). a is used only where the divergence needs it.
template <typename acc_t>
struct Lse {
  acc_t m, z, a;
};

template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_identity() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0)};
}

template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_combine(const Lse<acc_t>& x, const Lse<acc_t>& y) {
  const acc_t M = dmax(x.m, y.m);
  const acc_t Ms = (M == neg_inf<acc_t>()) ? acc_t(0) : M;
  const acc_t fx = (x.m == neg_inf<acc_t>()) ? acc_t(0) : dexp2(x.m - Ms);
  const acc_t fy = (y.m == neg_inf<acc_t>()) ? acc_t(0) : dexp2(y.m - Ms);
  return {M, x.z * fx + y.z * fy, x.a * fx + y.a * fy};
}

// Adds n values x (with partners y for the a-sum) to a running state.
template <bool kHasA, int kN, typename acc_t>
__device__ __forceinline__ void lse_add(Lse<acc_t>& st, const acc_t (&x)[kN], const acc_t (&y)[kN]) {
  acc_t bm = x[0];
#pragma unroll
  for (int i = 1; i < kN; ++i) bm = dmax(bm, x[i]);
  if (bm > st.m) {  // false for NaN: m never becomes NaN, z does
    const acc_t f = (st.m == neg_inf<acc_t>()) ? acc_t(0) : dexp2(st.m - bm);
    st.z *= f;
    if (kHasA) st.a *= f;
    st.m = bm;
  }
  const acc_t shift = (st.m == neg_inf<acc_t>()) ? acc_t(0) : st.m;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const acc_t e = dexp2(x[i] - shift);
    st.z += e;
    if (kHasA) st.a += (e == acc_t(0)) ? acc_t(0) : e * (x[i] - y[i]);
  }
}

template <typename acc_t>
struct Pair {
  Lse<acc_t> s, t;
};

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

template <typename acc_t>
__device__ __forceinline__ Pair<acc_t> warp_reduce(Pair<acc_t> v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    Lse<acc_t> os{shfl_xor(v.s.m, o), shfl_xor(v.s.z, o), shfl_xor(v.s.a, o)};
    Lse<acc_t> ot{shfl_xor(v.t.m, o), shfl_xor(v.t.z, o), shfl_xor(v.t.a, o)};
    v.s = lse_combine(v.s, os);
    v.t = lse_combine(v.t, ot);
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
template <int kGroup, typename acc_t>
__device__ __forceinline__ Pair<acc_t> group_reduce(Pair<acc_t> v, Pair<acc_t>* scratch) {
  v = warp_reduce(v);
  if constexpr (kGroup > kWarp) {
    constexpr int kWarps = kGroup / kWarp;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < kWarps) ? scratch[lane] : Pair<acc_t>{lse_identity<acc_t>(), lse_identity<acc_t>()};
    v = warp_reduce(v);  // every warp reduces the kWarps partials itself: no second barrier round
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

// The per-element gradient of pass 2 (KL / reverse KL) or pass 3 (JSD). s2, t2: base-2 scaled logits.
template <int kDiv, typename acc_t>
struct GradFn {
  acc_t lse2_s, lse2_t, D, cg, kl_p, kl_q, b1, b0;
  __device__ __forceinline__ void operator()(acc_t s2, acc_t t2, acc_t& g_s, acc_t& g_t) const {
    constexpr acc_t ln2 = Consts<acc_t>::kLn2;
    const acc_t ls2 = s2 - lse2_s, lt2 = t2 - lse2_t;
    const acc_t q = dexp2(ls2), p = dexp2(lt2);
    if constexpr (kDiv == kKL) {
      g_s = (q - p) * cg;
      g_t = (p == acc_t(0)) ? acc_t(0) : p * (ln2 * (lt2 - ls2) - D) * cg;
    } else if constexpr (kDiv == kReverseKL) {
      g_s = (q == acc_t(0)) ? acc_t(0) : q * (ln2 * (ls2 - lt2) - D) * cg;
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
  constexpr bool kAt = (kDiv == kKL), kAs = (kDiv == kReverseKL);

  // ---- pass 1: online log-sum-exp of s2 and t2 (+ the KL / reverse-KL numerator)
  Pair<acc_t> st{lse_identity<acc_t>(), lse_identity<acc_t>()};
  auto add_scalar = [&](int64_t j) {
    const acc_t s1[1] = {static_cast<acc_t>(xs[j]) * k2};
    const acc_t t1[1] = {static_cast<acc_t>(xt[j]) * k2};
    lse_add<kAs>(st.s, s1, t1);
    lse_add<kAt>(st.t, t1, s1);
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
      s[i] = static_cast<acc_t>(vs.v[i]) * k2;
      t[i] = static_cast<acc_t>(vt.v[i]) * k2;
    }
    lse_add<kAs>(st.s, s, t);
    lse_add<kAt>(st.t, t, s);
  }
  for (int64_t j = sp.tail0 + tid; j < V; j += kGroup) add_scalar(j);
  st = group_reduce<kGroup>(st, scratch);

  const acc_t ms = st.s.m == neg_inf<acc_t>() ? acc_t(0) : st.s.m;
  const acc_t mt = st.t.m == neg_inf<acc_t>() ? acc_t(0) : st.t.m;
  const acc_t lse2_s = ms + dlog2(st.s.z), lse2_t = mt + dlog2(st.t.z);
  // lse2_s - lse2_t for the loss, without the cancellation of two numbers of size ~log2(V):
  const acc_t lse2_diff = (ms - mt) + dlog2(st.s.z / st.t.z);
  GradFn<kDiv, acc_t> fn{lse2_s, lse2_t, acc_t(0), c * P.inv_t, acc_t(0), acc_t(0), P.beta, acc_t(1) - P.beta};

  // Visits every element of the row as (j, s2, t2) for scalars and (j, s2[kN], t2[kN]) for vectors,
  // vectors in reverse order of pass 1 (see the header), cached ones from shared memory.
  auto for_row = [&](auto&& on_scalar, auto&& on_vec) {
    for (int64_t j = sp.tail0 + tid; j < V; j += kGroup)
      on_scalar(j, static_cast<acc_t>(xs[j]) * k2, static_cast<acc_t>(xt[j]) * k2);
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
          s[i] = static_cast<acc_t>(vs.v[i]) * k2;
          t[i] = static_cast<acc_t>(vt.v[i]) * k2;
        }
        on_vec(j, s, t);
      }
    }
    for (int64_t j = tid; j < sp.head; j += kGroup)
      on_scalar(j, static_cast<acc_t>(xs[j]) * k2, static_cast<acc_t>(xt[j]) * k2);
  };

  acc_t D;
  if constexpr (kDiv == kKL) {
    D = ln2 * (st.t.a / st.t.z + lse2_diff);
  } else if constexpr (kDiv == kReverseKL) {
    D = ln2 * (st.s.a / st.s.z - lse2_diff);
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
  fn.D = D;
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

// ---- host side: parameters and launch shape (used by distill_loss.cu and by the host emulation)

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
