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

template <class S>
struct StorageTag {
  using type = S;
};

// Every entry point's prologue: makes the tensors' device current, validates the arguments, then
// returns run(StorageTag<S>{}) for the input dtype's storage type S.
template <class Args, class Run>
auto dispatch(const Args& args, Run&& run) {
  DeviceGuard guard(args.opt.device);
  cuda_impl::validate(args);
  switch (args.dtype) {
    case DType::kFloat16: return run(StorageTag<__half>{});
    case DType::kBFloat16: return run(StorageTag<__nv_bfloat16>{});
    case DType::kFloat32: return run(StorageTag<float>{});
    case DType::kFloat64: return run(StorageTag<double>{});
  }
  unknown_dtype(args.dtype);
}

// The workspace of a plan: it depends on the accumulator dtype only (float for every input dtype
// but float64).
template <class Args, class Plan>
size_t workspace_bytes(const Args& args, Plan&& plan) {
  return dispatch(args, [&](auto tag) {
    using T = typename cuda_impl::AccumulatorOf<typename decltype(tag)::type>::type;
    return plan(T{}, cuda_impl::device_info()).ws.bytes_needed();
  });
}
}  // namespace

void forward(const ForwardArgs& args) {
  dispatch(args, [&](auto tag) { cuda_impl::forward_impl<typename decltype(tag)::type>(args); });
}

void backward(const BackwardArgs& args) {
  dispatch(args, [&](auto tag) { cuda_impl::backward_impl<typename decltype(tag)::type>(args); });
}

size_t forward_workspace_bytes(const ForwardArgs& args) {
  return workspace_bytes(args, [&](auto acc, const cuda_impl::DeviceInfo& dev) {
    return cuda_impl::plan_forward<decltype(acc)>(args, dev);
  });
}

size_t backward_workspace_bytes(const BackwardArgs& args) {
  return workspace_bytes(args, [&](auto acc, const cuda_impl::DeviceInfo& dev) {
    return cuda_impl::plan_backward<decltype(acc)>(args, dev);
  });
}

}  // namespace cuda
}  // namespace gmattn
