// CPU emulation of the small CUDA subset the gmattn kernels use, for testing their logic on a
// machine without a GPU. Only used when GMATTN_CUDA_EMULATION is defined and the .cu sources
// are compiled as C++ by a host compiler (see emulation/README.md); never part of the real build.
//
// Model: a block's threads are cooperative fibers (ucontext) on one OS thread, run round-robin;
// a thread yields only at __syncthreads(), so shared memory needs no locks. The order in which
// threads run between two barriers is ascending, descending or shuffled anew each round
// (environment GMATTN_EMU_ORDER=ascending|descending|random): a missing barrier shows up as a
// wrong result in at least one of the orders. Blocks run one
// after another. Warp-level WMMA is executed by lane 0 of each warp on whole tiles (the other
// lanes skip it), which is race-free because the kernels only touch fragments through
// load/mma/store/fill and element-wise conversion or addition.
//
// Sanitizers (build.sh --sanitize): fiber switches are announced to AddressSanitizer, and the
// dynamic shared memory of a launch is its own heap block of exactly the requested size, so
// ASan sees out-of-bounds shared-memory accesses. Without ASan the annotations compile away.
#pragma once

#include <cuda_fp16.h>  // __half, __nv_bfloat16, dim3, cudaStream_t (host-usable headers)
#include <cuda_bf16.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>
#include <string>
#include <stdexcept>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define GMA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define GMA_EMU_ASAN 1
#endif
#endif
#if defined(GMA_EMU_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace emu {

// AddressSanitizer must know which stack is in use: announce each switch with start_switch()
// just before swapcontext and finish_switch() right after it, on the new stack. fake_stack:
// where ASan keeps the switching context's fake stack (nullptr: the context ends for good).
inline void start_switch(void** fake_stack, const void* bottom, size_t size) {
#if defined(GMA_EMU_ASAN)
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}
inline void finish_switch(void* fake_stack, const void** old_bottom, size_t* old_size) {
#if defined(GMA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_size);
#else
  (void)fake_stack, (void)old_bottom, (void)old_size;
#endif
}

// Dynamic shared memory of one launch: a heap block of exactly the requested size (64-byte
// aligned), so that AddressSanitizer reports any access past its end.
struct SharedMemory {
  unsigned char* data = nullptr;
  size_t size = 0;
  void reset(size_t bytes) {
    release();
    data = static_cast<unsigned char*>(::operator new(bytes, std::align_val_t(64)));
    size = bytes;
  }
  void release() {
    if (data) ::operator delete(data, std::align_val_t(64));
    data = nullptr;
    size = 0;
  }
  ~SharedMemory() { release(); }
};

struct State {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  // block barrier
  unsigned arrived = 0, generation = 0, expected = 0;
  bool progress = false;
  ucontext_t scheduler;
  ucontext_t* current = nullptr;
  SharedMemory smem;
  // ASan: the scheduler's fake stack, and its stack as reported on each switch into a fiber
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
};
inline State& state() {
  static State s;
  return s;
}

// The emulated device's size, settable by tests to exercise the kernels' size choices.
struct DeviceConfig {
  int sm_count = 8;
  int max_smem_optin = 227 * 1024;
  int order = -1;  // 0 ascending, 1 descending, 2 random; -1: from GMATTN_EMU_ORDER
  // The runtime around the kernels, as far as the host code sees it: the devices (all of this
  // size), the calling thread's current one, a fault to raise after the launches of one kernel
  // (reported at the next stream synchronisation, as a real kernel's fault is), and a count of
  // the workspaces the host code allocated itself (stream-ordered allocations).
  int device_count = 1;
  int current_device = 0;
  std::string fault_kernel;
  bool fault_pending = false;
  long async_allocations = 0;
};
inline DeviceConfig& device_config() {
  static DeviceConfig c;
  return c;
}

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  bool done = false;
  void* fake_stack = nullptr;  // ASan's, while the fiber is switched out
};

inline std::function<void()>*& fiber_body() {
  static std::function<void()>* body = nullptr;
  return body;
}
inline Fiber*& running_fiber() {
  static Fiber* f = nullptr;
  return f;
}

inline void syncthreads() {
  State& s = state();
  const unsigned gen = s.generation;
  s.progress = true;
  if (++s.arrived == s.expected) {
    s.arrived = 0;
    ++s.generation;
    return;
  }
  while (s.generation == gen) {
    Fiber* self = running_fiber();
    start_switch(&self->fake_stack, s.scheduler_stack, s.scheduler_stack_size);
    swapcontext(s.current, &s.scheduler);
    finish_switch(self->fake_stack, &s.scheduler_stack, &s.scheduler_stack_size);
  }
  s.progress = true;
}

inline void fiber_entry() {
  State& s = state();
  finish_switch(nullptr, &s.scheduler_stack, &s.scheduler_stack_size);
  (*fiber_body())();
  running_fiber()->done = true;
  s.progress = true;
  start_switch(nullptr, s.scheduler_stack, s.scheduler_stack_size);  // this fiber is over
}  // returns to uc_link (the scheduler)

// Runs body() as every thread of every block of the grid.
// (swapcontext is declared returns_twice, which makes GCC warn about clobbered locals; it
// returns exactly once per switch with callee-saved registers restored, so they are safe.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wclobbered"
#endif
inline void run_grid(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  State& s = state();
  // The limits the real launch checks (cudaErrorInvalidValue / InvalidConfiguration there).
  const uint64_t nthreads64 = (uint64_t)block.x * block.y * block.z;
  if (nthreads64 == 0 || nthreads64 > 1024 || block.z > 64 || grid.x == 0 || grid.x > 0x7FFFFFFFu ||
      grid.y == 0 || grid.y > 65535 || grid.z == 0 || grid.z > 65535)
    throw std::runtime_error("emu: invalid launch configuration");
  if (smem_bytes > (size_t)device_config().max_smem_optin)
    throw std::runtime_error("emu: " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory exceed the device's " +
                             std::to_string(device_config().max_smem_optin));
  s.grid_dim = grid;
  s.block_dim = block;
  const unsigned nthreads = (unsigned)nthreads64;
  std::vector<Fiber> fibers(nthreads);
  for (auto& f : fibers) f.stack.resize(256 * 1024);
  s.smem.reset(smem_bytes);
  fiber_body() = &body;
  if (device_config().order < 0) {
    const char* env = std::getenv("GMATTN_EMU_ORDER");
    const std::string order = env ? env : "ascending";
    device_config().order = order == "descending" ? 1 : order == "random" ? 2 : 0;
  }
  std::vector<unsigned> sequence(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) sequence[t] = t;
  if (device_config().order == 1) std::reverse(sequence.begin(), sequence.end());
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_idx = dim3(bx, by, bz);
        s.arrived = 0;
        s.expected = nthreads;
        // Poison shared memory so that reads of unwritten shared memory show up as NaN.
        if (smem_bytes) std::memset(s.smem.data, 0xFF, smem_bytes);
        for (unsigned t = 0; t < nthreads; ++t) {
          Fiber& f = fibers[t];
          f.done = false;
          f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &s.scheduler;
          makecontext(&f.ctx, fiber_entry, 0);
#if defined(GMA_EMU_ASAN)
          // ASan's swapcontext interceptor clears the shadow of the target context's uc_stack
          // on every switch, which would erase the redzones of the fiber's live frames: hide the
          // stack from it (makecontext has used it; switching needs only the saved registers).
          f.ctx.uc_stack.ss_sp = nullptr;
          f.ctx.uc_stack.ss_size = 0;
#endif
        }
        unsigned alive = nthreads;
        while (alive > 0) {
          s.progress = false;
          alive = 0;
          if (device_config().order == 2)
            for (unsigned i = nthreads; i > 1; --i) {  // Fisher-Yates with a fixed-seed xorshift
              rng ^= rng << 13;
              rng ^= rng >> 7;
              rng ^= rng << 17;
              std::swap(sequence[i - 1], sequence[rng % i]);
            }
          for (unsigned t : sequence) {
            Fiber& f = fibers[t];
            if (f.done) continue;
            s.thread_idx = f.tid;
            s.current = &f.ctx;
            running_fiber() = &f;
            start_switch(&s.scheduler_fake_stack, f.stack.data(), f.stack.size());
            swapcontext(&s.scheduler, &f.ctx);
            finish_switch(s.scheduler_fake_stack, nullptr, nullptr);
            if (!f.done) ++alive;
          }
          if (alive > 0 && !s.progress) {
            std::fprintf(stderr, "emu: deadlock in block (%u,%u,%u): %u threads stuck at a barrier\n",
                         bx, by, bz, alive);
            std::abort();
          }
          // A finished thread while others wait at a barrier is a deadlock on a real GPU too.
          if (alive > 0 && alive < nthreads && s.arrived > 0 && s.arrived == alive) {
            std::fprintf(stderr, "emu: __syncthreads() not reached by all threads\n");
            std::abort();
          }
        }
      }
  s.smem.release();
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

inline unsigned char* dynamic_smem() {
  // 64-byte aligned (the kernels need 32 bytes for WMMA); exactly the launch's size.
  return state().smem.data;
}

inline unsigned lane_id() {
  State& s = state();
  unsigned linear = s.thread_idx.x + s.block_dim.x * (s.thread_idx.y + s.block_dim.y * s.thread_idx.z);
  return linear % 32;
}

}  // namespace emu

#define threadIdx (::emu::state().thread_idx)
#define blockIdx (::emu::state().block_idx)
#define blockDim (::emu::state().block_dim)
#define gridDim (::emu::state().grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define GMA_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()

template <class T>
inline T atomicAdd(T* address, T val) {
  T old = *address;
  *address = old + val;
  return old;
}

// ---- WMMA (tf32 only, as used by the kernels) --------------------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment;

template <class Layout>
struct fragment<matrix_a, 16, 16, 8, precision::tf32, Layout> {
  static constexpr int rows = 16, cols = 8, num_elements = 128;
  float x[128];  // row-major 16 x 8
};
template <class Layout>
struct fragment<matrix_b, 16, 16, 8, precision::tf32, Layout> {
  static constexpr int rows = 8, cols = 16, num_elements = 128;
  float x[128];  // row-major 8 x 16
};
template <>
struct fragment<accumulator, 16, 16, 8, float, void> {
  static constexpr int rows = 16, cols = 16, num_elements = 256;
  float x[256];
};

template <class Use, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 8, precision::tf32, Layout>& f, const float* p,
                             unsigned ldm) {
  if (emu::lane_id() != 0) return;
  constexpr bool col = std::is_same<Layout, col_major>::value;
  using F = fragment<Use, 16, 16, 8, precision::tf32, Layout>;
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % 4 != 0) {
    std::fprintf(stderr, "emu: misaligned wmma load\n");
    std::abort();
  }
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = col ? p[r + c * ldm] : p[r * ldm + c];
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 8, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  if (emu::lane_id() != 0) return;
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % 4 != 0) {
    std::fprintf(stderr, "emu: misaligned wmma load\n");
    std::abort();
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = layout == mem_row_major ? p[r * ldm + c] : p[r + c * ldm];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 8, float>& f, unsigned ldm,
                              layout_t layout) {
  if (emu::lane_id() != 0) return;
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % 4 != 0) {
    std::fprintf(stderr, "emu: misaligned wmma store\n");
    std::abort();
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[r + c * ldm]) = f.x[r * 16 + c];
}
inline void fill_fragment(fragment<accumulator, 16, 16, 8, float>& f, float v) {
  for (float& e : f.x) e = v;
}
template <class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 8, float>& d,
                     const fragment<matrix_a, 16, 16, 8, precision::tf32, LA>& a,
                     const fragment<matrix_b, 16, 16, 8, precision::tf32, LB>& b,
                     const fragment<accumulator, 16, 16, 8, float>& c) {
  if (emu::lane_id() != 0) return;
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.x[i * 16 + j];
      for (int k = 0; k < 8; ++k) acc += a.x[i * 8 + k] * b.x[k * 16 + j];
      out[i * 16 + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}
// Round to the nearest tf32 value (10 explicit mantissa bits), ties away from zero, as cvt.rna.
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x1000u;  // half of the dropped 13 bits: rounds ties away from zero in magnitude
  u &= 0xFFFFE000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}
}  // namespace wmma
}  // namespace nvcuda
