// Layout planning shared by the CPU and CUDA elementwise kernels (add_relu): one check of the
// arguments, one test for the flat fast path, one stride plan for everything else.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <array>
#include <numeric>

namespace fastcnn {

constexpr int kMaxDims = 4;

// relu(v) that keeps NaN as NaN, like torch.relu (a max() could drop it).
template <typename T>
inline T relu_keep_nan(T v) {
  return v < T(0) ? T(0) : v;
}

inline void check_elementwise_args(const char* op, const at::Tensor& x, const at::Tensor& residual,
                                   const at::Tensor& out) {
  TORCH_CHECK(x.sizes() == residual.sizes(), op, ": x has shape ", x.sizes(), " but residual has ",
              residual.sizes());
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out has shape ", out.sizes(), ", expected ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == out.scalar_type(), op,
              ": dtypes differ (x ", x.scalar_type(), ", residual ", residual.scalar_type(),
              ", out ", out.scalar_type(), ")");
  TORCH_CHECK(x.device() == residual.device() && x.device() == out.device(), op,
              ": tensors are on different devices (x ", x.device(), ", residual ",
              residual.device(), ", out ", out.device(), ")");
  TORCH_CHECK(x.dim() <= kMaxDims, op, ": at most ", kMaxDims, " dimensions, got ", x.dim());
  TORCH_CHECK(out.numel() == 0 || at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              ": out has overlapping memory (e.g. an expanded tensor)");
}

// True when the three tensors share one dense layout (contiguous or channels_last alike), so
// that the op can walk their storage as one flat array, whatever the memory format.
inline bool same_dense_layout(const at::Tensor& x, const at::Tensor& residual,
                              const at::Tensor& out) {
  return out.is_non_overlapping_and_dense() && x.strides() == out.strides() &&
         residual.strides() == out.strides();
}

// Sizes and strides of x, residual and out, padded to 4 dims and ordered by out's strides
// (largest first), so the innermost loop walks out's memory contiguously.
struct Strided4 {
  std::array<int64_t, kMaxDims> size{1, 1, 1, 1};
  std::array<int64_t, kMaxDims> x{0, 0, 0, 0}, r{0, 0, 0, 0}, out{0, 0, 0, 0};
};

inline Strided4 plan_strided4(const at::Tensor& x, const at::Tensor& residual,
                              const at::Tensor& out) {
  const int64_t nd = out.dim();
  std::array<int64_t, kMaxDims> order{0, 1, 2, 3};
  std::stable_sort(order.begin(), order.begin() + nd,
                   [&](int64_t a, int64_t b) { return out.stride(a) > out.stride(b); });
  Strided4 plan;
  const int64_t pad = kMaxDims - nd;
  for (int64_t i = 0; i < nd; ++i) {
    const int64_t d = order[i];
    plan.size[pad + i] = out.size(d);
    plan.x[pad + i] = x.stride(d);
    plan.r[pad + i] = residual.stride(d);
    plan.out[pad + i] = out.stride(d);
  }
  return plan;
}

}  // namespace fastcnn
