// Winograd F(4x4, 3x3) convolution for fp32 3x3 stride-1 convs with padding 1
// (cpu/winograd_conv.cpp), reached through onednn_conv_pack / onednn_conv: a weight packed for
// Winograd carries the layout id kWinogradLayout, and onednn_conv runs such a pack here.
#pragma once
#ifdef FASTCNN_WITH_ONEDNN

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastcnn {

constexpr int64_t kWinogradLayout = -1;  // onednn_conv_pack's layout id for a Winograd pack

// Can a conv with these weight sizes, stride, padding, groups and dtype run here?
bool winograd_applies(at::IntArrayRef w, at::IntArrayRef stride, at::IntArrayRef padding,
                      int64_t groups, at::ScalarType type);

// weight [K, C, 3, 3] transformed (in float64) and packed for inputs of x_sizes: bytes.
at::Tensor winograd_pack(const at::Tensor& weight, at::IntArrayRef x_sizes);

// out = relu?(conv3x3(x) + bias + residual), with the weight packed by winograd_pack for x's
// sizes. x, out and residual have their channels innermost (stride 1); the caller has checked
// shapes, dtypes and overlaps (onednn_conv's checks). Returns false, writing nothing, where a
// channel stride is not 1.
bool winograd_conv(const at::Tensor& x, const at::Tensor& packed, at::IntArrayRef w,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                   const at::Tensor& out, bool relu);

}  // namespace fastcnn

#endif  // FASTCNN_WITH_ONEDNN
