// A direct oneDNN convolution made ready once for one call signature (fastcnn.optimize.program's
// conv steps): the kept primitive and its memory objects, whose data handles each run() sets.
// onednn_conv() builds a key, looks the primitive up and creates five memory objects and an
// argument map on every call: a few microseconds hot, several times that in a forward whose
// convs have just evicted that code and data from the caches. Not for concurrent use: a
// program runs one call at a time.
#pragma once
#ifdef FASTCNN_WITH_ONEDNN

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>
#include <optional>
#include <unordered_map>
#include <vector>

namespace fastcnn {

struct DirectConv;  // onednn_conv.cpp's kept primitive

class PreparedConv {
 public:
  // For calls whose tensors have these tensors' sizes, strides and dtype (checked as
  // onednn_conv checks them; packed: onednn_conv_pack's, for its size); ok() is false where oneDNN
  // has no optimized kernel for them, or the pack is Winograd's (onednn_conv runs those).
  PreparedConv(const at::Tensor& x, const at::Tensor& packed, int64_t packed_layout,
               std::vector<int64_t> w, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& residual, const at::Tensor& out,
               std::vector<int64_t> stride, std::vector<int64_t> padding, int64_t groups,
               bool relu);
  bool ok() const;
  // out = relu?(conv(x, packed) + bias + residual), as onednn_conv with the prepared
  // arguments; tensors with other metadata than the prepared ones are refused.
  void run(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& residual, const at::Tensor& out);

 private:
  std::shared_ptr<const DirectConv> conv_;
  at::Tensor x_meta_, out_meta_, residual_meta_;  // empty tensors with the prepared metadata
  bool has_bias_ = false, has_residual_ = false, sum_ = false;
  std::unordered_map<int, dnnl::memory> args_;
};

}  // namespace fastcnn

#endif  // FASTCNN_WITH_ONEDNN
