// add_relu on CUDA: relu(x + residual) -> out in fp32 registers. Dense tensors sharing one
// layout take a grid-stride loop of 128-bit loads/stores when all three pointers are 16-byte
// aligned; any other layout takes a grid-stride 4-D strided loop ordered by out's strides.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/elementwise.h"
#include "launch.h"

namespace fastcnn {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ T add_relu_one(T a, T b) {
  const acc_t<T> v = static_cast<acc_t<T>>(a) + static_cast<acc_t<T>>(b);
  return static_cast<T>(v < acc_t<T>(0) ? acc_t<T>(0) : v);  // NaN stays NaN
}

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// kVec elements per 128-bit access (kVec = 1 when the pointers are not 16-byte aligned).
template <typename T, int kVec>
__global__ void add_relu_dense_kernel(const T* __restrict__ x, const T* __restrict__ r,
                                      T* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_packs = n / kVec;
  using P = Pack<T, kVec>;
  for (int64_t i = tid; i < n_packs; i += stride) {
    const P a = reinterpret_cast<const P*>(x)[i];
    const P b = reinterpret_cast<const P*>(r)[i];
    P c;
#pragma unroll
    for (int k = 0; k < kVec; ++k) c.v[k] = add_relu_one(a.v[k], b.v[k]);
    reinterpret_cast<P*>(out)[i] = c;
  }
  for (int64_t i = n_packs * kVec + tid; i < n; i += stride) out[i] = add_relu_one(x[i], r[i]);
}

template <typename T>
__global__ void add_relu_strided_kernel(const T* __restrict__ x, const T* __restrict__ r,
                                        T* __restrict__ out, int64_t n, Strided4 p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    int64_t rest = i;
    int64_t xo = 0, ro = 0, oo = 0;
#pragma unroll
    for (int d = kMaxDims - 1; d >= 0; --d) {
      const int64_t idx = rest % p.size[d];
      rest /= p.size[d];
      xo += idx * p.x[d];
      ro += idx * p.r[d];
      oo += idx * p.out[d];
    }
    out[oo] = add_relu_one(x[xo], r[ro]);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void add_relu_out_cuda(const at::Tensor& x, const at::Tensor& residual, at::Tensor out) {
  check_elementwise_args("fastcnn_ext::add_relu_out", x, residual, out);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (same_dense_layout(x, residual, out)) {
      constexpr int kVec = 16 / sizeof(scalar_t);
      if (aligned16(xp) && aligned16(rp) && aligned16(op)) {
        add_relu_dense_kernel<scalar_t, kVec>
            <<<grid_for(n / kVec + 1), kThreads, 0, stream>>>(xp, rp, op, n);
      } else {
        add_relu_dense_kernel<scalar_t, 1><<<grid_for(n), kThreads, 0, stream>>>(xp, rp, op, n);
      }
    } else {
      add_relu_strided_kernel<scalar_t>
          <<<grid_for(n), kThreads, 0, stream>>>(xp, rp, op, n, plan_strided4(x, residual, out));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn_ext, CUDA, m) { m.impl("add_relu_out", &add_relu_out_cuda); }

}  // namespace fastcnn
