// What every step of the gmattn CUDA kernels shares: block size and size limits, numeric
// helpers, strided device views, shared-memory carving, the block-wide GEMM on shared tiles, and
// the host's size arithmetic and argument checks.
#pragma once

#include <gmattn/gmattn.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../common/gma_math.h"
#include "gma_platform.cuh"

namespace gmattn {
namespace cuda_impl {

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks
constexpr int kWarps = kThreads / 32;

// Supported sizes (checked on the host; see check_sizes).
constexpr int kMaxK = 256;
constexpr int kMaxD = 1024;
constexpr int kMaxDv = 1024;

// --------------------------------------------------------------------------------------------
// Numeric helpers (the math shared with the CPU kernels is in ../common/gma_math.h)
// --------------------------------------------------------------------------------------------

template <class T>
__device__ __forceinline__ T to_acc(__half v) { return T(__half2float(v)); }
template <class T>
__device__ __forceinline__ T to_acc(__nv_bfloat16 v) { return T(__bfloat162float(v)); }
template <class T>
__device__ __forceinline__ T to_acc(float v) { return T(v); }
template <class T>
__device__ __forceinline__ T to_acc(double v) { return T(v); }

__device__ __forceinline__ void store_as(__half& dst, float v) { dst = __float2half_rn(v); }
__device__ __forceinline__ void store_as(__nv_bfloat16& dst, float v) { dst = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_as(float& dst, float v) { dst = v; }
__device__ __forceinline__ void store_as(double& dst, double v) { dst = v; }

template <class S>
struct AccumulatorOf { using type = float; };
template <>
struct AccumulatorOf<double> { using type = double; };

// Tensor cores (tf32 WMMA) for the half-precision inputs; float / double keep full precision.
template <class S>
constexpr bool kUseTensorCores = std::is_same<S, __half>::value || std::is_same<S, __nv_bfloat16>::value;

// --------------------------------------------------------------------------------------------
// Strided views
// --------------------------------------------------------------------------------------------

// A strided view of up to 4 dimensions on the device (element strides, may be negative).
template <class E>
struct DView {
  E* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  __device__ __forceinline__ E& operator()(int64_t i0, int64_t i1 = 0, int64_t i2 = 0,
                                           int64_t i3 = 0) const {
    return p[i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3];
  }
};

template <class E>
inline DView<E> make_view(const View& v) {
  DView<E> d;
  d.p = static_cast<E*>(v.data);
  d.s0 = v.stride[0];
  d.s1 = v.stride[1];
  d.s2 = v.stride[2];
  d.s3 = v.stride[3];
  return d;
}

// --------------------------------------------------------------------------------------------
// Shared memory carving (the same code sizes the buffer on the host and splits it on the device)
// --------------------------------------------------------------------------------------------

struct Carver {
  uintptr_t base = 0;
  size_t offset = 0;
  template <class E>
  __host__ __device__ E* take(size_t count) {
    offset = (offset + 127) & ~size_t(127);  // 128-byte aligned tiles (WMMA needs 32)
    E* ptr = reinterpret_cast<E*>(base + offset);
    offset += count * sizeof(E);
    return ptr;
  }
};

// Leading dimensions of the shared tiles: +4 keeps WMMA's 16-byte multiple and skews banks.
__host__ __device__ __forceinline__ int padded_ld(int width) { return width + 4; }

// --------------------------------------------------------------------------------------------
// Block-wide GEMM on shared-memory tiles: C[M x N] (row-major, ldc) = (ACCUM ? C : 0) + A * B.
// A is M x Kd, B is Kd x N, each row- or column-major with its leading dimension. M, N are
// multiples of 16 and Kd a multiple of 8. With comp (ACCUM only; same layout as C), the product
// is added to C with compensation (math::compensated_add), comp holding C's rounding error: a
// running state then keeps a few ulp of accuracy over any number of chunks. All threads of the
// block must call it; it does not synchronise (callers __syncthreads() before reading C).
// --------------------------------------------------------------------------------------------

struct RowMajor {};
struct ColMajor {};

template <class L>
__device__ __forceinline__ int elem_offset(int row, int col, int ld) {
  return std::is_same<L, RowMajor>::value ? row * ld + col : row + col * ld;
}

// FMA path: each thread owns 4 x 4 outputs (rows m0..m0+3, columns strided by N/4 so that
// neighbouring threads read neighbouring B elements).
template <bool ACCUM, class LA, class LB, class T>
__device__ void gemm_fma(T* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N, int Kd, T* comp) {
  const int tiles_n = N / 4;
  const int tiles = (M / 4) * tiles_n;
  for (int t = threadIdx.x; t < tiles; t += kThreads) {
    const int m0 = (t / tiles_n) * 4;
    const int nq = t % tiles_n;
    // The product is summed from zero and added to C once (ACCUM): a running state then takes one
    // rounding per chunk, not one per row of the chunk.
    T acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
    for (int kk = 0; kk < Kd; ++kk) {
      T a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = A[elem_offset<LA>(m0 + i, kk, lda)];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = B[elem_offset<LB>(kk, nq + j * tiles_n, ldb)];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int at = (m0 + i) * ldc + nq + j * tiles_n;
        if (ACCUM && comp != nullptr)
          math::compensated_add(C[at], comp[at], acc[i][j]);
        else
          C[at] = ACCUM ? C[at] + acc[i][j] : acc[i][j];
      }
  }
}

#if GMA_DEVICE_COMPILE_TC
// Tensor-core path: one 16 x 16 output tile per warp at a time, tf32 inputs, fp32 accumulate.
template <bool ACCUM, class LA, class LB>
__device__ void gemm_tf32(float* C, int ldc, const float* A, int lda, const float* B, int ldb, int M, int N,
                          int Kd, float* comp) {
  namespace wmma = nvcuda::wmma;
  using WA = typename std::conditional<std::is_same<LA, RowMajor>::value, wmma::row_major, wmma::col_major>::type;
  using WB = typename std::conditional<std::is_same<LB, RowMajor>::value, wmma::row_major, wmma::col_major>::type;
  const int warp = threadIdx.x / 32;
  const int tiles_n = N / 16;
  const int tiles = (M / 16) * tiles_n;
  for (int t = warp; t < tiles; t += kWarps) {
    const int m0 = (t / tiles_n) * 16;
    const int n0 = (t % tiles_n) * 16;
    // Summed from zero, added to C once (ACCUM), as in gemm_fma.
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k0 = 0; k0 < Kd; k0 += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, WA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, WB> b;
      wmma::load_matrix_sync(a, A + elem_offset<LA>(m0, k0, lda), lda);
      wmma::load_matrix_sync(b, B + elem_offset<LB>(k0, n0, ldb), ldb);
#pragma unroll
      for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
#pragma unroll
      for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);
      wmma::mma_sync(acc, a, b, acc);
    }
    if (ACCUM && comp != nullptr) {
      wmma::fragment<wmma::accumulator, 16, 16, 8, float> sum, err;  // same type: same element layout
      wmma::load_matrix_sync(sum, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
      wmma::load_matrix_sync(err, comp + m0 * ldc + n0, ldc, wmma::mem_row_major);
#pragma unroll
      for (int i = 0; i < acc.num_elements; ++i) math::compensated_add(sum.x[i], err.x[i], acc.x[i]);
      wmma::store_matrix_sync(comp + m0 * ldc + n0, err, ldc, wmma::mem_row_major);
      wmma::store_matrix_sync(C + m0 * ldc + n0, sum, ldc, wmma::mem_row_major);
      continue;
    }
    if (ACCUM) {
      wmma::fragment<wmma::accumulator, 16, 16, 8, float> prev;  // same type: same element layout
      wmma::load_matrix_sync(prev, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
#pragma unroll
      for (int i = 0; i < acc.num_elements; ++i) acc.x[i] += prev.x[i];
    }
    wmma::store_matrix_sync(C + m0 * ldc + n0, acc, ldc, wmma::mem_row_major);
  }
}
#endif

template <bool TC, bool ACCUM, class LA, class LB, class T>
__device__ __forceinline__ void block_gemm(T* C, int ldc, const T* A, int lda, const T* B, int ldb, int M,
                                           int N, int Kd, T* comp = nullptr) {
#if GMA_DEVICE_COMPILE_TC
  if constexpr (TC && std::is_same<T, float>::value) {
    gemm_tf32<ACCUM, LA, LB>(C, ldc, A, lda, B, ldb, M, N, Kd, comp);
    return;
  }
#endif
  gemm_fma<ACCUM, LA, LB>(C, ldc, A, lda, B, ldb, M, N, Kd, comp);
}

// ============================================================================================
// Host side
// ============================================================================================

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int round_up16(int64_t x) { return (int)ceil_div(x, 16) * 16; }

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("gmattn CUDA: " + msg);
}

inline unsigned grid_size(int64_t blocks, const char* what) {
  require(blocks <= std::numeric_limits<int>::max(), std::string("too many blocks for ") + what);
  return (unsigned)blocks;
}

inline void check_view(const View& v, const char* name, std::initializer_list<int64_t> shape) {
  require(v.present(), std::string(name) + " is required");
  int i = 0;
  for (int64_t s : shape) {
    require(v.shape[i] == s, std::string(name) + ": dimension " + std::to_string(i) + " is " +
                                 std::to_string(v.shape[i]) + ", expected " + std::to_string(s));
    ++i;
  }
}
inline void check_optional_view(const View& v, const char* name, std::initializer_list<int64_t> shape) {
  if (v.present()) check_view(v, name, shape);
}

// Packed sequences: S, the number of sequences cu_seqlens (S + 1 offsets) holds; 0 when absent.
inline int64_t packed_sequences(const View& cu_seqlens) {
  return cu_seqlens.present() ? cu_seqlens.shape[0] - 1 : 0;
}

inline void check_sizes(const Dims& d) {
  require(d.B > 0 && d.N > 0 && d.H > 0 && d.K > 0 && d.D > 0 && d.Dv > 0,
          "all of B, N, H, K, D, Dv must be positive");
  require(d.K <= kMaxK, "K = " + std::to_string(d.K) + " exceeds the supported maximum " + std::to_string(kMaxK));
  require(d.D <= kMaxD, "D = " + std::to_string(d.D) + " exceeds the supported maximum " + std::to_string(kMaxD));
  require(d.Dv <= kMaxDv,
          "Dv = " + std::to_string(d.Dv) + " exceeds the supported maximum " + std::to_string(kMaxDv));
  // B and H first, so that B * H cannot overflow; B * H * N bounded so that no workspace size
  // (up to 2^21 * B * H * N bytes) can overflow (2^40 positions are terabytes of inputs).
  require(d.N < (int64_t(1) << 31) && d.B < (int64_t(1) << 31) && d.H < (int64_t(1) << 31) &&
              d.B * d.H < (int64_t(1) << 31),
          "N or B*H too large");
  require(d.B * d.H * d.N < (int64_t(1) << 40), "B*N*H too large");
}

}  // namespace cuda_impl
}  // namespace gmattn
