// The mixture, per head: its set-up (prep_params: lam = 1/sigma2, the log-normaliser), the
// responsibilities of query and key rows (compute_responsibilities, used by the responsibilities
// kernel and by the chunk kernels of a forward that saves nothing), and their backward
// (responsibilities_bwd: softmax backward, dq / dk, partial parameter sums; finalize_params: the
// chain rule to mu, omega, alpha).
#pragma once

#include "common.cuh"

namespace gmattn {
namespace cuda_impl {

// --------------------------------------------------------------------------------------------
// prep_params: per head, lam = 1 / sigma2 (math::variance), a contiguous copy of mu, and
// logc[k] = log_softmax(alpha)[k] - 0.5 * sum_d log sigma2[k, d] (math::log_norm), formed in
// double and shifted by the head's largest before its rounding to T, as on the CPU. One block
// per head; shared memory: K + 1 doubles.
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
  double* log_norm = reinterpret_cast<double*>(smem_raw);  // [K] before the shift, then log_z
  const int64_t h = blockIdx.x;
  const int K = p.K, D = p.D;
  for (int idx = threadIdx.x; idx < K * D; idx += kThreads) {
    const int k = idx / D, d = idx % D;
    p.lam[(h * K + k) * D + d] = T(1) / math::variance(p.omega(h, k, d), p.sigma_eps);
    p.mu_c[(h * K + k) * D + d] = p.mu(h, k, d);
  }
  if (threadIdx.x == 0) log_norm[K] = math::log_sum_exp([&](int64_t k) { return double(p.alpha(h, k)); }, K);
  __syncthreads();
  for (int k = threadIdx.x; k < K; k += kThreads) {
    const double sum_log =
        math::sum_log([&](int64_t d) { return double(math::variance(p.omega(h, k, d), p.sigma_eps)); }, D);
    log_norm[k] = math::log_norm(double(p.alpha(h, k)) - log_norm[K], sum_log);
  }
  __syncthreads();
  double shift = log_norm[0];
  for (int k = 1; k < K; ++k) shift = shift < log_norm[k] ? log_norm[k] : shift;
  for (int k = threadIdx.x; k < K; k += kThreads) p.logc[h * K + k] = T(log_norm[k] - shift);
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

// Where responsibilities come from: the rows x (B, N, H, D) of one path, its optional key mask
// (B, N) and the mixture set up by prep_params.
template <class S, class T>
struct RespSource {
  DView<const S> x;            // (B, N, H, D)
  DView<const uint8_t> mask;   // (B, N) or p == nullptr
  const T* lam = nullptr;      // [H][K][D]
  const T* mu_c = nullptr;     // [H][K][D]
  const T* logc = nullptr;     // [H][K]
  int D = 0;
};

// Shared memory of compute_responsibilities for R rows and Kp (padded K) components.
template <class T>
struct RespScratch {
  T *x = nullptr, *lam = nullptr, *mu = nullptr, *inv_sum = nullptr;
  RespScratch() = default;
  __host__ __device__ RespScratch(Carver& c, int Kp, int R) {
    x = c.take<T>((size_t)R * (kRespDTile + 1));   // [R][DT+1]: rows in different banks
    lam = c.take<T>((size_t)kRespDTile * Kp);      // [DT][Kp]: components contiguous
    mu = c.take<T>((size_t)kRespDTile * Kp);
    inv_sum = c.take<T>(R);
  }
};

// Responsibilities of rows n0 .. n0 + rows - 1 of (b, h) into the shared tile G[R][ldG] (ldG >=
// Kp + 1): gamma for r < rows, k < K (zeros for masked rows), zeros in the padding (r >= rows or
// k >= K), which the chunk products rely on. R * Kp <= kThreads * kRespMaxTiles * kMicro^2.
// Every element is summed in the same order whatever R is, so a chunk kernel computing its own
// rows gets the same bits as responsibilities_kernel. All threads must call it; it ends with a
// barrier.
template <class S, class T>
__device__ void compute_responsibilities(const RespSource<S, T>& src, int64_t b, int64_t h, int64_t n0, int rows,
                                         int R, int K, int Kp, const RespScratch<T>& sc, T* G, int ldG) {
  const int tid = threadIdx.x;
  const int D = src.D;
  constexpr int DT = kRespDTile, XLD = kRespDTile + 1;
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
      sc.x[r * XLD + c] = (r < rows && c < dcols) ? to_acc<T>(src.x(b, n0 + r, h, d0 + c)) : T(0);
    }
    for (int idx = tid; idx < Kp * DT; idx += kThreads) {
      const int k = idx / DT, c = idx % DT;
      const bool ok = c < dcols && k < K;  // padding: lam = 0 contributes nothing
      sc.lam[c * Kp + k] = ok ? src.lam[(h * K + k) * D + d0 + c] : T(0);
      sc.mu[c * Kp + k] = ok ? src.mu_c[(h * K + k) * D + d0 + c] : T(0);
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
          for (int i = 0; i < kMicro; ++i) xv[i] = sc.x[(r0 + i) * XLD + c];
#pragma unroll
          for (int j = 0; j < kMicro; ++j) {
            lv[j] = sc.lam[c * Kp + kq + j * tiles_k];
            mv[j] = sc.mu[c * Kp + kq + j * tiles_k];
          }
#pragma unroll
          for (int i = 0; i < kMicro; ++i)
#pragma unroll
            for (int j = 0; j < kMicro; ++j) acc[u][i][j] += math::direct_term(lv[j], xv[i], mv[j]);
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
          if (k < K) G[(r0 + i) * ldG + k] = src.logc[h * K + k] - T(0.5) * acc[u][i][j];
        }
    }
  }
  __syncthreads();
  // Max-subtracted softmax over k, one thread per row.
  for (int r = tid; r < R; r += kThreads) {
    T* sr = G + r * ldG;
    T m = sr[0];
    for (int k = 1; k < K; ++k) m = sr[k] > m ? sr[k] : m;
    T sum = T(0);
    for (int k = 0; k < K; ++k) {
      const T e = math::exp_of(sr[k] - m);
      sr[k] = e;
      sum += e;
    }
    sc.inv_sum[r] = T(1) / sum;
  }
  __syncthreads();
  for (int idx = tid; idx < R * Kp; idx += kThreads) {
    const int r = idx / Kp, k = idx % Kp;
    const bool keep = r < rows && k < K && (src.mask.p == nullptr || src.mask(b, n0 + r) != 0);
    G[r * ldG + k] = keep ? G[r * ldG + k] * sc.inv_sum[r] : T(0);
  }
  __syncthreads();
}

template <class S, class T>
struct RespParams {
  RespSource<S, T> src;
  DView<T> gamma;                // (B, H, N, K)
  int64_t N, H;
  int K, Kp, R;
  int64_t row_tiles;
};

template <class T>
struct RespSmem {
  T* s;  // [R][Kp+1] responsibilities
  RespScratch<T> scratch;
  __host__ __device__ RespSmem(Carver& c, int Kp, int R)
      : s(c.take<T>((size_t)R * (Kp + 1))), scratch(c, Kp, R) {}
};

// responsibilities of a tile of R rows, written to gamma (B, H, N, K).
template <class S, class T>
__global__ void __launch_bounds__(kThreads) responsibilities_kernel(const RespParams<S, T> p) {
  GMA_DYNAMIC_SMEM(smem_raw);
  Carver carver{reinterpret_cast<uintptr_t>(smem_raw)};
  RespSmem<T> sm(carver, p.Kp, p.R);
  const int64_t tile = blockIdx.x % p.row_tiles;
  const int64_t bh = blockIdx.x / p.row_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t n0 = tile * p.R;
  const int rows = (int)(p.N - n0 < p.R ? p.N - n0 : p.R);
  compute_responsibilities(p.src, b, h, n0, rows, p.R, p.K, p.Kp, sm.scratch, sm.s, p.Kp + 1);
  for (int idx = threadIdx.x; idx < rows * p.K; idx += kThreads) {
    const int r = idx / p.K, k = idx % p.K;
    p.gamma(b, h, n0 + r, k) = sm.s[r * (p.Kp + 1) + k];
  }
}

// --------------------------------------------------------------------------------------------
// responsibilities_bwd: for the query (path 0) and key (path 1) responsibilities,
//   ds = gamma * (dgamma - sum_k gamma dgamma) (pivoted: math::softmax_backward_pivoted),
//   dx = -sum_k ds lam (x - mu)
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
  T* slots;                  // [H][slots_per_head][slot_size], then (deterministic) as many compensations
  int64_t slot_comp_offset;  // deterministic: from a slot value to its compensation
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
  T *gam, *ds, *x, *lam, *mu;
  __host__ __device__ RespBwdSmem(Carver& c, int Kp, int R, int DT) {
    gam = c.take<T>((size_t)R * (Kp + 1));
    ds = c.take<T>((size_t)R * (Kp + 1));
    x = c.take<T>((size_t)R * DT);
    lam = c.take<T>((size_t)Kp * DT);
    mu = c.take<T>((size_t)Kp * DT);
  }
};

// Deterministic: the slot belongs to this block alone and takes one addition per item, with
// compensation (dst[comp_offset]) as the CPU adds its parameter sums.
template <class T>
__device__ __forceinline__ void add_to_slot(T* dst, T v, bool deterministic, int64_t comp_offset) {
  if (deterministic)
    math::compensated_add(*dst, dst[comp_offset], v);
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
    // One thread per row, in place (padding columns stay 0; padding rows are all zero).
    for (int r = tid; r < R; r += kThreads) math::softmax_backward_pivoted(sm.gam + r * GLD, sm.ds + r * GLD, K);
    __syncthreads();
    for (int k = tid; k < K; k += kThreads) {
      T t0 = T(0);
      for (int r = 0; r < rows; ++r) t0 += sm.ds[r * GLD + k];
      add_to_slot(T0 + k, t0, p.deterministic, p.slot_comp_offset);
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
                add_to_slot(T1 + (int64_t)k * D + d0 + c, t1[i][j], p.deterministic, p.slot_comp_offset);
                add_to_slot(T2 + (int64_t)k * D + d0 + c, t2[i][j], p.deterministic, p.slot_comp_offset);
              }
            }
        }
      }
      __syncthreads();
    }
  }
}

// --------------------------------------------------------------------------------------------
// finalize_params: one block per head; sums the slots in a fixed order, compensated, and applies
// the chain rule (math::dmu_from_sums, domega_from_sums, dalpha_from_sums) with T0 = ds_sum.
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
  double* log_z = reinterpret_cast<double*>(smem_raw);     // log sum_k exp(alpha_k)
  T* T0 = reinterpret_cast<T*>(smem_raw + sizeof(double));  // [K]
  T* T0_all = T0 + p.K;                                     // sum_k T0
  const int64_t h = blockIdx.x;
  const int K = p.K, D = p.D;
  const T* head_slots = p.slots + h * p.slots_per_head * p.slot_size;
  // The sum over a head's slots, in slot order.
  auto slot_sum = [&](int64_t at) {
    T sum = T(0), comp = T(0);
    for (int s = 0; s < p.slots_per_head; ++s) math::compensated_add(sum, comp, head_slots[s * p.slot_size + at]);
    return sum;
  };
  for (int k = threadIdx.x; k < K; k += kThreads) T0[k] = slot_sum(k);
  __syncthreads();
  if (threadIdx.x == 0) {
    T total = T(0);
    for (int k = 0; k < K; ++k) total += T0[k];
    T0_all[0] = total;
    log_z[0] = math::log_sum_exp([&](int64_t k) { return double(p.alpha(h, k)); }, K);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < K; k += kThreads) {
    const T pi = T(math::exp_of(double(p.alpha(h, k)) - log_z[0]));
    p.dalpha(h, k) = math::dalpha_from_sums(T0[k], pi, T0_all[0]);
  }
  const int64_t KD = (int64_t)K * D;
  for (int idx = threadIdx.x; idx < K * D; idx += kThreads) {
    const int k = idx / D, d = idx % D;
    const T om = p.omega(h, k, d);
    const T lam = T(1) / math::variance(om, p.sigma_eps);
    p.dmu(h, k, d) = math::dmu_from_sums(lam, slot_sum(K + idx));
    p.domega(h, k, d) = math::domega_from_sums(lam, T0[k], slot_sum(K + KD + idx), math::sigmoid(om));
  }
}

// ============================================================================================
// Host side
// ============================================================================================

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
  launch("gmattn prep_params", prep_params_kernel<T>, grid_size(d.H, "prep_params"), kThreads,
         (d.K + 1) * sizeof(double), stream, pp);
}

template <class S, class T>
inline RespSource<S, T> resp_source(const View& x, const View& mask, const Dims& d, const T* lam, const T* mu_c,
                                    const T* logc) {
  RespSource<S, T> src;
  src.x = make_view<const S>(x);
  src.mask = make_view<const uint8_t>(mask);
  src.lam = lam;
  src.mu_c = mu_c;
  src.logc = logc;
  src.D = (int)d.D;
  return src;
}

// Writes the responsibilities of src to the caller's (B, H, N, K) tensor.
template <class S, class T>
inline void launch_responsibilities(const RespSource<S, T>& src, const View& gamma, const Dims& d,
                                    const DeviceInfo& dev, cudaStream_t stream) {
  RespParams<S, T> rp;
  rp.src = src;
  rp.gamma = make_view<T>(gamma);
  rp.N = d.N;
  rp.H = d.H;
  rp.K = (int)d.K;
  rp.Kp = round_up16(d.K);
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

}  // namespace cuda_impl
}  // namespace gmattn
