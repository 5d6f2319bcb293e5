// fastkd::scale_grad_kernel_ — multiply a gradient that a forward pass already wrote, in place, by the
// upstream gradient: grad[i, ...] *= scale (scale 0-d) or scale[i] (scale [N]).
// The CPU and CUDA kernels of the op fastkd::scale_grad_ (fastkd/ops/scale_grad.py: the one
// torch.library.custom_op, which declares the mutation, bumps the version counter and picks the
// backend); this raw kernel op is only called from there, below autograd.
// Used by backward of the fused losses: they write d(loss)/d(input) during the forward, so backward
// is one in-place scale, and no work at all when the upstream gradient is the scalar 1
// (checked here on the CPU value, and on the device inside the CUDA kernel: never a host sync).
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

namespace fastkd {
namespace {

template <typename scalar_t>
void scale_rows_cpu(scalar_t* g, const double* scale, int64_t rows, int64_t cols, bool per_row) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t s = static_cast<acc_t>(per_row ? scale[r] : scale[0]);
      if (s == acc_t(1)) continue;
      scalar_t* row = g + r * cols;
      if constexpr (std::is_same_v<scalar_t, float>) {
        using Vec = at::vec::Vectorized<float>;
        const Vec vs(s);
        int64_t j = 0;
        for (; j + Vec::size() <= cols; j += Vec::size()) (Vec::loadu(row + j) * vs).store(row + j);
        for (; j < cols; ++j) row[j] *= s;
      } else {
        for (int64_t j = 0; j < cols; ++j) row[j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) * s);
      }
    }
  });
}

void scale_grad_cpu(at::Tensor grad, const at::Tensor& scale) {
  FASTKD_CHECK_CONTIGUOUS(grad);
  FASTKD_CHECK(at::isFloatingType(scale.scalar_type()), "scale must be a floating-point tensor, got ", scale.scalar_type());
  FASTKD_CHECK_DEVICE(scale, grad.device());
  if (grad.numel() == 0) return;
  const bool per_row = scale.dim() > 0;
  const int64_t rows = grad.dim() >= 1 ? grad.size(0) : 1;
  FASTKD_CHECK(!per_row || (grad.dim() >= 1 && scale.numel() == rows),
               "scale of shape [N] must match grad.size(0); got scale ", scale.sizes(), ", grad ", grad.sizes());
  FASTKD_CHECK(per_row || scale.numel() == 1, "scale must be 0-d or [N], got ", scale.sizes());
  const int64_t cols = grad.numel() / rows;
  auto sc = scale.to(at::kDouble).contiguous();  // 0-d or [N]: tiny
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "fastkd_scale_grad_", [&] {
    scale_rows_cpu<scalar_t>(grad.data_ptr<scalar_t>(), sc.data_ptr<double>(), rows, cols, per_row);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastkd, m) { m.def("scale_grad_kernel_(Tensor(a!) grad, Tensor scale) -> ()"); }

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("scale_grad_kernel_", &scale_grad_cpu); }

}  // namespace fastkd
