// fastkd:cpu-dispatch
// fastkd::_fast_exp / _fast_exp_nonpos / _fast_log: fastkd's float32 exp and log (fast_math.h) applied to a
// tensor, at the active instruction-set level. For tests (tests/test_numerics.py measures their
// error against float64 over the whole range), not part of the public API.
#include "cpu_dispatch.h"
#include "fast_math.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

namespace fastkd {
namespace CPU_CAPABILITY {
namespace fast_math_ops_impl {  // one namespace per file: the level's files compile as one unit
namespace {

enum Fn { kExp, kExpNonpos, kLog };

template <Fn F, typename T>
inline T fn(const T& v) {
  if constexpr (F == kExp) return fast_exp(v);
  if constexpr (F == kExpNonpos) return fast_exp_nonpos(v);
  if constexpr (F == kLog) return fast_log(v);
}

template <Fn F>
at::Tensor apply(const at::Tensor& x) {
  FASTKD_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  using Vec = at::vec::Vectorized<float>;
  at::parallel_for(0, in.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    int64_t j = b;
    for (; j + Vec::size() <= e; j += Vec::size()) {
      const Vec v = Vec::loadu(src + j);
      fn<F>(v).store(dst + j);
    }
    for (; j < e; ++j) dst[j] = fn<F>(src[j]);
  });
  return out;
}

at::Tensor fast_exp_cpu(const at::Tensor& x) { return apply<kExp>(x); }
at::Tensor fast_exp_nonpos_cpu(const at::Tensor& x) { return apply<kExpNonpos>(x); }
at::Tensor fast_log_cpu(const at::Tensor& x) { return apply<kLog>(x); }

}  // namespace
}  // namespace fast_math_ops_impl
using fast_math_ops_impl::fast_exp_cpu;
using fast_math_ops_impl::fast_exp_nonpos_cpu;
using fast_math_ops_impl::fast_log_cpu;
}  // namespace CPU_CAPABILITY
}  // namespace fastkd

FASTKD_CPU_KERNEL(fast_exp_cpu)
FASTKD_CPU_KERNEL(fast_exp_nonpos_cpu)
FASTKD_CPU_KERNEL(fast_log_cpu)

#ifdef FASTKD_CPU_BASE
TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("_fast_exp(Tensor x) -> Tensor");
  m.def("_fast_exp_nonpos(Tensor x) -> Tensor");
  m.def("_fast_log(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("_fast_exp", FASTKD_CPU_DISPATCH(fast_exp_cpu));
  m.impl("_fast_exp_nonpos", FASTKD_CPU_DISPATCH(fast_exp_nonpos_cpu));
  m.impl("_fast_log", FASTKD_CPU_DISPATCH(fast_log_cpu));
}
#endif
