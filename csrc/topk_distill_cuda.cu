// fastkd::topk_distill — CUDA implementation. The math and the gradient are written above the CPU
// kernel in topk_distill.cpp; this kernel computes the same quantities with one thread block per
// row: two strided passes over the student row (max, then sum of exponentials: its logsumexp), the
// K gathered entries (P, Q, D reduced in double), then one strided pass writing the gradient
// c/T q_j (1 - r / q_tail) and, after a block barrier, the K entries at the ids c/T (q - p).
#include "common.h"

#include "cuda_common.cuh"

#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fastkd {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* smem) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, smem[w]);
  return r;
}

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return (a > b || a != a) ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

template <typename scalar_t, typename acc_t>
__global__ void topk_distill_kernel(const scalar_t* __restrict__ xs, const int64_t* __restrict__ ids,
                                    const acc_t* __restrict__ tv, const acc_t* __restrict__ tlse,
                                    const acc_t* __restrict__ rs, acc_t* __restrict__ rows, scalar_t* __restrict__ g,
                                    int64_t N, int64_t V, int64_t K, acc_t inv_t, double loss_scale) {
  __shared__ acc_t sm_a[kWarps];
  __shared__ double sm_d[kWarps];
  __shared__ double sm_f;
  const acc_t ninf = -INFINITY;
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    const double c = loss_scale * double(rs[i]);
    const scalar_t* x = xs + i * V;
    scalar_t* gr = g == nullptr ? nullptr : g + i * V;
    if (c == 0.0) {
      if (threadIdx.x == 0) rows[i] = acc_t(0);
      if (gr != nullptr)
        for (int64_t j = threadIdx.x; j < V; j += kThreads) gr[j] = scalar_t(0);
      continue;
    }
    acc_t m = ninf;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) m = MaxOp()(m, static_cast<acc_t>(x[j]) * inv_t);
    m = block_reduce(m, MaxOp(), sm_a);
    const acc_t shift = (m == ninf) ? acc_t(0) : m;
    acc_t z = 0;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) z += exp(static_cast<acc_t>(x[j]) * inv_t - shift);
    z = block_reduce(z, SumOp(), sm_a);
    const double lse_s = double(shift) + log(double(z));
    const int64_t* id = ids + i * K;
    const acc_t* t = tv + i * K;
    double lse_t;
    if (tlse != nullptr) {
      lse_t = double(tlse[i]);
    } else {
      double tm = -INFINITY;
      for (int64_t k = threadIdx.x; k < K; k += kThreads) tm = fmax(tm, double(t[k]) * double(inv_t));
      tm = block_reduce(tm, MaxOp(), sm_d);
      const double sh = isinf(tm) && tm < 0 ? 0.0 : tm;
      double tz = 0.0;
      for (int64_t k = threadIdx.x; k < K; k += kThreads) tz += exp(double(t[k]) * double(inv_t) - sh);
      tz = block_reduce(tz, SumOp(), sm_d);
      lse_t = sh + log(tz);
    }
    double P = 0.0, Q = 0.0, D = 0.0;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      const double lp = double(t[k]) * double(inv_t) - lse_t;
      const double lq = double(static_cast<acc_t>(x[id[k]]) * inv_t) - lse_s;
      const double p = exp(lp);
      P += p;
      Q += exp(lq);
      if (p != 0.0) D += p * (lp - lq);
    }
    P = block_reduce(P, SumOp(), sm_d);
    Q = block_reduce(Q, SumOp(), sm_d);
    D = block_reduce(D, SumOp(), sm_d);
    if (threadIdx.x == 0) {
      double r = 0.0;
      const double qtail = fmax(0.0, 1.0 - Q);
      if (tlse != nullptr) {
        r = fmax(0.0, 1.0 - P);
        if (r <= (std::is_same_v<acc_t, double> ? 1e-12 : 1e-6)) r = 0.0;  // rounding (as in topk_distill.cpp)
        if (r > 0.0) D += r * (log(r) - log(qtail));
      }
      rows[i] = static_cast<acc_t>(c * D);
      sm_f = (r > 0.0) ? 1.0 - r / qtail : 1.0;
    }
    __syncthreads();
    if (gr != nullptr) {
      const double cg = c * double(inv_t);
      const acc_t scale = static_cast<acc_t>(cg * sm_f);
      const acc_t lsef = static_cast<acc_t>(lse_s);
      for (int64_t j = threadIdx.x; j < V; j += kThreads)
        gr[j] = static_cast<scalar_t>(exp(static_cast<acc_t>(x[j]) * inv_t - lsef) * scale);
      __syncthreads();  // the id entries below overwrite the tail formula
      for (int64_t k = threadIdx.x; k < K; k += kThreads) {
        const double lp = double(t[k]) * double(inv_t) - lse_t;
        const double lq = double(static_cast<acc_t>(x[id[k]]) * inv_t) - lse_s;
        gr[id[k]] = static_cast<scalar_t>(cg * (exp(lq) - exp(lp)));
      }
    }
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor> topk_distill_cuda(const at::Tensor& student, const at::Tensor& ids,
                                                     const at::Tensor& teacher, const c10::optional<at::Tensor>& lse,
                                                     const at::Tensor& row_scale, double temperature,
                                                     double loss_scale, bool reduce, bool grad_student) {
  FASTKD_CHECK_DIM(student, 2);
  FASTKD_CHECK_DIM(ids, 2);
  FASTKD_CHECK_CONTIGUOUS(student);
  FASTKD_CHECK_CONTIGUOUS(ids);
  FASTKD_CHECK_CONTIGUOUS(teacher);
  FASTKD_CHECK_FLOATING(student);
  FASTKD_CHECK(student.is_cuda(), "student must be a CUDA tensor, got ", student.device());
  FASTKD_CHECK_DEVICE(ids, student.device());
  FASTKD_CHECK_DEVICE(teacher, student.device());
  FASTKD_CHECK_DEVICE(row_scale, student.device());
  const int64_t N = student.size(0), V = student.size(1), K = ids.size(1);
  const bool is_double = student.scalar_type() == at::kDouble;
  const auto acc = is_double ? at::kDouble : at::kFloat;
  FASTKD_CHECK(ids.scalar_type() == at::kLong && ids.size(0) == N, "teacher_ids must be int64 [N, K] with N = ", N);
  FASTKD_CHECK(teacher.scalar_type() == acc && teacher.sizes() == ids.sizes(), "teacher_logits must be ", acc,
               " with the shape of teacher_ids ", ids.sizes());
  FASTKD_CHECK(!lse.has_value() || (lse->scalar_type() == acc && lse->dim() == 1 && lse->size(0) == N &&
                                    lse->is_contiguous() && lse->device() == student.device()),
               "teacher_logsumexp must be a contiguous ", acc, " [N] tensor on the student's device");
  FASTKD_CHECK(row_scale.scalar_type() == acc && row_scale.dim() == 1 && row_scale.size(0) == N,
               "row_scale must be [N] with N = ", N, " and dtype ", acc);
  FASTKD_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be positive and finite, got ", temperature);
  FASTKD_CHECK(K >= 1 && K <= V, "teacher_ids must have 1 <= K <= V = ", V, " columns, got ", K);
  const c10::cuda::CUDAGuard guard(student.device());
  auto rs = row_scale.contiguous();
  at::Tensor g = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor rows = at::empty({N}, student.options().dtype(acc));
  if (N > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();
    const int64_t blocks = std::min<int64_t>(N, (int64_t(1) << 31) - 1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fastkd_topk_distill_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      topk_distill_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          student.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), teacher.data_ptr<acc_t>(),
          lse.has_value() ? lse->data_ptr<acc_t>() : nullptr, rs.data_ptr<acc_t>(), rows.data_ptr<acc_t>(),
          grad_student ? g.data_ptr<scalar_t>() : nullptr, N, V, K, static_cast<acc_t>(1.0 / temperature), loss_scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor loss = reduce ? rows.sum() : rows;
  return {loss, g};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("topk_distill", &topk_distill_cuda); }

}  // namespace fastkd
