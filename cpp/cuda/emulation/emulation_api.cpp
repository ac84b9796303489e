// C entry points of the gmattn CUDA kernels for tests driven through ctypes
// (emulation/test_emulated.py): the emulated CPU build (GMATTN_CUDA_EMULATION) or the real
// one (build.sh --cuda, pointers are then device pointers). Build: see emulation/README.md.
#include <cstdio>
#include <exception>
#include <stdexcept>

#include <gmattn/gmattn.h>

#include "../gma_platform.cuh"

namespace {
template <class F>
int guarded(F&& f, char* err, int errlen) {
  try {
    f();
    return 0;
  } catch (const std::invalid_argument& e) {
    std::snprintf(err, errlen, "invalid_argument: %s", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "error: %s", e.what());
    return 2;
  }
}
}  // namespace

extern "C" {
int gma_emu_forward(const gmattn::ForwardArgs* args, char* err, int errlen) {
  return guarded([&] { gmattn::cuda::forward(*args); }, err, errlen);
}
int gma_emu_backward(const gmattn::BackwardArgs* args, char* err, int errlen) {
  return guarded([&] { gmattn::cuda::backward(*args); }, err, errlen);
}
// Emulated build: sets the emulated GPU's size. Real build: returns 0 (no effect).
int gma_emu_set_device(int sm_count, int max_smem_optin) {
#if defined(GMATTN_CUDA_EMULATION)
  emu::device_config().sm_count = sm_count;
  emu::device_config().max_smem_optin = max_smem_optin;
  return 1;
#else
  (void)sm_count;
  (void)max_smem_optin;
  return 0;
#endif
}
#if defined(GMATTN_CUDA_EMULATION)
// The emulated runtime around the kernels (the gmattn._cuda module built on the emulator exposes
// these to its tests, see module.cpp): the number of devices, the current one, a kernel whose
// launches fault (reported at the next stream synchronisation), and the workspaces the core
// allocated itself.
void gma_emu_set_device_count(int count) { emu::device_config().device_count = count; }
int gma_emu_current_device() { return emu::device_config().current_device; }
void gma_emu_set_current_device(int device) { emu::device_config().current_device = device; }
void gma_emu_set_fault_kernel(const char* name) {
  emu::device_config().fault_kernel = name ? name : "";
  emu::device_config().fault_pending = false;
}
long gma_emu_async_allocations() { return emu::device_config().async_allocations; }
#endif
size_t gma_emu_sizeof_forward_args() { return sizeof(gmattn::ForwardArgs); }
size_t gma_emu_sizeof_backward_args() { return sizeof(gmattn::BackwardArgs); }
}
