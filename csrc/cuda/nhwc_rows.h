// A 4-D [N, C, H, W] tensor seen as a row-major matrix [N*H*W, C] with one row stride: what a
// dense channels_last tensor is, and also a channel slice big[:, c0:c0+C] of one (row stride =
// big's channel count). cuBLASLt and the epilogue kernel take tensors in this form.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastcnn {

struct NhwcRows {
  int64_t rows;  // N * H * W
  int64_t cols;  // C
  int64_t ld;    // elements from one row (pixel) to the next, >= cols
};

// The rows view of t, or nothing when t's strides do not have that form (e.g. NCHW, or a
// spatially strided view such as x[:, :, ::2, ::2]).
inline std::optional<NhwcRows> nhwc_rows(const at::Tensor& t) {
  if (t.dim() != 4) return std::nullopt;
  const int64_t n = t.size(0), c = t.size(1), h = t.size(2), w = t.size(3);
  if (c > 1 && t.stride(1) != 1) return std::nullopt;
  // The row stride is W's stride, or (for W == 1 or H == W == 1) what the outer strides imply.
  int64_t ld = c;
  if (w > 1) {
    ld = t.stride(3);
  } else if (h > 1) {
    ld = t.stride(2);
  } else if (n > 1) {
    ld = t.stride(0);
  }
  if (ld < c) return std::nullopt;
  if ((w > 1 && t.stride(3) != ld) || (h > 1 && t.stride(2) != w * ld) ||
      (n > 1 && t.stride(0) != h * w * ld)) {
    return std::nullopt;
  }
  return NhwcRows{n * h * w, c, ld};
}

}  // namespace fastcnn
