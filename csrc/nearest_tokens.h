// fastkd::nearest_tokens — pieces shared by the CPU (nearest_tokens.cpp) and CUDA (nearest_tokens_cuda.cu)
// implementations: metric codes, constants and the checks of a direct torch.ops call.
#pragma once

#include "common.h"

#include <limits>

namespace fastkd {
namespace nearest {

// Metric codes, shared with fastkd/ops/nearest_tokens.py and kernels/nearest_tokens.py.
enum Metric : int64_t { COSINE = 0, DOT = 1, L2DIST = 2 };

constexpr int64_t kNoId = std::numeric_limits<int64_t>::max();  // "no entry": ranks after every id
constexpr double kEps = 1e-8;  // cosine: norms are clamped to at least kEps

inline void check_inputs(const at::Tensor& embeds, const at::Tensor& embedding_matrix, int64_t k, int64_t metric) {
  FASTKD_CHECK_DIM(embeds, 2);
  FASTKD_CHECK_DIM(embedding_matrix, 2);
  FASTKD_CHECK_FLOATING(embeds);
  FASTKD_CHECK_DEVICE(embedding_matrix, embeds.device());
  FASTKD_CHECK(embedding_matrix.scalar_type() == embeds.scalar_type(), "embedding_matrix must have the dtype of embeds (",
               embeds.scalar_type(), "), got ", embedding_matrix.scalar_type());
  FASTKD_CHECK(embedding_matrix.size(1) == embeds.size(1), "embedding_matrix must be [V, H] with H = ", embeds.size(1),
               " (embeds' last dimension), got ", embedding_matrix.sizes());
  const int64_t V = embedding_matrix.size(0);
  FASTKD_CHECK(k >= 1 && k <= V, "k must be in [1, V] with V = ", V, " (embedding_matrix rows), got ", k);
  FASTKD_CHECK(metric >= COSINE && metric <= L2DIST, "metric code must be 0 (cosine), 1 (dot) or 2 (l2), got ", metric);
}

}  // namespace nearest
}  // namespace fastkd
