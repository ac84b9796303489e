// Small dense products on contiguous row-major blocks (chunk x chunk, chunk x K, K x Dv), the
// building blocks of the chunked GMA kernels. Register-tiled: MR rows of C are kept in
// accumulators across the whole reduction, NR columns at a time (two vectors of the target ISA).
#pragma once

#include <cstdint>
#include <cstring>

#ifndef GMATTN_VECTOR_BYTES
#define GMATTN_VECTOR_BYTES 16
#endif

namespace gmattn {
namespace cpu_detail {

template <class Acc>
struct Tile {
  static constexpr int MR = 4;
  static constexpr int NR = 2 * GMATTN_VECTOR_BYTES / static_cast<int>(sizeof(Acc));
};

template <class Acc, int MR, int NR>
inline void gemm_micro(int64_t depth, const Acc* A, int64_t lda, const Acc* B, int64_t ldb, Acc* C,
                       int64_t ldc, bool accumulate) {
  Acc acc[MR][NR];
  for (int r = 0; r < MR; ++r) {
#pragma omp simd
    for (int j = 0; j < NR; ++j) acc[r][j] = accumulate ? C[r * ldc + j] : Acc(0);
  }
  for (int64_t p = 0; p < depth; ++p) {
    const Acc* b = B + p * ldb;
    for (int r = 0; r < MR; ++r) {
      const Acc a = A[r * lda + p];
#pragma omp simd
      for (int j = 0; j < NR; ++j) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < MR; ++r) {
#pragma omp simd
    for (int j = 0; j < NR; ++j) C[r * ldc + j] = acc[r][j];
  }
}

// Rows or columns left over by the tiles: one row of C at a time, columns [j0, j1).
template <class Acc>
inline void gemm_edge(int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t depth, const Acc* A, int64_t lda,
                      const Acc* B, int64_t ldb, Acc* C, int64_t ldc, bool accumulate) {
  for (int64_t i = i0; i < i1; ++i) {
    Acc* c = C + i * ldc;
    if (!accumulate) {
      for (int64_t j = j0; j < j1; ++j) c[j] = Acc(0);
    }
    for (int64_t p = 0; p < depth; ++p) {
      const Acc a = A[i * lda + p];
      const Acc* b = B + p * ldb;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) c[j] += a * b[j];
    }
  }
}

// C (M x N) = [C +] A (M x depth) * B (depth x N); all row-major with leading dimensions.
template <class Acc>
inline void gemm(int64_t M, int64_t N, int64_t depth, const Acc* A, int64_t lda, const Acc* B, int64_t ldb,
                 Acc* C, int64_t ldc, bool accumulate) {
  constexpr int MR = Tile<Acc>::MR;
  constexpr int NR = Tile<Acc>::NR;
  const int64_t M_tiled = M - M % MR;
  const int64_t N_tiled = N - N % NR;
  for (int64_t i = 0; i < M_tiled; i += MR) {
    for (int64_t j = 0; j < N_tiled; j += NR) {
      gemm_micro<Acc, MR, NR>(depth, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    }
  }
  if (N_tiled < N) gemm_edge(0, M_tiled, N_tiled, N, depth, A, lda, B, ldb, C, ldc, accumulate);
  if (M_tiled < M) gemm_edge(M_tiled, M, 0, N, depth, A, lda, B, ldb, C, ldc, accumulate);
}

// dst (cols x rows, leading dimension ld_dst) = transpose of src (rows x cols, leading ld_src).
template <class Acc>
inline void transpose(int64_t rows, int64_t cols, const Acc* src, int64_t ld_src, Acc* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
}

}  // namespace cpu_detail
}  // namespace gmattn
