// What the direct oneDNN sources share (onednn_conv.cpp, winograd_conv.cpp): one engine, a
// stream per thread, and the key type of their primitive caches.
#pragma once
#ifdef FASTCNN_WITH_ONEDNN

#include <cstdint>
#include <functional>
#include <oneapi/dnnl/dnnl.hpp>
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

}  // namespace fastcnn

#endif  // FASTCNN_WITH_ONEDNN
