// Per-thread working memory that is grown and kept, never freed per call: a fresh large
// allocation per call costs page faults and cold cache lines on every call, while memory that
// was just used is still in cache. One call at a time runs on a thread, so a thread's buffer
// is never shared; each Slot is a separate buffer (two users may hold theirs at once).
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdlib>

namespace fastcnn {

enum class ThreadBuffer { kOnednnScratchpad, kInceptionIntermediates, kWinograd };

// At least `bytes` of this thread's Slot buffer, 64-byte aligned (a cache line, and what
// oneDNN asks of its buffers). Valid until the next call for the same Slot on this thread.
template <ThreadBuffer Slot>
void* thread_buffer(size_t bytes) {
  struct Buffer {
    void* data = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  if (buffer.bytes < bytes) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    std::free(buffer.data);
    buffer.data = std::aligned_alloc(64, rounded);
    buffer.bytes = buffer.data ? rounded : 0;
    TORCH_CHECK(buffer.data, "fastcnn: could not allocate ", rounded, " bytes of working memory");
  }
  return buffer.data;
}

}  // namespace fastcnn
