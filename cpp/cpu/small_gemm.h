// Small dense products on the chunk buffers of the CPU kernels (chunk x chunk, chunk x K, K x Dv,
// ...). Register-tiled micro-kernels on the SIMD vectors of simd.h: an MR x NV tile of C
// (MR rows, NV vectors of columns) stays in registers for the whole reduction; each step
// broadcasts MR elements of A and loads NV vectors of B.
//
// Conventions: B and C are row-major with leading dimensions; their column count is a whole
// number of vectors (the kernels pad every width to the vector length with zeros). A is read
// through two strides, A(r, p) = A[r * a_rs + p * a_ps], so A and A^T are both plain operands.
#pragma once

#ifndef GMATTN_ISA
#define GMATTN_ISA generic
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "simd.h"

namespace gmattn {
namespace cpu_detail {
// One copy per ISA build (GMATTN_ISA): inline functions compiled with different instruction
// sets must not share symbols, or the linker would merge them across builds.
inline namespace GMATTN_ISA {

#if GMATTN_VECTOR_BYTES >= 64
// AVX-512: 32 vector registers. 4 x 4 accumulators + 4 B vectors + 1 broadcast.
constexpr int kGemmMR = 4;
constexpr int kGemmNV = 4;
#else
// SSE / NEON / AVX2: 16 vector registers. 4 x 2 accumulators + 2 B vectors + 1 broadcast.
constexpr int kGemmMR = 4;
constexpr int kGemmNV = 2;
#endif

template <class Acc, int MR, int NV>
inline void gemm_micro(int64_t p0, int64_t p1, const Acc* A, int64_t a_rs, int64_t a_ps, const Acc* B,
                       int64_t ldb, Acc* C, int64_t ldc, bool accumulate) {
  using V = VecT<Acc>;
  constexpr int W = Simd<Acc>::W;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? loadu(C + r * ldc + v * W) : V{};
  }
  for (int64_t p = p0; p < p1; ++p) {
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = loadu(B + p * ldb + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V a = splat(A[r * a_rs + p * a_ps]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) storeu(C + r * ldc + v * W, acc[r][v]);
  }
}

template <class Acc, int MR>
inline void gemm_micro_nv(int nv, int64_t p0, int64_t p1, const Acc* A, int64_t a_rs, int64_t a_ps, const Acc* B,
                          int64_t ldb, Acc* C, int64_t ldc, bool accumulate) {
  switch (nv) {
    case 1: gemm_micro<Acc, MR, 1>(p0, p1, A, a_rs, a_ps, B, ldb, C, ldc, accumulate); break;
    case 2: gemm_micro<Acc, MR, 2>(p0, p1, A, a_rs, a_ps, B, ldb, C, ldc, accumulate); break;
#if GMATTN_VECTOR_BYTES >= 64
    case 3: gemm_micro<Acc, MR, 3>(p0, p1, A, a_rs, a_ps, B, ldb, C, ldc, accumulate); break;
    case 4: gemm_micro<Acc, MR, 4>(p0, p1, A, a_rs, a_ps, B, ldb, C, ldc, accumulate); break;
#endif
    default: break;
  }
}

// Triangular structure of a product over one chunk (row i attends to columns j <= i):
//   kOutLower:   only C[i][j] for j < (row block end) rounded up to a vector are computed
//                (the caller masks j > i); the rest of C is left untouched.
//   kDepthLower: A(i, p) = 0 for p > i, so row block [i0, i0+MR) reduces over p < i0+MR only.
//   kDepthUpper: A(i, p) = 0 for p < i, so row block [i0, ...) reduces over p >= i0 only.
enum class Tri { kNone, kOutLower, kDepthLower, kDepthUpper };

// C (M x nvec*W) (+)= A (M x depth) * B (depth x nvec*W).
template <class Acc>
inline void gemm(int64_t M, int64_t nvec, int64_t depth, const Acc* A, int64_t a_rs, int64_t a_ps, const Acc* B,
                 int64_t ldb, Acc* C, int64_t ldc, bool accumulate, Tri tri = Tri::kNone) {
  constexpr int MR = kGemmMR;
  constexpr int NV = kGemmNV;
  constexpr int W = Simd<Acc>::W;
  if (nvec == 1 && tri == Tri::kNone) {  // one vector of columns: taller tiles
    int64_t i0 = 0;
    for (; i0 + 8 <= M; i0 += 8) {
      gemm_micro<Acc, 8, 1>(0, depth, A + i0 * a_rs, a_rs, a_ps, B, ldb, C + i0 * ldc, ldc, accumulate);
    }
    for (; i0 < M; ++i0) gemm_micro<Acc, 1, 1>(0, depth, A + i0 * a_rs, a_rs, a_ps, B, ldb, C + i0 * ldc, ldc, accumulate);
    return;
  }
  for (int64_t i0 = 0; i0 < M; i0 += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, M - i0));
    int64_t p0 = 0, p1 = depth, nv_end = nvec;
    if (tri == Tri::kOutLower) nv_end = std::min<int64_t>(nvec, (i0 + mr + W - 1) / W);
    if (tri == Tri::kDepthLower) p1 = std::min<int64_t>(depth, i0 + mr);
    if (tri == Tri::kDepthUpper) p0 = std::min<int64_t>(depth, i0);
    const Acc* Ai = A + i0 * a_rs;
    Acc* Ci = C + i0 * ldc;
    for (int64_t v0 = 0; v0 < nv_end; v0 += NV) {
      const int nv = static_cast<int>(std::min<int64_t>(NV, nv_end - v0));
      const Acc* Bv = B + v0 * W;
      Acc* Cv = Ci + v0 * W;
      switch (mr) {
        case 4: gemm_micro_nv<Acc, 4>(nv, p0, p1, Ai, a_rs, a_ps, Bv, ldb, Cv, ldc, accumulate); break;
        case 3: gemm_micro_nv<Acc, 3>(nv, p0, p1, Ai, a_rs, a_ps, Bv, ldb, Cv, ldc, accumulate); break;
        case 2: gemm_micro_nv<Acc, 2>(nv, p0, p1, Ai, a_rs, a_ps, Bv, ldb, Cv, ldc, accumulate); break;
        default: gemm_micro_nv<Acc, 1>(nv, p0, p1, Ai, a_rs, a_ps, Bv, ldb, Cv, ldc, accumulate); break;
      }
    }
  }
}

#ifdef GMATTN_HAVE_SHUFFLEVECTOR  // (simd.h)
// In-register transpose of a W x W block: log2(W) stages; stage S swaps the off-diagonal S x S
// sub-blocks of every 2S x 2S block (rows i and i + S exchange the lanes with bit S set).
template <class Acc, int S, bool kFirst>
constexpr int transpose_lane(int j) {
  constexpr int W = Simd<Acc>::W;
  return kFirst ? ((j & S) ? W + (j - S) : j) : ((j & S) ? W + j : j + S);
}
template <class Acc, int S, size_t... J>
inline void transpose_pair(VecT<Acc>& a, VecT<Acc>& b, std::index_sequence<J...>) {
  const VecT<Acc> na = __builtin_shufflevector(a, b, transpose_lane<Acc, S, true>(J)...);
  const VecT<Acc> nb = __builtin_shufflevector(a, b, transpose_lane<Acc, S, false>(J)...);
  a = na;
  b = nb;
}
template <class Acc, int S>
inline void transpose_stage(VecT<Acc>* r) {
  constexpr int W = Simd<Acc>::W;
  if constexpr (S >= 1) {
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) {
      if (!(i & S)) transpose_pair<Acc, S>(r[i], r[i + S], std::make_index_sequence<W>{});
    }
    transpose_stage<Acc, S / 2>(r);
  }
}
template <class Acc>
inline void transpose_block(const Acc* src, int64_t ld_src, Acc* dst, int64_t ld_dst) {
  constexpr int W = Simd<Acc>::W;
  VecT<Acc> r[W];
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) r[i] = loadu(src + i * ld_src);
  transpose_stage<Acc, W / 2>(r);
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) storeu(dst + i * ld_dst, r[i]);
}
#endif

// dst (cols x rows, leading dimension ld_dst) = transpose of src (rows x cols, leading ld_src).
template <class Acc>
inline void transpose(int64_t rows, int64_t cols, const Acc* src, int64_t ld_src, Acc* dst, int64_t ld_dst) {
  int64_t rows_done = 0, cols_done = 0;
#ifdef GMATTN_HAVE_SHUFFLEVECTOR
  constexpr int W = Simd<Acc>::W;
  rows_done = rows - rows % W;
  cols_done = cols - cols % W;
  for (int64_t i0 = 0; i0 < rows_done; i0 += W) {
    for (int64_t j0 = 0; j0 < cols_done; j0 += W) {
      transpose_block(src + i0 * ld_src + j0, ld_src, dst + j0 * ld_dst + i0, ld_dst);
    }
  }
#endif
  // Edges (and everything without __builtin_shufflevector): element by element.
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t j_start = i < rows_done ? cols_done : 0;
    for (int64_t j = j_start; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
}

}  // namespace GMATTN_ISA
}  // namespace cpu_detail
}  // namespace gmattn
