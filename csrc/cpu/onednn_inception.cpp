// The Inception block on the cpu backend as ONE call from Python: its six (or, merged, four)
// direct oneDNN convolutions, the pool branch's max-pool and the concat into the output, with
// the intermediates allocated here. A block planned in Python paid per conv a Python runner,
// a pack lookup, an output allocation and a pybind call, and the pool and concat their own
// dispatches: ~0.1 ms of host time a block at batch 1, about a tenth of a batch-1 block's
// convolution time. The intermediates (branch outputs, the pool's output, merged slices) live
// in this thread's kept buffer (common/thread_buffer.h): the same memory for every block and
// call instead of an allocation each (GoogLeNet's block calls replayed back to back at batch 8:
// 20 -> 8 ms beyond their convs, benchmarks/cpu_inception_overhead.py; the whole model: within
// the benchmark VM's noise).
// fastcnn.cpu.inception looks the packed weights up (per weight version) and calls this with
// them; the structures are those of fastcnn/cpu/inception.py:
//   merged:   [merged 1x1 reduce, kxk of branch 2, kxk of branch 3, 1x1 after the pool]
//   separate: [branch 1's 1x1, reduce 2, kxk 2, reduce 3, kxk 3, 1x1 after the pool]
// Every conv is stride 1 with "same" padding (k / 2) and ReLU, as in fastcnn.ops.inception.
#ifdef FASTCNN_WITH_ONEDNN

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "../common/thread_buffer.h"
#include "winograd_conv.h"

namespace fastcnn {

bool onednn_conv(const at::Tensor& x, const at::Tensor& packed_weight, int64_t packed_layout,
                 at::IntArrayRef w, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& residual, const at::Tensor& out,
                 at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups,
                 bool relu);  // onednn_conv.cpp
void max_pool2d_out_cpu(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::Tensor out);  // max_pool.cpp

// out = the block's four branches concatenated along channels, for x (channels_last fp32 or
// bf16).
// packed[i], layouts[i]: onednn_conv_pack's result for conv i of the structure (see above),
// w_sizes[i] its weight's sizes, biases[i] its bias; widths: the merged reduce's three parts
// (branch 1, reduce 2, reduce 3); pool: the pool branch's window (stride 1, padding pool / 2).
// Returns false, with out unwritten, where oneDNN has no optimized kernel for one of the convs
// (the caller then takes its per-conv path, which notes it).
bool onednn_inception(const at::Tensor& x, const std::vector<at::Tensor>& packed,
                      const std::vector<int64_t>& layouts,
                      const std::vector<std::vector<int64_t>>& w_sizes,
                      const std::vector<at::Tensor>& biases, at::IntArrayRef widths, int64_t pool,
                      at::Tensor out) {
  const size_t n = packed.size();
  TORCH_CHECK((n == 4 || n == 6) && layouts.size() == n && w_sizes.size() == n &&
                  biases.size() == n && widths.size() == 3 && pool >= 1 && pool % 2 == 1,
              "fastcnn onednn_inception: 4 (merged) or 6 (separate) convs with their layouts, "
              "weight sizes and biases, 3 widths and an odd pool window expected");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "fastcnn onednn_inception: x must be a 4-D channels_last fp32 or bf16 tensor");
  for (const auto& w : w_sizes) {
    TORCH_CHECK(w.size() == 4 && w[0] >= 1 && w[2] == w[3] && w[2] % 2 == 1,
                "fastcnn onednn_inception: square odd kernels expected");
  }
  // the intermediates are sized from these: a wrong width would write past them
  TORCH_CHECK(widths[0] >= 0 && widths[1] >= 0 && widths[2] >= 0 &&
                  (n == 6 || widths[0] + widths[1] + widths[2] == w_sizes[0][0]),
              "fastcnn onednn_inception: widths ", widths,
              " must be >= 0 and (merged) add up to the reduce conv's outputs");
  int64_t channels = 0;
  for (size_t i : n == 4 ? std::vector<size_t>{1, 2, 3} : std::vector<size_t>{0, 2, 4, 5}) {
    channels += w_sizes[i][0];
  }
  if (n == 4) channels += widths[0];  // branch 1: the merged reduce's first part
  TORCH_CHECK(out.sizes() == at::IntArrayRef({x.size(0), channels, x.size(2), x.size(3)}) &&
                  out.scalar_type() == x.scalar_type() && out.device() == x.device(),
              "fastcnn onednn_inception: out ", out.sizes(), " ", out.scalar_type(),
              " is not the block's output [", x.size(0), ", ", channels, ", ", x.size(2), ", ",
              x.size(3), "] ", x.scalar_type());
  at::assert_no_overlap(out, x);
  const int64_t batch = x.size(0), h = x.size(2), wd = x.size(3);
  // The intermediates, channels_last, one after another in this thread's buffer (each start
  // 64-byte aligned): every conv's output, the pool's, and (merged) the two reduce slices'
  // dense copies.
  std::vector<int64_t> widths_used;
  for (const auto& w : w_sizes) widths_used.push_back(w[0]);
  widths_used.push_back(x.size(1));  // the pool's output
  if (n == 4) widths_used.insert(widths_used.end(), {widths[1], widths[2]});
  const int64_t plane = batch * h * wd, align = 64 / static_cast<int64_t>(x.element_size());
  int64_t elements = 0;
  for (int64_t c : widths_used) elements += (plane * c + align - 1) / align * align;
  auto* memory = static_cast<char*>(
      thread_buffer<ThreadBuffer::kInceptionIntermediates>(elements * x.element_size()));
  int64_t taken = 0;            // elements
  auto take = [&](int64_t c) {  // a [batch, c, h, w] channels_last tensor of the buffer
    auto t = at::from_blob(memory + taken * x.element_size(), {batch, c, h, wd},
                           {h * wd * c, 1, wd * c, c}, x.options());
    taken += (plane * c + align - 1) / align * align;
    return t;
  };
  bool done = true;
  // conv i of the structure on `input` (channels_last: dense, or a slice for Winograd), or an
  // undefined tensor where oneDNN has no optimized kernel (then the rest is skipped)
  auto conv = [&](size_t i, const at::Tensor& input) -> at::Tensor {
    if (!done) return {};
    const auto& w = w_sizes[i];
    const int64_t pad = w[2] / 2;
    auto y = take(w[0]);
    done = onednn_conv(input, packed[i], layouts[i], w, biases[i], std::nullopt, y, {1, 1},
                       {pad, pad}, 1, true);
    return y;
  };
  auto pooled = [&]() -> at::Tensor {
    if (!done) return {};
    auto p = take(x.size(1));  // stride 1, padding pool / 2, pool odd: the input's size
    max_pool2d_out_cpu(x, {pool, pool}, {1, 1}, {pool / 2, pool / 2}, p);
    return p;
  };
  // conv i's input from a channel slice of the merged reduce: read in place by a Winograd conv
  // (it takes any pixel stride), else a dense copy (oneDNN 3.2 has no optimized kernel that
  // reads a channel slice)
  auto slice_input = [&](size_t i, const at::Tensor& slice) -> at::Tensor {
    if (!done) return {};              // a conv had no kernel: nothing more is computed
    auto dense = take(slice.size(1));  // taken either way: the buffer's layout stays the same
    return is_winograd_layout(layouts[i]) ? slice : dense.copy_(slice);
  };
  std::vector<at::Tensor> ys;
  if (n == 4) {  // merged: one 1x1 over x, branches 2 and 3 read dense copies of its slices
    const int64_t c1 = widths[0], c2r = widths[1], c3r = widths[2];
    auto reduced = conv(0, x);
    if (!done) return false;
    ys.push_back(reduced.narrow(1, 0, c1));
    ys.push_back(conv(1, slice_input(1, reduced.narrow(1, c1, c2r))));
    ys.push_back(conv(2, slice_input(2, reduced.narrow(1, c1 + c2r, c3r))));
    ys.push_back(conv(3, pooled()));
  } else {
    ys.push_back(conv(0, x));
    ys.push_back(conv(2, conv(1, x)));
    ys.push_back(conv(4, conv(3, x)));
    ys.push_back(conv(5, pooled()));
  }
  if (!done) return false;
  at::cat_out(out, ys, 1);
  return true;
}

}  // namespace fastcnn

#endif  // FASTCNN_WITH_ONEDNN
