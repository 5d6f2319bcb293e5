// fastkd::embedding_ascent_ — host-side pieces shared by the CPU (embedding_ascent.cpp) and CUDA
// (embedding_ascent_cuda.cu) implementations: the norm codes, the checks of a direct torch.ops call, and
// the translation of every operand into "rows" (a base pointer and a row stride over [N, H]). The
// functions are defined in host_shared.cpp, compiled once by the C++ compiler (see there why not inline).
//
// Strided operands: a tensor [..., H] whose last dimension is unit-stride and whose leading
// dimensions collapse into one (any slice along the leading dimensions, a [:, :H] column slice of a
// wider matrix, ...) is addressed in place with its own row stride. Anything else is processed on a
// contiguous copy; for the mutated operands (embeds, momentum_buffer) the result is then copied back
// into the caller's tensor with copy_, so the update always lands in the caller's storage. A mutated
// operand whose elements overlap (an expanded tensor) is refused.
#pragma once

#include "common.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <optional>
#include <vector>

namespace fastkd {
namespace ascent {

// Norm codes, shared with fastkd/ops/embedding_ascent.py and kernels/embedding_ascent.py.
enum Norm : int64_t { L2 = 0, SIGN = 1, NONE = 2 };

// Stride (elements) between consecutive rows of t seen as [N, H], or -1 when the leading
// dimensions do not collapse into one or the last dimension is not unit-stride.
int64_t row_stride(const at::Tensor& t);

// One operand as rows: `t` is what the kernel reads or writes (the caller's tensor, or a contiguous
// copy of it), `writeback` is the caller's tensor when `t` is a copy that must be copied back.
struct Rows {
  at::Tensor t;
  at::Tensor writeback;
  int64_t stride = 0;
};

Rows as_rows(const at::Tensor& x, bool writable);

void check_writable(const at::Tensor& x, const char* name);

// Checks of one (embeds, grad, origin, mask, momentum_buffer) group; `idx` >= 0 names the list entry.
void check_group(const at::Tensor& embeds, const at::Tensor& grad, const std::optional<at::Tensor>& origin,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& buf, bool need_origin,
                 int64_t idx);

void check_scalars(double step_size, int64_t norm, std::optional<double> radius, std::optional<double> max_norm,
                   double momentum);

// One tensor of the (multi-tensor) update, addressed as rows.
struct Group {
  Rows e, g, o, b;
  at::Tensor m;  // [N] bool, contiguous, or undefined
  int64_t rows = 0, H = 0;
};

Group make_group(const at::Tensor& embeds, const at::Tensor& grad, const std::optional<at::Tensor>& origin,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& buf, bool use_origin);

// Bump the version counter of a tensor the kernel wrote (ops registered from C++ get no
// ADInplaceOrView kernel that would do it), so that autograd notices when a tensor it saved for
// backward was modified. Inference tensors have no counter.
void bump_version(const at::Tensor& t);

// After the kernels ran: write the results computed on copies into the caller's tensors, and
// bump the version counters of the mutated operands.
void write_back(std::vector<Group>& groups, const std::vector<at::Tensor>& embeds,
                const std::vector<std::optional<at::Tensor>>& bufs);

// All checks of a (multi-tensor) call, then every tensor as rows. `device_type` is the device the
// calling kernel runs on.
struct Prepared {
  std::vector<Group> groups;
  bool has_buf = false;
  bool buf_same = true;  // the buffers have embeds' dtype (else the compute dtype)
  at::ScalarType dtype = at::kFloat;
};

Prepared prepare(const std::vector<at::Tensor>& embeds, const std::vector<at::Tensor>& grads,
                 const std::vector<std::optional<at::Tensor>>& origins,
                 const std::vector<std::optional<at::Tensor>>& masks,
                 const std::vector<std::optional<at::Tensor>>& bufs, double step_size, int64_t norm,
                 std::optional<double> radius, std::optional<double> max_norm, double momentum,
                 c10::DeviceType device_type);

// The list form's arguments as per-tensor vectors (origins / momentum_buffers empty = none).
struct Lists {
  std::vector<at::Tensor> e, g;
  std::vector<std::optional<at::Tensor>> o, m, b;
};

Lists unpack_lists(at::TensorList embeds, at::TensorList grads, at::TensorList origins,
                   const c10::List<std::optional<at::Tensor>>& masks, at::TensorList momentum_buffers);

}  // namespace ascent
}  // namespace fastkd
