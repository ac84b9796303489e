// Instantiates the gmattn CUDA forward / backward for __nv_bfloat16 inputs (one translation unit per
// dtype keeps compile times and error messages small).
#include "gma_kernels.cuh"

namespace gmattn {
namespace cuda_impl {
template void forward_impl<__nv_bfloat16>(const ForwardArgs&);
template void backward_impl<__nv_bfloat16>(const BackwardArgs&);
}  // namespace cuda_impl
}  // namespace gmattn
