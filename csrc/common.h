// fastkd: helpers shared by every C++/CUDA source.
//
// Vector width: the CPU kernels are compiled once per instruction-set level and picked at run time
// (cpu_dispatch.h); setup.py passes each copy the CPU_CAPABILITY macros that ATen's at::vec reads.
// Files outside that scheme compile at the baseline (at::vec's portable version).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <sstream>
#include <string>

// Checks that name the argument, like flash-attention's CHECK_SHAPE: the error says which tensor
// and what was expected. The Python layer validates user input first; these guard direct calls
// through torch.ops.fastkd.*.
#define FASTKD_CHECK(cond, ...) TORCH_CHECK(cond, "fastkd: ", __VA_ARGS__)
#define FASTKD_CHECK_CONTIGUOUS(x) FASTKD_CHECK((x).is_contiguous(), #x " must be contiguous")
#define FASTKD_CHECK_DIM(x, d) \
  FASTKD_CHECK((x).dim() == (d), #x " must have ", (d), " dimensions, got ", (x).dim())
#define FASTKD_CHECK_FLOATING(x) \
  FASTKD_CHECK(at::isFloatingType((x).scalar_type()), #x " must be a floating-point tensor, got ", (x).scalar_type())
#define FASTKD_CHECK_DEVICE(x, dev) \
  FASTKD_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())

namespace fastkd {
// Divergence codes shared with fastkd/ops/distill_loss.py and kernels/distill_loss.py.
enum Divergence : int64_t { KL = 0, REVERSE_KL = 1, JSD = 2 };
}  // namespace fastkd
