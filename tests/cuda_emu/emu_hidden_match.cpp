// Host entry point (C ABI, for ctypes) that runs fastkd's hidden_match CUDA row kernel
// (csrc/hidden_match.cuh) under the host emulation of cuda_host_emu.h, launched the way
// csrc/hidden_match_cuda.cu launches it. Built by tests/cuda_emu/__init__.py for tests/test_hidden_match.py.
#include "cuda_host_emu.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "hidden_match.cuh"

namespace {

using namespace fastkd;

template <typename scalar_t>
void run_rows(int64_t loss, const void* p, const void* bias, int64_t bias_stride, const void* t, const void* rs,
              void* dp, void* dt, void* loss_rows, int64_t R, int64_t N, int64_t H, double eps, int64_t max_grid) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  hidden_cuda::RowParams<scalar_t, acc_t> P;
  P.p = static_cast<const scalar_t*>(p);
  P.bias = static_cast<const scalar_t*>(bias);
  P.bias_stride = bias_stride;
  P.t = static_cast<const scalar_t*>(t);
  P.rs = static_cast<const acc_t*>(rs);
  P.dp = static_cast<scalar_t*>(dp);
  P.dt = static_cast<scalar_t*>(dt);
  P.loss_rows = static_cast<acc_t*>(loss_rows);
  P.R = R;
  P.N = N;
  P.H = H;
  P.loss = loss;
  P.eps = static_cast<acc_t>(eps);
  const int64_t grid = std::min<int64_t>(R, max_grid);
  fastkd_emu::launch(static_cast<unsigned>(grid), hidden_cuda::kThreads, 0,
                     [&] { hidden_cuda::hm_rows_kernel<scalar_t, acc_t>(P); });
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 bfloat16, 3 float16. Null dp / dt / bias: not written / no bias.
extern "C" void fastkd_emu_hidden_rows(int dtype, int64_t loss, const void* p, const void* bias, int64_t bias_stride,
                                       const void* t, const void* rs, void* dp, void* dt, void* loss_rows, int64_t R,
                                       int64_t N, int64_t H, double eps, int64_t max_grid) {
  switch (dtype) {
    case 0:
      return run_rows<float>(loss, p, bias, bias_stride, t, rs, dp, dt, loss_rows, R, N, H, eps, max_grid);
    case 1:
      return run_rows<double>(loss, p, bias, bias_stride, t, rs, dp, dt, loss_rows, R, N, H, eps, max_grid);
    case 2:
      return run_rows<c10::BFloat16>(loss, p, bias, bias_stride, t, rs, dp, dt, loss_rows, R, N, H, eps, max_grid);
    default:
      return run_rows<c10::Half>(loss, p, bias, bias_stride, t, rs, dp, dt, loss_rows, R, N, H, eps, max_grid);
  }
}
