// Declarations of the per-dtype implementations (defined in forward.cuh / backward.cuh,
// instantiated in gma_f16.cu, gma_bf16.cu, gma_f32.cu, gma_f64.cu). The extern declarations of those explicit
// instantiations keep other translation units from instantiating them again.
#pragma once

#include <gmattn/gmattn.h>

#include "gma_platform.cuh"

namespace gmattn {
namespace cuda_impl {
template <class S>
void forward_impl(const ForwardArgs& args);
template <class S>
void backward_impl(const BackwardArgs& args);

extern template void forward_impl<__half>(const ForwardArgs&);
extern template void forward_impl<__nv_bfloat16>(const ForwardArgs&);
extern template void forward_impl<float>(const ForwardArgs&);
extern template void forward_impl<double>(const ForwardArgs&);
extern template void backward_impl<__half>(const BackwardArgs&);
extern template void backward_impl<__nv_bfloat16>(const BackwardArgs&);
extern template void backward_impl<float>(const BackwardArgs&);
extern template void backward_impl<double>(const BackwardArgs&);
}  // namespace cuda_impl
}  // namespace gmattn
