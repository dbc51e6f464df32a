// The pieces the CUDA conv_bn_act and inception kernels are built from (conv_bn_act.cu and
// inception.cu put them together).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastcnn {

// out = relu?(y + bias[c] + residual): the one epilogue pass after a cuDNN convolution, writing
// through out's strides (a channel slice of a larger tensor included). y, residual and out are
// [N, C, H, W]; bias is [C]; residual and bias may be absent.
void bias_residual_act_out(const at::Tensor& y, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, bool relu, at::Tensor& out);

// A 1x1 stride-1 convolution as one cuBLASLt GEMM [N*H*W, Cin] x [Cin, Cout] whose epilogue adds
// the bias and the residual (as GEMM's C operand, beta = 1) and applies the ReLU, storing straight
// into out (a channel slice included). Returns false, having done nothing, when cuBLASLt is not
// compiled in or has no algorithm for these layouts: the caller then takes the cuDNN path.
bool cublaslt_conv1x1_out(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, bool relu, at::Tensor& out);

// relu?(conv2d(x, weight) + bias + residual) into out: cuBLASLt for 1x1 stride-1 convs where it
// can, else cuDNN (through at::conv2d) and one bias_residual_act_out pass.
void conv_bn_act_into(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, const std::optional<at::Tensor>& residual, bool relu,
                      at::Tensor& out);

}  // namespace fastcnn
