// gmattn::cuda::forward / backward: validate the arguments, then switch on the input dtype.
#include <stdexcept>
#include <string>

#include "gma_impl.h"
#include "gma_kernels.cuh"

namespace gmattn {
namespace cuda {

void forward(const ForwardArgs& args) {
  cuda_impl::validate(args);
  switch (args.dtype) {
    case DType::kFloat16: return cuda_impl::forward_impl<__half>(args);
    case DType::kBFloat16: return cuda_impl::forward_impl<__nv_bfloat16>(args);
    case DType::kFloat32: return cuda_impl::forward_impl<float>(args);
    case DType::kFloat64: return cuda_impl::forward_impl<double>(args);
  }
  throw std::invalid_argument("gmattn CUDA: unknown dtype " + std::to_string(static_cast<int>(args.dtype)));
}

void backward(const BackwardArgs& args) {
  cuda_impl::validate(args);
  switch (args.dtype) {
    case DType::kFloat16: return cuda_impl::backward_impl<__half>(args);
    case DType::kBFloat16: return cuda_impl::backward_impl<__nv_bfloat16>(args);
    case DType::kFloat32: return cuda_impl::backward_impl<float>(args);
    case DType::kFloat64: return cuda_impl::backward_impl<double>(args);
  }
  throw std::invalid_argument("gmattn CUDA: unknown dtype " + std::to_string(static_cast<int>(args.dtype)));
}

}  // namespace cuda
}  // namespace gmattn
