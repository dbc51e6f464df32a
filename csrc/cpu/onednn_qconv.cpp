// int8 conv + bias (+ int8 residual) (+ ReLU) + requantize as one oneDNN primitive, called
// directly like the fp32 ones (onednn_conv.cpp): uint8 activations with a per-tensor scale and
// zero point, int8 weights with a scale per output channel, int32 sums. What this saves over
// torch.ops.onednn.qconv_pointwise is the primitive descriptor, scratchpad and output torch
// makes on every call: primitives are made once per (shapes, strides, post-ops) and kept.
//
// oneDNN 3's arithmetic, which is fastcnn.reference.qconv_bn_act's:
//   f = x_scale * weight_scale[c] * sum((x - x_zp) * w) + bias[c]
//   f += r_scale * (out - r_zp)        (the sum post-op: out holds the residual on entry)
//   f = relu(f)
//   out = saturate_u8(round(f / out_scale) + out_zp)
// Scales and zero points are passed per call (runtime scales): one packed weight serves every
// calibration of the conv; only the residual's scale and zero point are in the primitive.
// Weights are packed with the compensation oneDNN needs for a source zero point, so a conv
// whose input has zero point 0 (after a ReLU: most of them) uses a pack without it.
#ifdef FASTCNN_WITH_ONEDNN

#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>
#include <tuple>
#include <unordered_map>

#include "onednn_common.h"

namespace fastcnn {
namespace {

using dnnl::memory;
using dt = memory::data_type;

struct QConv {
  std::shared_ptr<dnnl::convolution_forward> prim;  // null: no optimized kernel
  memory::desc src, weights, bias, dst, scratchpad;
};

PrimitiveCache<QConv> cache;

const memory::desc& scalar_desc(dt type) {
  static const memory::desc f32({1}, dt::f32, memory::format_tag::a);
  static const memory::desc s32({1}, dt::s32, memory::format_tag::a);
  return type == dt::f32 ? f32 : s32;
}

// The quantization attributes: runtime scales for source, weights (per output channel) and
// destination, and zero points for source and destination where they are not 0.
dnnl::primitive_attr quant_attr(bool src_zp, bool dst_zp) {
  dnnl::primitive_attr attr;
  attr.set_scales_mask(DNNL_ARG_SRC, 0);
  attr.set_scales_mask(DNNL_ARG_WEIGHTS, 1 << 0);
  attr.set_scales_mask(DNNL_ARG_DST, 0);
  if (src_zp) attr.set_zero_points_mask(DNNL_ARG_SRC, 0);
  if (dst_zp) attr.set_zero_points_mask(DNNL_ARG_DST, 0);
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per call: safe across threads
  return attr;
}

// The layout oneDNN picks for this conv's weights with dense channels_last uint8 input and
// output at the current thread count; with src_zp, it carries the zero point's compensation.
memory::desc packed_qweight_desc(at::IntArrayRef x, at::IntArrayRef w, at::IntArrayRef stride,
                                 at::IntArrayRef padding, bool src_zp) {
  using tag = memory::format_tag;
  dnnl::convolution_forward::primitive_desc pd(
      onednn_engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
      memory::desc(x.vec(), dt::u8, tag::nhwc), memory::desc(w.vec(), dt::s8, tag::any),
      memory::desc({w[0]}, dt::f32, tag::a),
      memory::desc(output_dims(x, w, stride, padding), dt::u8, tag::nhwc), stride.vec(),
      padding.vec(), padding.vec(), quant_attr(src_zp, false));
  return pd.weights_desc();
}

std::shared_ptr<const QConv> make_qconv(const at::Tensor& x, const memory::desc& weights,
                                        at::IntArrayRef w, bool has_bias, bool src_zp, bool dst_zp,
                                        bool sum, float r_scale, int32_t r_zp,
                                        const at::Tensor& out, at::IntArrayRef stride,
                                        at::IntArrayRef padding, bool relu) {
  auto conv = std::make_shared<QConv>();
  conv->src = strided(x, dt::u8);
  conv->dst = strided(out, dt::u8);
  conv->weights = weights;
  if (has_bias) conv->bias = memory::desc({w[0]}, dt::f32, memory::format_tag::a);
  dnnl::post_ops ops;
  if (sum) ops.append_sum(r_scale, r_zp);
  if (relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  auto attr = quant_attr(src_zp, dst_zp);
  attr.set_post_ops(ops);
  conv->prim = optimized_conv(conv->src, conv->weights, conv->bias, conv->dst, stride, padding,
                              attr, &conv->scratchpad);
  return conv;
}

void check_qconv_args(const at::Tensor& x, const at::Tensor& packed_weight, at::IntArrayRef w,
                      const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                      const at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(
      x.dim() == 4 && out.dim() == 4 && w.size() == 4 && stride.size() == 2 && padding.size() == 2,
      "fastcnn onednn_qconv: 4-D x/out, 4 weight sizes, 2 strides and paddings expected");
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu() && packed_weight.device().is_cpu() &&
                  weight_scale.device().is_cpu(),
              "fastcnn onednn_qconv: CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kByte && out.scalar_type() == at::kByte,
              "fastcnn onednn_qconv: uint8 x and out expected, got ", x.scalar_type(), " and ",
              out.scalar_type());
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && x.size(1) == w[1], "fastcnn onednn_qconv: x has ",
              x.size(1), " channels, the weight ", w[1]);
  const auto dims = output_dims(x.sizes(), w, stride, padding);
  TORCH_CHECK(out.sizes() == at::IntArrayRef(dims), "fastcnn onednn_qconv: out ", out.sizes(),
              " is not the conv's output size ", at::IntArrayRef(dims));
  TORCH_CHECK(packed_weight.scalar_type() == at::kByte && packed_weight.is_contiguous(),
              "fastcnn onednn_qconv: the packed weight must be onednn_qconv_pack's byte tensor");
  TORCH_CHECK(weight_scale.scalar_type() == at::kFloat && weight_scale.dim() == 1 &&
                  weight_scale.size(0) == w[0] && weight_scale.is_contiguous(),
              "fastcnn onednn_qconv: weight_scale must be a contiguous float32 vector of ", w[0]);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w[0] && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                "fastcnn onednn_qconv: the bias must be a contiguous float32 CPU vector of ", w[0]);
  }
  // Yes only: a channel slice is TooHard to prove, not overlapping
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "fastcnn onednn_qconv: out has elements that share memory");
  at::assert_no_overlap(out, x);
}

int32_t float_bits(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

}  // namespace

// The id of the layout onednn_qconv_pack packs an int8 weight of sizes w in for uint8 inputs
// of x_sizes at this thread count (src_zp: inputs with a zero point other than 0).
int64_t onednn_qconv_layout(at::IntArrayRef x_sizes, at::IntArrayRef w, at::IntArrayRef stride,
                            at::IntArrayRef padding, bool src_zp) {
  TORCH_CHECK(x_sizes.size() == 4 && w.size() == 4 && x_sizes[1] == w[1],
              "fastcnn onednn_qconv_layout: input sizes ", x_sizes, " do not fit the weight ", w);
  return layout_id(packed_qweight_desc(x_sizes, w, stride, padding, src_zp));
}

// int8 weight [O, I, KH, KW] packed for onednn_qconv: (the bytes, the layout's id).
std::tuple<at::Tensor, int64_t> onednn_qconv_pack(const at::Tensor& weight, at::IntArrayRef x_sizes,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  bool src_zp) {
  TORCH_CHECK(weight.dim() == 4 && x_sizes.size() == 4 && weight.device().is_cpu() &&
                  weight.scalar_type() == at::kChar,
              "fastcnn onednn_qconv_pack: a 4-D int8 CPU weight and input sizes expected");
  auto packed_desc = packed_qweight_desc(x_sizes, weight.sizes(), stride, padding, src_zp);
  auto packed =
      at::zeros({static_cast<int64_t>(packed_desc.get_size())}, weight.options().dtype(at::kByte));
  memory from(strided(weight, dt::s8), onednn_engine(), weight.data_ptr());
  memory to(packed_desc, onednn_engine(), packed.data_ptr());
  auto& stream = onednn_thread_stream();
  dnnl::reorder(from, to).execute(stream, from, to);
  stream.wait();
  return {packed, layout_id(packed_desc)};
}

// out = requantized relu?(dequantized conv2d(x, weight) + bias (+ residual)), weight packed by
// onednn_qconv_pack for x's sizes and x_zp's kind. With sum_residual, out holds the residual's
// uint8 values on entry (scale r_scale, zero point r_zp) and is overwritten with the result.
// Returns false, writing nothing, where oneDNN has no optimized kernel for these strides.
bool onednn_qconv(const at::Tensor& x, double x_scale, int64_t x_zp,
                  const at::Tensor& packed_weight, int64_t packed_layout, at::IntArrayRef w,
                  const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                  bool sum_residual, double r_scale, int64_t r_zp, const at::Tensor& out,
                  at::IntArrayRef stride, at::IntArrayRef padding, bool relu, double out_scale,
                  int64_t out_zp) {
  check_qconv_args(x, packed_weight, w, weight_scale, bias, out, stride, padding);
  const bool src_zp = x_zp != 0, dst_zp = out_zp != 0;
  OnednnKey key;
  key.reserve(40);
  for (auto v : x.sizes()) key.push_back(v);
  for (auto v : x.strides()) key.push_back(v);
  for (auto v : w) key.push_back(v);
  for (auto v : out.strides()) key.push_back(v);
  // the thread count too: oneDNN partitions the work for it when it makes the primitive
  key.insert(key.end(), {stride[0], stride[1], padding[0], padding[1], relu, bias.has_value(),
                         packed_layout, at::get_num_threads(), src_zp, dst_zp, sum_residual});
  if (sum_residual) key.insert(key.end(), {float_bits(static_cast<float>(r_scale)), r_zp});
  auto conv = cache.get(key, [&] {
    return make_qconv(x, layout(packed_layout), w, bias.has_value(), src_zp, dst_zp, sum_residual,
                      static_cast<float>(r_scale), static_cast<int32_t>(r_zp), out, stride, padding,
                      relu);
  });
  if (!conv->prim) return false;
  TORCH_CHECK(static_cast<size_t>(packed_weight.numel()) == conv->weights.get_size(),
              "fastcnn onednn_qconv: the packed weight does not have the size of its layout "
              "(packed for another conv)");
  float src_scale = static_cast<float>(x_scale), dst_scale = static_cast<float>(out_scale);
  int32_t src_zero = static_cast<int32_t>(x_zp), dst_zero = static_cast<int32_t>(out_zp);
  auto& eng = onednn_engine();
  const memory::desc wscale_desc({w[0]}, dt::f32, memory::format_tag::a);
  std::unordered_map<int, memory> args = {
      {DNNL_ARG_SRC, memory(conv->src, eng, x.data_ptr())},
      {DNNL_ARG_WEIGHTS, memory(conv->weights, eng, packed_weight.data_ptr())},
      {DNNL_ARG_DST, memory(conv->dst, eng, out.data_ptr())},
      {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, memory(scalar_desc(dt::f32), eng, &src_scale)},
      {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, memory(wscale_desc, eng, weight_scale.data_ptr())},
      {DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST, memory(scalar_desc(dt::f32), eng, &dst_scale)}};
  if (src_zp) {
    args.emplace(DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC,
                 memory(scalar_desc(dt::s32), eng, &src_zero));
  }
  if (dst_zp) {
    args.emplace(DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_DST,
                 memory(scalar_desc(dt::s32), eng, &dst_zero));
  }
  if (bias.has_value()) args.emplace(DNNL_ARG_BIAS, memory(conv->bias, eng, bias->data_ptr()));
  execute_conv(*conv->prim, conv->scratchpad, args);  // the scales above live until it returns
  return true;
}

size_t onednn_qconv_cached() { return cache.size(); }

}  // namespace fastcnn

#endif  // FASTCNN_WITH_ONEDNN
