// The Inception block on CUDA, every branch written straight into its channel slice of out:
// branch 1's 1x1 conv is a cuBLASLt GEMM over x into out's first slice; each reduce 1x1 conv is
// a GEMM over x into a dense scratch that its kxk conv (cuDNN, which reads dense NHWC only)
// reads and writes into its slice; branch 4 is a max-pool (stride 1, "same") followed by a 1x1
// GEMM into the last slice. x is read by three GEMMs instead of one, which costs less than
// copying a shared scratch's channel slices into the dense inputs cuDNN needs. The pooled tensor
// is written once here; the Triton backend fuses the pool into the GEMM's loads instead.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "conv_cuda.h"

namespace fastcnn {
namespace {

void inception_out_cuda(const at::Tensor& x_in, const at::Tensor& reduce_weight,
                        const at::Tensor& reduce_bias, at::IntArrayRef widths, const at::Tensor& w2,
                        const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3,
                        const at::Tensor& w4, const at::Tensor& b4, int64_t pool, at::Tensor out) {
  TORCH_CHECK(x_in.dim() == 4 && widths.size() == 3, "fastcnn_ext::inception_out: x must be ",
              "4-D and widths three channel counts");
  const int64_t c1 = widths[0], c2r = widths[1], c3r = widths[2];
  const int64_t c2 = w2.size(0), c3 = w3.size(0), c4 = w4.size(0);
  const int64_t n = x_in.size(0), h = x_in.size(2), w = x_in.size(3);
  TORCH_CHECK(reduce_weight.size(0) == c1 + c2r + c3r,
              "fastcnn_ext::inception_out: reduce_weight has ", reduce_weight.size(0),
              " output channels, widths sum to ", c1 + c2r + c3r);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({n, c1 + c2 + c3 + c4, h, w}),
              "fastcnn_ext::inception_out: out has shape ", out.sizes(), ", expected [", n, ", ",
              c1 + c2 + c3 + c4, ", ", h, ", ", w, "]");
  TORCH_CHECK(out.device() == x_in.device() && out.scalar_type() == x_in.scalar_type(),
              "fastcnn_ext::inception_out: out is ", out.scalar_type(), " on ", out.device(),
              ", x is ", x_in.scalar_type(), " on ", x_in.device());
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const std::vector<int64_t> one{1, 1}, zero{0, 0};
  const std::optional<at::Tensor> none;

  at::Tensor slice1 = out.narrow(1, 0, c1);
  conv_bn_act_into(x, reduce_weight.narrow(0, 0, c1), reduce_bias.narrow(0, 0, c1), one, zero, none,
                   true, slice1);
  int64_t c0 = c1, r0 = c1;  // next output channel, next reduce weight row
  for (const auto& [reduced, weight, bias] : {std::tuple{c2r, w2, b2}, std::tuple{c3r, w3, b3}}) {
    at::Tensor scratch =
        at::empty({n, reduced, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    conv_bn_act_into(x, reduce_weight.narrow(0, r0, reduced), reduce_bias.narrow(0, r0, reduced),
                     one, zero, none, true, scratch);
    const int64_t k = weight.size(2) / 2;
    at::Tensor slice = out.narrow(1, c0, weight.size(0));
    conv_bn_act_into(scratch, weight, bias, one, std::vector<int64_t>{k, k}, none, true, slice);
    c0 += weight.size(0);
    r0 += reduced;
  }
  const at::Tensor pooled = at::max_pool2d(x, {pool, pool}, {1, 1}, {pool / 2, pool / 2}, {1, 1},
                                           /*ceil_mode=*/true);
  at::Tensor slice4 = out.narrow(1, c0, c4);
  conv_bn_act_into(pooled, w4, b4, one, zero, none, true, slice4);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn_ext, CUDA, m) { m.impl("inception_out", &inception_out_cuda); }

}  // namespace fastcnn
