// fastkd::embedding_ascent_ / embedding_ascent_multi_ — CUDA implementation: registration and launch
// of the kernel in embedding_ascent.cuh (which describes it). The host-side checks and the row
// layout of strided operands are shared with the CPU kernel through embedding_ascent.h.
#include "embedding_ascent.h"

#include "cuda_common.cuh"
#include "embedding_ascent.cuh"

#include <ATen/Dispatch.h>

#include <limits>

namespace fastkd {
namespace {

using namespace fastkd::ascent;
using namespace fastkd::ascent_cuda;
static_assert(kL2 == L2 && kSign == SIGN && kNone == NONE, "norm codes differ from embedding_ascent.h");

template <typename scalar_t, typename buf_t>
void run_groups(std::vector<Group>& groups, bool has_buf, double step_size, int64_t norm, std::optional<double> radius,
                std::optional<double> max_norm, double momentum, bool maximize) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  DevParams<acc_t> p;
  p.step = static_cast<acc_t>(step_size);
  p.sgn = maximize ? acc_t(1) : acc_t(-1);
  p.momentum = static_cast<acc_t>(momentum);
  p.radius = static_cast<acc_t>(radius.value_or(0));
  p.max_norm = static_cast<acc_t>(max_norm.value_or(0));
  p.has_buf = has_buf;
  p.has_radius = radius.has_value();
  p.has_max_norm = max_norm.has_value();
  p.norm = static_cast<int>(norm);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(groups.front().e.t.device().index()).stream();

  size_t gi = 0;
  while (gi < groups.size()) {
    Batch batch{};
    int64_t rows = 0, maxH = 0;
    while (gi < groups.size() && batch.n < kMaxGroups) {
      Group& gr = groups[gi++];
      if (gr.rows == 0 || gr.H == 0) continue;
      GroupArg& a = batch.gr[batch.n++];
      a.e = gr.e.t.data_ptr();
      a.g = gr.g.t.data_ptr();
      a.o = p.has_radius ? gr.o.t.data_ptr() : nullptr;
      a.m = gr.m.defined() ? gr.m.data_ptr<bool>() : nullptr;
      a.b = has_buf ? gr.b.t.data_ptr() : nullptr;
      a.se = gr.e.stride;
      a.sg = gr.g.stride;
      a.so = p.has_radius ? gr.o.stride : 0;
      a.sb = has_buf ? gr.b.stride : 0;
      a.first = rows;
      a.H = gr.H;
      rows += gr.rows;
      maxH = std::max(maxH, gr.H);
    }
    if (rows == 0) continue;
    FASTKD_CHECK(rows <= std::numeric_limits<int32_t>::max(), "embeds has more than 2^31 - 1 rows (", rows,
                 "); split it into several calls");
    const Plan plan = plan_threads(maxH);
    FASTKD_CHECK(plan.vpt > 0, "the cuda kernel supports H <= ", kMaxVpt * 1024, ", got H = ", maxH,
                 " (use backend='triton' or backend='torch')");
    dispatch_vpt(plan.vpt, [&](auto V) {
      ascent_kernel<scalar_t, buf_t, acc_t, decltype(V)::value>
          <<<static_cast<unsigned>(rows), plan.threads, 0, stream>>>(batch, p);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void ascent_impl(const std::vector<at::Tensor>& embeds, const std::vector<at::Tensor>& grads,
                 const std::vector<std::optional<at::Tensor>>& origins,
                 const std::vector<std::optional<at::Tensor>>& masks,
                 const std::vector<std::optional<at::Tensor>>& bufs, double step_size, int64_t norm,
                 std::optional<double> radius, std::optional<double> max_norm, double momentum, bool maximize) {
  Prepared pr =
      prepare(embeds, grads, origins, masks, bufs, step_size, norm, radius, max_norm, momentum, c10::DeviceType::CUDA);
  if (pr.groups.empty()) return;
  const c10::cuda::CUDAGuard guard(embeds[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pr.dtype, "fastkd_embedding_ascent_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (pr.buf_same) {
      run_groups<scalar_t, scalar_t>(pr.groups, pr.has_buf, step_size, norm, radius, max_norm, momentum, maximize);
    } else {
      run_groups<scalar_t, acc_t>(pr.groups, pr.has_buf, step_size, norm, radius, max_norm, momentum, maximize);
    }
  });
  write_back(pr.groups, embeds, bufs);
}

void embedding_ascent_cuda(at::Tensor embeds, const at::Tensor& grad, const std::optional<at::Tensor>& origin,
                           const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& momentum_buffer,
                           double step_size, int64_t norm, std::optional<double> radius,
                           std::optional<double> max_norm, double momentum, bool maximize) {
  ascent_impl({embeds}, {grad}, {origin}, {mask}, {momentum_buffer}, step_size, norm, radius, max_norm, momentum,
              maximize);
}

void embedding_ascent_multi_cuda(at::TensorList embeds, at::TensorList grads, at::TensorList origins,
                                 const c10::List<std::optional<at::Tensor>>& masks, at::TensorList momentum_buffers,
                                 double step_size, int64_t norm, std::optional<double> radius,
                                 std::optional<double> max_norm, double momentum, bool maximize) {
  Lists l = unpack_lists(embeds, grads, origins, masks, momentum_buffers);
  ascent_impl(l.e, l.g, l.o, l.m, l.b, step_size, norm, radius, max_norm, momentum, maximize);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("embedding_ascent_", &embedding_ascent_cuda);
  m.impl("embedding_ascent_multi_", &embedding_ascent_multi_cuda);
}

}  // namespace fastkd
