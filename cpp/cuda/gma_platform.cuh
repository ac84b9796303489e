// The thin layer between the gmattn CUDA kernels and the CUDA runtime.
//
// The kernels (gma_kernels.cuh and the step headers it includes) use only what this header
// provides, so the same sources also compile with a host C++ compiler under
// GMATTN_CUDA_EMULATION and run on the CPU through the fiber emulator in
// emulation/cuda_emulation.h. That is how their logic is tested on machines
// without a GPU; the real build never defines GMATTN_CUDA_EMULATION.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#if defined(GMATTN_CUDA_EMULATION)
#include "emulation/cuda_emulation.h"
#define GMA_DEVICE_COMPILE_TC 1  // the emulator provides tf32 WMMA
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
// Dynamic shared memory of a kernel, 128-byte aligned (WMMA needs 32).
#define GMA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
// tf32 WMMA exists from sm_80 on; below that (or in the host pass) the FMA path is compiled.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define GMA_DEVICE_COMPILE_TC 1
#else
#define GMA_DEVICE_COMPILE_TC 0
#endif
#endif

namespace gmattn {
namespace cuda_impl {

// Each platform below provides: device_info(), get_device(), set_device(), malloc_async(),
// free_async(), memset_async(), launch_kernel() (a launch, checked for launch errors) and
// synchronize() (waits for the stream; returns what went wrong, or an empty string).

#if defined(GMATTN_CUDA_EMULATION)

struct DeviceInfo {
  int sm_count = 0;
  int max_smem_optin = 0;
};
inline DeviceInfo device_info() {
  return DeviceInfo{emu::device_config().sm_count, emu::device_config().max_smem_optin};
}

inline int get_device() { return emu::device_config().current_device; }
inline void set_device(int device) {
  if (device < 0 || device >= emu::device_config().device_count)
    throw std::runtime_error("gmattn CUDA: cudaSetDevice(" + std::to_string(device) +
                             "): invalid device ordinal (emulated)");
  emu::device_config().current_device = device;
}

inline void* malloc_async(size_t bytes, cudaStream_t) {
  if (bytes == 0) return nullptr;
  void* p = std::malloc(bytes);
  if (!p) throw std::runtime_error("gmattn CUDA (emulated): out of memory");
  ++emu::device_config().async_allocations;
  return p;
}
inline void free_async(void* p, cudaStream_t) { std::free(p); }
inline void memset_async(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes) std::memset(p, value, bytes);
}

template <class Params>
void launch_kernel(const char* name, void (*kernel)(Params), unsigned grid, unsigned block, size_t smem,
                   cudaStream_t, const Params& params) {
  emu::run_grid(dim3(grid), dim3(block), smem, [&] { kernel(params); });
  if (emu::device_config().fault_kernel == name) emu::device_config().fault_pending = true;
}

inline std::string synchronize(cudaStream_t) {
  if (!emu::device_config().fault_pending) return std::string();
  emu::device_config().fault_pending = false;
  return "an emulated kernel fault";
}

#else  // real CUDA

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("gmattn CUDA: ") + what + ": " + cudaGetErrorString(err));
}

struct DeviceInfo {
  int sm_count = 0;
  int max_smem_optin = 0;
};
inline DeviceInfo device_info() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  DeviceInfo info;
  check_cuda(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, dev),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  check_cuda(cudaDeviceGetAttribute(&info.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return info;
}

inline int get_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}
inline void set_device(int device) {
  check_cuda(cudaSetDevice(device), ("cudaSetDevice(" + std::to_string(device) + ")").c_str());
}

inline void* malloc_async(size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  check_cuda(cudaMallocAsync(&p, bytes, stream), "cudaMallocAsync (workspace)");
  return p;
}
inline void free_async(void* p, cudaStream_t stream) {
  if (p) check_cuda(cudaFreeAsync(p, stream), "cudaFreeAsync (workspace)");
}
inline void memset_async(void* p, int value, size_t bytes, cudaStream_t stream) {
  if (bytes) check_cuda(cudaMemsetAsync(p, value, bytes, stream), "cudaMemsetAsync");
}

template <class Params>
void launch_kernel(const char* name, void (*kernel)(Params), unsigned grid, unsigned block, size_t smem,
                   cudaStream_t stream, const Params& params) {
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
               name);
  kernel<<<grid, block, smem, stream>>>(params);
  check_cuda(cudaGetLastError(), name);
}

inline std::string synchronize(cudaStream_t stream) {
  const cudaError_t err = cudaStreamSynchronize(stream);
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

#endif

// GMATTN_CUDA_SYNC=1: wait for every kernel right after its launch and raise an error naming it
// when it faulted. Off by default (it serialises the host with the GPU); without it a kernel's
// fault surfaces at the caller's next synchronisation, with no name attached.
inline bool sync_check_enabled() {
  const char* env = std::getenv("GMATTN_CUDA_SYNC");
  return env != nullptr && env[0] != '\0' && std::string(env) != "0";
}

template <class Params>
void launch(const char* name, void (*kernel)(Params), unsigned grid, unsigned block, size_t smem,
            cudaStream_t stream, const Params& params) {
  if (grid == 0) return;
  launch_kernel(name, kernel, grid, block, smem, stream, params);
  if (sync_check_enabled()) {
    const std::string err = synchronize(stream);
    if (!err.empty())
      throw std::runtime_error(std::string("gmattn CUDA: kernel '") + name +
                               "' failed (found by GMATTN_CUDA_SYNC=1 right after its launch): " + err);
  }
}

}  // namespace cuda_impl
}  // namespace gmattn
