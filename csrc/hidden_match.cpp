// fastkd:cpu-dispatch
// fastkd::hidden_match — fused multi-layer hidden-state matching (projection + MSE / cosine / NMSE),
// CPU kernel. The CUDA kernel is in hidden_match_cuda.cu, the Triton kernel in kernels/hidden_match.py, the
// reference in fastkd/ops/hidden_match.py; the loss math and its gradient coefficients are written
// in hidden_match.h.
//
// Inputs: student S [L, N, Hs], teacher T [L, N, Ht], optional weight W ([L, Ht, Hs] per layer or
// [Ht, Hs] shared) and bias b ([L, Ht] or [Ht]), row_scale w [L, N] (the reduction weights: layer
// weight x mask / count). P_l = S_l W_l^T + b_l (P = S + b without a weight).
// Outputs: the loss (sum over rows of w * loss_row, or the [L, N] rows), and, when asked, the
// gradients of that sum: dS_l = dP_l W_l, dW_l = dP_l^T S_l (summed over l when shared),
// db_l = colsum(dP_l), dT_l, where dP_l is w * dLoss/dP row by row.
//
// Schedule: one call handles every layer. For each layer, rows go in tiles of R (see tile_rows):
//   P_tile = S_tile W^T           MKL/oneDNN GEMM into one reusable buffer (at::mm_out)
//   row pass                      at::vec, parallel over rows: loss and dP in place over P_tile, dT
//   dS_tile = dP_tile W           GEMM straight into the dS output
//   dW += dP_tile^T S_tile        GEMM accumulating into dW (addmm_)
//   db += colsum(dP_tile)         summed per thread inside the row pass
// so the projection exists only one tile at a time (up to 32 MiB: one whole layer at the issue
// shape), never as an [L, N, Ht] tensor, and the gradients are complete when the forward returns
// (backward is a scale).
// bfloat16/float16 inputs are computed in float32 (tiles converted on the fly), float64 in float64.
#include "cpu_dispatch.h"
#include "hidden_match.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

namespace fastkd {
namespace CPU_CAPABILITY {
namespace hidden_match_impl {  // one namespace per file: the level's files compile as one unit
namespace {

using at::vec::Vectorized;

template <typename acc_t>
inline acc_t vsum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

// MSE row: d = P + b - T; loss = w/H sum d^2; dP = w 2/H d (may overwrite P); dT = -dP;
// cs (the bias gradient's per-thread column sums, or nullptr) += dP.
template <typename acc_t>
acc_t row_mse(const acc_t* p, const acc_t* bias, const acc_t* t, acc_t* dp, acc_t* dt, acc_t* cs, int64_t H,
              acc_t w) {
  using Vec = Vectorized<acc_t>;
  const acc_t c = w * acc_t(2) / acc_t(H);
  const Vec vc(c), vnc(-c);
  Vec acc(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= H; j += Vec::size()) {
    const Vec d = Vec::loadu(p + j) + Vec::loadu(bias + j) - Vec::loadu(t + j);
    acc = at::vec::fmadd(d, d, acc);
    const Vec g = vc * d;
    if (dp) g.store(dp + j);
    if (dt) (vnc * d).store(dt + j);
    if (cs) (Vec::loadu(cs + j) + g).store(cs + j);
  }
  acc_t s = vsum(acc);
  for (; j < H; ++j) {
    const acc_t d = p[j] + bias[j] - t[j];
    s += d * d;
    if (dp) dp[j] = c * d;
    if (dt) dt[j] = -c * d;
    if (cs) cs[j] += c * d;
  }
  return w * s / acc_t(H);
}

// COSINE / NMSE row: pass 1 sums |P|^2, |T|^2, P.T; pass 2 writes dP (may overwrite P) and dT and,
// for NMSE, sums (P/nP - T/nT)^2.
template <typename acc_t>
acc_t row_norm_loss(int64_t loss, const acc_t* p, const acc_t* bias, const acc_t* t, acc_t* dp, acc_t* dt, acc_t* cs,
                    int64_t H, acc_t w, acc_t eps) {
  using Vec = Vectorized<acc_t>;
  Vec vpp(acc_t(0)), vtt(acc_t(0)), vpt(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= H; j += Vec::size()) {
    const Vec x = Vec::loadu(p + j) + Vec::loadu(bias + j), y = Vec::loadu(t + j);
    vpp = at::vec::fmadd(x, x, vpp);
    vtt = at::vec::fmadd(y, y, vtt);
    vpt = at::vec::fmadd(x, y, vpt);
  }
  acc_t pp = vsum(vpp), tt = vsum(vtt), pt = vsum(vpt);
  for (; j < H; ++j) {
    const acc_t x = p[j] + bias[j], y = t[j];
    pp += x * x;
    tt += y * y;
    pt += x * y;
  }
  const RowCoef<acc_t> k = norm_loss_coef<acc_t>(loss, pp, tt, pt, acc_t(H), eps, w);
  const bool nmse = loss == HM_NMSE;
  if (!dp && !dt && !cs && !nmse) return k.loss;
  const Vec aP(k.aP), bP(k.bP), aT(k.aT), bT(k.bT), ip(k.inv_np), it(k.inv_nt);
  Vec vl(acc_t(0));
  j = 0;
  for (; j + Vec::size() <= H; j += Vec::size()) {
    const Vec x = Vec::loadu(p + j) + Vec::loadu(bias + j), y = Vec::loadu(t + j);
    if (nmse) {
      const Vec d = x * ip - y * it;
      vl = at::vec::fmadd(d, d, vl);
    }
    if (dp || cs) {
      const Vec g = at::vec::fmadd(aP, x, bP * y);
      if (dp) g.store(dp + j);
      if (cs) (Vec::loadu(cs + j) + g).store(cs + j);
    }
    if (dt) at::vec::fmadd(aT, y, bT * x).store(dt + j);
  }
  acc_t l = vsum(vl);
  for (; j < H; ++j) {
    const acc_t x = p[j] + bias[j], y = t[j];
    if (nmse) {
      const acc_t d = x * k.inv_np - y * k.inv_nt;
      l += d * d;
    }
    const acc_t g = k.aP * x + k.bP * y;
    if (dp) dp[j] = g;
    if (cs) cs[j] += g;
    if (dt) dt[j] = k.aT * y + k.bT * x;
  }
  return nmse ? w * l / acc_t(H) : k.loss;
}

// Rows per tile: up to 32 MiB of P, a multiple of 64 rows (at least 64). Measured on the 2-core CI
// machine (issue shape, N = 8192, Ht = 768): one tile per layer beat 1024-row tiles (L2-sized) by
// 10-40% of wall time, because every tile costs five parallel regions (three GEMMs, the row pass, the
// dW accumulation) and a region waits for its slowest thread; the row pass is a small part of the time.
int64_t tile_rows(int64_t N, int64_t Ht, size_t elt) {
  const int64_t target = (int64_t(32) << 20) / std::max<int64_t>(1, Ht * int64_t(elt));
  const int64_t r = std::max<int64_t>(64, (target / 64) * 64);
  return std::max<int64_t>(1, std::min(N, r));
}

template <typename scalar_t>
void run_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& W, const at::Tensor& b,
             const at::Tensor& row_scale, int64_t loss, double eps, at::Tensor& rows, at::Tensor& gS, at::Tensor& gW,
             at::Tensor& gb, at::Tensor& gT) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kLow = !std::is_same_v<scalar_t, acc_t>;
  const int64_t L = student.size(0), N = student.size(1), Hs = student.size(2), Ht = teacher.size(2);
  const bool has_w = W.defined();
  const bool grad_s = gS.numel() > 0, grad_t = gT.numel() > 0, grad_w = gW.defined(), grad_b = gb.defined();
  const bool need_dp = grad_s || grad_w || grad_b;
  const auto acc_opts = student.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor zero_bias = b.defined() ? at::Tensor() : at::zeros({Ht}, acc_opts);
  const int64_t R = tile_rows(N, Ht, sizeof(acc_t));
  at::Tensor pbuf = at::empty({R, Ht}, acc_opts);               // P, then dP, of one tile
  at::Tensor sbuf = kLow ? at::empty({R, Hs}, acc_opts) : at::Tensor();  // low-precision S tile in acc_t
  at::Tensor dsbuf = (kLow && grad_s && has_w) ? at::empty({R, Hs}, acc_opts) : at::Tensor();
  const acc_t* rs = row_scale.data_ptr<acc_t>();
  acc_t* prow = rows.data_ptr<acc_t>();
  const acc_t feps = static_cast<acc_t>(eps);
  // ~32k elements per task: tiny inputs stay on one thread (no parallel region to wake up)
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(Ht, 1));
  // the bias gradient: column sums of dP, accumulated per thread inside the row pass
  const int nthreads = at::get_num_threads();
  std::vector<acc_t> colpart(grad_b ? size_t(nthreads) * Ht : 0);

  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor Wl = has_w ? (W.dim() == 3 ? W[l] : W) : at::Tensor();
    const at::Tensor bl = b.defined() ? (b.dim() == 2 ? b[l] : b) : zero_bias;
    at::Tensor gWl = grad_w ? (gW.dim() == 3 ? gW[l] : gW) : at::Tensor();
    at::Tensor gbl = grad_b ? (gb.dim() == 2 ? gb[l] : gb) : at::Tensor();
    const acc_t* pb = bl.data_ptr<acc_t>();
    for (int64_t r0 = 0; r0 < N; r0 += R) {
      const int64_t n = std::min(R, N - r0);
      at::Tensor sx = student[l].narrow(0, r0, n);
      if constexpr (kLow) sx = sbuf.narrow(0, 0, n).copy_(sx);
      at::Tensor pt = pbuf.narrow(0, 0, n);
      at::Tensor gs_tile = grad_s ? gS[l].narrow(0, r0, n) : at::Tensor();
      const acc_t* psrc;
      at::Tensor dpt;  // where dP of this tile is written (undefined: not needed)
      if (has_w) {
        at::mm_out(pt, sx, Wl.t());
        psrc = pt.data_ptr<acc_t>();
        if (need_dp) dpt = pt;
      } else {
        psrc = sx.data_ptr<acc_t>();
        // without a projection dS = dP: write it straight into the output when it has the dtype
        if (need_dp) dpt = (grad_s && !kLow) ? gs_tile : pt;
      }
      acc_t* pdp = dpt.defined() ? dpt.data_ptr<acc_t>() : nullptr;
      const scalar_t* tsrc = teacher.data_ptr<scalar_t>() + (l * N + r0) * Ht;
      scalar_t* tdst = grad_t ? gT.data_ptr<scalar_t>() + (l * N + r0) * Ht : nullptr;
      const acc_t* w = rs + l * N + r0;
      std::fill(colpart.begin(), colpart.end(), acc_t(0));
      at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
        std::vector<acc_t> tconv(kLow ? Ht : 0), dtconv(kLow && grad_t ? Ht : 0);
        acc_t* cs = grad_b ? colpart.data() + size_t(std::min(at::get_thread_num(), nthreads - 1)) * Ht : nullptr;
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t o = i * Ht;
          acc_t* dp = pdp ? pdp + o : nullptr;
          if (w[i] == acc_t(0)) {  // excluded row: loss 0, zero gradients, nothing read
            prow[l * N + r0 + i] = acc_t(0);
            if (dp) std::fill(dp, dp + Ht, acc_t(0));
            if (tdst) std::fill(tdst + o, tdst + o + Ht, scalar_t(0));
            continue;
          }
          const acc_t* t;
          acc_t* dt;
          if constexpr (kLow) {
            for (int64_t j = 0; j < Ht; ++j) tconv[j] = static_cast<acc_t>(tsrc[o + j]);
            t = tconv.data();
            dt = tdst ? dtconv.data() : nullptr;
          } else {
            t = tsrc + o;
            dt = tdst ? tdst + o : nullptr;
          }
          const acc_t* p = psrc + o;
          prow[l * N + r0 + i] = (loss == HM_MSE) ? row_mse<acc_t>(p, pb, t, dp, dt, cs, Ht, w[i])
                                                  : row_norm_loss<acc_t>(loss, p, pb, t, dp, dt, cs, Ht, w[i], feps);
          if constexpr (kLow) {
            if (tdst)
              for (int64_t j = 0; j < Ht; ++j) tdst[o + j] = static_cast<scalar_t>(dtconv[j]);
          }
        }
      });
      if (grad_s) {
        if (has_w) {
          if constexpr (kLow) {
            at::Tensor d = dsbuf.narrow(0, 0, n);
            at::mm_out(d, dpt, Wl);
            gs_tile.copy_(d);
          } else {
            at::mm_out(gs_tile, dpt, Wl);
          }
        } else if (!dpt.is_same(gs_tile)) {
          gs_tile.copy_(dpt);
        }
      }
      if (grad_w) {
        if (r0 == 0 && (gW.dim() == 3 || l == 0)) {
          at::mm_out(gWl, dpt.t(), sx);
        } else {
          gWl.addmm_(dpt.t(), sx);
        }
      }
      if (grad_b) {
        acc_t* g = gbl.data_ptr<acc_t>();
        for (int th = 0; th < nthreads; ++th)
          for (int64_t j = 0; j < Ht; ++j) g[j] += colpart[size_t(th) * Ht + j];
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hidden_match_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& row_scale, int64_t loss, double eps, bool reduce,
    bool grad_student, bool grad_weight, bool grad_bias, bool grad_teacher) {
  check_hidden_match_args(student, teacher, weight, bias, row_scale, loss, eps);
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  const int64_t L = student.size(0), N = student.size(1);
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = student.options().dtype(acc);
  at::Tensor rows = at::empty({L, N}, acc_opts);
  at::Tensor gS = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor gT = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  // weight and bias in the accumulation dtype (a no-op for float32/float64); their gradients are
  // accumulated there too and cast at the end.
  const at::Tensor W = has_w ? weight->to(acc).contiguous() : at::Tensor();
  const at::Tensor b = has_b ? bias->to(acc).contiguous() : at::Tensor();
  // every layer's (or, shared, the first layer's) first tile writes dW without reading it
  at::Tensor gW = (grad_weight && has_w) ? ((L > 0 && N > 0) ? at::empty(W.sizes(), acc_opts) : at::zeros(W.sizes(), acc_opts))
                                         : at::Tensor();
  at::Tensor gb = (grad_bias && has_b) ? at::zeros(b.sizes(), acc_opts) : at::Tensor();
  if (L > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fastkd_hidden_match_cpu", [&] {
      run_cpu<scalar_t>(student, teacher, W, b, row_scale, loss, eps, rows, gS, gW, gb, gT);
    });
  }
  at::Tensor out_gW = gW.defined() ? gW.to(weight->scalar_type()) : at::empty({0}, student.options());
  at::Tensor out_gb = gb.defined() ? gb.to(bias->scalar_type()) : at::empty({0}, student.options());
  at::Tensor out = reduce ? rows.sum() : rows;
  return {out, gS, out_gW, out_gb, gT};
}

}  // namespace
}  // namespace hidden_match_impl
using hidden_match_impl::hidden_match_cpu;
}  // namespace CPU_CAPABILITY
}  // namespace fastkd

FASTKD_CPU_KERNEL(hidden_match_cpu)

#ifdef FASTKD_CPU_BASE
TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def(
      "hidden_match(Tensor student, Tensor teacher, Tensor? weight, Tensor? bias, Tensor row_scale, int loss, "
      "float eps, bool reduce, bool grad_student, bool grad_weight, bool grad_bias, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("hidden_match", FASTKD_CPU_DISPATCH(hidden_match_cpu)); }
#endif
