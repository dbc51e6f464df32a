// Conv + bias (+ residual) (+ ReLU) as one oneDNN primitive, called directly (the oneDNN
// library of the onednn-cpu-gomp wheel; torch's own copy exports no symbols). What this saves
// over torch.ops.mkldnn._convolution_pointwise is the primitive descriptor torch creates on
// every call (20-45 us a conv, 2-3 ms of a batch-1 GoogLeNet): here primitives are made once
// per (shapes, strides, post-ops) and kept. Source and destination are described by their own
// strides, so a channel slice of a larger channels_last tensor is read or written in place.
// Built only where the wheel's headers are found (fastcnn/_extension.py defines
// FASTCNN_WITH_ONEDNN); fastcnn.cpu.onednn falls back to torch's ops otherwise, with a note.
#ifdef FASTCNN_WITH_ONEDNN

#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "../common/thread_buffer.h"
#include "onednn_common.h"
#include "onednn_prepared.h"
#include "winograd_conv.h"

namespace fastcnn {

using dnnl::memory;

// t's layout as oneDNN matches it: a dense channels_last or NCHW tensor by its format tag (a
// size-1 dim's stride is arbitrary in torch, while oneDNN compares every stride), any other
// (a channel slice) by its strides.
memory::desc strided(const at::Tensor& t, memory::data_type type) {
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return memory::desc(t.sizes().vec(), type, memory::format_tag::nhwc);
  }
  if (t.is_contiguous()) {
    return memory::desc(t.sizes().vec(), type, memory::format_tag::abcd);
  }
  return memory::desc(t.sizes().vec(), type, t.strides().vec());
}

memory::dims output_dims(at::IntArrayRef x, at::IntArrayRef w, at::IntArrayRef stride,
                         at::IntArrayRef padding) {
  return {x[0], w[0], (x[2] + 2 * padding[0] - w[2]) / stride[0] + 1,
          (x[3] + 2 * padding[1] - w[3]) / stride[1] + 1};
}

// Reference and gemm-based kernels are far slower than torch's path (which copies a strided
// input to a dense one first): only the optimized convolution kernels are taken.
static bool optimized(const std::string& impl) {
  return impl.find("ref") == std::string::npos && impl.find("gemm") == std::string::npos;
}

// Every packed weight layout seen, by id (the index): a handful per model, never removed, so an
// id stays valid for the life of the process. Shared by every direct conv (fp32, bf16, int8).
namespace {
std::mutex layouts_mutex;
std::vector<memory::desc> layouts;
}  // namespace

int64_t layout_id(const memory::desc& desc) {
  std::lock_guard<std::mutex> lock(layouts_mutex);
  for (size_t i = 0; i < layouts.size(); ++i) {
    if (layouts[i] == desc) return static_cast<int64_t>(i);
  }
  layouts.push_back(desc);
  return static_cast<int64_t>(layouts.size() - 1);
}

memory::desc layout(int64_t id) {
  std::lock_guard<std::mutex> lock(layouts_mutex);
  TORCH_CHECK(id >= 0 && static_cast<size_t>(id) < layouts.size(),
              "fastcnn onednn_conv: unknown packed weight layout ", id);
  return layouts[id];
}

std::shared_ptr<dnnl::convolution_forward> optimized_conv(
    const memory::desc& src, const memory::desc& weights, const memory::desc& bias,
    const memory::desc& dst, at::IntArrayRef stride, at::IntArrayRef padding,
    const dnnl::primitive_attr& attr, memory::desc* scratchpad) {
  try {
    dnnl::convolution_forward::primitive_desc pd(
        onednn_engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
        src, weights, bias, dst, stride.vec(), padding.vec(), padding.vec(), attr);
    if (!optimized(pd.impl_info_str())) return nullptr;
    *scratchpad = pd.scratchpad_desc();
    return std::make_shared<dnnl::convolution_forward>(pd);
  } catch (const dnnl::error&) {
    return nullptr;  // no implementation for this combination
  }
}

void execute_conv(const dnnl::convolution_forward& prim, const memory::desc& scratchpad,
                  std::unordered_map<int, memory>& args) {
  if (scratchpad.get_size() > 0) {
    // this thread's buffer now (it moves when it grows; prepared args are reused)
    void* buffer = thread_buffer<ThreadBuffer::kOnednnScratchpad>(scratchpad.get_size());
    auto found = args.find(DNNL_ARG_SCRATCHPAD);
    if (found != args.end()) {
      found->second.set_data_handle(buffer);
    } else {
      args.emplace(DNNL_ARG_SCRATCHPAD, memory(scratchpad, onednn_engine(), buffer));
    }
  }
  auto& stream = onednn_thread_stream();
  prim.execute(stream, args);
  stream.wait();
}

// A cached primitive; prim is null where oneDNN offers no optimized kernel for the layout
// (the caller then takes torch's path, which copies to a dense layout first).
struct DirectConv {
  std::shared_ptr<dnnl::convolution_forward> prim;
  memory::desc src, weights, bias, dst, residual, scratchpad;
  bool sum = false;  // residual added as a sum post-op: it is the destination itself
};

namespace {

using Key = OnednnKey;
using Conv = DirectConv;

memory::data_type data_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return memory::data_type::f32;
    case at::kBFloat16:
      return memory::data_type::bf16;
    case at::kHalf:
      return memory::data_type::f16;
    default:
      TORCH_CHECK(false, "fastcnn onednn_conv: unsupported dtype ", type);
  }
}

memory::data_type data_type(const at::Tensor& t) { return data_type(t.scalar_type()); }

// The weight as oneDNN sees it: [G, O/G, I/G, KH, KW] for grouped convs, read through its own
// strides (fastcnn keeps weights channels_last).
memory::desc weight_view(const at::Tensor& w, int64_t groups, memory::data_type type) {
  if (groups == 1) return strided(w, type);
  auto s = w.strides();
  return memory::desc({groups, w.size(0) / groups, w.size(1), w.size(2), w.size(3)}, type,
                      {s[0] * (w.size(0) / groups), s[0], s[1], s[2], s[3]});
}

memory::dims weight_dims(at::IntArrayRef w, int64_t groups) {
  if (groups == 1) return w.vec();
  return {groups, w[0] / groups, w[1], w[2], w[3]};
}

// The packed weight layout for a conv of these shapes: the one oneDNN picks for dense
// channels_last input and output (at the current thread count). A pack carries the id of its
// layout (layout_id) and a primitive is made for, and keyed by, that exact layout: one packed
// copy serves a conv whatever its post-ops or strides. oneDNN's choice also depends on the
// thread count, and a layout packed for another count may have no optimized kernel at this
// one, so fastcnn.cpu.onednn packs per thread count.
memory::desc packed_weight_desc(at::IntArrayRef x, at::IntArrayRef w, at::IntArrayRef stride,
                                at::IntArrayRef padding, int64_t groups, memory::data_type type) {
  using tag = memory::format_tag;
  dnnl::convolution_forward::primitive_desc pd(
      onednn_engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
      memory::desc(x.vec(), type, tag::nhwc), memory::desc(weight_dims(w, groups), type, tag::any),
      memory::desc({w[0]}, type, tag::a),
      memory::desc(output_dims(x, w, stride, padding), type, tag::nhwc), stride.vec(),
      padding.vec(), padding.vec());
  return pd.weights_desc();
}

PrimitiveCache<Conv> cache;

std::shared_ptr<const Conv> make_conv(const at::Tensor& x, const memory::desc& weights,
                                      at::IntArrayRef w, bool has_bias,
                                      const std::optional<at::Tensor>& residual,
                                      const at::Tensor& out, at::IntArrayRef stride,
                                      at::IntArrayRef padding, bool relu) {
  auto conv = std::make_shared<Conv>();
  const auto type = data_type(x);
  conv->src = strided(x, type);
  conv->dst = strided(out, type);
  conv->weights = weights;
  if (has_bias) conv->bias = memory::desc({w[0]}, type, memory::format_tag::a);
  dnnl::post_ops ops;
  if (residual.has_value()) {
    conv->sum = residual->data_ptr() == out.data_ptr();
    if (conv->sum) {
      ops.append_sum(1.f);
    } else {
      conv->residual = strided(*residual, type);
      ops.append_binary(dnnl::algorithm::binary_add, conv->residual);
    }
  }
  if (relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(ops);
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per call: safe across threads
  conv->prim = optimized_conv(conv->src, conv->weights, conv->bias, conv->dst, stride, padding,
                              attr, &conv->scratchpad);
  return conv;
}

// The caller's tensors against the conv they claim (cheap next to the conv): a wrong size,
// dtype, device or an output overlapping its input would make oneDNN read or write out of bounds.
void check_conv_args(const at::Tensor& x, const at::Tensor& packed_weight, at::IntArrayRef w,
                     const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, const at::Tensor& out,
                     at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups) {
  TORCH_CHECK(
      x.dim() == 4 && out.dim() == 4 && w.size() == 4 && stride.size() == 2 && padding.size() == 2,
      "fastcnn onednn_conv: 4-D x/out, 4 weight sizes, 2 strides and paddings expected");
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu() && packed_weight.device().is_cpu(),
              "fastcnn onednn_conv: CPU tensors expected");
  TORCH_CHECK(groups >= 1 && stride[0] >= 1 && stride[1] >= 1 && x.size(1) == w[1] * groups &&
                  w[0] % groups == 0,
              "fastcnn onednn_conv: x has ", x.size(1), " channels, the weight ", w[1],
              " per group in ", groups, " groups");
  const int64_t ho = (x.size(2) + 2 * padding[0] - w[2]) / stride[0] + 1;
  const int64_t wo = (x.size(3) + 2 * padding[1] - w[3]) / stride[1] + 1;
  TORCH_CHECK(out.sizes() == at::IntArrayRef({x.size(0), w[0], ho, wo}),
              "fastcnn onednn_conv: out ", out.sizes(), " is not the conv's output size [",
              x.size(0), ", ", w[0], ", ", ho, ", ", wo, "]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "fastcnn onednn_conv: out is ",
              out.scalar_type(), ", x ", x.scalar_type());
  TORCH_CHECK(packed_weight.scalar_type() == at::kByte && packed_weight.is_contiguous(),
              "fastcnn onednn_conv: the packed weight must be onednn_conv_pack's byte tensor");
  // Yes only: a channel slice or crop is TooHard to prove, not overlapping
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "fastcnn onednn_conv: out has elements that share memory");
  at::assert_no_overlap(out, x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w[0] && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type() && bias->device().is_cpu(),
                "fastcnn onednn_conv: the bias must be a contiguous CPU vector of ", w[0], " ",
                x.scalar_type());
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device().is_cpu(),
                "fastcnn onednn_conv: the residual ", residual->sizes(), " ",
                residual->scalar_type(), " must be a CPU tensor like out ", out.sizes());
    if (residual->data_ptr() == out.data_ptr()) {  // in place: the same tensor, element for element
      TORCH_CHECK(residual->strides() == out.strides(),
                  "fastcnn onednn_conv: the residual written in place must be out itself");
    } else {
      at::assert_no_overlap(out, *residual);
    }
  }
}

// The kept primitive for a call with these tensors (made on first sight).
std::shared_ptr<const Conv> find_conv(const at::Tensor& x, int64_t packed_layout, at::IntArrayRef w,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual,
                                      const at::Tensor& out, at::IntArrayRef stride,
                                      at::IntArrayRef padding, int64_t groups, bool relu) {
  Key key;
  key.reserve(40);
  key.push_back(static_cast<int64_t>(x.scalar_type()));
  for (auto v : x.sizes()) key.push_back(v);
  for (auto v : x.strides()) key.push_back(v);
  for (auto v : w) key.push_back(v);
  for (auto v : out.strides()) key.push_back(v);
  // the thread count too: oneDNN partitions the work for it when it makes the primitive
  key.insert(key.end(), {stride[0], stride[1], padding[0], padding[1], groups, relu,
                         bias.has_value(), packed_layout, at::get_num_threads()});
  if (residual.has_value()) {
    key.push_back(residual->data_ptr() == out.data_ptr() ? 1 : 2);
    for (auto v : residual->strides()) key.push_back(v);
  }
  return cache.get(key, [&] {
    return make_conv(x, layout(packed_layout), w, bias.has_value(), residual, out, stride, padding,
                     relu);
  });
}

// The metadata a prepared call's tensor must have: an empty tensor with t's sizes, strides,
// dtype and device.
at::Tensor meta_like(const at::Tensor& t) {
  return at::empty_strided(t.sizes(), t.strides(), t.options().device(at::kMeta));
}

bool same_meta(const at::Tensor& t, const at::Tensor& meta) {
  return t.scalar_type() == meta.scalar_type() && t.device().is_cpu() &&
         t.sizes() == meta.sizes() && t.strides() == meta.strides();
}

}  // namespace

PreparedConv::PreparedConv(const at::Tensor& x, const at::Tensor& packed, int64_t packed_layout,
                           std::vector<int64_t> w, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, const at::Tensor& out,
                           std::vector<int64_t> stride, std::vector<int64_t> padding,
                           int64_t groups, bool relu) {
  if (is_winograd_layout(packed_layout)) return;  // not ok(): onednn_conv runs Winograd packs
  TORCH_CHECK(!x.is_same(out), "fastcnn PreparedConv: out is x");
  check_conv_args(x, packed, w, bias, residual, out, stride, padding, groups);
  conv_ = find_conv(x, packed_layout, w, bias, residual, out, stride, padding, groups, relu);
  if (!conv_->prim) return;
  x_meta_ = meta_like(x);
  out_meta_ = meta_like(out);
  has_bias_ = bias.has_value();
  has_residual_ = residual.has_value();
  sum_ = conv_->sum;
  if (has_residual_) residual_meta_ = meta_like(*residual);
  auto& eng = onednn_engine();
  // handles set by run(); DNNL_MEMORY_NONE would make oneDNN allocate nothing either
  args_.emplace(DNNL_ARG_SRC, memory(conv_->src, eng, nullptr));
  args_.emplace(DNNL_ARG_WEIGHTS, memory(conv_->weights, eng, nullptr));
  args_.emplace(DNNL_ARG_DST, memory(conv_->dst, eng, nullptr));
  if (has_bias_) args_.emplace(DNNL_ARG_BIAS, memory(conv_->bias, eng, nullptr));
  if (has_residual_ && !sum_) {
    args_.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                  memory(conv_->residual, eng, nullptr));
  }
}

bool PreparedConv::ok() const { return conv_ && conv_->prim; }

void PreparedConv::run(const at::Tensor& x, const at::Tensor& packed,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, const at::Tensor& out) {
  TORCH_CHECK(ok(), "fastcnn PreparedConv: not prepared (no optimized kernel, or Winograd)");
  TORCH_CHECK(same_meta(x, x_meta_) && same_meta(out, out_meta_) && bias.has_value() == has_bias_ &&
                  residual.has_value() == has_residual_,
              "fastcnn PreparedConv: x ", x.sizes(), " / out ", out.sizes(),
              " or the bias / residual are not the tensors it was prepared for");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  static_cast<size_t>(packed.numel()) == conv_->weights.get_size(),
              "fastcnn PreparedConv: the packed weight does not have the size of its layout");
  if (has_bias_) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out.size(1) && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type() && bias->device().is_cpu(),
                "fastcnn PreparedConv: the bias must be a contiguous CPU vector like out's "
                "channels");
    args_.at(DNNL_ARG_BIAS).set_data_handle(bias->data_ptr());
  }
  at::assert_no_overlap(out, x);
  if (has_residual_) {
    TORCH_CHECK(
        same_meta(*residual, residual_meta_) && (residual->data_ptr() == out.data_ptr()) == sum_,
        "fastcnn PreparedConv: the residual is not the one it was prepared for");
    if (!sum_) {
      at::assert_no_overlap(out, *residual);
      args_.at(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1)
          .set_data_handle(residual->data_ptr());
    }
  }
  args_.at(DNNL_ARG_SRC).set_data_handle(x.data_ptr());
  args_.at(DNNL_ARG_WEIGHTS).set_data_handle(packed.data_ptr());
  args_.at(DNNL_ARG_DST).set_data_handle(out.data_ptr());
  execute_conv(*conv_->prim, conv_->scratchpad, args_);
}

// The id of the layout onednn_conv_pack packs a weight of sizes w and dtype type in for inputs
// of x_sizes at this thread count (Winograd's where winograd, fp32 only): convs whose ids agree
// share one pack, so a weight served at many batch sizes is packed once per layout, not once
// per shape.
int64_t onednn_conv_layout(at::IntArrayRef x_sizes, at::IntArrayRef w, at::IntArrayRef stride,
                           at::IntArrayRef padding, int64_t groups, bool winograd,
                           at::ScalarType type) {
  TORCH_CHECK(x_sizes.size() == 4 && w.size() == 4 && x_sizes[1] == w[1] * groups,
              "fastcnn onednn_conv_layout: input sizes ", x_sizes, " do not fit the weight ", w);
  if (winograd) {
    TORCH_CHECK(winograd_applies(w, stride, padding, groups, type),
                "fastcnn onednn_conv_layout: Winograd takes fp32 3x3 convs of stride 1, padding "
                "1, 1 group");
    return winograd_layout_id(layout_id(winograd_weights_desc(x_sizes, w[0])));
  }
  return layout_id(packed_weight_desc(x_sizes, w, stride, padding, groups, data_type(type)));
}

// weight [O, I/G, KH, KW] packed into the layout oneDNN picks for convs of these shapes (see
// packed_weight_desc): (the bytes, the layout's id for onednn_conv). With winograd, transformed
// for winograd_conv.cpp instead (a negative layout id: winograd_layout_id).
std::tuple<at::Tensor, int64_t> onednn_conv_pack(const at::Tensor& weight, at::IntArrayRef x_sizes,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 int64_t groups, bool winograd) {
  TORCH_CHECK(weight.dim() == 4 && x_sizes.size() == 4 && !weight.is_cuda(),
              "fastcnn onednn_conv_pack: a 4-D CPU weight and input sizes expected");
  if (winograd) {
    TORCH_CHECK(
        winograd_applies(weight.sizes(), stride, padding, groups, weight.scalar_type()),
        "fastcnn onednn_conv_pack: Winograd takes fp32 3x3 convs of stride 1, padding 1, 1 group");
    auto [packed, desc] = winograd_pack(weight, x_sizes);
    return {packed, winograd_layout_id(layout_id(desc))};
  }
  const auto type = data_type(weight);
  auto packed_desc = packed_weight_desc(x_sizes, weight.sizes(), stride, padding, groups, type);
  auto packed =
      at::empty({static_cast<int64_t>(packed_desc.get_size())}, weight.options().dtype(at::kByte));
  memory from(weight_view(weight, groups, type), onednn_engine(), weight.data_ptr());
  memory to(packed_desc, onednn_engine(), packed.data_ptr());
  auto& stream = onednn_thread_stream();
  dnnl::reorder(from, to).execute(stream, from, to);
  stream.wait();
  return {packed, layout_id(packed_desc)};
}

// out = relu?(conv2d(x, weight) + bias + residual) with weight packed by onednn_conv_pack for
// x's sizes (packed_weight and packed_layout: what it returned). Returns false, writing
// nothing, where oneDNN has no optimized kernel for these strides (the caller then takes
// another path). residual may be out itself (a sum post-op). A Winograd pack runs in
// winograd_conv.cpp.
bool onednn_conv(const at::Tensor& x, const at::Tensor& packed_weight, int64_t packed_layout,
                 at::IntArrayRef w, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& residual, const at::Tensor& out,
                 at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups, bool relu) {
  check_conv_args(x, packed_weight, w, bias, residual, out, stride, padding, groups);
  if (is_winograd_layout(packed_layout)) {
    TORCH_CHECK(winograd_applies(w, stride, padding, groups, x.scalar_type()),
                "fastcnn onednn_conv: a Winograd pack for a conv Winograd does not take");
    return winograd_conv(x, packed_weight, layout(winograd_registry_id(packed_layout)), w, bias,
                         residual, out, relu);
  }
  auto conv = find_conv(x, packed_layout, w, bias, residual, out, stride, padding, groups, relu);
  if (!conv->prim) return false;
  TORCH_CHECK(static_cast<size_t>(packed_weight.numel()) == conv->weights.get_size(),
              "fastcnn onednn_conv: the packed weight does not have the size of its layout "
              "(packed for another conv)");
  auto& eng = onednn_engine();
  std::unordered_map<int, memory> args = {
      {DNNL_ARG_SRC, memory(conv->src, eng, x.data_ptr())},
      {DNNL_ARG_WEIGHTS, memory(conv->weights, eng, packed_weight.data_ptr())},
      {DNNL_ARG_DST, memory(conv->dst, eng, out.data_ptr())}};
  if (bias.has_value()) args.emplace(DNNL_ARG_BIAS, memory(conv->bias, eng, bias->data_ptr()));
  if (residual.has_value() && !conv->sum) {
    args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                 memory(conv->residual, eng, residual->data_ptr()));
  }
  execute_conv(*conv->prim, conv->scratchpad, args);
  return true;
}

size_t onednn_conv_cached() { return cache.size(); }

}  // namespace fastcnn

#endif  // FASTCNN_WITH_ONEDNN
