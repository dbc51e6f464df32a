// max_pool2d on CPU for channels_last tensors, without the indices that aten's max_pool2d also
// computes and writes (int64: twice the bytes of an fp32 output) when no backward will need them.
// Each output pixel is the elementwise max of its window's channel vectors: vectorized over
// channels with ATen's Vectorized<T>, split over (batch, output row) with at::parallel_for.
// uint8 too: fastcnn.quantize's activations (aten's uint8 max_pool2d rejects large inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace fastcnn {
namespace {

using at::vec::Vectorized;

// NaN wins, as in torch.max_pool2d.
template <typename T>
inline T max_keep_nan(T a, T b) {
  return (a != a || a > b) ? a : b;
}

template <typename T>
void max_pool_cl(const T* x, T* out, int64_t n, int64_t c, int64_t h, int64_t w, int64_t ho,
                 int64_t wo, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                 int64_t out_ld) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const T lowest = std::numeric_limits<T>::has_infinity ? -std::numeric_limits<T>::infinity()
                                                        : std::numeric_limits<T>::lowest();
  at::parallel_for(0, n * ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / ho, oh = row % ho;
      const int64_t h0 = std::max<int64_t>(oh * sh - ph, 0);
      const int64_t h1 = std::min<int64_t>(oh * sh - ph + kh, h);
      for (int64_t ow = 0; ow < wo; ++ow) {
        const int64_t w0 = std::max<int64_t>(ow * sw - pw, 0);
        const int64_t w1 = std::min<int64_t>(ow * sw - pw + kw, w);
        T* o = out + ((b * ho + oh) * wo + ow) * out_ld;
        int64_t ch = 0;
        for (; ch + V <= c; ch += V) {
          Vec m(lowest);
          for (int64_t ih = h0; ih < h1; ++ih) {
            for (int64_t iw = w0; iw < w1; ++iw) {
              m = at::vec::maximum(m, Vec::loadu(x + ((b * h + ih) * w + iw) * c + ch));
            }
          }
          m.store(o + ch);
        }
        for (; ch < c; ++ch) {
          T m = lowest;
          for (int64_t ih = h0; ih < h1; ++ih) {
            for (int64_t iw = w0; iw < w1; ++iw)
              m = max_keep_nan(m, x[((b * h + ih) * w + iw) * c + ch]);
          }
          o[ch] = m;
        }
      }
    }
  });
}

void max_pool2d_out_cpu(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::Tensor out) {
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4, "fastcnn_ext::max_pool2d_out: 4-D tensors only");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fastcnn_ext::max_pool2d_out: x must be channels_last");
  TORCH_CHECK(
      out.scalar_type() == x.scalar_type() && out.size(0) == x.size(0) && out.size(1) == x.size(1),
      "fastcnn_ext::max_pool2d_out: out must match x's batch, channels and dtype");
  // out: channels_last, or a channel slice of a channels_last tensor (row stride out_ld).
  const int64_t c = x.size(1), ho = out.size(2), wo = out.size(3);
  const int64_t out_ld = wo > 1 ? out.stride(3) : (ho > 1 ? out.stride(2) : out.stride(0));
  TORCH_CHECK((c == 1 || out.stride(1) == 1) && out_ld >= c &&
                  (wo == 1 || out.stride(3) == out_ld) &&
                  (ho == 1 || out.stride(2) == wo * out_ld) &&
                  (out.size(0) == 1 || out.stride(0) == ho * wo * out_ld),
              "fastcnn_ext::max_pool2d_out: out must be channels_last (or a channel slice of one)");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "fastcnn_ext::max_pool2d_out: kernel, stride and padding are pairs");
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND3(
      at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "max_pool_cpu", [&] {
        max_pool_cl<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              x.size(0), c, x.size(2), x.size(3), ho, wo, kernel[0], kernel[1],
                              stride[0], stride[1], padding[0], padding[1], out_ld);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn_ext, CPU, m) { m.impl("max_pool2d_out", &max_pool2d_out_cpu); }

}  // namespace fastcnn
