// Global average pooling on CPU for channels_last tensors: out[n, c] = mean of x[n, c, :, :],
// summed in fp32 (bf16 and fp16 too) in pixel order, vectorized over channels and split over
// (batch, channel block) with at::parallel_for. fastcnn.optimize.program's step for a classifier's
// AdaptiveAvgPool2d(1): one call without the dispatcher (a batch-1 ResNet-50's pool takes
// ~30 us alone, ~300 us as aten's op right after the convs, whose weights have evicted the
// dispatcher's and the interpreter's working set).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastcnn {
namespace {

using at::vec::Vectorized;
constexpr int64_t kBlock = 256;  // channels a task: 8 tasks for ResNet-50's 2048 at batch 1

template <typename T>
void global_avg_pool_cl(const T* x, T* out, int64_t n, int64_t c, int64_t pixels) {
  using Vec = Vectorized<float>;
  constexpr int64_t V = Vec::size();
  const int64_t blocks = (c + kBlock - 1) / kBlock;
  const float count = static_cast<float>(pixels);
  at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float sums[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = task % blocks * kBlock;
      const int64_t width = std::min(kBlock, c - c0);
      std::fill(sums, sums + width, 0.f);
      const T* image = x + b * pixels * c + c0;
      for (int64_t p = 0; p < pixels; ++p) {
        const T* row = image + p * c;
        int64_t ch = 0;
        for (; ch + V <= width; ch += V) {
          Vec v;
          if constexpr (std::is_same_v<T, float>) {
            v = Vec::loadu(row + ch);
          } else {
            at::vec::load_to_float<T>(row + ch, v);
          }
          (Vec::loadu(sums + ch) + v).store(sums + ch);
        }
        for (; ch < width; ++ch) sums[ch] += static_cast<float>(row[ch]);
      }
      T* o = out + b * c + c0;
      for (int64_t ch = 0; ch < width; ++ch) o[ch] = static_cast<T>(sums[ch] / count);
    }
  });
}

}  // namespace

// out [N, C, 1, 1] (dense) = the mean over H and W of a channels_last x [N, C, H, W].
void global_avg_pool_out(const at::Tensor& x, const at::Tensor& out) {
  TORCH_CHECK(
      x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(at::MemoryFormat::ChannelsLast),
      "fastcnn global_avg_pool_out: a channels_last 4-D CPU x expected");
  TORCH_CHECK(x.size(2) * x.size(3) > 0, "fastcnn global_avg_pool_out: x has no pixels");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == x.scalar_type() &&
                  out.sizes() == at::IntArrayRef({x.size(0), x.size(1), 1, 1}) &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fastcnn global_avg_pool_out: out must be a dense [", x.size(0), ", ", x.size(1),
              ", 1, 1] ", x.scalar_type(), " CPU tensor, got ", out.sizes(), " ",
              out.scalar_type());
  at::assert_no_overlap(out, x);
  const auto* in = x.const_data_ptr();
  auto* o = out.mutable_data_ptr();
  const int64_t n = x.size(0), c = x.size(1), pixels = x.size(2) * x.size(3);
  switch (x.scalar_type()) {
    case at::kFloat:
      return global_avg_pool_cl(static_cast<const float*>(in), static_cast<float*>(o), n, c,
                                pixels);
    case at::kBFloat16:
      return global_avg_pool_cl(static_cast<const at::BFloat16*>(in), static_cast<at::BFloat16*>(o),
                                n, c, pixels);
    case at::kHalf:
      return global_avg_pool_cl(static_cast<const at::Half*>(in), static_cast<at::Half*>(o), n, c,
                                pixels);
    default:
      TORCH_CHECK(false, "fastcnn global_avg_pool_out: float32, bfloat16 or float16 only, got ",
                  x.scalar_type());
  }
}

}  // namespace fastcnn
