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
#include <functional>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <utility>
#endif

namespace fastcnn {

#ifndef FASTCNN_WITH_CUBLASLT

ConvPath cublaslt_conv1x1_out(const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                              bool, at::Tensor&) {
  return ConvPath::kNoCublasLt;  // built without cuBLASLt headers: the cuDNN path runs
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

// Everything the algorithm choice and the descriptors depend on. The pointers themselves are
// not part of it: only their alignment, and the bias pointer, which is set on each call.
struct PlanKey {
  int device;
  int dtype;
  int compute;
  int64_t m, n, k, ldb, ldc, ldd;
  bool bias, residual, relu;
  uint32_t align_a, align_b, align_c, align_d;

  // The one list of fields that both == and the hash read. (A defaulted operator== is C++20;
  // torch 2.11 builds extensions as C++17.)
  auto fields() const {
    return std::make_tuple(device, dtype, compute, m, n, k, ldb, ldc, ldd, bias, residual, relu,
                           align_a, align_b, align_c, align_d);
  }
  bool operator==(const PlanKey& other) const { return fields() == other.fields(); }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    return std::apply(
        [](auto... field) {
          size_t h = 0;
          ((h = h * 1000003u ^ std::hash<int64_t>()(static_cast<int64_t>(field))), ...);
          return h;
        },
        key.fields());
  }
};

// The descriptors and the algorithm of one PlanKey, made once. Plans are never destroyed: they
// live in a per-thread cache for the process, and destroying cuBLASLt objects at exit, after
// the CUDA context may be gone, could fail.
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool found = false;  // false: cuBLASLt has no algorithm; the cuDNN path runs
};

Plan make_plan(const PlanKey& key, cublasLtHandle_t handle) {
  const auto type = static_cast<cudaDataType_t>(key.dtype);
  Plan plan;
  check(
      cublasLtMatmulDescCreate(&plan.op, static_cast<cublasComputeType_t>(key.compute), CUDA_R_32F),
      "MatmulDescCreate");
  set(plan.op, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set(plan.op, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  cublasLtEpilogue_t epilogue = key.relu ? CUBLASLT_EPILOGUE_RELU : CUBLASLT_EPILOGUE_DEFAULT;
  if (key.bias) {
    epilogue = key.relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
    set(plan.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, type);
  }
  set(plan.op, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  check(cublasLtMatrixLayoutCreate(&plan.a, type, key.k, key.m, key.k), "MatrixLayoutCreate(A)");
  check(cublasLtMatrixLayoutCreate(&plan.b, type, key.k, key.n, key.ldb), "MatrixLayoutCreate(B)");
  check(cublasLtMatrixLayoutCreate(&plan.c, type, key.m, key.n, key.ldc), "MatrixLayoutCreate(C)");
  check(cublasLtMatrixLayoutCreate(&plan.d, type, key.m, key.n, key.ldd), "MatrixLayoutCreate(D)");

  cublasLtMatmulPreference_t pref = nullptr;
  check(cublasLtMatmulPreferenceCreate(&pref), "MatmulPreferenceCreate");
  set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(kWorkspaceBytes));
  set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_a);
  set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_b);
  set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c);
  set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_d);
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      handle, plan.op, plan.a, plan.b, plan.c, plan.d, pref, 1, &heuristic, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (status != CUBLAS_STATUS_NOT_SUPPORTED) check(status, "MatmulAlgoGetHeuristic");
  plan.found = status == CUBLAS_STATUS_SUCCESS && found > 0;
  plan.algo = heuristic.algo;
  return plan;
}

// This thread's plan for key, made on first use.
const Plan& plan_for(const PlanKey& key, cublasLtHandle_t handle) {
  // Leaked on purpose (see Plan): a pointer, so no destructor runs at thread or process exit.
  thread_local auto* plans = new std::unordered_map<PlanKey, Plan, PlanKeyHash>();
  auto it = plans->find(key);
  if (it == plans->end()) it = plans->emplace(key, make_plan(key, handle)).first;
  return it->second;
}

// This thread's workspace for (device, stream), allocated once; kernels on one stream run in
// order, so reusing it across calls on that stream is safe.
void* workspace_for(int device, cudaStream_t stream, const at::TensorOptions& options) {
  thread_local auto* workspaces = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  auto& buffer = (*workspaces)[{device, stream}];
  if (!buffer.defined()) buffer = at::empty({kWorkspaceBytes}, options.dtype(at::kByte));
  return buffer.mutable_data_ptr();
}

}  // namespace

ConvPath cublaslt_conv1x1_out(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, bool relu,
                              at::Tensor& out) {
  const auto xr = nhwc_rows(x);
  if (!xr) return ConvPath::kXLayout;
  const auto dr = nhwc_rows(out);
  if (!dr) return ConvPath::kOutLayout;
  const auto rr = residual ? nhwc_rows(*residual) : std::optional<NhwcRows>(NhwcRows{0, 0, 0});
  if (!rr) return ConvPath::kResidualLayout;
  if (x.scalar_type() == at::kDouble) return ConvPath::kUnsupportedDtype;
  if (out.numel() == 0) return ConvPath::kCublasLt;  // nothing to compute
  const at::Tensor w = weight.reshape({weight.size(0), weight.size(1)}).contiguous();
  std::optional<at::Tensor> b;
  if (bias) {  // the epilogue reads the bias with vector loads: give it an aligned copy if not
    b = bias->contiguous();
    if (alignment(b->const_data_ptr()) < 16) b = b->clone();
  }

  const c10::cuda::CUDAGuard guard(out.device());
  const int device = out.get_device();
  // fp32 follows torch.backends.cudnn.allow_tf32, as fastcnn's other conv paths do.
  const cublasComputeType_t compute =
      x.scalar_type() == at::kFloat && at::globalContext().allowTF32CuDNN()
          ? CUBLAS_COMPUTE_32F_FAST_TF32
          : CUBLAS_COMPUTE_32F;
  const void* c_ptr = residual ? residual->const_data_ptr() : out.const_data_ptr();
  const PlanKey key{device,
                    static_cast<int>(data_type(x.scalar_type())),
                    static_cast<int>(compute),
                    w.size(0),
                    xr->rows,
                    w.size(1),
                    xr->ld,
                    residual ? rr->ld : dr->ld,
                    dr->ld,
                    b.has_value(),
                    residual.has_value(),
                    relu,
                    alignment(w.const_data_ptr()),
                    alignment(x.const_data_ptr()),
                    alignment(c_ptr),
                    alignment(out.const_data_ptr())};
  const cublasLtHandle_t handle = handle_for(device);
  const Plan& plan = plan_for(key, handle);
  if (!plan.found) return ConvPath::kNoAlgorithm;
  if (b) set(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, b->const_data_ptr());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float alpha = 1.0f, beta = residual ? 1.0f : 0.0f;
  check(cublasLtMatmul(handle, plan.op, &alpha, w.const_data_ptr(), plan.a, x.const_data_ptr(),
                       plan.b, &beta, c_ptr, plan.c, out.mutable_data_ptr(), plan.d, &plan.algo,
                       workspace_for(device, stream, out.options()), kWorkspaceBytes, stream),
        "cublasLtMatmul");
  return ConvPath::kCublasLt;
}

#endif  // FASTCNN_WITH_CUBLASLT

}  // namespace fastcnn
