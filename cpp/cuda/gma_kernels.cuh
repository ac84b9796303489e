// gmattn CUDA kernels: Gaussian Mixture Attention forward and backward (docs/design.md section 1).
//
// Templated on the input dtype S (half, bfloat16, float, double) and the accumulator dtype T
// (float, or double for double inputs). Each dtype's translation unit instantiates
// forward_impl<S> / backward_impl<S>; dispatch.cu switches on ForwardArgs::dtype.
//
// Pipeline (per batch row b and head h; "chunk" = C consecutive tokens, "segment" = a run of
// chunks processed sequentially by one thread block, "slice" = DvT consecutive value columns):
//
//   forward
//     prep_params            lam = 1/sigma2, log pi - 0.5 sum log sigma2         (H, K[, D])
//     responsibilities x2    Gq = gamma(q), Gk = gamma(k) * mask                  (B, H, N, K)
//     seg_state + state_scan segment-local sums Gk^T V, Gk^T 1 then a prefix over segments
//                            (causal, when there is more than one segment) or the total
//                            (bidirectional); skipped for causal with one segment
//     forward_chunk          out = (Gq S_prev + tril(Gq Gk^T) V) / (Gq z_prev + rowsum + eps),
//                            then S += Gk^T V, z += Gk^T 1, chunk after chunk
//   backward
//     dden                   dden = -(g . out) / den                              (B, H, N)
//     seg_state + state_scan forward states as above; the backward states dS, dz (sums of
//                            Gq^T dnum, Gq^T dden) as suffix sums over segments
//     backward_chunk         a forward sweep over the segment's chunks for dGq, a reverse sweep
//                            for dGk and dv (docs/design.md section 1, chunked)
//     responsibilities_bwd   softmax backward, dq / dk, per-block partial sums of the
//                            parameter gradients
//     finalize_params        fixed-order sum of the partials, chain rule to mu, omega, alpha
//
// Memory: workspaces are O(B H N K) (responsibilities and their gradients) plus
// O(B H P K Dv) segment states with P chosen from the GPU size, never O(N K Dv) or O(N^2).
// Chunk products run on tensor cores (tf32 WMMA, fp32 accumulate) for half / bfloat16 inputs
// and as register-tiled FMA loops in the accumulator dtype for float / double inputs.
#pragma once

#include <gmattn/gmattn.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

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
// Numeric helpers
// --------------------------------------------------------------------------------------------

__device__ __forceinline__ float gexp(float x) { return expf(x); }
__device__ __forceinline__ double gexp(double x) { return exp(x); }
__device__ __forceinline__ float glog(float x) { return logf(x); }
__device__ __forceinline__ double glog(double x) { return log(x); }
__device__ __forceinline__ float glog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double glog1p(double x) { return log1p(x); }

// softplus(x) = log(1 + e^x) without overflow for large x or loss for very negative x.
template <class T>
__device__ __forceinline__ T softplus(T x) {
  return x > T(0) ? x + glog1p(gexp(-x)) : glog1p(gexp(x));
}
template <class T>
__device__ __forceinline__ T sigmoid(T x) {
  return T(1) / (T(1) + gexp(-x));
}

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
// Strided views and state references
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

// Where a block finds the (K x Dv) state and (K) normaliser it starts from: either a
// caller's tensor (B, H, K, Dv) / (B, H, K) (seg strides 0), or the segment workspace
// [B*H][P][K][Dv] / [B*H][P][K]. S == nullptr means zeros.
template <class T>
struct StateRef {
  const T* S = nullptr;
  int64_t S_b = 0, S_h = 0, S_seg = 0, S_k = 0, S_e = 0;
  const T* z = nullptr;
  int64_t z_b = 0, z_h = 0, z_seg = 0, z_k = 0;
};

template <class T>
inline StateRef<T> state_ref_from_views(const View& S, const View& z) {
  StateRef<T> r;
  if (S.present()) {
    r.S = static_cast<const T*>(S.data);
    r.S_b = S.stride[0];
    r.S_h = S.stride[1];
    r.S_k = S.stride[2];
    r.S_e = S.stride[3];
  }
  if (z.present()) {
    r.z = static_cast<const T*>(z.data);
    r.z_b = z.stride[0];
    r.z_h = z.stride[1];
    r.z_k = z.stride[2];
  }
  return r;
}

// seg_stride_one == false: every segment reads slot 0 (bidirectional totals).
template <class T>
inline StateRef<T> state_ref_from_workspace(const T* S_seg, const T* z_seg, int64_t H, int64_t P,
                                            int64_t K, int64_t Dv, bool per_segment) {
  StateRef<T> r;
  r.S = S_seg;
  r.S_h = P * K * Dv;
  r.S_b = H * r.S_h;
  r.S_seg = per_segment ? K * Dv : 0;
  r.S_k = Dv;
  r.S_e = 1;
  r.z = z_seg;
  r.z_h = P * K;
  r.z_b = H * r.z_h;
  r.z_seg = per_segment ? K : 0;
  r.z_k = 1;
  return r;
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
// multiples of 16 and Kd a multiple of 8. All threads of the block must call it; it does not
// synchronise (callers __syncthreads() before reading C).
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
__device__ void gemm_fma(T* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N, int Kd) {
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
        T& c = C[(m0 + i) * ldc + nq + j * tiles_n];
        c = ACCUM ? c + acc[i][j] : acc[i][j];
      }
  }
}

#if GMA_DEVICE_COMPILE_TC
// Tensor-core path: one 16 x 16 output tile per warp at a time, tf32 inputs, fp32 accumulate.
template <bool ACCUM, class LA, class LB>
__device__ void gemm_tf32(float* C, int ldc, const float* A, int lda, const float* B, int ldb, int M, int N,
                          int Kd) {
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
                                           int N, int Kd) {
#if GMA_DEVICE_COMPILE_TC
  if constexpr (TC && std::is_same<T, float>::value) {
    gemm_tf32<ACCUM, LA, LB>(C, ldc, A, lda, B, ldb, M, N, Kd);
    return;
  }
#endif
  gemm_fma<ACCUM, LA, LB>(C, ldc, A, lda, B, ldb, M, N, Kd);
}

// Loads the (K x DvT) state slice [e0, e0 + ev) and the normaliser a block starts from into
// shared memory, zero-padded to Kp rows and DvT columns.
template <class T>
__device__ void load_state(T* S, int ldS, T* z, const StateRef<T>& ref, int64_t b, int64_t h, int64_t seg,
                           int K, int Kp, int DvT, int e0, int ev) {
  for (int idx = threadIdx.x; idx < Kp * DvT; idx += kThreads) {
    const int k = idx / DvT, c = idx % DvT;
    T val = T(0);
    if (ref.S != nullptr && k < K && c < ev)
      val = ref.S[b * ref.S_b + h * ref.S_h + seg * ref.S_seg + k * ref.S_k + (e0 + c) * ref.S_e];
    S[k * ldS + c] = val;
  }
  for (int k = threadIdx.x; k < Kp; k += kThreads) {
    T val = T(0);
    if (ref.z != nullptr && k < K) val = ref.z[b * ref.z_b + h * ref.z_h + seg * ref.z_seg + k * ref.z_k];
    z[k] = val;
  }
}

// Writes a shared (K x DvT) state slice and (slice 0 only) its normaliser to caller tensors.
template <class T>
__device__ void store_state(DView<T> S_out, DView<T> z_out, const T* S, int ldS, const T* z, int64_t b,
                            int64_t h, int K, int DvT, int e0, int ev, bool write_z) {
  if (S_out.p != nullptr)
    for (int idx = threadIdx.x; idx < K * DvT; idx += kThreads) {
      const int k = idx / DvT, c = idx % DvT;
      if (c < ev) S_out(b, h, k, e0 + c) = S[k * ldS + c];
    }
  if (write_z && z_out.p != nullptr)
    for (int k = threadIdx.x; k < K; k += kThreads) z_out(b, h, k) = z[k];
}

// Sizes of the sequence decomposition shared by the chunk kernels.
struct ChunkGeometry {
  int64_t B = 0, N = 0, H = 0;
  int K = 0, Kp = 0, Dv = 0;
  int C = 0;        // chunk length (multiple of 16)
  int DvT = 0;      // value columns per slice (multiple of 16)
  int nslices = 0;  // ceil(Dv / DvT)
  int P = 0;        // segments per (b, h)
  int64_t seg_len = 0;  // tokens per segment (a multiple of C)
};

struct BlockCoords {
  int64_t b, h, bh, seg, n_begin, n_end;
  int slice, e0, ev;
};

// Blocks are laid out as (bh, slice, seg) with seg fastest.
__device__ __forceinline__ BlockCoords block_coords(const ChunkGeometry& g) {
  BlockCoords c;
  const int64_t bid = blockIdx.x;
  c.seg = bid % g.P;
  c.slice = (int)((bid / g.P) % g.nslices);
  c.bh = bid / ((int64_t)g.P * g.nslices);
  c.b = c.bh / g.H;
  c.h = c.bh % g.H;
  c.n_begin = c.seg * g.seg_len;
  c.n_end = c.n_begin + g.seg_len < g.N ? c.n_begin + g.seg_len : g.N;
  c.e0 = c.slice * g.DvT;
  c.ev = g.Dv - c.e0 < g.DvT ? g.Dv - c.e0 : g.DvT;
  return c;
}

// --------------------------------------------------------------------------------------------
// prep_params: per head, lam = 1 / (softplus(omega) + sigma_eps), a contiguous copy of mu, and
// logc[k] = log_softmax(alpha)[k] - 0.5 * sum_d log sigma2[k, d]. One block per head.
// --------------------------------------------------------------------------------------------

template <class T>
struct PrepParams {
  DView<const T> mu, omega, alpha;
  T* lam;   // [H][K][D]
  T* mu_c;  // [H][K][D]
  T* logc;  // [H][K]
  int H, K, D;
  T sigma_eps;
};

template <class T>
__global__ void __launch_bounds__(kThreads) prep_params_kernel(const PrepParams<T> p) {
  GMA_DYNAMIC_SMEM(smem_raw);
  T* log_norm = reinterpret_cast<T*>(smem_raw);  // log sum_k exp(alpha_k)
  const int64_t h = blockIdx.x;
  const int K = p.K, D = p.D;
  for (int idx = threadIdx.x; idx < K * D; idx += kThreads) {
    const int k = idx / D, d = idx % D;
    const T sigma2 = softplus(p.omega(h, k, d)) + p.sigma_eps;
    p.lam[(h * K + k) * D + d] = T(1) / sigma2;
    p.mu_c[(h * K + k) * D + d] = p.mu(h, k, d);
  }
  if (threadIdx.x == 0) {
    T m = p.alpha(h, 0);
    for (int k = 1; k < K; ++k) m = p.alpha(h, k) > m ? p.alpha(h, k) : m;
    T s = T(0);
    for (int k = 0; k < K; ++k) s += gexp(p.alpha(h, k) - m);
    log_norm[0] = m + glog(s);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < K; k += kThreads) {
    T sum_log = T(0);
    for (int d = 0; d < D; ++d) sum_log += glog(softplus(p.omega(h, k, d)) + p.sigma_eps);
    p.logc[h * K + k] = p.alpha(h, k) - log_norm[0] - T(0.5) * sum_log;
  }
}

// --------------------------------------------------------------------------------------------
// responsibilities: gamma[b, h, n, :] = softmax_k(logc[k] - 0.5 sum_d lam[k,d] (x[d] - mu[k,d])^2)
// for a tile of R rows; rows of masked keys are written as zeros.
//
// The quadratic form is evaluated directly (not expanded into x^2, x and mu^2 terms, which
// cancel badly) in the accumulator dtype. Each thread owns up to kRespMaxTiles micro-tiles of
// 4 rows x 4 components, so one shared load feeds four FMAs; D is staged kRespDTile at a time.
// --------------------------------------------------------------------------------------------

constexpr int kMicro = 4;         // micro-tile edge (rows x components, or rows x columns)
constexpr int kRespDTile = 16;    // D columns staged per step
constexpr int kRespMaxTiles = 2;  // micro-tiles per thread (register budget: 32 accumulators)

// Rows per block for Kp (padded K): as many as the threads' micro-tiles cover, at most 128.
inline int responsibility_rows(int Kp) {
  const int rows = (kThreads * kRespMaxTiles * kMicro * kMicro / Kp) / kMicro * kMicro;
  return rows < 128 ? rows : 128;
}

template <class S, class T>
struct RespParams {
  DView<const S> x;              // (B, N, H, D)
  DView<const uint8_t> mask;     // (B, N) or p == nullptr
  DView<T> gamma;                // (B, H, N, K)
  const T* lam;
  const T* mu_c;
  const T* logc;
  int64_t N, H;
  int K, Kp, D, R;
  int64_t row_tiles;
};

template <class T>
struct RespSmem {
  T *x, *lam, *mu, *s, *inv_sum;
  __host__ __device__ RespSmem(Carver& c, int Kp, int R) {
    x = c.take<T>((size_t)R * (kRespDTile + 1));   // [R][DT+1]: rows in different banks
    lam = c.take<T>((size_t)kRespDTile * Kp);      // [DT][Kp]: components contiguous
    mu = c.take<T>((size_t)kRespDTile * Kp);
    s = c.take<T>((size_t)R * (Kp + 1));           // [R][Kp+1] log-responsibilities
    inv_sum = c.take<T>(R);
  }
};

template <class S, class T>
__global__ void __launch_bounds__(kThreads) responsibilities_kernel(const RespParams<S, T> p) {
  GMA_DYNAMIC_SMEM(smem_raw);
  Carver carver{reinterpret_cast<uintptr_t>(smem_raw)};
  RespSmem<T> sm(carver, p.Kp, p.R);
  const int tid = threadIdx.x;
  const int K = p.K, Kp = p.Kp, D = p.D, R = p.R;
  constexpr int DT = kRespDTile, XLD = kRespDTile + 1;
  const int64_t tile = blockIdx.x % p.row_tiles;
  const int64_t bh = blockIdx.x / p.row_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t n0 = tile * R;
  const int rows = (int)(p.N - n0 < R ? p.N - n0 : R);
  // Micro-tile t covers rows 4*(t / tiles_k) + i and components t % tiles_k + j * tiles_k.
  const int tiles_k = Kp / kMicro;
  const int tiles = (R / kMicro) * tiles_k;

  T acc[kRespMaxTiles][kMicro][kMicro];
#pragma unroll
  for (int u = 0; u < kRespMaxTiles; ++u)
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[u][i][j] = T(0);
  for (int d0 = 0; d0 < D; d0 += DT) {
    const int dcols = D - d0 < DT ? D - d0 : DT;
    for (int idx = tid; idx < R * DT; idx += kThreads) {
      const int r = idx / DT, c = idx % DT;
      sm.x[r * XLD + c] = (r < rows && c < dcols) ? to_acc<T>(p.x(b, n0 + r, h, d0 + c)) : T(0);
    }
    for (int idx = tid; idx < Kp * DT; idx += kThreads) {
      const int k = idx / DT, c = idx % DT;
      const bool ok = c < dcols && k < K;  // padding: lam = 0 contributes nothing
      sm.lam[c * Kp + k] = ok ? p.lam[(h * K + k) * D + d0 + c] : T(0);
      sm.mu[c * Kp + k] = ok ? p.mu_c[(h * K + k) * D + d0 + c] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kRespMaxTiles; ++u) {
      const int t = tid + u * kThreads;
      if (t < tiles) {
        const int r0 = (t / tiles_k) * kMicro, kq = t % tiles_k;
#pragma unroll 4
        for (int c = 0; c < DT; ++c) {
          T xv[kMicro], lv[kMicro], mv[kMicro];
#pragma unroll
          for (int i = 0; i < kMicro; ++i) xv[i] = sm.x[(r0 + i) * XLD + c];
#pragma unroll
          for (int j = 0; j < kMicro; ++j) {
            lv[j] = sm.lam[c * Kp + kq + j * tiles_k];
            mv[j] = sm.mu[c * Kp + kq + j * tiles_k];
          }
#pragma unroll
          for (int i = 0; i < kMicro; ++i)
#pragma unroll
            for (int j = 0; j < kMicro; ++j) {
              const T diff = xv[i] - mv[j];
              acc[u][i][j] += lv[j] * diff * diff;
            }
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < kRespMaxTiles; ++u) {
    const int t = tid + u * kThreads;
    if (t < tiles) {
      const int r0 = (t / tiles_k) * kMicro, kq = t % tiles_k;
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) {
          const int k = kq + j * tiles_k;
          if (k < K) sm.s[(r0 + i) * (Kp + 1) + k] = p.logc[h * K + k] - T(0.5) * acc[u][i][j];
        }
    }
  }
  __syncthreads();
  // Max-subtracted softmax over k, one thread per row.
  for (int r = tid; r < R; r += kThreads) {
    T* sr = sm.s + r * (Kp + 1);
    T m = sr[0];
    for (int k = 1; k < K; ++k) m = sr[k] > m ? sr[k] : m;
    T sum = T(0);
    for (int k = 0; k < K; ++k) {
      const T e = gexp(sr[k] - m);
      sr[k] = e;
      sum += e;
    }
    sm.inv_sum[r] = T(1) / sum;
  }
  __syncthreads();
  for (int idx = tid; idx < rows * K; idx += kThreads) {
    const int r = idx / K, k = idx % K;
    const int64_t n = n0 + r;
    T val = sm.s[r * (Kp + 1) + k] * sm.inv_sum[r];
    if (p.mask.p != nullptr && p.mask(b, n) == 0) val = T(0);
    p.gamma(b, h, n, k) = val;
  }
}

// --------------------------------------------------------------------------------------------
// seg_state: per (b, h, segment, slice) the segment-local sums
//   S_seg[k, e] = sum_n G[n, k] * Y[n, e] / den[n]     (den optional)
//   z_seg[k]    = sum_n G[n, k] * w[n]                  (w optional, 1 when absent)
// Forward state: G = Gk, Y = v. Backward state: G = Gq, Y = dout, den, w = dden.
// --------------------------------------------------------------------------------------------

template <class S, class T>
struct SegStateParams {
  ChunkGeometry g;
  DView<const T> G;    // (B, H, N, K)
  DView<const S> Y;    // (B, N, H, Dv)
  DView<const T> den;  // (B, H, N) or p == nullptr
  const T* w;          // [B*H][N] or nullptr
  T* S_seg;            // [B*H][P][K][Dv]
  T* z_seg;            // [B*H][P][K]
};

template <class T>
struct SegStateSmem {
  T *S, *z, *G, *Y, *w;
  __host__ __device__ SegStateSmem(Carver& c, const ChunkGeometry& g) {
    S = c.take<T>((size_t)g.Kp * padded_ld(g.DvT));
    z = c.take<T>(g.Kp);
    G = c.take<T>((size_t)g.C * padded_ld(g.Kp));
    Y = c.take<T>((size_t)g.C * padded_ld(g.DvT));
    w = c.take<T>(g.C);
  }
};

template <class S, class T, bool TC>
__global__ void __launch_bounds__(kThreads) seg_state_kernel(const SegStateParams<S, T> p) {
  GMA_DYNAMIC_SMEM(smem_raw);
  const ChunkGeometry& g = p.g;
  Carver carver{reinterpret_cast<uintptr_t>(smem_raw)};
  SegStateSmem<T> sm(carver, g);
  const BlockCoords bc = block_coords(g);
  const int tid = threadIdx.x;
  const int K = g.K, Kp = g.Kp, C = g.C, DvT = g.DvT;
  const int ldK = padded_ld(Kp), ldS = padded_ld(DvT);

  for (int idx = tid; idx < Kp * DvT; idx += kThreads) sm.S[(idx / DvT) * ldS + idx % DvT] = T(0);
  for (int k = tid; k < Kp; k += kThreads) sm.z[k] = T(0);
  for (int64_t c0 = bc.n_begin; c0 < bc.n_end; c0 += C) {
    const int rows = (int)(bc.n_end - c0 < C ? bc.n_end - c0 : C);
    for (int idx = tid; idx < C * Kp; idx += kThreads) {
      const int r = idx / Kp, k = idx % Kp;
      sm.G[r * ldK + k] = (r < rows && k < K) ? p.G(bc.b, bc.h, c0 + r, k) : T(0);
    }
    for (int idx = tid; idx < C * DvT; idx += kThreads) {
      const int r = idx / DvT, c = idx % DvT;
      T val = T(0);
      if (r < rows && c < bc.ev) {
        val = to_acc<T>(p.Y(bc.b, c0 + r, bc.h, bc.e0 + c));
        if (p.den.p != nullptr) val = val / p.den(bc.b, bc.h, c0 + r);
      }
      sm.Y[r * ldS + c] = val;
    }
    for (int r = tid; r < C; r += kThreads)
      sm.w[r] = r < rows ? (p.w != nullptr ? p.w[bc.bh * g.N + c0 + r] : T(1)) : T(0);
    __syncthreads();
    block_gemm<TC, true, ColMajor, RowMajor>(sm.S, ldS, sm.G, ldK, sm.Y, ldS, Kp, DvT, C);  // S += G^T Y
    for (int k = tid; k < Kp; k += kThreads) {
      T s = T(0);
      for (int r = 0; r < C; ++r) s += sm.G[r * ldK + k] * sm.w[r];
      sm.z[k] += s;
    }
    __syncthreads();
  }
  T* S_out = p.S_seg + (bc.bh * g.P + bc.seg) * g.K * g.Dv;
  for (int idx = tid; idx < K * DvT; idx += kThreads) {
    const int k = idx / DvT, c = idx % DvT;
    if (c < bc.ev) S_out[(int64_t)k * g.Dv + bc.e0 + c] = sm.S[k * ldS + c];
  }
  if (bc.slice == 0)
    for (int k = tid; k < K; k += kThreads) p.z_seg[(bc.bh * g.P + bc.seg) * g.K + k] = sm.z[k];
}

// --------------------------------------------------------------------------------------------
// state_scan: over the P segment-local states of each (b, h), in place, in a fixed order:
//   kExclusivePrefix  slot p := init + sum_{q < p} local_q     (causal forward states)
//   kExclusiveSuffix  slot p := init + sum_{q > p} local_q     (causal backward states)
//   kTotal            slot 0 := init + sum_q local_q           (bidirectional)
// and writes init + sum_q local_q to the optional out tensors (S_final / dS0).
// --------------------------------------------------------------------------------------------

enum ScanMode : int { kExclusivePrefix = 0, kExclusiveSuffix = 1, kTotal = 2 };

template <class T>
struct ScanParams {
  T* S_seg;
  T* z_seg;
  int64_t B, H;
  int K, Dv, P;
  int mode;
  DView<const T> S_init, z_init;  // (B, H, K, Dv), (B, H, K); optional
  DView<T> S_out, z_out;          // optional
};

template <class T>
__global__ void __launch_bounds__(kThreads) state_scan_kernel(const ScanParams<T> p) {
  const int64_t per_bh = (int64_t)p.K * p.Dv + p.K;
  const int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (idx >= p.B * p.H * per_bh) return;  // no barriers in this kernel
  const int64_t bh = idx / per_bh, e = idx % per_bh;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t KDv = (int64_t)p.K * p.Dv;
  T* slot;
  int64_t stride;
  T acc = T(0);
  if (e < KDv) {
    const int k = (int)(e / p.Dv), c = (int)(e % p.Dv);
    slot = p.S_seg + bh * p.P * KDv + e;
    stride = KDv;
    if (p.S_init.p != nullptr) acc = p.S_init(b, h, k, c);
  } else {
    const int k = (int)(e - KDv);
    slot = p.z_seg + bh * p.P * p.K + k;
    stride = p.K;
    if (p.z_init.p != nullptr) acc = p.z_init(b, h, k);
  }
  if (p.mode == kExclusivePrefix) {
    for (int q = 0; q < p.P; ++q) {
      const T local = slot[q * stride];
      slot[q * stride] = acc;
      acc += local;
    }
  } else if (p.mode == kExclusiveSuffix) {
    for (int q = p.P - 1; q >= 0; --q) {
      const T local = slot[q * stride];
      slot[q * stride] = acc;
      acc += local;
    }
  } else {
    for (int q = 0; q < p.P; ++q) acc += slot[q * stride];
    slot[0] = acc;
  }
  if (e < KDv) {
    if (p.S_out.p != nullptr) p.S_out(b, h, e / p.Dv, e % p.Dv) = acc;
  } else {
    if (p.z_out.p != nullptr) p.z_out(b, h, e - KDv) = acc;
  }
}

// --------------------------------------------------------------------------------------------
// forward_chunk: per (b, h, segment, slice), chunk after chunk
//   A   = tril(Gq_c Gk_c^T)                       (causal only)
//   num = Gq_c S + A V_c,  den = Gq_c z + rowsum(A) + eps,  out = num / den
//   S  += Gk_c^T V_c,      z  += Gk_c^T 1          (causal only; bidirectional S is the total)
// --------------------------------------------------------------------------------------------

template <class S, class T>
struct FwdChunkParams {
  ChunkGeometry g;
  DView<const T> gq, gk;       // (B, H, N, K)
  DView<const S> v;            // (B, N, H, Dv)
  DView<S> out;                // (B, N, H, Dv)
  DView<T> den;                // (B, H, N), optional
  StateRef<T> init;            // state before the segment (the total when bidirectional)
  DView<T> S_final, z_final;   // written when write_final (causal, single segment)
  bool write_final;
  T eps;
};

template <class T>
struct FwdChunkSmem {
  T *S, *z, *Gq, *Gk, *V, *A, *O, *den;
  __host__ __device__ FwdChunkSmem(Carver& c, const ChunkGeometry& g) {
    S = c.take<T>((size_t)g.Kp * padded_ld(g.DvT));
    z = c.take<T>(g.Kp);
    Gq = c.take<T>((size_t)g.C * padded_ld(g.Kp));
    Gk = c.take<T>((size_t)g.C * padded_ld(g.Kp));
    V = c.take<T>((size_t)g.C * padded_ld(g.DvT));
    A = c.take<T>((size_t)g.C * padded_ld(g.C));
    O = c.take<T>((size_t)g.C * padded_ld(g.DvT));
    den = c.take<T>(g.C);
  }
};

template <class S, class T, bool CAUSAL, bool TC>
__global__ void __launch_bounds__(kThreads) forward_chunk_kernel(const FwdChunkParams<S, T> p) {
  GMA_DYNAMIC_SMEM(smem_raw);
  const ChunkGeometry& g = p.g;
  Carver carver{reinterpret_cast<uintptr_t>(smem_raw)};
  FwdChunkSmem<T> sm(carver, g);
  const BlockCoords bc = block_coords(g);
  const int tid = threadIdx.x;
  const int K = g.K, Kp = g.Kp, C = g.C, DvT = g.DvT;
  const int ldK = padded_ld(Kp), ldS = padded_ld(DvT), ldC = padded_ld(C);

  load_state(sm.S, ldS, sm.z, p.init, bc.b, bc.h, bc.seg, K, Kp, DvT, bc.e0, bc.ev);
  __syncthreads();
  for (int64_t c0 = bc.n_begin; c0 < bc.n_end; c0 += C) {
    const int rows = (int)(bc.n_end - c0 < C ? bc.n_end - c0 : C);
    for (int idx = tid; idx < C * Kp; idx += kThreads) {
      const int r = idx / Kp, k = idx % Kp;
      const bool ok = r < rows && k < K;
      sm.Gq[r * ldK + k] = ok ? p.gq(bc.b, bc.h, c0 + r, k) : T(0);
      if (CAUSAL) sm.Gk[r * ldK + k] = ok ? p.gk(bc.b, bc.h, c0 + r, k) : T(0);
    }
    if (CAUSAL)
      for (int idx = tid; idx < C * DvT; idx += kThreads) {
        const int r = idx / DvT, c = idx % DvT;
        sm.V[r * ldS + c] = (r < rows && c < bc.ev) ? to_acc<T>(p.v(bc.b, c0 + r, bc.h, bc.e0 + c)) : T(0);
      }
    __syncthreads();
    block_gemm<TC, false, RowMajor, RowMajor>(sm.O, ldS, sm.Gq, ldK, sm.S, ldS, C, DvT, Kp);  // Gq S
    if (CAUSAL) block_gemm<TC, false, RowMajor, ColMajor>(sm.A, ldC, sm.Gq, ldK, sm.Gk, ldK, C, C, Kp);
    __syncthreads();
    if (CAUSAL)
      for (int idx = tid; idx < C * C; idx += kThreads) {
        const int i = idx / C, j = idx % C;
        if (j > i) sm.A[i * ldC + j] = T(0);  // keys after the query do not count
      }
    for (int i = tid; i < C; i += kThreads) {
      T d = p.eps;
      for (int k = 0; k < Kp; ++k) d += sm.Gq[i * ldK + k] * sm.z[k];
      if (CAUSAL)
        for (int j = 0; j <= i; ++j) d += sm.A[i * ldC + j];
      sm.den[i] = d;
    }
    __syncthreads();
    if (CAUSAL) {
      block_gemm<TC, true, RowMajor, RowMajor>(sm.O, ldS, sm.A, ldC, sm.V, ldS, C, DvT, C);  // += A V
      __syncthreads();
    }
    for (int idx = tid; idx < C * DvT; idx += kThreads) {
      const int r = idx / DvT, c = idx % DvT;
      if (r < rows && c < bc.ev) store_as(p.out(bc.b, c0 + r, bc.h, bc.e0 + c), sm.O[r * ldS + c] / sm.den[r]);
    }
    if (bc.slice == 0 && p.den.p != nullptr)
      for (int r = tid; r < rows; r += kThreads) p.den(bc.b, bc.h, c0 + r) = sm.den[r];
    if (CAUSAL) {
      block_gemm<TC, true, ColMajor, RowMajor>(sm.S, ldS, sm.Gk, ldK, sm.V, ldS, Kp, DvT, C);  // S += Gk^T V
      for (int k = tid; k < Kp; k += kThreads) {
        T s = T(0);
        for (int r = 0; r < C; ++r) s += sm.Gk[r * ldK + k];
        sm.z[k] += s;
      }
    }
    __syncthreads();
  }
  if (CAUSAL && p.write_final)
    store_state(p.S_final, p.z_final, sm.S, ldS, sm.z, bc.b, bc.h, K, DvT, bc.e0, bc.ev, bc.slice == 0);
}

// --------------------------------------------------------------------------------------------
// dden: dden[b, h, n] = -(dout[b, n, h, :] . out[b, n, h, :]) / den[b, h, n]
// --------------------------------------------------------------------------------------------

template <class S, class T>
struct DdenParams {
  DView<const S> dout, out;
  DView<const T> den;
  T* dden;  // [B*H][N]
  int64_t B, N, H;
  int Dv;
};

template <class S, class T>
__global__ void __launch_bounds__(kThreads) dden_kernel(const DdenParams<S, T> p) {
  const int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (idx >= p.B * p.H * p.N) return;  // no barriers in this kernel
  const int64_t n = idx % p.N, bh = idx / p.N;
  const int64_t b = bh / p.H, h = bh % p.H;
  T dot = T(0);
  for (int e = 0; e < p.Dv; ++e) dot += to_acc<T>(p.dout(b, n, h, e)) * to_acc<T>(p.out(b, n, h, e));
  p.dden[idx] = -dot / p.den(b, h, n);
}

// --------------------------------------------------------------------------------------------
// backward_chunk: per (b, h, segment, slice); dnum = dout / den (this slice's columns),
// dd = dden. Writes this slice's share of dGq and dGk (summed over slices later) and dv.
//
// Forward sweep (state S, z = before the chunk):
//   dGq_c = dnum S^T + [slice 0] dd z^T + Bm Gk_c,  Bm = tril(dnum V^T + [slice 0] dd 1^T)
//   S += Gk_c^T V_c, z += Gk_c^T 1
// Reverse sweep (dS, dz = the backward state after the chunk):
//   dGk_c = V dS^T + [slice 0] 1 dz^T + Bm^T Gq_c
//   dv_c  = Gk_c dS + A^T dnum,  A = tril(Gq_c Gk_c^T)
//   dS += Gq_c^T dnum, dz += Gq_c^T dd
// Bidirectional: the same without the intra-chunk terms and with constant (total) states.
// --------------------------------------------------------------------------------------------

template <class S, class T>
struct BwdChunkParams {
  ChunkGeometry g;
  DView<const T> gq, gk;  // (B, H, N, K)
  DView<const T> den;     // (B, H, N)
  DView<const S> v, dout; // (B, N, H, Dv)
  const T* dden;          // [B*H][N]
  StateRef<T> fwd_init;   // S, z before the segment (total when bidirectional)
  StateRef<T> bwd_init;   // dS, dz after the segment (total when bidirectional)
  T* dGq;                 // [nslices][B*H][N][K]
  T* dGk;                 // [nslices][B*H][N][K]
  int64_t slice_stride;   // B*H*N*K
  DView<S> dv;            // (B, N, H, Dv)
  DView<T> dS0, dz0;      // written when write_final (causal, single segment)
  bool write_final;
};

template <class T>
struct BwdChunkSmem {
  T *S, *z, *Gq, *Gk, *dG, *V, *Dn, *dV, *A, *Bm, *dd;
  __host__ __device__ BwdChunkSmem(Carver& c, const ChunkGeometry& g) {
    S = c.take<T>((size_t)g.Kp * padded_ld(g.DvT));
    z = c.take<T>(g.Kp);
    Gq = c.take<T>((size_t)g.C * padded_ld(g.Kp));
    Gk = c.take<T>((size_t)g.C * padded_ld(g.Kp));
    dG = c.take<T>((size_t)g.C * padded_ld(g.Kp));
    V = c.take<T>((size_t)g.C * padded_ld(g.DvT));
    Dn = c.take<T>((size_t)g.C * padded_ld(g.DvT));
    dV = c.take<T>((size_t)g.C * padded_ld(g.DvT));
    A = c.take<T>((size_t)g.C * padded_ld(g.C));
    Bm = c.take<T>((size_t)g.C * padded_ld(g.C));
    dd = c.take<T>(g.C);
  }
};

template <class S, class T, bool CAUSAL, bool TC>
__global__ void __launch_bounds__(kThreads) backward_chunk_kernel(const BwdChunkParams<S, T> p) {
  GMA_DYNAMIC_SMEM(smem_raw);
  const ChunkGeometry& g = p.g;
  Carver carver{reinterpret_cast<uintptr_t>(smem_raw)};
  BwdChunkSmem<T> sm(carver, g);
  const BlockCoords bc = block_coords(g);
  const int tid = threadIdx.x;
  const int K = g.K, Kp = g.Kp, C = g.C, DvT = g.DvT;
  const int ldK = padded_ld(Kp), ldS = padded_ld(DvT), ldC = padded_ld(C);
  const bool first_slice = bc.slice == 0;
  T* dGq = p.dGq + bc.slice * p.slice_stride + bc.bh * g.N * K;
  T* dGk = p.dGk + bc.slice * p.slice_stride + bc.bh * g.N * K;

  // Stages the chunk's tiles (zero-padded to C rows, Kp / DvT columns).
  auto load_chunk = [&](int64_t c0, int rows, bool need_gq, bool need_gk, bool need_v, bool need_dn) {
    for (int idx = tid; idx < C * Kp; idx += kThreads) {
      const int r = idx / Kp, k = idx % Kp;
      const bool ok = r < rows && k < K;
      if (need_gq) sm.Gq[r * ldK + k] = ok ? p.gq(bc.b, bc.h, c0 + r, k) : T(0);
      if (need_gk) sm.Gk[r * ldK + k] = ok ? p.gk(bc.b, bc.h, c0 + r, k) : T(0);
    }
    for (int idx = tid; idx < C * DvT; idx += kThreads) {
      const int r = idx / DvT, c = idx % DvT;
      const bool ok = r < rows && c < bc.ev;
      if (need_v) sm.V[r * ldS + c] = ok ? to_acc<T>(p.v(bc.b, c0 + r, bc.h, bc.e0 + c)) : T(0);
      if (need_dn)
        sm.Dn[r * ldS + c] =
            ok ? to_acc<T>(p.dout(bc.b, c0 + r, bc.h, bc.e0 + c)) / p.den(bc.b, bc.h, c0 + r) : T(0);
    }
    for (int r = tid; r < C; r += kThreads) sm.dd[r] = r < rows ? p.dden[bc.bh * g.N + c0 + r] : T(0);
  };
  auto store_dG = [&](T* dst, int64_t c0, int rows) {
    for (int idx = tid; idx < rows * K; idx += kThreads) {
      const int r = idx / K, k = idx % K;
      dst[(c0 + r) * K + k] = sm.dG[r * ldK + k];
    }
  };

  // ---- forward sweep: dGq ----
  load_state(sm.S, ldS, sm.z, p.fwd_init, bc.b, bc.h, bc.seg, K, Kp, DvT, bc.e0, bc.ev);
  __syncthreads();
  for (int64_t c0 = bc.n_begin; c0 < bc.n_end; c0 += C) {
    const int rows = (int)(bc.n_end - c0 < C ? bc.n_end - c0 : C);
    load_chunk(c0, rows, false, CAUSAL, CAUSAL, true);
    __syncthreads();
    block_gemm<TC, false, RowMajor, ColMajor>(sm.dG, ldK, sm.Dn, ldS, sm.S, ldS, C, Kp, DvT);  // dnum S^T
    if (CAUSAL) block_gemm<TC, false, RowMajor, ColMajor>(sm.Bm, ldC, sm.Dn, ldS, sm.V, ldS, C, C, DvT);
    __syncthreads();
    if (first_slice)
      for (int idx = tid; idx < C * Kp; idx += kThreads) {
        const int i = idx / Kp, k = idx % Kp;
        sm.dG[i * ldK + k] += sm.dd[i] * sm.z[k];
      }
    if (CAUSAL)
      for (int idx = tid; idx < C * C; idx += kThreads) {
        const int i = idx / C, j = idx % C;
        T& bm = sm.Bm[i * ldC + j];
        bm = j <= i ? bm + (first_slice ? sm.dd[i] : T(0)) : T(0);
      }
    __syncthreads();
    if (CAUSAL) {
      block_gemm<TC, true, RowMajor, RowMajor>(sm.dG, ldK, sm.Bm, ldC, sm.Gk, ldK, C, Kp, C);  // += Bm Gk
      __syncthreads();
    }
    store_dG(dGq, c0, rows);
    if (CAUSAL) {
      block_gemm<TC, true, ColMajor, RowMajor>(sm.S, ldS, sm.Gk, ldK, sm.V, ldS, Kp, DvT, C);  // S += Gk^T V
      for (int k = tid; k < Kp; k += kThreads) {
        T s = T(0);
        for (int r = 0; r < C; ++r) s += sm.Gk[r * ldK + k];
        sm.z[k] += s;
      }
    }
    __syncthreads();
  }

  // ---- reverse sweep: dGk, dv ----
  load_state(sm.S, ldS, sm.z, p.bwd_init, bc.b, bc.h, bc.seg, K, Kp, DvT, bc.e0, bc.ev);
  __syncthreads();
  const int64_t nchunks = (bc.n_end - bc.n_begin + C - 1) / C;
  for (int64_t ci = nchunks - 1; ci >= 0; --ci) {
    const int64_t c0 = bc.n_begin + ci * C;
    const int rows = (int)(bc.n_end - c0 < C ? bc.n_end - c0 : C);
    load_chunk(c0, rows, CAUSAL, true, true, CAUSAL);
    __syncthreads();
    block_gemm<TC, false, RowMajor, ColMajor>(sm.dG, ldK, sm.V, ldS, sm.S, ldS, C, Kp, DvT);  // V dS^T
    block_gemm<TC, false, RowMajor, RowMajor>(sm.dV, ldS, sm.Gk, ldK, sm.S, ldS, C, DvT, Kp);  // Gk dS
    if (CAUSAL) {
      block_gemm<TC, false, RowMajor, ColMajor>(sm.Bm, ldC, sm.Dn, ldS, sm.V, ldS, C, C, DvT);   // dnum V^T
      block_gemm<TC, false, RowMajor, ColMajor>(sm.A, ldC, sm.Gq, ldK, sm.Gk, ldK, C, C, Kp);    // Gq Gk^T
    }
    __syncthreads();
    if (first_slice)
      for (int idx = tid; idx < C * Kp; idx += kThreads) {
        const int j = idx / Kp, k = idx % Kp;
        sm.dG[j * ldK + k] += sm.z[k];
      }
    if (CAUSAL)
      for (int idx = tid; idx < C * C; idx += kThreads) {
        const int i = idx / C, j = idx % C;
        T& bm = sm.Bm[i * ldC + j];
        bm = j <= i ? bm + (first_slice ? sm.dd[i] : T(0)) : T(0);
        if (j > i) sm.A[i * ldC + j] = T(0);
      }
    __syncthreads();
    if (CAUSAL) {
      block_gemm<TC, true, ColMajor, RowMajor>(sm.dG, ldK, sm.Bm, ldC, sm.Gq, ldK, C, Kp, C);   // += Bm^T Gq
      block_gemm<TC, true, ColMajor, RowMajor>(sm.dV, ldS, sm.A, ldC, sm.Dn, ldS, C, DvT, C);   // += A^T dnum
      __syncthreads();
    }
    store_dG(dGk, c0, rows);
    for (int idx = tid; idx < C * DvT; idx += kThreads) {
      const int r = idx / DvT, c = idx % DvT;
      if (r < rows && c < bc.ev) store_as(p.dv(bc.b, c0 + r, bc.h, bc.e0 + c), sm.dV[r * ldS + c]);
    }
    if (CAUSAL) {
      block_gemm<TC, true, ColMajor, RowMajor>(sm.S, ldS, sm.Gq, ldK, sm.Dn, ldS, Kp, DvT, C);  // dS += Gq^T dnum
      for (int k = tid; k < Kp; k += kThreads) {
        T s = T(0);
        for (int r = 0; r < C; ++r) s += sm.Gq[r * ldK + k] * sm.dd[r];
        sm.z[k] += s;
      }
    }
    __syncthreads();
  }
  if (CAUSAL && p.write_final)
    store_state(p.dS0, p.dz0, sm.S, ldS, sm.z, bc.b, bc.h, K, DvT, bc.e0, bc.ev, first_slice);
}

// --------------------------------------------------------------------------------------------
// responsibilities_bwd: for the query (path 0) and key (path 1) responsibilities,
//   ds = gamma * (dgamma - sum_k gamma dgamma),  dx = -sum_k ds lam (x - mu)
// and partial sums, per block, of
//   T0[k] = sum ds[., k],  T1[k, d] = sum ds (x_d - mu_kd),  T2[k, d] = sum ds (x_d - mu_kd)^2
// from which finalize_params forms the parameter gradients. Deterministic mode: each block
// owns a slot; otherwise all blocks of a head add atomically into one.
// --------------------------------------------------------------------------------------------

template <class S, class T>
struct RespBwdParams {
  DView<const S> x[2];       // q, k (B, N, H, D)
  DView<const T> gamma[2];   // gq, gk (B, H, N, K)
  const T* dgamma[2];        // dGq, dGk partials [nslices][B*H][N][K]
  DView<S> dx[2];            // dq, dk
  int nslices;
  int64_t slice_stride;
  const T* lam;
  const T* mu_c;
  T* slots;                  // [H][slots_per_head][slot_size]
  int64_t slot_size;         // K + 2 K D
  int groups;                // blocks per (h, path)
  bool deterministic;
  int64_t B, N, H;
  int K, Kp, D;
  int R, DT;                 // rows per item, D columns staged per step (multiples of 4)
  int64_t row_tiles;
};

template <class T>
struct RespBwdSmem {
  T *gam, *ds, *x, *lam, *mu, *rowdot;
  __host__ __device__ RespBwdSmem(Carver& c, int Kp, int R, int DT) {
    gam = c.take<T>((size_t)R * (Kp + 1));
    ds = c.take<T>((size_t)R * (Kp + 1));
    x = c.take<T>((size_t)R * DT);
    lam = c.take<T>((size_t)Kp * DT);
    mu = c.take<T>((size_t)Kp * DT);
    rowdot = c.take<T>(R);
  }
};

template <class T>
__device__ __forceinline__ void add_to_slot(T* dst, T v, bool deterministic) {
  if (deterministic)
    *dst += v;  // the slot belongs to this block alone
  else
    atomicAdd(dst, v);
}

template <class S, class T>
__global__ void __launch_bounds__(kThreads) responsibilities_bwd_kernel(const RespBwdParams<S, T> p) {
  GMA_DYNAMIC_SMEM(smem_raw);
  Carver carver{reinterpret_cast<uintptr_t>(smem_raw)};
  const int K = p.K, Kp = p.Kp, D = p.D, R = p.R, DT = p.DT, GLD = p.Kp + 1;
  RespBwdSmem<T> sm(carver, Kp, R, DT);
  const int tid = threadIdx.x;
  const int group = blockIdx.x % p.groups;
  const int path = (blockIdx.x / p.groups) % 2;
  const int64_t h = blockIdx.x / (2 * p.groups);
  const DView<const S> x = p.x[path];
  const DView<const T> gamma = p.gamma[path];
  const T* dgamma = p.dgamma[path];
  const DView<S> dx = p.dx[path];
  T* slot = p.deterministic ? p.slots + ((h * 2 + path) * p.groups + group) * p.slot_size
                            : p.slots + h * p.slot_size;
  T* T0 = slot;
  T* T1 = slot + K;
  T* T2 = slot + K + (int64_t)K * D;
  // Work units of one D step: dx micro-tiles (4 rows x 4 columns, summing over k) first, then
  // T1/T2 micro-tiles (4 components x 4 columns, summing over rows).
  const int tiles_d = DT / kMicro;
  const int dx_tiles = (R / kMicro) * tiles_d;
  const int units = dx_tiles + (Kp / kMicro) * tiles_d;

  const int64_t items = p.B * p.row_tiles;
  for (int64_t item = group; item < items; item += p.groups) {
    const int64_t b = item / p.row_tiles;
    const int64_t n0 = (item % p.row_tiles) * R;
    const int rows = (int)(p.N - n0 < R ? p.N - n0 : R);
    const int64_t row_base = (b * p.H + h) * p.N;  // [B*H][N] row index of n = 0
    for (int idx = tid; idx < R * Kp; idx += kThreads) {
      const int r = idx / Kp, k = idx % Kp;
      T gm = T(0), dg = T(0);
      if (r < rows && k < K) {
        gm = gamma(b, h, n0 + r, k);
        const T* src = dgamma + (row_base + n0 + r) * K + k;
        for (int s = 0; s < p.nslices; ++s) dg += src[s * p.slice_stride];  // fixed order
      }
      sm.gam[r * GLD + k] = gm;
      sm.ds[r * GLD + k] = dg;
    }
    __syncthreads();
    for (int r = tid; r < R; r += kThreads) {
      T dot = T(0);
      for (int k = 0; k < K; ++k) dot += sm.gam[r * GLD + k] * sm.ds[r * GLD + k];
      sm.rowdot[r] = dot;
    }
    __syncthreads();
    for (int idx = tid; idx < R * Kp; idx += kThreads) {
      const int r = idx / Kp, k = idx % Kp;
      sm.ds[r * GLD + k] = sm.gam[r * GLD + k] * (sm.ds[r * GLD + k] - sm.rowdot[r]);  // padding stays 0
    }
    __syncthreads();
    for (int k = tid; k < K; k += kThreads) {
      T t0 = T(0);
      for (int r = 0; r < rows; ++r) t0 += sm.ds[r * GLD + k];
      add_to_slot(T0 + k, t0, p.deterministic);
    }
    for (int d0 = 0; d0 < D; d0 += DT) {
      const int dcols = D - d0 < DT ? D - d0 : DT;
      for (int idx = tid; idx < R * DT; idx += kThreads) {
        const int r = idx / DT, c = idx % DT;
        sm.x[idx] = (r < rows && c < dcols) ? to_acc<T>(x(b, n0 + r, h, d0 + c)) : T(0);
      }
      for (int idx = tid; idx < Kp * DT; idx += kThreads) {
        const int k = idx / DT, c = idx % DT;
        const bool ok = c < dcols && k < K;
        sm.lam[idx] = ok ? p.lam[(h * K + k) * D + d0 + c] : T(0);
        sm.mu[idx] = ok ? p.mu_c[(h * K + k) * D + d0 + c] : T(0);
      }
      __syncthreads();
      for (int t = tid; t < units; t += kThreads) {
        if (t < dx_tiles) {
          // dx[r, d] = -sum_k ds[r, k] lam[k, d] (x[r, d] - mu[k, d])
          const int r0 = (t / tiles_d) * kMicro, cq = t % tiles_d;
          T xv[kMicro][kMicro], acc[kMicro][kMicro];
#pragma unroll
          for (int i = 0; i < kMicro; ++i)
#pragma unroll
            for (int j = 0; j < kMicro; ++j) {
              xv[i][j] = sm.x[(r0 + i) * DT + cq + j * tiles_d];
              acc[i][j] = T(0);
            }
#pragma unroll 2
          for (int k = 0; k < K; ++k) {
            T dv[kMicro], lv[kMicro], mv[kMicro];
#pragma unroll
            for (int i = 0; i < kMicro; ++i) dv[i] = sm.ds[(r0 + i) * GLD + k];
#pragma unroll
            for (int j = 0; j < kMicro; ++j) {
              lv[j] = sm.lam[k * DT + cq + j * tiles_d];
              mv[j] = sm.mu[k * DT + cq + j * tiles_d];
            }
#pragma unroll
            for (int i = 0; i < kMicro; ++i)
#pragma unroll
              for (int j = 0; j < kMicro; ++j) acc[i][j] += (dv[i] * lv[j]) * (xv[i][j] - mv[j]);
          }
#pragma unroll
          for (int i = 0; i < kMicro; ++i)
#pragma unroll
            for (int j = 0; j < kMicro; ++j) {
              const int r = r0 + i, c = cq + j * tiles_d;
              if (r < rows && c < dcols) store_as(dx(b, n0 + r, h, d0 + c), -acc[i][j]);
            }
        } else {
          // T1[k, d] += sum_r ds[r, k] (x[r, d] - mu[k, d]);  T2 likewise with the square
          const int u = t - dx_tiles;
          const int k0 = (u / tiles_d) * kMicro, cq = u % tiles_d;
          T mv[kMicro][kMicro], t1[kMicro][kMicro], t2[kMicro][kMicro];
#pragma unroll
          for (int i = 0; i < kMicro; ++i)
#pragma unroll
            for (int j = 0; j < kMicro; ++j) {
              mv[i][j] = sm.mu[(k0 + i) * DT + cq + j * tiles_d];
              t1[i][j] = T(0);
              t2[i][j] = T(0);
            }
#pragma unroll 2
          for (int r = 0; r < rows; ++r) {
            T wv[kMicro], xr[kMicro];
#pragma unroll
            for (int i = 0; i < kMicro; ++i) wv[i] = sm.ds[r * GLD + k0 + i];
#pragma unroll
            for (int j = 0; j < kMicro; ++j) xr[j] = sm.x[r * DT + cq + j * tiles_d];
#pragma unroll
            for (int i = 0; i < kMicro; ++i)
#pragma unroll
              for (int j = 0; j < kMicro; ++j) {
                const T diff = xr[j] - mv[i][j];
                const T wd = wv[i] * diff;
                t1[i][j] += wd;
                t2[i][j] += wd * diff;
              }
          }
#pragma unroll
          for (int i = 0; i < kMicro; ++i)
#pragma unroll
            for (int j = 0; j < kMicro; ++j) {
              const int k = k0 + i, c = cq + j * tiles_d;
              if (k < K && c < dcols) {
                add_to_slot(T1 + (int64_t)k * D + d0 + c, t1[i][j], p.deterministic);
                add_to_slot(T2 + (int64_t)k * D + d0 + c, t2[i][j], p.deterministic);
              }
            }
        }
      }
      __syncthreads();
    }
  }
}

// --------------------------------------------------------------------------------------------
// finalize_params: one block per head; sums the slots in a fixed order and applies
//   dmu = lam T1,  dsigma2 = -0.5 (lam T0 - lam^2 T2),  domega = dsigma2 sigmoid(omega),
//   dalpha = T0 - softmax(alpha) sum_k T0.
// --------------------------------------------------------------------------------------------

template <class T>
struct FinalizeParams {
  const T* slots;
  int64_t slot_size;
  int slots_per_head;
  DView<const T> omega, alpha;
  DView<T> dmu, domega, dalpha;
  int K, D;
  T sigma_eps;
};

template <class T>
__global__ void __launch_bounds__(kThreads) finalize_params_kernel(const FinalizeParams<T> p) {
  GMA_DYNAMIC_SMEM(smem_raw);
  T* T0 = reinterpret_cast<T*>(smem_raw);  // [K]
  T* stats = T0 + p.K;                     // max alpha, sum exp, total T0
  const int64_t h = blockIdx.x;
  const int K = p.K, D = p.D;
  const T* head_slots = p.slots + h * p.slots_per_head * p.slot_size;
  for (int k = threadIdx.x; k < K; k += kThreads) {
    T t0 = T(0);
    for (int s = 0; s < p.slots_per_head; ++s) t0 += head_slots[s * p.slot_size + k];
    T0[k] = t0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    T m = p.alpha(h, 0);
    for (int k = 1; k < K; ++k) m = p.alpha(h, k) > m ? p.alpha(h, k) : m;
    T sum = T(0), total = T(0);
    for (int k = 0; k < K; ++k) {
      sum += gexp(p.alpha(h, k) - m);
      total += T0[k];
    }
    stats[0] = m;
    stats[1] = sum;
    stats[2] = total;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < K; k += kThreads)
    p.dalpha(h, k) = T0[k] - gexp(p.alpha(h, k) - stats[0]) / stats[1] * stats[2];
  const int64_t KD = (int64_t)K * D;
  for (int idx = threadIdx.x; idx < K * D; idx += kThreads) {
    const int k = idx / D, d = idx % D;
    T t1 = T(0), t2 = T(0);
    for (int s = 0; s < p.slots_per_head; ++s) {
      t1 += head_slots[s * p.slot_size + K + idx];
      t2 += head_slots[s * p.slot_size + K + KD + idx];
    }
    const T om = p.omega(h, k, d);
    const T lam = T(1) / (softplus(om) + p.sigma_eps);
    p.dmu(h, k, d) = lam * t1;
    const T dsigma2 = T(-0.5) * lam * (T0[k] - lam * t2);
    p.domega(h, k, d) = dsigma2 * sigmoid(om);
  }
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

// One cudaMallocAsync carved into 256-byte aligned pieces.
class Workspace {
 public:
  explicit Workspace(cudaStream_t stream) : stream_(stream) {}
  ~Workspace() {
    try {
      free_async(base_, stream_);
    } catch (...) {
    }
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  // Reserve `count` elements; returns the offset (the pointer comes after allocate()).
  template <class E>
  size_t reserve(int64_t count) {
    const size_t off = size_;
    size_ += ((size_t)count * sizeof(E) + 255) & ~size_t(255);
    return off;
  }
  void allocate() { base_ = static_cast<unsigned char*>(malloc_async(size_, stream_)); }
  template <class E>
  E* at(size_t offset) const {
    return reinterpret_cast<E*>(base_ + offset);
  }

 private:
  cudaStream_t stream_;
  size_t size_ = 0;
  unsigned char* base_ = nullptr;
};

// Shared memory per block of each chunk kernel for a geometry.
template <class T, class Layout>
inline size_t smem_bytes(const ChunkGeometry& g) {
  Carver c;
  Layout layout(c, g);
  (void)layout;
  return c.offset + 128;
}

// Chooses chunk length C, slice width DvT (largest that fit the shared memory) and the number
// of segments P (enough blocks to fill the GPU at about two blocks per SM).
template <class T, class Layout>
inline ChunkGeometry choose_geometry(const Dims& d, const DeviceInfo& dev) {
  ChunkGeometry g;
  g.B = d.B;
  g.N = d.N;
  g.H = d.H;
  g.K = (int)d.K;
  g.Kp = round_up16(d.K);
  g.Dv = (int)d.Dv;
  const int64_t max_C = ceil_div(d.N, 16) * 16;  // 64 bits: N may be up to 2^31 - 1
  const int max_DvT = round_up16(d.Dv);
  static const int candidates[][2] = {{32, 64}, {32, 32}, {16, 64}, {16, 32}, {16, 16}};
  bool found = false;
  for (const auto& cand : candidates) {
    g.C = (int)std::min<int64_t>(cand[0], max_C);
    g.DvT = std::min(cand[1], max_DvT);
    if (smem_bytes<T, Layout>(g) <= (size_t)dev.max_smem_optin) {
      found = true;
      break;
    }
  }
  require(found, "K = " + std::to_string(d.K) + " needs more shared memory than this GPU has");
  g.nslices = (int)ceil_div(d.Dv, g.DvT);
  const int64_t nchunks = ceil_div(d.N, g.C);
  const int64_t base_blocks = d.B * d.H * g.nslices;
  const int64_t target_blocks = 2 * (int64_t)std::max(dev.sm_count, 1);
  int64_t P = std::max<int64_t>(1, std::min<int64_t>(nchunks, ceil_div(target_blocks, base_blocks)));
  const int64_t chunks_per_seg = ceil_div(nchunks, P);
  g.P = (int)ceil_div(nchunks, chunks_per_seg);  // no empty segments
  g.seg_len = chunks_per_seg * g.C;
  return g;
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

template <class T>
inline ScanParams<T> make_scan(T* S_seg, T* z_seg, const ChunkGeometry& g, ScanMode mode, const View& S_init,
                               const View& z_init, const View& S_out, const View& z_out) {
  ScanParams<T> sp;
  sp.S_seg = S_seg;
  sp.z_seg = z_seg;
  sp.B = g.B;
  sp.H = g.H;
  sp.K = g.K;
  sp.Dv = g.Dv;
  sp.P = g.P;
  sp.mode = mode;
  sp.S_init = make_view<const T>(S_init);
  sp.z_init = make_view<const T>(z_init);
  sp.S_out = make_view<T>(S_out);
  sp.z_out = make_view<T>(z_out);
  return sp;
}

template <class T>
inline void launch_prep(const View& mu, const View& omega, const View& alpha, const Dims& d, T sigma_eps, T* lam,
                        T* mu_c, T* logc, cudaStream_t stream) {
  PrepParams<T> pp;
  pp.mu = make_view<const T>(mu);
  pp.omega = make_view<const T>(omega);
  pp.alpha = make_view<const T>(alpha);
  pp.lam = lam;
  pp.mu_c = mu_c;
  pp.logc = logc;
  pp.H = (int)d.H;
  pp.K = (int)d.K;
  pp.D = (int)d.D;
  pp.sigma_eps = sigma_eps;
  launch("gmattn prep_params", prep_params_kernel<T>, grid_size(d.H, "prep_params"), kThreads, 128 + sizeof(T),
         stream, pp);
}

template <class S, class T>
inline void launch_responsibilities(const View& x, const View& mask, T* gamma_ptr, const View& gamma_view,
                                    const Dims& d, const DeviceInfo& dev, const T* lam, const T* mu_c,
                                    const T* logc, cudaStream_t stream) {
  RespParams<S, T> rp;
  rp.x = make_view<const S>(x);
  rp.mask = make_view<const uint8_t>(mask);
  if (gamma_view.present()) {
    rp.gamma = make_view<T>(gamma_view);
  } else {  // contiguous workspace (B, H, N, K)
    rp.gamma.p = gamma_ptr;
    rp.gamma.s3 = 1;
    rp.gamma.s2 = d.K;
    rp.gamma.s1 = d.N * d.K;
    rp.gamma.s0 = d.H * d.N * d.K;
  }
  rp.lam = lam;
  rp.mu_c = mu_c;
  rp.logc = logc;
  rp.N = d.N;
  rp.H = d.H;
  rp.K = (int)d.K;
  rp.Kp = round_up16(d.K);
  rp.D = (int)d.D;
  // Rows per block: as many as the micro-tiles cover, fewer if the shared memory is short.
  size_t smem = 0;
  for (rp.R = responsibility_rows(rp.Kp); rp.R >= kMicro; rp.R = rp.R / 2 / kMicro * kMicro) {
    Carver c;
    RespSmem<T> layout(c, rp.Kp, rp.R);
    (void)layout;
    smem = c.offset + 128;
    if (smem <= (size_t)dev.max_smem_optin) break;
  }
  require(rp.R >= kMicro, "K = " + std::to_string(d.K) + " needs more shared memory than this GPU has");
  rp.row_tiles = ceil_div(d.N, rp.R);
  launch("gmattn responsibilities", responsibilities_kernel<S, T>,
         grid_size(d.B * d.H * rp.row_tiles, "responsibilities"), kThreads, smem, stream, rp);
}

template <class S, class T, bool TC>
inline void launch_seg_state(const ChunkGeometry& g, DView<const T> G, const View& Y, const View& den, const T* w,
                             T* S_seg, T* z_seg, cudaStream_t stream) {
  SegStateParams<S, T> sp;
  sp.g = g;
  sp.G = G;
  sp.Y = make_view<const S>(Y);
  sp.den = make_view<const T>(den);
  sp.w = w;
  sp.S_seg = S_seg;
  sp.z_seg = z_seg;
  launch("gmattn seg_state", seg_state_kernel<S, T, TC>, grid_size(g.B * g.H * g.nslices * g.P, "seg_state"),
         kThreads, smem_bytes<T, SegStateSmem<T>>(g), stream, sp);
}

template <class T>
inline void launch_scan(const ScanParams<T>& sp, cudaStream_t stream) {
  const int64_t total = sp.B * sp.H * ((int64_t)sp.K * sp.Dv + sp.K);
  launch("gmattn state_scan", state_scan_kernel<T>, grid_size(ceil_div(total, kThreads), "state_scan"), kThreads,
         0, stream, sp);
}

// A contiguous (B, H, N, K) device view over a workspace pointer or the caller's tensor.
template <class T>
inline DView<const T> responsibilities_view(const View& saved, const T* ws, const Dims& d) {
  if (saved.present()) return make_view<const T>(saved);
  DView<const T> v;
  v.p = ws;
  v.s3 = 1;
  v.s2 = d.K;
  v.s1 = d.N * d.K;
  v.s0 = d.H * d.N * d.K;
  return v;
}

template <class S>
void forward_impl(const ForwardArgs& a) {
  using T = typename AccumulatorOf<S>::type;
  constexpr bool TC = kUseTensorCores<S>;
  const Dims& d = a.dims;
  const bool causal = a.opt.causal;
  cudaStream_t stream = static_cast<cudaStream_t>(a.opt.stream);
  const DeviceInfo dev = device_info();
  const ChunkGeometry g = choose_geometry<T, FwdChunkSmem<T>>(d, dev);
  const bool save = a.gq.present();
  // Causal with one segment per (b, h) streams the state from S0; otherwise segment states
  // (causal) or the total state (bidirectional) are computed first.
  const bool need_seg = !causal || g.P > 1;

  Workspace ws(stream);
  const size_t o_lam = ws.reserve<T>(d.H * d.K * d.D);
  const size_t o_mu = ws.reserve<T>(d.H * d.K * d.D);
  const size_t o_logc = ws.reserve<T>(d.H * d.K);
  const int64_t bhnk = d.B * d.H * d.N * d.K;
  const size_t o_gq = save ? 0 : ws.reserve<T>(bhnk);
  const size_t o_gk = save ? 0 : ws.reserve<T>(bhnk);
  const int64_t seg_count = need_seg ? d.B * d.H * g.P : 0;
  const size_t o_Sseg = ws.reserve<T>(seg_count * d.K * d.Dv);
  const size_t o_zseg = ws.reserve<T>(seg_count * d.K);
  ws.allocate();
  T* lam = ws.at<T>(o_lam);
  T* mu_c = ws.at<T>(o_mu);
  T* logc = ws.at<T>(o_logc);
  T* gq_ws = save ? nullptr : ws.at<T>(o_gq);
  T* gk_ws = save ? nullptr : ws.at<T>(o_gk);
  T* S_seg = ws.at<T>(o_Sseg);
  T* z_seg = ws.at<T>(o_zseg);

  launch_prep<T>(a.mu, a.omega, a.alpha, d, (T)a.opt.sigma_eps, lam, mu_c, logc, stream);
  launch_responsibilities<S, T>(a.q, View{}, gq_ws, a.gq, d, dev, lam, mu_c, logc, stream);
  launch_responsibilities<S, T>(a.k, a.mask, gk_ws, a.gk, d, dev, lam, mu_c, logc, stream);
  const DView<const T> gq = responsibilities_view<T>(a.gq, gq_ws, d);
  const DView<const T> gk = responsibilities_view<T>(a.gk, gk_ws, d);

  if (need_seg) {
    launch_seg_state<S, T, TC>(g, gk, a.v, View{}, nullptr, S_seg, z_seg, stream);
    launch_scan(make_scan<T>(S_seg, z_seg, g, causal ? kExclusivePrefix : kTotal, a.S0, a.z0, a.S_final, a.z_final),
                stream);
  }

  FwdChunkParams<S, T> fp;
  fp.g = g;
  fp.gq = gq;
  fp.gk = gk;
  fp.v = make_view<const S>(a.v);
  fp.out = make_view<S>(a.out);
  fp.den = make_view<T>(a.den);
  fp.init = need_seg ? state_ref_from_workspace<T>(S_seg, z_seg, d.H, g.P, d.K, d.Dv, causal)
                     : state_ref_from_views<T>(a.S0, a.z0);
  fp.write_final = !need_seg;
  fp.S_final = make_view<T>(a.S_final);
  fp.z_final = make_view<T>(a.z_final);
  fp.eps = (T)a.opt.eps;
  const unsigned blocks = grid_size(d.B * d.H * g.nslices * g.P, "forward_chunk");
  const size_t smem = smem_bytes<T, FwdChunkSmem<T>>(g);
  if (causal)
    launch("gmattn forward_chunk", forward_chunk_kernel<S, T, true, TC>, blocks, kThreads, smem, stream, fp);
  else
    launch("gmattn forward_chunk", forward_chunk_kernel<S, T, false, TC>, blocks, kThreads, smem, stream, fp);
}

template <class S>
void backward_impl(const BackwardArgs& a) {
  using T = typename AccumulatorOf<S>::type;
  constexpr bool TC = kUseTensorCores<S>;
  const Dims& d = a.dims;
  const bool causal = a.opt.causal;
  cudaStream_t stream = static_cast<cudaStream_t>(a.opt.stream);
  const DeviceInfo dev = device_info();
  const ChunkGeometry g = choose_geometry<T, BwdChunkSmem<T>>(d, dev);
  const bool need_seg = !causal || g.P > 1;

  // Row tile and D step of responsibilities_bwd: the largest that fit the shared memory.
  const int Kp = round_up16(d.K);
  int R = 0, DT = 0;
  {
    const int rows_max = std::min(64, responsibility_rows(Kp));
    static const int dts[] = {32, 16, 8};
    for (int rows = rows_max; rows >= kMicro && R == 0; rows = rows / 2 / kMicro * kMicro)
      for (int dt : dts) {
        Carver c;
        RespBwdSmem<T> layout(c, Kp, rows, dt);
        (void)layout;
        if (c.offset + 128 <= (size_t)dev.max_smem_optin) {
          R = rows;
          DT = dt;
          break;
        }
      }
  }
  require(R > 0, "K = " + std::to_string(d.K) + " needs more shared memory than this GPU has");
  const int64_t row_tiles = ceil_div(d.N, R);
  const int groups = (int)std::max<int64_t>(
      1, std::min<int64_t>(d.B * row_tiles, ceil_div(std::max(dev.sm_count, 1), d.H)));
  const int slots_per_head = a.opt.deterministic ? 2 * groups : 1;
  const int64_t slot_size = d.K + 2 * d.K * d.D;

  Workspace ws(stream);
  const size_t o_lam = ws.reserve<T>(d.H * d.K * d.D);
  const size_t o_mu = ws.reserve<T>(d.H * d.K * d.D);
  const size_t o_logc = ws.reserve<T>(d.H * d.K);
  const size_t o_dden = ws.reserve<T>(d.B * d.H * d.N);
  const int64_t seg_count = need_seg ? d.B * d.H * g.P : 0;
  const size_t o_fS = ws.reserve<T>(seg_count * d.K * d.Dv);
  const size_t o_fz = ws.reserve<T>(seg_count * d.K);
  const size_t o_bS = ws.reserve<T>(seg_count * d.K * d.Dv);
  const size_t o_bz = ws.reserve<T>(seg_count * d.K);
  const int64_t slice_stride = d.B * d.H * d.N * d.K;
  const size_t o_dGq = ws.reserve<T>(g.nslices * slice_stride);
  const size_t o_dGk = ws.reserve<T>(g.nslices * slice_stride);
  const int64_t slots_elems = d.H * slots_per_head * slot_size;
  const size_t o_slots = ws.reserve<T>(slots_elems);
  ws.allocate();
  T* lam = ws.at<T>(o_lam);
  T* mu_c = ws.at<T>(o_mu);
  T* logc = ws.at<T>(o_logc);
  T* dden = ws.at<T>(o_dden);
  T* fS = ws.at<T>(o_fS);
  T* fz = ws.at<T>(o_fz);
  T* bS = ws.at<T>(o_bS);
  T* bz = ws.at<T>(o_bz);
  T* dGq = ws.at<T>(o_dGq);
  T* dGk = ws.at<T>(o_dGk);
  T* slots = ws.at<T>(o_slots);

  launch_prep<T>(a.mu, a.omega, a.alpha, d, (T)a.opt.sigma_eps, lam, mu_c, logc, stream);

  DdenParams<S, T> dp;
  dp.dout = make_view<const S>(a.dout);
  dp.out = make_view<const S>(a.out);
  dp.den = make_view<const T>(a.den);
  dp.dden = dden;
  dp.B = d.B;
  dp.N = d.N;
  dp.H = d.H;
  dp.Dv = (int)d.Dv;
  launch("gmattn dden", dden_kernel<S, T>, grid_size(ceil_div(d.B * d.H * d.N, kThreads), "dden"), kThreads, 0,
         stream, dp);

  const DView<const T> gq = make_view<const T>(a.gq);
  const DView<const T> gk = make_view<const T>(a.gk);
  if (need_seg) {
    launch_seg_state<S, T, TC>(g, gk, a.v, View{}, nullptr, fS, fz, stream);
    launch_scan(make_scan<T>(fS, fz, g, causal ? kExclusivePrefix : kTotal, a.S0, a.z0, View{}, View{}), stream);
    launch_seg_state<S, T, TC>(g, gq, a.dout, a.den, dden, bS, bz, stream);
    launch_scan(make_scan<T>(bS, bz, g, causal ? kExclusiveSuffix : kTotal, a.dS_final, a.dz_final, a.dS0, a.dz0),
                stream);
  }

  BwdChunkParams<S, T> bp;
  bp.g = g;
  bp.gq = gq;
  bp.gk = gk;
  bp.den = make_view<const T>(a.den);
  bp.v = make_view<const S>(a.v);
  bp.dout = make_view<const S>(a.dout);
  bp.dden = dden;
  bp.fwd_init = need_seg ? state_ref_from_workspace<T>(fS, fz, d.H, g.P, d.K, d.Dv, causal)
                         : state_ref_from_views<T>(a.S0, a.z0);
  bp.bwd_init = need_seg ? state_ref_from_workspace<T>(bS, bz, d.H, g.P, d.K, d.Dv, causal)
                         : state_ref_from_views<T>(a.dS_final, a.dz_final);
  bp.dGq = dGq;
  bp.dGk = dGk;
  bp.slice_stride = slice_stride;
  bp.dv = make_view<S>(a.dv);
  bp.dS0 = make_view<T>(a.dS0);
  bp.dz0 = make_view<T>(a.dz0);
  bp.write_final = !need_seg;
  const unsigned blocks = grid_size(d.B * d.H * g.nslices * g.P, "backward_chunk");
  const size_t smem = smem_bytes<T, BwdChunkSmem<T>>(g);
  if (causal)
    launch("gmattn backward_chunk", backward_chunk_kernel<S, T, true, TC>, blocks, kThreads, smem, stream, bp);
  else
    launch("gmattn backward_chunk", backward_chunk_kernel<S, T, false, TC>, blocks, kThreads, smem, stream, bp);

  memset_async(slots, 0, (size_t)slots_elems * sizeof(T), stream);
  RespBwdParams<S, T> rb;
  rb.x[0] = make_view<const S>(a.q);
  rb.x[1] = make_view<const S>(a.k);
  rb.gamma[0] = gq;
  rb.gamma[1] = gk;
  rb.dgamma[0] = dGq;
  rb.dgamma[1] = dGk;
  rb.dx[0] = make_view<S>(a.dq);
  rb.dx[1] = make_view<S>(a.dk);
  rb.nslices = g.nslices;
  rb.slice_stride = slice_stride;
  rb.lam = lam;
  rb.mu_c = mu_c;
  rb.slots = slots;
  rb.slot_size = slot_size;
  rb.groups = groups;
  rb.deterministic = a.opt.deterministic;
  rb.B = d.B;
  rb.N = d.N;
  rb.H = d.H;
  rb.K = (int)d.K;
  rb.Kp = Kp;
  rb.D = (int)d.D;
  rb.R = R;
  rb.DT = DT;
  rb.row_tiles = row_tiles;
  {
    Carver c;
    RespBwdSmem<T> layout(c, Kp, R, DT);
    (void)layout;
    launch("gmattn responsibilities_bwd", responsibilities_bwd_kernel<S, T>,
           grid_size(d.H * 2 * groups, "responsibilities_bwd"), kThreads, c.offset + 128, stream, rb);
  }

  FinalizeParams<T> fin;
  fin.slots = slots;
  fin.slot_size = slot_size;
  fin.slots_per_head = slots_per_head;
  fin.omega = make_view<const T>(a.omega);
  fin.alpha = make_view<const T>(a.alpha);
  fin.dmu = make_view<T>(a.dmu);
  fin.domega = make_view<T>(a.domega);
  fin.dalpha = make_view<T>(a.dalpha);
  fin.K = (int)d.K;
  fin.D = (int)d.D;
  fin.sigma_eps = (T)a.opt.sigma_eps;
  launch("gmattn finalize_params", finalize_params_kernel<T>, grid_size(d.H, "finalize_params"), kThreads,
         (size_t)(d.K + 3) * sizeof(T) + 128, stream, fin);
}

// Validation shared by the entry points (the bindings validate first; this is the last line
// of defence against out-of-bounds writes).
inline void validate(const ForwardArgs& a) {
  const Dims& d = a.dims;
  check_sizes(d);
  check_view(a.q, "q", {d.B, d.N, d.H, d.D});
  check_view(a.k, "k", {d.B, d.N, d.H, d.D});
  check_view(a.v, "v", {d.B, d.N, d.H, d.Dv});
  check_view(a.mu, "mu", {d.H, d.K, d.D});
  check_view(a.omega, "omega", {d.H, d.K, d.D});
  check_view(a.alpha, "alpha", {d.H, d.K});
  check_optional_view(a.mask, "mask", {d.B, d.N});
  check_optional_view(a.S0, "S0", {d.B, d.H, d.K, d.Dv});
  check_optional_view(a.z0, "z0", {d.B, d.H, d.K});
  check_view(a.out, "out", {d.B, d.N, d.H, d.Dv});
  check_optional_view(a.S_final, "S_final", {d.B, d.H, d.K, d.Dv});
  check_optional_view(a.z_final, "z_final", {d.B, d.H, d.K});
  if (a.gq.present() || a.gk.present() || a.den.present()) {
    check_view(a.gq, "gq", {d.B, d.H, d.N, d.K});
    check_view(a.gk, "gk", {d.B, d.H, d.N, d.K});
    check_view(a.den, "den", {d.B, d.H, d.N});
  }
}

inline void validate(const BackwardArgs& a) {
  const Dims& d = a.dims;
  check_sizes(d);
  check_view(a.q, "q", {d.B, d.N, d.H, d.D});
  check_view(a.k, "k", {d.B, d.N, d.H, d.D});
  check_view(a.v, "v", {d.B, d.N, d.H, d.Dv});
  check_view(a.mu, "mu", {d.H, d.K, d.D});
  check_view(a.omega, "omega", {d.H, d.K, d.D});
  check_view(a.alpha, "alpha", {d.H, d.K});
  check_optional_view(a.mask, "mask", {d.B, d.N});
  check_optional_view(a.S0, "S0", {d.B, d.H, d.K, d.Dv});
  check_optional_view(a.z0, "z0", {d.B, d.H, d.K});
  check_view(a.out, "out", {d.B, d.N, d.H, d.Dv});
  check_view(a.gq, "gq", {d.B, d.H, d.N, d.K});
  check_view(a.gk, "gk", {d.B, d.H, d.N, d.K});
  check_view(a.den, "den", {d.B, d.H, d.N});
  check_view(a.dout, "dout", {d.B, d.N, d.H, d.Dv});
  check_optional_view(a.dS_final, "dS_final", {d.B, d.H, d.K, d.Dv});
  check_optional_view(a.dz_final, "dz_final", {d.B, d.H, d.K});
  check_view(a.dq, "dq", {d.B, d.N, d.H, d.D});
  check_view(a.dk, "dk", {d.B, d.N, d.H, d.D});
  check_view(a.dv, "dv", {d.B, d.N, d.H, d.Dv});
  check_view(a.dmu, "dmu", {d.H, d.K, d.D});
  check_view(a.domega, "domega", {d.H, d.K, d.D});
  check_view(a.dalpha, "dalpha", {d.H, d.K});
  check_optional_view(a.dS0, "dS0", {d.B, d.H, d.K, d.Dv});
  check_optional_view(a.dz0, "dz0", {d.B, d.H, d.K});
}

}  // namespace cuda_impl
}  // namespace gmattn
