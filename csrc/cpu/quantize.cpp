// The float <-> uint8 conversions of fastcnn.quantize's models, each one pass over memory
// (torch's expression of the same arithmetic makes four to six): where a quantized region
// starts (quantize), ends (dequantize), or changes scale (requantize). The arithmetic is
// fastcnn.nn.quantized's, step for step in fp32, so results are bit-identical to it:
//   quantize:   q = clamp(round_half_even(x * inv_scale) + zero_point, 0, 255)
//   dequantize: x = (float(q) - zero_point) * scale
//   requantize: quantize(dequantize(q)) with the target's inv_scale and zero point
// round_half_even is nearbyint in the default rounding mode; NaN quantizes to 0.
// x and out walk storage in the same order: both dense in one layout (channels_last or
// contiguous), checked. Split over threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace fastcnn {
namespace {

constexpr int64_t kGrain = 65536;  // elements per task: small tensors stay on one thread

// nearbyint rounds ties to even in the default rounding mode (torch.round's rounding). The
// int32 step and restrict-qualified pointers in the loops let the compiler vectorize them.
inline uint8_t to_u8(float x, float inv_scale, float zero_point) {
  const float v = std::nearbyint(x * inv_scale) + zero_point;
  // NaN > 0 is false: NaN becomes 0 (uint8 has no NaN), +-inf saturate.
  return static_cast<uint8_t>(static_cast<int32_t>(v > 0.f ? (v < 255.f ? v : 255.f) : 0.f));
}

void check_dense_pair(const at::Tensor& in, const at::Tensor& out, const char* op) {
  TORCH_CHECK(in.device().is_cpu() && out.device().is_cpu(), "fastcnn_ext::", op,
              ": CPU tensors only");
  TORCH_CHECK(in.sizes() == out.sizes(), "fastcnn_ext::", op, ": out has shape ", out.sizes(),
              " but the input ", in.sizes());
  TORCH_CHECK(in.is_non_overlapping_and_dense() && in.strides() == out.strides(),
              "fastcnn_ext::", op, ": input and out must be dense with the same strides");
}

void quantize_u8_out(const at::Tensor& x, double scale, int64_t zero_point, at::Tensor out) {
  check_dense_pair(x, out, "quantize_u8_out");
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kByte,
              "fastcnn_ext::quantize_u8_out: float32 in, uint8 out");
  const float inv = static_cast<float>(1.0 / scale), zp = static_cast<float>(zero_point);
  const float* src = x.const_data_ptr<float>();
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    // locals, the pointers restrict-qualified: a uint8 store may alias anything, the captured
    // variables too, which would then be reloaded every iteration
    const float* __restrict s = src;
    uint8_t* __restrict d = dst;
    const float inv_ = inv, zp_ = zp;
    for (int64_t i = begin; i < end; ++i) d[i] = to_u8(s[i], inv_, zp_);
  });
}

void dequantize_u8_out(const at::Tensor& q, double scale, int64_t zero_point, at::Tensor out) {
  check_dense_pair(q, out, "dequantize_u8_out");
  TORCH_CHECK(q.scalar_type() == at::kByte && out.scalar_type() == at::kFloat,
              "fastcnn_ext::dequantize_u8_out: uint8 in, float32 out");
  const float s = static_cast<float>(scale), zp = static_cast<float>(zero_point);
  const uint8_t* src = q.const_data_ptr<uint8_t>();
  float* dst = out.mutable_data_ptr<float>();
  at::parallel_for(0, q.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = (static_cast<float>(src[i]) - zp) * s;
  });
}

void requantize_u8_out(const at::Tensor& q, double scale, int64_t zero_point, double out_scale,
                       int64_t out_zero_point, at::Tensor out) {
  check_dense_pair(q, out, "requantize_u8_out");
  TORCH_CHECK(q.scalar_type() == at::kByte && out.scalar_type() == at::kByte,
              "fastcnn_ext::requantize_u8_out: uint8 in and out");
  const float s = static_cast<float>(scale), zp = static_cast<float>(zero_point);
  const float inv = static_cast<float>(1.0 / out_scale), ozp = static_cast<float>(out_zero_point);
  const uint8_t* src = q.const_data_ptr<uint8_t>();
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, q.numel(), kGrain, [&](int64_t begin, int64_t end) {
    const uint8_t* __restrict from = src;  // locals: see quantize_u8_out
    uint8_t* __restrict to = dst;
    const float s_ = s, zp_ = zp, inv_ = inv, ozp_ = ozp;
    for (int64_t i = begin; i < end; ++i)
      to[i] = to_u8((static_cast<float>(from[i]) - zp_) * s_, inv_, ozp_);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn_ext, CPU, m) {
  m.impl("quantize_u8_out", &quantize_u8_out);
  m.impl("dequantize_u8_out", &dequantize_u8_out);
  m.impl("requantize_u8_out", &requantize_u8_out);
}

}  // namespace fastcnn
