// The one binding file: the schema of every extension op (its CPU and CUDA kernels register
// themselves per dispatch key in cpu/*.cpp and cuda/*.cu) and build_info() for collect_env.
#include <torch/extension.h>

#ifdef FASTCNN_WITH_ONEDNN
#include "cpu/onednn_prepared.h"
#endif

#include <cstdint>
#include <string>
#include <vector>

namespace fastcnn {
#ifdef FASTCNN_WITH_CUDA
std::string cuda_arch_list();            // cuda/build_info.cu
bool with_cublaslt();                    // cuda/build_info.cu
std::vector<int64_t> take_conv_paths();  // cuda/conv_bn_act.cu
#endif
void global_avg_pool_out(const at::Tensor& x, const at::Tensor& out);  // cpu/avg_pool.cpp
#ifdef FASTCNN_WITH_ONEDNN
// cpu/onednn_conv.cpp
std::tuple<at::Tensor, int64_t> onednn_conv_pack(const at::Tensor& weight, at::IntArrayRef x_sizes,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 int64_t groups, bool winograd);
int64_t onednn_conv_layout(at::IntArrayRef x_sizes, at::IntArrayRef w, at::IntArrayRef stride,
                           at::IntArrayRef padding, int64_t groups, bool winograd,
                           at::ScalarType type);
bool onednn_conv(const at::Tensor& x, const at::Tensor& packed_weight, int64_t packed_layout,
                 at::IntArrayRef w, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& residual, const at::Tensor& out,
                 at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups, bool relu);
size_t onednn_conv_cached();
// cpu/onednn_qconv.cpp
int64_t onednn_qconv_layout(at::IntArrayRef x_sizes, at::IntArrayRef w, at::IntArrayRef stride,
                            at::IntArrayRef padding, bool src_zp);
std::tuple<at::Tensor, int64_t> onednn_qconv_pack(const at::Tensor& weight, at::IntArrayRef x_sizes,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  bool src_zp);
bool onednn_qconv(const at::Tensor& x, double x_scale, int64_t x_zp,
                  const at::Tensor& packed_weight, int64_t packed_layout, at::IntArrayRef w,
                  const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                  bool sum_residual, double r_scale, int64_t r_zp, const at::Tensor& out,
                  at::IntArrayRef stride, at::IntArrayRef padding, bool relu, double out_scale,
                  int64_t out_zp);
size_t onednn_qconv_cached();
// cpu/onednn_inception.cpp
bool onednn_inception(const at::Tensor& x, const std::vector<at::Tensor>& packed,
                      const std::vector<int64_t>& layouts,
                      const std::vector<std::vector<int64_t>>& w_sizes,
                      const std::vector<at::Tensor>& biases, at::IntArrayRef widths, int64_t pool,
                      at::Tensor out);
#endif
}  // namespace fastcnn

TORCH_LIBRARY(fastcnn_ext, m) {
  // relu(x + residual) written into out (any layout; same shape, dtype and device).
  m.def("add_relu_out(Tensor x, Tensor residual, Tensor(a!) out) -> ()");
  // relu?(conv2d(x, weight) + bias + residual) written into out (a channel slice included);
  // groups = 1, dilation = 1. CUDA only: the CPU path is oneDNN, called from Python.
  m.def(
      "conv_bn_act_out(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "Tensor? residual, bool relu, Tensor(a!) out) -> ()");
  // max_pool2d of a channels_last x into out (channels_last, or a channel slice of one), no
  // indices; out's shape carries ceil_mode. CPU only (inference: nothing needs the indices).
  m.def(
      "max_pool2d_out(Tensor x, int[2] kernel, int[2] stride, int[2] padding, Tensor(a!) out) "
      "-> ()");
  // fastcnn.quantize's float <-> uint8 conversions, one pass each (cpu/quantize.cpp); in and
  // out dense with the same strides. CPU only.
  m.def("quantize_u8_out(Tensor x, float scale, int zero_point, Tensor(a!) out) -> ()");
  m.def("dequantize_u8_out(Tensor q, float scale, int zero_point, Tensor(a!) out) -> ()");
  m.def(
      "requantize_u8_out(Tensor q, float scale, int zero_point, float out_scale, "
      "int out_zero_point, Tensor(a!) out) -> ()");
  // The eval-mode Inception block of fastcnn.ops.inception, written into out. CUDA only.
  m.def(
      "inception_out(Tensor x, Tensor reduce_weight, Tensor reduce_bias, int[3] widths, "
      "Tensor w2, Tensor b2, Tensor w3, Tensor b3, Tensor w4, Tensor b4, int pool, "
      "Tensor(a!) out) -> ()");
}

#define FASTCNN_STR2(x) #x
#define FASTCNN_STR(x) FASTCNN_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The paths (fastcnn::ConvPath numbers) of this thread's CUDA convolutions since the last
  // call, oldest first, at most 16; read by fastcnn.ops while a fastcnn.trace() records.
  // conv_bn_act_out for a launch plan (fastcnn.ops.conv_bn_act.plan): the same dispatcher
  // call as torch.ops.fastcnn_ext.conv_bn_act_out (the kernel of the tensors' device), with
  // pybind11's argument conversion instead of the schema parser's, which takes about 1 us per
  // int[2] argument: 4.7 us a call in all against 1.5 us here, of a planned call's 10 us budget.
  m.def("conv_bn_act_out_planned",
        [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
           int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
           const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out) {
          // The kernels' own C++ signature (cuda/conv_bn_act.cu): the dispatcher checks it.
          static const auto op =
              c10::Dispatcher::singleton()
                  .findSchemaOrThrow("fastcnn_ext::conv_bn_act_out", "")
                  .typed<void(const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                              const std::optional<at::Tensor>&, bool, at::Tensor)>();
          const int64_t stride[2] = {stride_h, stride_w};
          const int64_t padding[2] = {pad_h, pad_w};
          op.call(x, weight, bias, stride, padding, residual, relu, out);
        });
  // fastcnn.cpu.program's step for AdaptiveAvgPool2d(1) (cpu/avg_pool.cpp)
  m.def("global_avg_pool_out", &fastcnn::global_avg_pool_out,
        pybind11::call_guard<pybind11::gil_scoped_release>());
#ifdef FASTCNN_WITH_ONEDNN
  // fastcnn.cpu.onednn's direct oneDNN convolutions (cpu/onednn_conv.cpp); absent without
  // the oneDNN library, which fastcnn.cpu.onednn notices.
  // Without the GIL while oneDNN runs, as torch's own ops: serving threads overlap.
  m.def("onednn_conv_pack", &fastcnn::onednn_conv_pack, pybind11::arg("weight"),
        pybind11::arg("x_sizes"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("groups"), pybind11::arg("winograd") = false,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("onednn_conv_layout", &fastcnn::onednn_conv_layout, pybind11::arg("x_sizes"),
        pybind11::arg("w"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("groups"), pybind11::arg("winograd"), pybind11::arg("dtype"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("onednn_conv", &fastcnn::onednn_conv, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("onednn_conv_cached", &fastcnn::onednn_conv_cached);
  pybind11::class_<fastcnn::PreparedConv, std::shared_ptr<fastcnn::PreparedConv>>(
      m, "OnednnPreparedConv")
      .def(pybind11::init<const at::Tensor&, const at::Tensor&, int64_t, std::vector<int64_t>,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                          const at::Tensor&, std::vector<int64_t>, std::vector<int64_t>, int64_t,
                          bool>(),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("ok", &fastcnn::PreparedConv::ok)
      .def("run", &fastcnn::PreparedConv::run,
           pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("onednn_qconv_layout", &fastcnn::onednn_qconv_layout,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("onednn_qconv_pack", &fastcnn::onednn_qconv_pack,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("onednn_qconv", &fastcnn::onednn_qconv,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("onednn_qconv_cached", &fastcnn::onednn_qconv_cached);
  m.def("onednn_inception", &fastcnn::onednn_inception,
        pybind11::call_guard<pybind11::gil_scoped_release>());
#endif
  m.def("take_conv_paths", [] {
#ifdef FASTCNN_WITH_CUDA
    return fastcnn::take_conv_paths();
#else
    return std::vector<int64_t>{};
#endif
  });
  m.def("build_info", [] {
    pybind11::dict info;
#ifdef FASTCNN_WITH_CUDA
    info["with_cuda"] = true;
    info["cuda_arch_list"] = fastcnn::cuda_arch_list();
    info["cublaslt"] = fastcnn::with_cublaslt();
#else
    info["with_cuda"] = false;
    info["cuda_arch_list"] = pybind11::none();
    info["cublaslt"] = false;
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    info["cpu_capability"] = FASTCNN_STR(CPU_CAPABILITY);
#else
    info["cpu_capability"] = "DEFAULT";
#endif
#ifdef FASTCNN_WITH_ONEDNN
    info["onednn"] = FASTCNN_STR(FASTCNN_WITH_ONEDNN);  // the library's version
#else
    info["onednn"] = pybind11::none();
#endif
    info["torch_version"] = TORCH_VERSION;
#ifdef _OPENMP
    info["openmp"] = true;  // at::parallel_for really runs in parallel
#else
    info["openmp"] = false;
#endif
    return info;
  });
}
