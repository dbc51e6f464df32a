// What the direct oneDNN sources share (onednn_conv.cpp, onednn_qconv.cpp, winograd_conv.cpp):
// one engine, a stream per thread, the key type of their primitive caches, tensor layouts as
// oneDNN sees them and the registry of packed weight layouts (defined in onednn_conv.cpp).
#pragma once
#ifdef FASTCNN_WITH_ONEDNN

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <vector>

namespace fastcnn {

using OnednnKey = std::vector<int64_t>;

struct OnednnKeyHash {
  size_t operator()(const OnednnKey& key) const {
    size_t h = key.size();
    for (int64_t v : key)
      h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
  }
};

inline dnnl::engine& onednn_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

inline dnnl::stream& onednn_thread_stream() {  // streams are not shared between threads
  thread_local dnnl::stream stream(onednn_engine());
  return stream;
}

// t's layout: a dense channels_last or NCHW tensor by its format tag, any other (a channel
// slice) by its strides.
dnnl::memory::desc strided(const at::Tensor& t, dnnl::memory::data_type type);

// [N, O, Ho, Wo] of a conv of input sizes x and weight sizes w.
dnnl::memory::dims output_dims(at::IntArrayRef x, at::IntArrayRef w, at::IntArrayRef stride,
                               at::IntArrayRef padding);

// Is this oneDNN implementation (impl_info_str) an optimized convolution kernel (not a
// reference or gemm-based one)?
bool optimized(const std::string& impl);

// The id of a packed weight layout (registered on first sight; ids live as long as the
// process), and the layout of an id.
int64_t layout_id(const dnnl::memory::desc& desc);
dnnl::memory::desc layout(int64_t id);

}  // namespace fastcnn

#endif  // FASTCNN_WITH_ONEDNN
