// gmattn: the kernel interface of the torch-free core.
//
// Every kernel path (CPU, CUDA) takes the same argument structs: raw pointers, shapes and
// strides (in elements), a dtype tag and, for CUDA, a stream. Nothing here knows about torch,
// MLX or Python; the bindings fill these structs from DLPack tensors after validating them.
//
// Layouts (names as in docs/design.md section 2):
//   q, k      (B, N, H, D)     input dtype, any strides
//   v, out    (B, N, H, Dv)    input dtype; out is written
//   mu, omega (H, K, D)        accumulator dtype (float32, or float64 for float64 inputs)
//   alpha     (H, K)           accumulator dtype
//   mask      (B, N)           uint8/bool, 1 = real token; data == nullptr means no mask
//   S         (B, H, K, Dv)    accumulator dtype (initial / final state)
//   z         (B, H, K)        accumulator dtype
//   gq, gk    (B, H, N, K)     accumulator dtype, responsibilities saved for backward
//                              (gk already multiplied by the mask)
//   den       (B, H, N)        accumulator dtype, read denominators saved for backward
//   cu_seqlens (S + 1,)        int64, optional: packed sequences (below)
// Any optional tensor is absent when its data pointer is null.
//
// Packed sequences: with cu_seqlens, B = 1 and the N rows hold S independent sequences, sequence
// s the rows [cu_seqlens[s], cu_seqlens[s + 1]) (0 = cu_seqlens[0] <= ... <= cu_seqlens[S] = N;
// an empty sequence is allowed). Each reads only its own keys (causal: those before it in its own
// sequence), and the state tensors (S, z, their gradients) have S in place of B. No mask then.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gmattn {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

// The accumulator (state, saved responsibilities, parameters) dtype for an input dtype.
inline DType accumulator_dtype(DType t) {
  return t == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
}

// A strided view of up to 4 dimensions. Unused trailing dimensions have shape 1.
struct View {
  void* data = nullptr;
  int64_t shape[4] = {1, 1, 1, 1};
  int64_t stride[4] = {0, 0, 0, 0};
  bool present() const { return data != nullptr; }
};

struct Dims {
  int64_t B = 0, N = 0, H = 0, K = 0, D = 0, Dv = 0;
};

struct Options {
  bool causal = false;
  double eps = 1e-6;        // added to the read denominator
  double sigma_eps = 1e-4;  // floor of the variances
  int num_threads = 0;      // CPU: 0 = OpenMP default
  void* stream = nullptr;   // CUDA: cudaStream_t of the caller; ignored on CPU
  bool deterministic = true;  // CUDA: false allows atomics for parameter gradients
  // CUDA: the device of the tensors, made current for the call (-1: the current device).
  int device = -1;
  // CUDA: device memory for the call's temporary buffers, from the caller's allocator (torch's
  // caching allocator from the torch front end), at least cuda::*_workspace_bytes() bytes and
  // usable on `stream`. Null: the core allocates them itself (cudaMallocAsync on `stream`).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

struct ForwardArgs {
  Dims dims;
  Options opt;
  DType dtype = DType::kFloat32;  // dtype of q, k, v, out
  // inputs
  View q, k, v;
  View mu, omega, alpha;
  View mask;
  View S0, z0;
  View cu_seqlens;  // packed sequences (in the memory of the kernels' device); absent: B sequences
  // outputs
  View out;
  // Optional. CPU: may be the views S0, z0 themselves (the state updated in place); the kernels
  // read each sequence's initial state before they write its final state.
  View S_final, z_final;
  View gq, gk, den;       // optional as a group: written when gq.data != nullptr
};

struct BackwardArgs {
  Dims dims;
  Options opt;
  DType dtype = DType::kFloat32;
  // forward inputs
  View q, k, v;
  View mu, omega, alpha;
  View mask;
  View S0, z0;
  View cu_seqlens;  // as for ForwardArgs
  // saved by forward
  View out, gq, gk, den;
  // Optional, bidirectional only: the forward's final state (S_final, z_final), which is what every
  // query read. Given, the CPU backward does not sum the keys' states again (one product and two
  // of the six saved/input tensors fewer in its first pass); the CUDA backward ignores it.
  View S_end, z_end;
  // incoming gradients
  View dout;                // (B, N, H, Dv) input dtype
  View dS_final, dz_final;  // optional (zero when absent)
  // outputs (all required except dS0/dz0)
  View dq, dk, dv;             // input dtype
  View dmu, domega, dalpha;    // accumulator dtype, summed over the batch
  View dS0, dz0;               // optional
};

// CPU kernels (OpenMP). Throw std::invalid_argument on inconsistent arguments; the bindings
// validate first, these checks are the last line of defence.
namespace cpu {
void forward(const ForwardArgs& args);
void backward(const BackwardArgs& args);
// The instruction set the CPU kernels dispatched to at run time ("avx512", "avx2", "generic").
const char* isa();
// Uninitialised memory for at least `bytes` (64-byte aligned) from the CPU core's buffer cache,
// and its return: blocks released here are kept for later requests of about their size (at most
// GMATTN_BUFFER_CACHE_MIB MiB in all, by default an eighth of the physical memory and at least
// 512 MiB, and none over a quarter of that; 0 turns the cache off). The torch front end takes its
// large CPU outputs from it (_core.cpu_buffer), so that repeated calls do not page-fault fresh
// memory every time. acquire_scratch throws std::bad_alloc (with a message naming the size);
// release_scratch never throws (a pointer it did not hand out is left alone).
void* acquire_scratch(size_t bytes);
void release_scratch(void* p) noexcept;
// Hands every kept block back to the system; returns their bytes. Blocks in use are not touched.
size_t empty_scratch_cache();
// The bytes of released blocks kept now, and the budget.
void scratch_cache_info(size_t& held, size_t& budget);
}  // namespace cpu

// CUDA kernels (separate module, built only with GMATTN_CUDA).
namespace cuda {
void forward(const ForwardArgs& args);
void backward(const BackwardArgs& args);
// Bytes of workspace (Options::workspace) a call with these arguments needs; 0 when none. They
// depend on the sizes, the options and the device (opt.device), not on the tensors' data.
size_t forward_workspace_bytes(const ForwardArgs& args);
size_t backward_workspace_bytes(const BackwardArgs& args);
// Makes `device` the calling thread's current CUDA device until destroyed, then restores the
// previous one (-1: leaves the current device alone). The bindings hold one while they export
// the tensors (DLPack producers such as torch export only from the current device) and the
// kernels hold one for their launches, so tensors on a GPU other than the current one work.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};
}  // namespace cuda

}  // namespace gmattn
