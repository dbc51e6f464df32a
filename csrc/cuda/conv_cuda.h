// The pieces the CUDA conv_bn_act and inception kernels are built from (conv_bn_act.cu and
// inception.cu put them together).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fastcnn {

// Which path a CUDA convolution took, and why a 1x1 stride-1 conv missed cuBLASLt. The numbers
// are read by Python (fastcnn/ops/_extension_paths.py): keep them in step.
enum class ConvPath : int64_t {
  kCublasLt = 0,          // one cuBLASLt GEMM, the epilogue fused
  kCudnn = 1,             // cuDNN + one epilogue pass: the path for every conv but 1x1 stride 1
  kNoCublasLt = 2,        // 1x1 stride 1, but the extension was built without cuBLASLt
  kXLayout = 3,           // 1x1 stride 1, but x is not NHWC rows (e.g. NCHW)
  kResidualLayout = 4,    // 1x1 stride 1, but the residual is not NHWC rows (e.g. NCHW)
  kOutLayout = 5,         // 1x1 stride 1, but out is not NHWC rows (e.g. NCHW)
  kNoAlgorithm = 6,       // 1x1 stride 1, but cuBLASLt has no algorithm for these layouts
  kUnsupportedDtype = 7,  // 1x1 stride 1, but cuBLASLt is not used for this dtype
};

// The paths of the last convolutions this thread ran (at most kPathHistory), oldest first, and
// forget them. Python reads them only while a fastcnn.trace() is recording; recording is one
// store into a fixed thread-local ring, so untraced calls pay nothing more.
constexpr int kPathHistory = 16;
void record_conv_path(ConvPath path);
std::vector<int64_t> take_conv_paths();

// out = relu?(y + bias[c] + residual): the one epilogue pass after a cuDNN convolution, writing
// through out's strides (a channel slice of a larger tensor included). y, residual and out are
// [N, C, H, W]; bias is [C]; residual and bias may be absent.
void bias_residual_act_out(const at::Tensor& y, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, bool relu, at::Tensor& out);

// A 1x1 stride-1 convolution as one cuBLASLt GEMM [N*H*W, Cin] x [Cin, Cout] whose epilogue adds
// the bias and the residual (as GEMM's C operand, beta = 1) and applies the ReLU, storing straight
// into out (a channel slice included). Returns kCublasLt when it ran; otherwise, having done
// nothing, why not (not compiled in, a layout it cannot read, no algorithm): the caller then
// takes the cuDNN path. The algorithm, descriptors and workspace are planned once per shape,
// layout, alignment, epilogue and dtype, and reused.
ConvPath cublaslt_conv1x1_out(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, bool relu,
                              at::Tensor& out);

// relu?(conv2d(x, weight) + bias + residual) into out: cuBLASLt for 1x1 stride-1 convs where it
// can, else cuDNN (through at::conv2d) and one bias_residual_act_out pass. Records the path taken
// (record_conv_path).
void conv_bn_act_into(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, const std::optional<at::Tensor>& residual, bool relu,
                      at::Tensor& out);

}  // namespace fastcnn
