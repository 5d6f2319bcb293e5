// Host entry points (C ABI, for ctypes) that run the CUDA kernels of csrc/embedding_ascent.cuh and
// csrc/nearest_tokens.cuh under the host emulation of cuda_host_emu.h, launched the way
// csrc/embedding_ascent_cuda.cu and csrc/nearest_tokens_cuda.cu launch them. Built by tests/cuda_emu/__init__.py for tests/emu_embed.py.
#include "cuda_host_emu.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "embedding_ascent.cuh"
#include "nearest_tokens.cuh"

namespace {

using namespace fastkd;

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t, typename buf_t>
int run_ascent(int n, void* const* e, void* const* g, void* const* o, void* const* m, void* const* b,
               const int64_t* strides, const int64_t* rows, const int64_t* H, double step, int norm, int has_radius,
               double radius, int has_max_norm, double max_norm, int has_buf, double momentum, int maximize) {
  using namespace ascent_cuda;
  using acc_t = acc_of<scalar_t>;
  Batch batch{};
  int64_t total = 0, max_h = 0;
  for (int i = 0; i < n; ++i) {
    GroupArg& a = batch.gr[batch.n++];
    a.e = e[i];
    a.g = g[i];
    a.o = has_radius ? o[i] : nullptr;
    a.m = static_cast<const bool*>(m[i]);
    a.b = has_buf ? b[i] : nullptr;
    a.se = strides[4 * i];
    a.sg = strides[4 * i + 1];
    a.so = strides[4 * i + 2];
    a.sb = strides[4 * i + 3];
    a.first = total;
    a.H = H[i];
    total += rows[i];
    max_h = std::max(max_h, H[i]);
  }
  DevParams<acc_t> p;
  p.step = static_cast<acc_t>(step);
  p.sgn = maximize ? acc_t(1) : acc_t(-1);
  p.momentum = static_cast<acc_t>(momentum);
  p.radius = static_cast<acc_t>(radius);
  p.max_norm = static_cast<acc_t>(max_norm);
  p.has_buf = has_buf != 0;
  p.has_radius = has_radius != 0;
  p.has_max_norm = has_max_norm != 0;
  p.norm = norm;
  const Plan plan = plan_threads(max_h);
  if (plan.vpt == 0) return -1;
  dispatch_vpt(plan.vpt, [&](auto V) {
    fastkd_emu::launch(static_cast<unsigned>(total), static_cast<unsigned>(plan.threads), 0,
                       [&] { ascent_kernel<scalar_t, buf_t, acc_t, decltype(V)::value>(batch, p); });
  });
  return plan.threads;
}

template <typename scalar_t>
int run_ascent_buf(int buf_same, int n, void* const* e, void* const* g, void* const* o, void* const* m,
                   void* const* b, const int64_t* strides, const int64_t* rows, const int64_t* H, double step,
                   int norm, int has_radius, double radius, int has_max_norm, double max_norm, int has_buf,
                   double momentum, int maximize) {
  if (buf_same)
    return run_ascent<scalar_t, scalar_t>(n, e, g, o, m, b, strides, rows, H, step, norm, has_radius, radius,
                                          has_max_norm, max_norm, has_buf, momentum, maximize);
  return run_ascent<scalar_t, acc_of<scalar_t>>(n, e, g, o, m, b, strides, rows, H, step, norm, has_radius, radius,
                                                has_max_norm, max_norm, has_buf, momentum, maximize);
}

template <typename acc_t>
void run_merge(const void* S, int64_t ldS, int64_t rows, int64_t cn, int64_t c0, const void* colterm, int metric,
               void* bv, void* braw, int64_t* bi, int64_t k) {
  using namespace nearest_cuda;
  dispatch_kmax(k, [&](auto KM) {
    fastkd_emu::launch(static_cast<unsigned>(rows), kThreads, 0, [&] {
      merge_kernel<acc_t, decltype(KM)::value>(static_cast<const acc_t*>(S), ldS, cn, c0,
                                               static_cast<const acc_t*>(colterm), metric, static_cast<acc_t*>(bv),
                                               static_cast<acc_t*>(braw), bi, static_cast<int>(k));
    });
  });
}

template <typename scalar_t>
void run_finalize(const void* e, const void* w, int64_t N, int64_t H, const void* braw, const int64_t* bi,
                  void* scores, int64_t k, int metric) {
  using namespace nearest_cuda;
  using acc_t = acc_of<scalar_t>;
  fastkd_emu::launch(static_cast<unsigned>(N), kThreads, 0, [&] {
    finalize_kernel<scalar_t, acc_t>(static_cast<const acc_t*>(e), static_cast<const scalar_t*>(w), H,
                                     static_cast<const acc_t*>(braw), bi, static_cast<acc_t*>(scores),
                                     static_cast<int>(k), metric);
  });
}

}  // namespace

// dtype codes: 0 float32, 1 float64, 2 bfloat16, 3 float16. Returns the block size used, -1 when
// H is too large for the kernel.
extern "C" int fastkd_emu_embedding_ascent(int dtype, int buf_same, int n, void* const* e, void* const* g,
                                           void* const* o, void* const* m, void* const* b, const int64_t* strides,
                                           const int64_t* rows, const int64_t* H, double step, int norm,
                                           int has_radius, double radius, int has_max_norm, double max_norm,
                                           int has_buf, double momentum, int maximize) {
#define FASTKD_EMU_ASCENT(T)                                                                                     \
  return run_ascent_buf<T>(buf_same, n, e, g, o, m, b, strides, rows, H, step, norm, has_radius, radius,        \
                           has_max_norm, max_norm, has_buf, momentum, maximize)
  switch (dtype) {
    case 0:
      FASTKD_EMU_ASCENT(float);
    case 1:
      FASTKD_EMU_ASCENT(double);
    case 2:
      FASTKD_EMU_ASCENT(c10::BFloat16);
    default:
      FASTKD_EMU_ASCENT(c10::Half);
  }
#undef FASTKD_EMU_ASCENT
}

// acc_code: 0 float32, 1 float64 (the compute type of the score tile and of the lists).
extern "C" void fastkd_emu_nearest_merge(int acc_code, const void* S, int64_t ldS, int64_t rows, int64_t cn, int64_t c0,
                                         const void* colterm, int metric, void* bv, void* braw, int64_t* bi,
                                         int64_t k) {
  if (acc_code == 1) return run_merge<double>(S, ldS, rows, cn, c0, colterm, metric, bv, braw, bi, k);
  run_merge<float>(S, ldS, rows, cn, c0, colterm, metric, bv, braw, bi, k);
}

// w_dtype: the vocabulary's dtype code; e is in the compute type.
extern "C" void fastkd_emu_nearest_finalize(int w_dtype, const void* e, const void* w, int64_t N, int64_t H,
                                            const void* braw, const int64_t* bi, void* scores, int64_t k,
                                            int metric) {
  switch (w_dtype) {
    case 0:
      return run_finalize<float>(e, w, N, H, braw, bi, scores, k, metric);
    case 1:
      return run_finalize<double>(e, w, N, H, braw, bi, scores, k, metric);
    case 2:
      return run_finalize<c10::BFloat16>(e, w, N, H, braw, bi, scores, k, metric);
    default:
      return run_finalize<c10::Half>(e, w, N, H, braw, bi, scores, k, metric);
  }
}
