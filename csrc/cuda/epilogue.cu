// The epilogue pass after a cuDNN convolution: out = relu?(y + bias[c] + residual), in fp32
// registers, one read of y (and of the residual) and one write of out, through row strides so
// that out may be a channel slice of a larger channels_last tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "conv_cuda.h"
#include "launch.h"
#include "nhwc_rows.h"

namespace fastcnn {
namespace {

template <typename T>
__global__ void bias_residual_act_kernel(const T* __restrict__ y, int64_t ldy,
                                         const T* __restrict__ bias, const T* __restrict__ r,
                                         int64_t ldr, T* __restrict__ out, int64_t ldo,
                                         int64_t rows, int64_t cols, bool relu) {
  const int64_t n = rows * cols;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t row = i / cols, col = i - row * cols;
    float v = static_cast<float>(y[row * ldy + col]);
    if (bias != nullptr) v += static_cast<float>(bias[col]);
    if (r != nullptr) v += static_cast<float>(r[row * ldr + col]);
    if (relu && v < 0.0f) v = 0.0f;  // NaN stays NaN, as in torch.relu
    out[row * ldo + col] = static_cast<T>(v);
  }
}

// t itself when it has the rows form, else a channels_last copy (which has it).
at::Tensor as_rows(const at::Tensor& t) {
  return nhwc_rows(t) ? t : t.contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

void bias_residual_act_out(const at::Tensor& y_in, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual_in, bool relu,
                           at::Tensor& out) {
  if (!nhwc_rows(out)) {  // e.g. an NCHW out: compute in channels_last, then one copy
    at::Tensor tmp = at::empty_like(out, at::MemoryFormat::ChannelsLast);
    bias_residual_act_out(y_in, bias, residual_in, relu, tmp);
    out.copy_(tmp);
    return;
  }
  if (out.numel() == 0) return;
  const at::Tensor y = as_rows(y_in);
  const std::optional<at::Tensor> residual =
      residual_in ? std::optional<at::Tensor>(as_rows(*residual_in)) : std::nullopt;
  const std::optional<at::Tensor> b =
      bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const NhwcRows o = *nhwc_rows(out);
  const int64_t ldy = nhwc_rows(y)->ld;
  const int64_t ldr = residual ? nhwc_rows(*residual)->ld : 0;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "epilogue", [&] {
    bias_residual_act_kernel<scalar_t><<<grid_for(o.rows * o.cols), kThreads, 0, stream>>>(
        y.const_data_ptr<scalar_t>(), ldy, b ? b->const_data_ptr<scalar_t>() : nullptr,
        residual ? residual->const_data_ptr<scalar_t>() : nullptr, ldr,
        out.mutable_data_ptr<scalar_t>(), o.ld, o.rows, o.cols, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastcnn
