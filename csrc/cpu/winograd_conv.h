// Winograd F(4x4, 3x3) convolution for fp32 3x3 stride-1 convs with padding 1
// (cpu/winograd_conv.cpp), reached through onednn_conv_pack / onednn_conv: a weight packed for
// Winograd carries a negative layout id (winograd_layout_id: its packed matmul layout, in the
// same registry as the direct path's), and onednn_conv runs such a pack here.
#pragma once
#ifdef FASTCNN_WITH_ONEDNN

#include <ATen/ATen.h>

#include <cstdint>
#include <oneapi/dnnl/dnnl.hpp>
#include <optional>
#include <tuple>

namespace fastcnn {

// A Winograd pack's layout id: -(the registry id of its packed matmul layout) - 2, so that every
// id < -1 is Winograd's and -1 stays free.
inline int64_t winograd_layout_id(int64_t registry_id) { return -registry_id - 2; }
inline bool is_winograd_layout(int64_t id) { return id < -1; }
inline int64_t winograd_registry_id(int64_t id) { return -id - 2; }

// Can a conv with these weight sizes, stride, padding, groups and dtype run here?
bool winograd_applies(at::IntArrayRef w, at::IntArrayRef stride, at::IntArrayRef padding,
                      int64_t groups, at::ScalarType type);

// weight [K, C, 3, 3] transformed (in float64, rounded once to fp32) and packed for inputs of
// x_sizes at this thread count: (the bytes, their oneDNN matmul layout).
std::tuple<at::Tensor, dnnl::memory::desc> winograd_pack(const at::Tensor& weight,
                                                         at::IntArrayRef x_sizes);

// The matmul layout winograd_pack packs a weight of k outputs in for inputs of x_sizes at this
// thread count (convs whose layouts agree can share one pack).
dnnl::memory::desc winograd_weights_desc(at::IntArrayRef x_sizes, int64_t k);

// out = relu?(conv3x3(x) + bias + residual), with the weight packed by winograd_pack for x's
// sizes in the layout `packed_layout` (refused where this call's plan has another). out and
// residual may have any strides; x's channels must be innermost (stride 1): returns false,
// writing nothing, otherwise. The caller has checked shapes, dtypes and overlaps (onednn_conv).
bool winograd_conv(const at::Tensor& x, const at::Tensor& packed,
                   const dnnl::memory::desc& packed_layout, at::IntArrayRef w,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                   const at::Tensor& out, bool relu);

}  // namespace fastcnn

#endif  // FASTCNN_WITH_ONEDNN
