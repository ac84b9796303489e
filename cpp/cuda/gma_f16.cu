// Instantiates the gmattn CUDA forward / backward for __half inputs (one translation unit per
// dtype keeps compile times and error messages small).
#include "gma_kernels.cuh"

namespace gmattn {
namespace cuda_impl {
template void forward_impl<__half>(const ForwardArgs&);
template void backward_impl<__half>(const BackwardArgs&);
}  // namespace cuda_impl
}  // namespace gmattn
