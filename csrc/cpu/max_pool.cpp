// max_pool2d on CPU for channels_last tensors, without the indices that aten's max_pool2d also
// computes and writes (int64: twice the bytes of an fp32 output) when no backward will need them.
// Each output pixel is the elementwise max of its window's channel vectors: vectorized over
// channels with ATen's Vectorized<T>, split over (batch, output row) with at::parallel_for;
// overlapping windows in a row are taken in two passes (see max_pool_cl).
// uint8 too: fastcnn.quantize's activations (aten's uint8 max_pool2d rejects large inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastcnn {
namespace {

using at::vec::Vectorized;

// NaN wins, as in torch.max_pool2d.
template <typename T>
inline T max_keep_nan(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// bf16 and fp16 compare as fp32: converted once on loading and once on storing (exact both
// ways: the max of bf16 values is one of them), where ATen's Vectorized<BFloat16>::maximum
// converts both operands and the result of every comparison.
template <typename T>
constexpr bool kAsFloat = at::vec::is_reduced_floating_point_v<T>;

template <typename T>
inline auto load_vec(const T* p) {
  if constexpr (kAsFloat<T>) {
    Vectorized<float> v;
    at::vec::load_to_float<T>(p, v);
    return v;
  } else {
    return Vectorized<T>::loadu(p);
  }
}

template <typename T, typename V>
inline void store_vec(const V& v, T* p) {
  if constexpr (kAsFloat<T>) {
    at::vec::convert_from_float<T>(v, v).store(p, V::size());
  } else {
    v.store(p);
  }
}

// The vector type a T channel block is compared in, and its lowest value.
template <typename T>
using CompareVec = Vectorized<std::conditional_t<kAsFloat<T>, float, T>>;

// The max of n channel vectors of c elements, each `step` apart from the last, into o.
template <typename T>
inline void max_of(const T* x, int64_t n, int64_t step, int64_t c, T lowest, T* o) {
  using Vec = CompareVec<T>;
  constexpr int64_t V = Vec::size();
  int64_t ch = 0;
  for (; ch + V <= c; ch += V) {
    Vec m(static_cast<typename Vec::value_type>(lowest));
    for (int64_t i = 0; i < n; ++i) m = at::vec::maximum(m, load_vec(x + i * step + ch));
    store_vec(m, o + ch);
  }
  for (; ch < c; ++ch) {
    T m = lowest;
    for (int64_t i = 0; i < n; ++i) m = max_keep_nan(m, x[i * step + ch]);
    o[ch] = m;
  }
}

// The max over a window of rows x cols channel vectors (rows `row_step` apart), into o.
template <typename T>
inline void window_max(const T* x, int64_t rows, int64_t cols, int64_t row_step, int64_t c,
                       T lowest, T* o) {
  using Vec = CompareVec<T>;
  constexpr int64_t V = Vec::size();
  int64_t ch = 0;
  for (; ch + V <= c; ch += V) {
    Vec m(static_cast<typename Vec::value_type>(lowest));
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        m = at::vec::maximum(m, load_vec(x + i * row_step + j * c + ch));
      }
    }
    store_vec(m, o + ch);
  }
  for (; ch < c; ++ch) {
    T m = lowest;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) m = max_keep_nan(m, x[i * row_step + j * c + ch]);
    }
    o[ch] = m;
  }
}

template <typename T>
void max_pool_cl(const T* x, T* out, int64_t n, int64_t c, int64_t h, int64_t w, int64_t ho,
                 int64_t wo, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                 int64_t out_ld) {
  const T lowest = std::numeric_limits<T>::has_infinity ? -std::numeric_limits<T>::infinity()
                                                        : std::numeric_limits<T>::lowest();
  // Separable where windows overlap along a row (stride 1, as in the Inception blocks' 3x3
  // pools): each output row first takes the max down its window's rows for every input column
  // (kh loads a column), then across each window's columns of that (kw loads an output):
  // kh + kw loads an output instead of kh * kw (6 instead of 9 for 3x3). With stride 2 both
  // ways cost the same and the direct loop is kept.
  const bool separable = sw == 1 && kw > 1 && kh > 1;
  at::parallel_for(0, n * ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> column_max(separable ? w * c : 0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / ho, oh = row % ho;
      const int64_t h0 = std::max<int64_t>(oh * sh - ph, 0);
      const int64_t h1 = std::min<int64_t>(oh * sh - ph + kh, h);
      const T* rows = x + (b * h + h0) * w * c;  // window row h0, column 0
      T* o = out + (b * ho + oh) * wo * out_ld;
      if (separable) {
        for (int64_t iw = 0; iw < w; ++iw) {
          max_of(rows + iw * c, h1 - h0, w * c, c, lowest, column_max.data() + iw * c);
        }
      }
      for (int64_t ow = 0; ow < wo; ++ow) {
        const int64_t w0 = std::max<int64_t>(ow * sw - pw, 0);
        const int64_t w1 = std::min<int64_t>(ow * sw - pw + kw, w);
        if (separable) {
          max_of(column_max.data() + w0 * c, w1 - w0, c, c, lowest, o + ow * out_ld);
        } else {
          window_max(rows + w0 * c, h1 - h0, w1 - w0, w * c, c, lowest, o + ow * out_ld);
        }
      }
    }
  });
}

}  // namespace

// Also called by the Inception block on the cpu backend (cpu/onednn_inception.cpp).
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
  TORCH_CHECK(kernel[0] >= 1 && kernel[1] >= 1 && stride[0] >= 1 && stride[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "fastcnn_ext::max_pool2d_out: kernel and stride >= 1, padding >= 0 expected");
  // every window must overlap the input (a larger out would get -inf rows)
  TORCH_CHECK((ho - 1) * stride[0] - padding[0] < x.size(2) &&
                  (wo - 1) * stride[1] - padding[1] < x.size(3),
              "fastcnn_ext::max_pool2d_out: out ", out.sizes(), " has windows past x ", x.sizes());
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND3(
      at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "max_pool_cpu", [&] {
        max_pool_cl<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              x.size(0), c, x.size(2), x.size(3), ho, wo, kernel[0], kernel[1],
                              stride[0], stride[1], padding[0], padding[1], out_ld);
      });
}

TORCH_LIBRARY_IMPL(fastcnn_ext, CPU, m) { m.impl("max_pool2d_out", &max_pool2d_out_cpu); }

}  // namespace fastcnn
