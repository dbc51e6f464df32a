// Reports the GPU architectures this extension's CUDA code was compiled for (nvcc's own list).
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

}  // namespace fastcnn
