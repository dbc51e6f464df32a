// Reports the GPU architectures this extension's CUDA code was compiled for (nvcc's own list)
// and whether cuBLASLt was found at build time (fastcnn/_extension.py decides).
#include <string>

#define FASTCNN_STR2(...) #__VA_ARGS__
#define FASTCNN_STR(...) FASTCNN_STR2(__VA_ARGS__)

namespace fastcnn {

std::string cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return FASTCNN_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

bool with_cublaslt() {
#ifdef FASTCNN_WITH_CUBLASLT
  return true;
#else
  return false;
#endif
}

}  // namespace fastcnn
