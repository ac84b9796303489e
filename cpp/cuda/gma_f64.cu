// Instantiates the gmattn CUDA forward / backward for double inputs (one translation unit per
// dtype keeps compile times and error messages small).
#include "gma_kernels.cuh"

namespace gmattn {
namespace cuda_impl {
template void forward_impl<double>(const ForwardArgs&);
template void backward_impl<double>(const BackwardArgs&);
}  // namespace cuda_impl
}  // namespace gmattn
