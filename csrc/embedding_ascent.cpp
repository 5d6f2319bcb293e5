// fastkd:cpu-dispatch
// fastkd::embedding_ascent_ / embedding_ascent_multi_ — fused in-place gradient step on token
// embeddings, CPU kernel (at::vec SIMD within a row, at::parallel_for over rows of every tensor of
// the list). The CUDA kernel is in embedding_ascent_cuda.cu, the Triton kernel in
// kernels/embedding_ascent.py, the reference and the documentation of the options in
// fastkd/ops/embedding_ascent.py.
//
// Per token row (last dimension H; s = +1 to ascend, -1 to descend), in float32 (float64 for float64
// embeddings):
//   g  = s * grad
//   momentum buffer given (MI-FGSM):  b = momentum * b + g / ||g||_1   (0 for a zero row), g := b
//   direction:  "l2"  d = g / ||g||_2    "sign" d = sign(g)    "none" d = g
//   x  = e + step_size * d             (a row whose g is exactly 0 is not stepped: x = e, no NaN)
//   radius (around origin o):  "l2"/"none": if ||x - o||_2 > r:  x = o + (x - o) * r / ||x - o||_2
//                              "sign":      where |x - o| > r:   x = o + copysign(r, x - o)
//   max_norm:                  if ||x||_2 > max_norm:  x = x * max_norm / ||x||_2
//   e  = x; rows whose mask is False are not read or written (embeds and buffer stay bit-identical).
// Each row is loaded once into two per-thread scratch rows (x and g in the compute type), all the
// passes above run on that scratch (it stays in L1), and the row is stored once.
#include "cpu_dispatch.h"
#include "embedding_ascent.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

namespace fastkd {
namespace CPU_CAPABILITY {
namespace embedding_ascent_impl {  // one namespace per file: the level's files compile as one unit
namespace {

using at::vec::Vectorized;
using namespace fastkd::ascent;

template <typename acc_t>
struct Params {
  acc_t step, sgn, momentum, radius, max_norm;
  bool has_radius, has_max_norm;
  int64_t norm;
};

template <typename src_t, typename acc_t>
inline void load_acc(const src_t* __restrict src, acc_t* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
  }
}

template <typename dst_t, typename acc_t>
inline void store_acc(const acc_t* __restrict src, dst_t* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<dst_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<dst_t>(src[j]);
  }
}

template <typename acc_t>
inline acc_t hsum(Vectorized<acc_t> v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

template <typename acc_t>
inline acc_t sum_sq(const acc_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec a(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec v = Vec::loadu(x + j);
    a = at::vec::fmadd(v, v, a);
  }
  acc_t s = hsum(a);
  for (; j < n; ++j) s += x[j] * x[j];
  return s;
}

template <typename acc_t>
inline acc_t sum_abs(const acc_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec a(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) a = a + Vec::loadu(x + j).abs();
  acc_t s = hsum(a);
  for (; j < n; ++j) s += std::abs(x[j]);
  return s;
}

// sum (x - o)^2
template <typename acc_t>
inline acc_t sum_sq_diff(const acc_t* x, const acc_t* o, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec a(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec v = Vec::loadu(x + j) - Vec::loadu(o + j);
    a = at::vec::fmadd(v, v, a);
  }
  acc_t s = hsum(a);
  for (; j < n; ++j) s += (x[j] - o[j]) * (x[j] - o[j]);
  return s;
}

// x += c * d
template <typename acc_t>
inline void axpy(acc_t* x, const acc_t* d, acc_t c, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec vc(c);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) at::vec::fmadd(vc, Vec::loadu(d + j), Vec::loadu(x + j)).store(x + j);
  for (; j < n; ++j) x[j] += c * d[j];
}

// sign with NaN and signed zero passing through (sign(NaN) = NaN, so NaN gradients propagate).
template <typename acc_t>
inline acc_t sign_of(acc_t v) {
  return v > acc_t(0) ? acc_t(1) : (v < acc_t(0) ? acc_t(-1) : v);
}

// x += c * sign(d)
template <typename acc_t>
inline void sign_step(acc_t* x, const acc_t* d, acc_t c, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(acc_t(0)), pc(c), nc(-c);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec v = Vec::loadu(d + j);
    // c * v for v = 0 or NaN (0 or NaN), +c for v > 0, -c for v < 0
    Vec s = Vec::blendv(v * pc, pc, v > zero);
    s = Vec::blendv(s, nc, v < zero);
    (Vec::loadu(x + j) + s).store(x + j);
  }
  for (; j < n; ++j) x[j] += c * sign_of(d[j]);
}

// x = o + (x - o) * f
template <typename acc_t>
inline void pull_towards(acc_t* x, const acc_t* o, acc_t f, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec vf(f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec ov = Vec::loadu(o + j);
    at::vec::fmadd(Vec::loadu(x + j) - ov, vf, ov).store(x + j);
  }
  for (; j < n; ++j) x[j] = o[j] + (x[j] - o[j]) * f;
}

// where |x - o| > r: x = o + copysign(r, x - o)
template <typename acc_t>
inline void clamp_box(acc_t* x, const acc_t* o, acc_t r, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec vr(r), nr(-r), zero(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec xv = Vec::loadu(x + j), ov = Vec::loadu(o + j);
    const Vec dv = xv - ov;
    const Vec edge = ov + Vec::blendv(vr, nr, dv < zero);
    Vec::blendv(xv, edge, dv.abs() > vr).store(x + j);
  }
  for (; j < n; ++j) {
    const acc_t dv = x[j] - o[j];
    if (std::abs(dv) > r) x[j] = o[j] + (dv < acc_t(0) ? -r : r);
  }
}

template <typename acc_t>
inline void scale(acc_t* x, acc_t f, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec vf(f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) * vf).store(x + j);
  for (; j < n; ++j) x[j] *= f;
}

// b = mu * b + inv * g; g := b (the new buffer, in the compute type); returns sum of squares of b.
template <typename buf_t, typename acc_t>
inline acc_t momentum_update(acc_t* g, buf_t* b, acc_t mu, acc_t inv, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<buf_t, acc_t>) {
    const Vec vm(mu), vi(inv);
    Vec a(acc_t(0));
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec v = at::vec::fmadd(vm, Vec::loadu(b + j), Vec::loadu(g + j) * vi);
      v.store(g + j);
      v.store(b + j);
      a = at::vec::fmadd(v, v, a);
    }
    acc_t s = hsum(a);
    for (; j < n; ++j) {
      const acc_t v = mu * b[j] + g[j] * inv;
      g[j] = v;
      b[j] = v;
      s += v * v;
    }
    return s;
  } else {
    // Low-precision buffer: the new g is what the buffer will hold (rounded), so that the step
    // uses exactly the stored momentum, as the reference does.
    acc_t s = 0;
    for (int64_t j = 0; j < n; ++j) {
      const buf_t v = static_cast<buf_t>(mu * static_cast<acc_t>(b[j]) + g[j] * inv);
      b[j] = v;
      g[j] = static_cast<acc_t>(v);
      s += g[j] * g[j];
    }
    return s;
  }
}

template <typename scalar_t, typename buf_t, typename acc_t>
void ascent_row(scalar_t* e, const scalar_t* gp, const scalar_t* op, buf_t* bp, int64_t H, const Params<acc_t>& p,
                acc_t* x, acc_t* g) {
  load_acc(e, x, H);
  load_acc(gp, g, H);
  acc_t c = p.step * p.sgn;  // the descent sign is folded into the step (g itself keeps grad's sign)
  acc_t sq;
  if (bp != nullptr) {
    const acc_t l1 = sum_abs(g, H);
    const acc_t inv = (l1 == acc_t(0)) ? acc_t(0) : p.sgn / l1;
    sq = momentum_update(g, bp, p.momentum, inv, H);
    c = p.step;  // the buffer already carries the sign
  } else {
    sq = sum_sq(g, H);
  }
  if (sq != acc_t(0)) {  // NaN also steps, so a NaN gradient propagates
    if (p.norm == L2) {
      axpy(x, g, c / std::sqrt(sq), H);
    } else if (p.norm == SIGN) {
      sign_step(x, g, c, H);
    } else {
      axpy(x, g, c, H);
    }
  }
  if (p.has_radius) {
    load_acc(op, g, H);  // g's scratch now holds the origin
    if (p.norm == SIGN) {
      clamp_box(x, g, p.radius, H);
    } else {
      const acc_t dn = std::sqrt(sum_sq_diff(x, g, H));
      if (dn > p.radius) pull_towards(x, g, p.radius / dn, H);
    }
  }
  if (p.has_max_norm) {
    const acc_t xn = std::sqrt(sum_sq(x, H));
    if (xn > p.max_norm) scale(x, p.max_norm / xn, H);
  }
  store_acc(x, e, H);
}

template <typename scalar_t, typename buf_t>
void run_groups(std::vector<Group>& groups, double step_size, int64_t norm, std::optional<double> radius,
                std::optional<double> max_norm, double momentum, bool maximize) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  Params<acc_t> p;
  p.step = static_cast<acc_t>(step_size);
  p.sgn = maximize ? acc_t(1) : acc_t(-1);
  p.momentum = static_cast<acc_t>(momentum);
  p.has_radius = radius.has_value();
  p.radius = static_cast<acc_t>(radius.value_or(0));
  p.has_max_norm = max_norm.has_value();
  p.max_norm = static_cast<acc_t>(max_norm.value_or(0));
  p.norm = norm;

  const int64_t G = static_cast<int64_t>(groups.size());
  std::vector<int64_t> first(G + 1, 0);  // first global row of each group
  int64_t maxH = 0;
  for (int64_t i = 0; i < G; ++i) {
    first[i + 1] = first[i] + groups[i].rows;
    maxH = std::max(maxH, groups[i].H);
  }
  const int64_t total = first[G];
  if (total == 0 || maxH == 0) return;
  // ~16 KiB of row data per task keeps scheduling overhead low for short rows.
  const int64_t grain = std::max<int64_t>(1, 4096 / maxH);
  at::parallel_for(0, total, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> xs(maxH), gs(maxH);
    int64_t gi = std::upper_bound(first.begin(), first.end(), r0) - first.begin() - 1;
    for (int64_t r = r0; r < r1; ++r) {
      while (r >= first[gi + 1]) ++gi;
      Group& gr = groups[gi];
      const int64_t i = r - first[gi];  // row within the group; int64 offsets below
      if (gr.m.defined() && !gr.m.data_ptr<bool>()[i]) continue;
      scalar_t* e = gr.e.t.data_ptr<scalar_t>() + i * gr.e.stride;
      const scalar_t* g = gr.g.t.data_ptr<scalar_t>() + i * gr.g.stride;
      const scalar_t* o = p.has_radius ? gr.o.t.data_ptr<scalar_t>() + i * gr.o.stride : nullptr;
      buf_t* b = gr.b.t.defined() ? gr.b.t.data_ptr<buf_t>() + i * gr.b.stride : nullptr;
      ascent_row<scalar_t, buf_t, acc_t>(e, g, o, b, gr.H, p, xs.data(), gs.data());
    }
  });
}

void ascent_impl(const std::vector<at::Tensor>& embeds, const std::vector<at::Tensor>& grads,
                 const std::vector<std::optional<at::Tensor>>& origins,
                 const std::vector<std::optional<at::Tensor>>& masks,
                 const std::vector<std::optional<at::Tensor>>& bufs, double step_size, int64_t norm,
                 std::optional<double> radius, std::optional<double> max_norm, double momentum, bool maximize) {
  Prepared pr =
      prepare(embeds, grads, origins, masks, bufs, step_size, norm, radius, max_norm, momentum, c10::DeviceType::CPU);
  if (pr.groups.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pr.dtype, "fastkd_embedding_ascent_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (pr.buf_same) {
      run_groups<scalar_t, scalar_t>(pr.groups, step_size, norm, radius, max_norm, momentum, maximize);
    } else {
      run_groups<scalar_t, acc_t>(pr.groups, step_size, norm, radius, max_norm, momentum, maximize);
    }
  });
  write_back(pr.groups, embeds, bufs);
}

void embedding_ascent_cpu(at::Tensor embeds, const at::Tensor& grad, const std::optional<at::Tensor>& origin,
                          const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& momentum_buffer,
                          double step_size, int64_t norm, std::optional<double> radius, std::optional<double> max_norm,
                          double momentum, bool maximize) {
  ascent_impl({embeds}, {grad}, {origin}, {mask}, {momentum_buffer}, step_size, norm, radius, max_norm, momentum,
              maximize);
}

void embedding_ascent_multi_cpu(at::TensorList embeds, at::TensorList grads, at::TensorList origins,
                                const c10::List<std::optional<at::Tensor>>& masks, at::TensorList momentum_buffers,
                                double step_size, int64_t norm, std::optional<double> radius,
                                std::optional<double> max_norm, double momentum, bool maximize) {
  Lists l = unpack_lists(embeds, grads, origins, masks, momentum_buffers);
  ascent_impl(l.e, l.g, l.o, l.m, l.b, step_size, norm, radius, max_norm, momentum, maximize);
}

}  // namespace
}  // namespace embedding_ascent_impl
using embedding_ascent_impl::embedding_ascent_cpu;
using embedding_ascent_impl::embedding_ascent_multi_cpu;
}  // namespace CPU_CAPABILITY
}  // namespace fastkd

FASTKD_CPU_KERNEL(embedding_ascent_cpu)
FASTKD_CPU_KERNEL(embedding_ascent_multi_cpu)

#ifdef FASTKD_CPU_BASE
TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def(
      "embedding_ascent_(Tensor(a!) embeds, Tensor grad, Tensor? origin, Tensor? mask, Tensor(b!)? momentum_buffer, "
      "float step_size, int norm, float? radius, float? max_norm, float momentum, bool maximize) -> ()");
  m.def(
      "embedding_ascent_multi_(Tensor(a!)[] embeds, Tensor[] grads, Tensor[] origins, Tensor?[] masks, "
      "Tensor(b!)[] momentum_buffers, float step_size, int norm, float? radius, float? max_norm, float momentum, "
      "bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("embedding_ascent_", FASTKD_CPU_DISPATCH(embedding_ascent_cpu));
  m.impl("embedding_ascent_multi_", FASTKD_CPU_DISPATCH(embedding_ascent_multi_cpu));
}
#endif
