// gmattn::cuda entry points: make the tensors' device current, validate the arguments, then
// switch on the input dtype.
#include <stdexcept>
#include <string>

#include "gma_impl.h"
#include "gma_kernels.cuh"

namespace gmattn {
namespace cuda {

DeviceGuard::DeviceGuard(int device) {
  if (device < 0) return;
  const int current = cuda_impl::get_device();
  if (current == device) return;
  cuda_impl::set_device(device);
  previous_ = current;
}

DeviceGuard::~DeviceGuard() {
  if (previous_ < 0) return;
  try {
    cuda_impl::set_device(previous_);
  } catch (...) {  // a destructor must not throw; the call's own error, if any, is the one to see
  }
}

namespace {
[[noreturn]] void unknown_dtype(DType t) {
  throw std::invalid_argument("gmattn CUDA: unknown dtype " + std::to_string(static_cast<int>(t)));
}
}  // namespace

void forward(const ForwardArgs& args) {
  DeviceGuard guard(args.opt.device);
  cuda_impl::validate(args);
  switch (args.dtype) {
    case DType::kFloat16: return cuda_impl::forward_impl<__half>(args);
    case DType::kBFloat16: return cuda_impl::forward_impl<__nv_bfloat16>(args);
    case DType::kFloat32: return cuda_impl::forward_impl<float>(args);
    case DType::kFloat64: return cuda_impl::forward_impl<double>(args);
  }
  unknown_dtype(args.dtype);
}

void backward(const BackwardArgs& args) {
  DeviceGuard guard(args.opt.device);
  cuda_impl::validate(args);
  switch (args.dtype) {
    case DType::kFloat16: return cuda_impl::backward_impl<__half>(args);
    case DType::kBFloat16: return cuda_impl::backward_impl<__nv_bfloat16>(args);
    case DType::kFloat32: return cuda_impl::backward_impl<float>(args);
    case DType::kFloat64: return cuda_impl::backward_impl<double>(args);
  }
  unknown_dtype(args.dtype);
}

// The plans depend on the accumulator dtype only: float for every input dtype but float64.
size_t forward_workspace_bytes(const ForwardArgs& args) {
  DeviceGuard guard(args.opt.device);
  cuda_impl::validate(args);
  const cuda_impl::DeviceInfo dev = cuda_impl::device_info();
  if (args.dtype == DType::kFloat64) return cuda_impl::plan_forward<double>(args, dev).ws.bytes_needed();
  return cuda_impl::plan_forward<float>(args, dev).ws.bytes_needed();
}

size_t backward_workspace_bytes(const BackwardArgs& args) {
  DeviceGuard guard(args.opt.device);
  cuda_impl::validate(args);
  const cuda_impl::DeviceInfo dev = cuda_impl::device_info();
  if (args.dtype == DType::kFloat64) return cuda_impl::plan_backward<double>(args, dev).ws.bytes_needed();
  return cuda_impl::plan_backward<float>(args, dev).ws.bytes_needed();
}

}  // namespace cuda
}  // namespace gmattn
