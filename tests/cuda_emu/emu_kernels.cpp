// Host entry points (C ABI, for ctypes) that run fastkd's CUDA kernels (csrc/distill_loss.cuh,
// csrc/scale_grad.cuh) under the host emulation of cuda_host_emu.h, launched the way
// csrc/distill_loss_cuda.cu and csrc/scale_grad_cuda.cu launch them. Built by tests/cuda_emu/__init__.py for tests/test_distill_loss.py.
#include "cuda_host_emu.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "distill_loss.cuh"
#include "scale_grad.cuh"

namespace {

using namespace fastkd;

template <typename scalar_t, int kDiv>
int64_t run_distill(const void* s, const void* t, const void* rs, void* loss, void* gs, void* gt, int64_t N, int64_t V,
                    double temperature, double beta, double loss_scale, int64_t smem_avail, int64_t max_grid) {
  using namespace distill_cuda;
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  auto P = make_params<scalar_t, acc_t>(static_cast<const scalar_t*>(s), static_cast<const scalar_t*>(t),
                                        static_cast<const acc_t*>(rs), static_cast<acc_t*>(loss),
                                        static_cast<scalar_t*>(gs), static_cast<scalar_t*>(gt), N, V, temperature,
                                        beta, loss_scale);
  const LaunchPlan plan = plan_launch<scalar_t>(V, P.vec_ok, smem_avail);
  if (plan.warp_per_row) {
    const int64_t grid = std::min<int64_t>((N + kWarpRows - 1) / kWarpRows, max_grid);
    fastkd_emu::launch(static_cast<unsigned>(grid), kWarp * kWarpRows, 0,
                       [&] { distill_loss_warp_kernel<scalar_t, acc_t, kDiv>(P); });
    return -1;
  }
  P.cache_vecs = plan.cache_vecs;
  const int64_t grid = std::min<int64_t>(N, max_grid);
  fastkd_emu::launch(static_cast<unsigned>(grid), kBlockThreads, static_cast<size_t>(plan.smem_bytes),
                     [&] { distill_loss_block_kernel<scalar_t, acc_t, kDiv>(P); });
  return plan.cache_vecs;
}

template <typename scalar_t>
int64_t run_distill_div(int div, const void* s, const void* t, const void* rs, void* loss, void* gs, void* gt,
                        int64_t N, int64_t V, double T, double beta, double ls, int64_t smem, int64_t grid) {
  if (div == 0) return run_distill<scalar_t, 0>(s, t, rs, loss, gs, gt, N, V, T, beta, ls, smem, grid);
  if (div == 1) return run_distill<scalar_t, 1>(s, t, rs, loss, gs, gt, N, V, T, beta, ls, smem, grid);
  return run_distill<scalar_t, 2>(s, t, rs, loss, gs, gt, N, V, T, beta, ls, smem, grid);
}

template <typename scalar_t, typename scale_t>
void run_scale(void* g, const void* scale, int64_t rows, int64_t cols, bool per_row, int64_t max_grid) {
  using namespace scale_cuda;
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  auto* gp = static_cast<scalar_t*>(g);
  auto* sp = static_cast<const scale_t*>(scale);
  if (per_row) {
    const int64_t grid = std::min<int64_t>(rows, max_grid);
    fastkd_emu::launch(static_cast<unsigned>(grid), kThreads, 0,
                       [&] { scale_rows_kernel<scalar_t, acc_t, scale_t>(gp, sp, rows, cols); });
  } else {
    const int64_t numel = rows * cols;
    constexpr int64_t kN = Vec16<scalar_t>::kN;
    const int64_t grid = std::min<int64_t>((numel / kN + kN + kThreads - 1) / kThreads, max_grid);
    fastkd_emu::launch(static_cast<unsigned>(grid), kThreads, 0,
                       [&] { scale_all_kernel<scalar_t, acc_t, scale_t>(gp, sp, numel); });
  }
}

template <typename scalar_t>
void run_scale_dtype(bool scale_double, void* g, const void* scale, int64_t rows, int64_t cols, bool per_row,
                     int64_t grid) {
  if (scale_double)
    run_scale<scalar_t, double>(g, scale, rows, cols, per_row, grid);
  else
    run_scale<scalar_t, float>(g, scale, rows, cols, per_row, grid);
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 bfloat16, 3 float16. Returns the number of cached vectors per
// input of the block kernel, or -1 when the warp-per-row kernel ran.
extern "C" int64_t fastkd_emu_distill_loss(int dtype, int div, const void* s, const void* t, const void* rs, void* loss,
                                           void* gs, void* gt, int64_t N, int64_t V, double temperature, double beta,
                                           double loss_scale, int64_t smem_avail, int64_t max_grid) {
  switch (dtype) {
    case 0:
      return run_distill_div<float>(div, s, t, rs, loss, gs, gt, N, V, temperature, beta, loss_scale, smem_avail,
                                    max_grid);
    case 1:
      return run_distill_div<double>(div, s, t, rs, loss, gs, gt, N, V, temperature, beta, loss_scale, smem_avail,
                                     max_grid);
    case 2:
      return run_distill_div<c10::BFloat16>(div, s, t, rs, loss, gs, gt, N, V, temperature, beta, loss_scale,
                                            smem_avail, max_grid);
    default:
      return run_distill_div<c10::Half>(div, s, t, rs, loss, gs, gt, N, V, temperature, beta, loss_scale, smem_avail,
                                        max_grid);
  }
}

extern "C" void fastkd_emu_scale_grad(int dtype, int scale_double, void* g, const void* scale, int64_t rows,
                                      int64_t cols, int per_row, int64_t max_grid) {
  switch (dtype) {
    case 0:
      return run_scale_dtype<float>(scale_double, g, scale, rows, cols, per_row, max_grid);
    case 1:
      return run_scale_dtype<double>(scale_double, g, scale, rows, cols, per_row, max_grid);
    case 2:
      return run_scale_dtype<c10::BFloat16>(scale_double, g, scale, rows, cols, per_row, max_grid);
    default:
      return run_scale_dtype<c10::Half>(scale_double, g, scale, rows, cols, per_row, max_grid);
  }
}
