// fastkd::nearest_tokens — pieces shared by the CPU (nearest_tokens.cpp) and CUDA (nearest_tokens_cuda.cu)
// implementations: metric codes, constants and the checks of a direct torch.ops call (defined in
// host_shared.cpp, compiled once by the C++ compiler: see there why not inline).
#pragma once

#include "common.h"

#include <limits>

namespace fastkd {
namespace nearest {

// Metric codes, shared with fastkd/ops/nearest_tokens.py and kernels/nearest_tokens.py.
enum Metric : int64_t { COSINE = 0, DOT = 1, L2DIST = 2 };

constexpr int64_t kNoId = std::numeric_limits<int64_t>::max();  // "no entry": ranks after every id
constexpr double kEps = 1e-8;  // cosine: norms are clamped to at least kEps

void check_inputs(const at::Tensor& embeds, const at::Tensor& embedding_matrix, int64_t k, int64_t metric);

}  // namespace nearest
}  // namespace fastkd
