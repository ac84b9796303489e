// Instantiates the gmattn CUDA forward / backward for float inputs (one translation unit per
// dtype keeps compile times and error messages small).
#include "gma_kernels.cuh"

namespace gmattn {
namespace cuda_impl {
template void forward_impl<float>(const ForwardArgs&);
template void backward_impl<float>(const BackwardArgs&);
}  // namespace cuda_impl
}  // namespace gmattn
