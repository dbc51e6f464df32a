// conv_bn_act on CUDA: relu?(conv2d(x, weight) + bias + residual) written into out (a channel
// slice of a larger tensor included). 1x1 stride-1 convs are one cuBLASLt GEMM with the whole
// epilogue fused; every other conv is cuDNN (through at::conv2d, NHWC) followed by exactly one
// epilogue pass (epilogue.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "conv_cuda.h"
#include "nhwc_rows.h"

namespace fastcnn {

namespace {
thread_local std::array<int64_t, kPathHistory> path_ring{};
thread_local int64_t paths_recorded = 0;  // since the last take_conv_paths()
}  // namespace

void record_conv_path(ConvPath path) {
  path_ring[paths_recorded % kPathHistory] = static_cast<int64_t>(path);
  ++paths_recorded;
}

std::vector<int64_t> take_conv_paths() {
  const int64_t n = std::min<int64_t>(paths_recorded, kPathHistory);
  std::vector<int64_t> paths;
  paths.reserve(n);
  for (int64_t i = paths_recorded - n; i < paths_recorded; ++i) {
    paths.push_back(path_ring[i % kPathHistory]);
  }
  paths_recorded = 0;
  return paths;
}

void conv_bn_act_into(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, const std::optional<at::Tensor>& residual, bool relu,
                      at::Tensor& out) {
  const bool gemm = weight.size(2) == 1 && weight.size(3) == 1 && stride[0] == 1 &&
                    stride[1] == 1 && padding[0] == 0 && padding[1] == 0;
  // A 1x1 GEMM reads x through its row stride (a channel slice needs no copy); cuDNN wants a
  // dense channels_last input to pick its NHWC kernels.
  const ConvPath path =
      gemm ? cublaslt_conv1x1_out(x, weight, bias, residual, relu, out) : ConvPath::kCudnn;
  record_conv_path(path);
  if (path == ConvPath::kCublasLt) return;
  const at::Tensor y =
      at::conv2d(x.contiguous(at::MemoryFormat::ChannelsLast),
                 weight.contiguous(at::MemoryFormat::ChannelsLast), {}, stride, padding);
  bias_residual_act_out(y, bias, residual, relu, out);
}

namespace {

void check_like(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type(),
              "fastcnn_ext::conv_bn_act_out: ", name, " is ", t.scalar_type(), " on ", t.device(),
              ", x is ", x.scalar_type(), " on ", x.device());
}

void conv_bn_act_out_cuda(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, const std::optional<at::Tensor>& residual,
                          bool relu, at::Tensor out) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "fastcnn_ext::conv_bn_act_out: x and weight ",
              "must be 4-D, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "fastcnn_ext::conv_bn_act_out: x has ", x.size(1),
              " channels, weight expects ", weight.size(1), " (groups are not supported)");
  check_like("weight", weight, x);
  check_like("out", out, x);
  if (bias) check_like("bias", *bias, x);
  if (residual) {
    check_like("residual", *residual, x);
    TORCH_CHECK(residual->sizes() == out.sizes(), "fastcnn_ext::conv_bn_act_out: residual has ",
                "shape ", residual->sizes(), ", out has ", out.sizes());
  }
  const int64_t ho = (x.size(2) + 2 * padding[0] - weight.size(2)) / stride[0] + 1;
  const int64_t wo = (x.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1;
  TORCH_CHECK(out.sizes() == at::IntArrayRef({x.size(0), weight.size(0), ho, wo}),
              "fastcnn_ext::conv_bn_act_out: out has shape ", out.sizes(), ", expected [",
              x.size(0), ", ", weight.size(0), ", ", ho, ", ", wo, "]");
  conv_bn_act_into(x, weight, bias, stride, padding, residual, relu, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn_ext, CUDA, m) { m.impl("conv_bn_act_out", &conv_bn_act_out_cuda); }

}  // namespace fastcnn
