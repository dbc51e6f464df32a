// What the direct oneDNN sources share (onednn_conv.cpp, onednn_qconv.cpp, winograd_conv.cpp):
// one engine, a stream per thread, the key type of their primitive caches, tensor layouts as
// oneDNN sees them and the registry of packed weight layouts (defined in onednn_conv.cpp).
#pragma once
#ifdef FASTCNN_WITH_ONEDNN

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <unordered_map>
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

// Primitives kept by key (no weights), shared between threads: made outside the lock (making
// one takes milliseconds), the map emptied when it reaches its bound (and refilled by the shapes
// still in use). A GoogLeNet or ResNet-50 served at every batch size up to 32 needs ~2000.
template <typename Value>
class PrimitiveCache {
 public:
  static constexpr size_t kBound = 8192;

  template <typename Make>
  std::shared_ptr<const Value> get(const OnednnKey& key, Make make) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto hit = map_.find(key);
      if (hit != map_.end()) return hit->second;
    }
    std::shared_ptr<const Value> made = make();
    std::lock_guard<std::mutex> lock(mutex_);
    if (map_.size() >= kBound) map_.clear();
    map_.emplace(key, made);
    return made;
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return map_.size();
  }

 private:
  std::mutex mutex_;
  std::unordered_map<OnednnKey, std::shared_ptr<const Value>, OnednnKeyHash> map_;
};

// The forward-inference convolution of these descriptors and attributes (padding on both
// sides), its scratchpad's descriptor in *scratchpad; null where oneDNN offers no optimized
// kernel for them (reference and gemm-based ones are far slower than torch's path, which copies
// a strided input to a dense one first), or none at all: the caller then takes another path.
std::shared_ptr<dnnl::convolution_forward> optimized_conv(
    const dnnl::memory::desc& src, const dnnl::memory::desc& weights,
    const dnnl::memory::desc& bias, const dnnl::memory::desc& dst, at::IntArrayRef stride,
    at::IntArrayRef padding, const dnnl::primitive_attr& attr, dnnl::memory::desc* scratchpad);

// Runs a convolution primitive with args on this thread's stream, its scratchpad (of that
// size) in this thread's buffer, and waits for it.
void execute_conv(const dnnl::convolution_forward& prim, const dnnl::memory::desc& scratchpad,
                  std::unordered_map<int, dnnl::memory>& args);

// t's layout: a dense channels_last or NCHW tensor by its format tag, any other (a channel
// slice) by its strides.
dnnl::memory::desc strided(const at::Tensor& t, dnnl::memory::data_type type);

// [N, O, Ho, Wo] of a conv of input sizes x and weight sizes w.
dnnl::memory::dims output_dims(at::IntArrayRef x, at::IntArrayRef w, at::IntArrayRef stride,
                               at::IntArrayRef padding);

// The id of a packed weight layout (registered on first sight; ids live as long as the
// process), and the layout of an id.
int64_t layout_id(const dnnl::memory::desc& desc);
dnnl::memory::desc layout(int64_t id);

}  // namespace fastcnn

#endif  // FASTCNN_WITH_ONEDNN
