// Launch sizing shared by the CUDA elementwise kernels (add_relu, the conv epilogue).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace fastcnn {

constexpr int kThreads = 256;

// Enough blocks of kThreads to fill the current GPU a few times over for `work` items; the
// kernels' grid-stride loops cover the rest.
inline int grid_for(int64_t work) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{sms} * 8)));
}

}  // namespace fastcnn
