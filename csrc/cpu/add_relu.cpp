// add_relu on CPU: relu(x + residual) -> out, computed in fp32, vectorized with ATen's
// Vectorized<T> and split across threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>

#include "../common/elementwise.h"

namespace fastcnn {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 32768;  // elements per task: small tensors stay on one thread

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline Vectorized<float> add_relu_vec(Vectorized<float> a, Vectorized<float> b) {
  const auto v = a + b;
  const auto zero = Vectorized<float>(0.f);
  return Vectorized<float>::blendv(v, zero, v < zero);  // NaN < 0 is false: NaN stays NaN
}

// The flat path: the three tensors share one dense layout, so walk storage directly.
template <typename T>
void add_relu_dense(const T* x, const T* r, T* out, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    if constexpr (std::is_same_v<T, float>) {
      constexpr int64_t W = Vectorized<float>::size();
      for (; i + W <= end; i += W) {
        add_relu_vec(Vectorized<float>::loadu(x + i), Vectorized<float>::loadu(r + i))
            .store(out + i);
      }
    } else if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) {
      constexpr int64_t W = Vectorized<T>::size();  // two float vectors' worth
      for (; i + W <= end; i += W) {
        auto [x0, x1] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(x + i));
        auto [r0, r1] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(r + i));
        at::vec::convert_from_float<T>(add_relu_vec(x0, r0), add_relu_vec(x1, r1)).store(out + i);
      }
    }
    for (; i < end; ++i) {  // tail (and double)
      out[i] =
          static_cast<T>(relu_keep_nan(static_cast<acc_t<T>>(x[i]) + static_cast<acc_t<T>>(r[i])));
    }
  });
}

// Any other layout (mixed memory formats, out a channel slice of a larger tensor): a 4-D loop
// ordered by out's strides, parallel over the outer three dims.
template <typename T>
void add_relu_strided(const T* x, const T* r, T* out, const Strided4& p) {
  const int64_t outer = p.size[0] * p.size[1] * p.size[2];
  at::parallel_for(0, outer, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, p.size[3])),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t o = begin; o < end; ++o) {
                       const int64_t i2 = o % p.size[2];
                       const int64_t i1 = (o / p.size[2]) % p.size[1];
                       const int64_t i0 = o / (p.size[2] * p.size[1]);
                       const T* xo = x + i0 * p.x[0] + i1 * p.x[1] + i2 * p.x[2];
                       const T* ro = r + i0 * p.r[0] + i1 * p.r[1] + i2 * p.r[2];
                       T* oo = out + i0 * p.out[0] + i1 * p.out[1] + i2 * p.out[2];
                       for (int64_t i3 = 0; i3 < p.size[3]; ++i3) {
                         const acc_t<T> v = static_cast<acc_t<T>>(xo[i3 * p.x[3]]) +
                                            static_cast<acc_t<T>>(ro[i3 * p.r[3]]);
                         oo[i3 * p.out[3]] = static_cast<T>(relu_keep_nan(v));
                       }
                     }
                   });
}

void add_relu_out_cpu(const at::Tensor& x, const at::Tensor& residual, at::Tensor out) {
  check_elementwise_args("fastcnn_ext::add_relu_out", x, residual, out);
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cpu", [&] {
    if (same_dense_layout(x, residual, out)) {
      add_relu_dense<scalar_t>(x.const_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(),
                               out.mutable_data_ptr<scalar_t>(), out.numel());
    } else {
      add_relu_strided<scalar_t>(x.const_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(),
                                 out.mutable_data_ptr<scalar_t>(), plan_strided4(x, residual, out));
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn_ext, CPU, m) { m.impl("add_relu_out", &add_relu_out_cpu); }

}  // namespace fastcnn
