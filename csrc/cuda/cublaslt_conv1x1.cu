// 1x1 stride-1 convolution over channels_last activations as one cuBLASLt GEMM with a fused
// epilogue: D = relu?(W . X + bias + R), with X, R and D read/written through their row
// strides, so D may be a channel slice of the concat output and R any NHWC residual.
//
// cuBLASLt is column-major. The activations are row-major [pixels, channels] matrices, i.e.
// column-major [channels, pixels] ones, so the GEMM runs as D^T[Cout, P] = W[Cout, Cin] X^T[Cin,
// P]: A = the weight (stored [Cout, Cin] row-major = [Cin, Cout] column-major, hence op(A) = A^T),
// B = X, C = R (beta = 1) and the bias indexed by D's row, which is the output channel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "conv_cuda.h"
#include "nhwc_rows.h"

#ifdef FASTCNN_WITH_CUBLASLT
#include <cublasLt.h>

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#endif

namespace fastcnn {

#ifndef FASTCNN_WITH_CUBLASLT

bool cublaslt_conv1x1_out(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, bool, at::Tensor&) {
  return false;  // built without cuBLASLt headers: the cuDNN path runs
}

#else

namespace {

constexpr int64_t kWorkspaceBytes = 32 << 20;  // what cuBLAS recommends on Hopper
constexpr int kMaxDevices = 64;

void check(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "fastcnn_ext::conv_bn_act_out: ", what,
              " failed: ", cublasLtGetStatusString(status));
}

// One cuBLASLt handle per device, created on first use and kept for the process.
cublasLtHandle_t handle_for(int device) {
  static std::array<cublasLtHandle_t, kMaxDevices> handles{};
  static std::array<std::once_flag, kMaxDevices> once;
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "fastcnn: device index ", device,
              " out of range");
  std::call_once(once[device], [&] { check(cublasLtCreate(&handles[device]), "cublasLtCreate"); });
  return handles[device];
}

// The descriptors of one call, destroyed on every exit path.
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Descriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    for (auto layout : {a, b, c, d})
      if (layout) cublasLtMatrixLayoutDestroy(layout);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

template <typename T>
void set(cublasLtMatmulDesc_t op, cublasLtMatmulDescAttributes_t attr, const T& value) {
  check(cublasLtMatmulDescSetAttribute(op, attr, &value, sizeof(value)), "MatmulDescSetAttribute");
}

template <typename T>
void set(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr,
         const T& value) {
  check(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)),
        "MatmulPreferenceSetAttribute");
}

// The largest power of two (up to 256) that divides the address: cuBLASLt assumes 256-byte
// aligned operands unless told otherwise, and a channel slice is rarely that.
uint32_t alignment(const void* p) {
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<std::uintptr_t>(p) % a != 0) a /= 2;
  return a;
}

cudaDataType_t data_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      return CUDA_R_32F;
  }
}

}  // namespace

bool cublaslt_conv1x1_out(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, bool relu, at::Tensor& out) {
  const auto xr = nhwc_rows(x), dr = nhwc_rows(out);
  const auto rr = residual ? nhwc_rows(*residual) : std::optional<NhwcRows>(NhwcRows{0, 0, 0});
  if (!xr || !dr || !rr || x.scalar_type() == at::kDouble || out.numel() == 0) return false;
  const at::Tensor w = weight.reshape({weight.size(0), weight.size(1)}).contiguous();
  const std::optional<at::Tensor> b =
      bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const int64_t m = w.size(0), n = xr->rows, k = w.size(1);

  const c10::cuda::CUDAGuard guard(out.device());
  const cudaDataType_t type = data_type(x.scalar_type());
  // fp32 follows torch.backends.cudnn.allow_tf32, as fastcnn's other conv paths do.
  const cublasComputeType_t compute =
      x.scalar_type() == at::kFloat && at::globalContext().allowTF32CuDNN()
          ? CUBLAS_COMPUTE_32F_FAST_TF32
          : CUBLAS_COMPUTE_32F;
  Descriptors desc;
  check(cublasLtMatmulDescCreate(&desc.op, compute, CUDA_R_32F), "MatmulDescCreate");
  set(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  cublasLtEpilogue_t epilogue = relu ? CUBLASLT_EPILOGUE_RELU : CUBLASLT_EPILOGUE_DEFAULT;
  if (b) {
    epilogue = relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
    set(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, b->const_data_ptr());
    set(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, type);
  }
  set(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  check(cublasLtMatrixLayoutCreate(&desc.a, type, k, m, k), "MatrixLayoutCreate(A)");
  check(cublasLtMatrixLayoutCreate(&desc.b, type, k, n, xr->ld), "MatrixLayoutCreate(B)");
  check(cublasLtMatrixLayoutCreate(&desc.c, type, m, n, residual ? rr->ld : dr->ld),
        "MatrixLayoutCreate(C)");
  check(cublasLtMatrixLayoutCreate(&desc.d, type, m, n, dr->ld), "MatrixLayoutCreate(D)");

  const void* c_ptr = residual ? residual->const_data_ptr() : out.const_data_ptr();
  check(cublasLtMatmulPreferenceCreate(&desc.pref), "MatmulPreferenceCreate");
  set(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(kWorkspaceBytes));
  set(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(w.const_data_ptr()));
  set(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(x.const_data_ptr()));
  set(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(c_ptr));
  set(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(out.const_data_ptr()));

  const cublasLtHandle_t handle = handle_for(out.get_device());
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      handle, desc.op, desc.a, desc.b, desc.c, desc.d, desc.pref, 1, &heuristic, &found);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || found == 0) return false;
  check(status, "MatmulAlgoGetHeuristic");

  const at::Tensor workspace = at::empty({kWorkspaceBytes}, out.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = residual ? 1.0f : 0.0f;
  check(cublasLtMatmul(handle, desc.op, &alpha, w.const_data_ptr(), desc.a, x.const_data_ptr(),
                       desc.b, &beta, c_ptr, desc.c, out.mutable_data_ptr(), desc.d,
                       &heuristic.algo, workspace.mutable_data_ptr(), kWorkspaceBytes,
                       c10::cuda::getCurrentCUDAStream()),
        "cublasLtMatmul");
  return true;
}

#endif  // FASTCNN_WITH_CUBLASLT

}  // namespace fastcnn
