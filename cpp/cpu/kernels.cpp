// CPU kernels for Gaussian Mixture Attention (DESIGN.md section 1), compiled once per
// instruction set into namespace gmattn::cpu::GMATTN_ISA; dispatch.cpp picks one at run time.
//
// Work is split over (batch, head) pairs with OpenMP. Each pair walks its sequence in chunks of
// kChunk rows: a chunk is gathered (any strides, any storage dtype) into contiguous accumulator
// buffers, all arithmetic runs there on small dense products, results are scattered back. The
// causal state (S, z) is carried across chunks; the backward pass recomputes what it needs from
// the saved responsibilities with one forward scan (dq) and one reverse scan (dk, dv).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "gmattn/gmattn.h"
#include "numeric.h"
#include "small_gemm.h"

#ifndef GMATTN_ISA
#define GMATTN_ISA generic
#endif

namespace gmattn {
namespace cpu {
namespace GMATTN_ISA {

using namespace cpu_detail;

constexpr int64_t kChunk = 64;

// ---------------------------------------------------------------------------------------------
// Strided access

template <class T>
inline T* at(const View& v, int64_t i0, int64_t i1, int64_t i2 = 0, int64_t i3 = 0) {
  return static_cast<T*>(v.data) + i0 * v.stride[0] + i1 * v.stride[1] + i2 * v.stride[2] + i3 * v.stride[3];
}

// dst[r * cols + c] = x[b, row0 + r, h, c] for a (B, N, H, cols) view of storage type T.
template <class T, class Acc>
void gather_rows(const View& x, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t cols, Acc* dst) {
  const int64_t sc = x.stride[3];
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = at<const T>(x, b, row0 + r, h);
    Acc* d = dst + r * cols;
    if (sc == 1) {
      for (int64_t c = 0; c < cols; ++c) d[c] = load_as<Acc>(src[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = load_as<Acc>(src[c * sc]);
    }
  }
}

template <class T, class Acc>
void scatter_rows(const View& y, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t cols, const Acc* src) {
  const int64_t sc = y.stride[3];
  for (int64_t r = 0; r < rows; ++r) {
    T* d = at<T>(y, b, row0 + r, h);
    const Acc* s = src + r * cols;
    for (int64_t c = 0; c < cols; ++c) d[c * sc] = store_as<T>(s[c]);
  }
}

// A (B, H, rows, cols) accumulator-typed view: copy rows [row0, row0+rows) of (b, h) in or out.
template <class Acc>
void read_saved(const View& x, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t cols, Acc* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const Acc* src = at<const Acc>(x, b, h, row0 + r);
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = src[c * x.stride[3]];
  }
}
template <class Acc>
void write_saved(const View& x, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t cols, const Acc* src) {
  for (int64_t r = 0; r < rows; ++r) {
    Acc* dst = at<Acc>(x, b, h, row0 + r);
    for (int64_t c = 0; c < cols; ++c) dst[c * x.stride[3]] = src[r * cols + c];
  }
}
// den is (B, H, N): three dimensions.
template <class Acc>
void read_den(const View& x, int64_t b, int64_t h, int64_t row0, int64_t rows, Acc* dst) {
  for (int64_t r = 0; r < rows; ++r) dst[r] = *at<const Acc>(x, b, h, row0 + r);
}
template <class Acc>
void write_den(const View& x, int64_t b, int64_t h, int64_t row0, int64_t rows, const Acc* src) {
  for (int64_t r = 0; r < rows; ++r) *at<Acc>(x, b, h, row0 + r) = src[r];
}

// State (B, H, K, Dv) / (B, H, K) in and out of a contiguous K x Dv / K buffer; an absent
// tensor reads as zeros (S and z are independent: autograd may hand a gradient for one only).
template <class Acc>
void read_state(const View& S, const View& z, int64_t b, int64_t h, int64_t K, int64_t Dv, Acc* S_buf, Acc* z_buf) {
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t e = 0; e < Dv; ++e) S_buf[k * Dv + e] = S.present() ? *at<const Acc>(S, b, h, k, e) : Acc(0);
    z_buf[k] = z.present() ? *at<const Acc>(z, b, h, k) : Acc(0);
  }
}
template <class Acc>
void write_state(const View& S, const View& z, int64_t b, int64_t h, int64_t K, int64_t Dv, const Acc* S_buf,
                 const Acc* z_buf) {
  if (!S.present()) return;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t e = 0; e < Dv; ++e) *at<Acc>(S, b, h, k, e) = S_buf[k * Dv + e];
    *at<Acc>(z, b, h, k) = z_buf[k];
  }
}

// ---------------------------------------------------------------------------------------------
// Mixture parameters of one head, derived once per call.

template <class Acc>
struct Mixture {
  int64_t K = 0, D = 0;
  std::vector<Acc> mu, lam;      // K x D
  std::vector<Acc> muT, lamT;    // D x K, for the row-wise responsibility loop
  std::vector<Acc> log_norm;     // K: logpi - 0.5 sum_d log sigma2
  std::vector<Acc> pi;           // K: softmax(alpha)
  std::vector<Acc> dsigma2_domega;  // K x D: sigmoid(omega)

  void build(const View& mu_v, const View& omega_v, const View& alpha_v, int64_t h, int64_t K_, int64_t D_,
             double sigma_eps) {
    K = K_;
    D = D_;
    mu.resize(K * D);
    lam.resize(K * D);
    muT.resize(K * D);
    lamT.resize(K * D);
    log_norm.resize(K);
    pi.resize(K);
    dsigma2_domega.resize(K * D);
    Acc amax = -INFINITY;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, *at<const Acc>(alpha_v, h, k));
    Acc asum = 0;
    for (int64_t k = 0; k < K; ++k) asum += std::exp(*at<const Acc>(alpha_v, h, k) - amax);
    const Acc log_z = amax + std::log(asum);
    for (int64_t k = 0; k < K; ++k) {
      const Acc logpi = *at<const Acc>(alpha_v, h, k) - log_z;
      pi[k] = std::exp(logpi);
      Acc log_det = 0;
      for (int64_t d = 0; d < D; ++d) {
        const Acc w = *at<const Acc>(omega_v, h, k, d);
        const Acc sigma2 = softplus(w) + static_cast<Acc>(sigma_eps);
        const Acc m = *at<const Acc>(mu_v, h, k, d);
        mu[k * D + d] = m;
        lam[k * D + d] = Acc(1) / sigma2;
        muT[d * K + k] = m;
        lamT[d * K + k] = Acc(1) / sigma2;
        dsigma2_domega[k * D + d] = sigmoid(w);
        log_det += std::log(sigma2);
      }
      log_norm[k] = logpi - Acc(0.5) * log_det;
    }
  }

  // gamma (rows x K) = softmax_k of the log-densities of x (rows x D); rows whose keep[r] == 0
  // are zeroed (masked keys write nothing).
  void responsibilities(const Acc* x, int64_t rows, Acc* gamma, const uint8_t* keep) const {
    for (int64_t r = 0; r < rows; ++r) {
      Acc* s = gamma + r * K;
      if (keep && !keep[r]) {
        std::fill(s, s + K, Acc(0));
        continue;
      }
      std::fill(s, s + K, Acc(0));
      const Acc* xr = x + r * D;
      for (int64_t d = 0; d < D; ++d) {
        const Acc xd = xr[d];
        const Acc* lam_d = lamT.data() + d * K;
        const Acc* mu_d = muT.data() + d * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          const Acc diff = xd - mu_d[k];
          s[k] += lam_d[k] * diff * diff;
        }
      }
      Acc smax = -INFINITY;
      for (int64_t k = 0; k < K; ++k) {
        s[k] = log_norm[k] - Acc(0.5) * s[k];
        smax = std::max(smax, s[k]);
      }
      Acc total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t k = 0; k < K; ++k) {
        s[k] = exp_nonpositive(s[k] - smax);
        total += s[k];
      }
      const Acc inv = Acc(1) / total;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) s[k] *= inv;
    }
  }
};

// Per (b, h) sums from which the parameter gradients follow (summed over rows, both paths):
//   t1 = sum_i ds (x - mu), t2 = sum_i ds (x - mu)^2 (K x D), ds_sum = sum_i ds (K).
template <class Acc>
struct ParamSums {
  Acc* t1;
  Acc* t2;
  Acc* ds_sum;
};

// From ds (rows x K, the gradient of the log-densities) and x (rows x D): dx (rows x D), and the
// row sums of the parameter gradients, added to `sums`.
template <class Acc>
void density_backward(const Mixture<Acc>& mix, const Acc* x, const Acc* ds, int64_t rows, Acc* dx,
                      ParamSums<Acc> sums) {
  const int64_t K = mix.K, D = mix.D;
  for (int64_t r = 0; r < rows; ++r) {
    Acc* dxr = dx + r * D;
    std::fill(dxr, dxr + D, Acc(0));
    const Acc* xr = x + r * D;
    for (int64_t k = 0; k < K; ++k) {
      const Acc w = ds[r * K + k];
      if (w == Acc(0)) continue;
      sums.ds_sum[k] += w;
      const Acc* mu_k = mix.mu.data() + k * D;
      const Acc* lam_k = mix.lam.data() + k * D;
      Acc* t1 = sums.t1 + k * D;
      Acc* t2 = sums.t2 + k * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const Acc diff = xr[d] - mu_k[d];
        const Acc wd = w * diff;
        t1[d] += wd;
        t2[d] += wd * diff;
        dxr[d] -= wd * lam_k[d];
      }
    }
  }
}

// ds = gamma * (dgamma - sum_k gamma dgamma), in place over dgamma.
template <class Acc>
void softmax_backward(const Acc* gamma, Acc* dgamma, int64_t rows, int64_t K) {
  for (int64_t r = 0; r < rows; ++r) {
    const Acc* g = gamma + r * K;
    Acc* dg = dgamma + r * K;
    Acc dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t k = 0; k < K; ++k) dot += g[k] * dg[k];
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) dg[k] = g[k] * (dg[k] - dot);
  }
}

// Zero the strict upper triangle of a square n x n block with leading dimension ld.
template <class Acc>
void keep_lower(Acc* a, int64_t n, int64_t ld) {
  for (int64_t i = 0; i < n; ++i) std::fill(a + i * ld + i + 1, a + i * ld + n, Acc(0));
}

// z (K) += column sums of g (rows x K)
template <class Acc>
void add_column_sums(const Acc* g, int64_t rows, int64_t K, Acc* z) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) z[k] += g[r * K + k];
  }
}

// ---------------------------------------------------------------------------------------------
// Per-thread buffers, sized once per call (no allocation inside the chunk loops).

template <class Acc>
struct Workspace {
  Acc *xq, *xk, *v, *g, *o;            // C x D, C x D, C x Dv, C x Dv (dout), C x Dv (out)
  Acc *gq, *gk, *gkT, *gqT;            // C x K, C x K, K x C, K x C
  Acc *A, *Bm, *T;                     // C x C (affinity, read-gradient matrix, transposes)
  Acc *num, *dnum, *vT, *den, *dden;   // C x Dv, C x Dv, Dv x C, C, C
  Acc *dgq, *dgk, *dx;                 // C x K, C x K, C x max(D)
  Acc *S, *z, *ST, *dS, *dz, *dST;     // K x Dv, K, Dv x K, K x Dv, K, Dv x K
  std::vector<Acc> storage;

  Workspace(int64_t C, int64_t K, int64_t D, int64_t Dv) {
    const int64_t sizes[] = {C * D, C * D, C * Dv, C * Dv, C * Dv, C * K, C * K, K * C, K * C, C * C, C * C, C * C,
                             C * Dv, C * Dv, Dv * C, C, C, C * K, C * K, C * D, K * Dv, K, Dv * K, K * Dv, K, Dv * K};
    Acc** slots[] = {&xq, &xk, &v, &g, &o, &gq, &gk, &gkT, &gqT, &A, &Bm, &T, &num, &dnum, &vT, &den, &dden,
                     &dgq, &dgk, &dx, &S, &z, &ST, &dS, &dz, &dST};
    int64_t total = 0;
    for (int64_t s : sizes) total += (s + 15) / 16 * 16;  // keep each slot 64-byte aligned in float
    storage.assign(total, Acc(0));
    int64_t off = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); ++i) {
      *slots[i] = storage.data() + off;
      off += (sizes[i] + 15) / 16 * 16;
    }
  }
};

inline int thread_count(int requested, int64_t tasks) {
  int n = requested > 0 ? requested : omp_get_max_threads();
  if (n < 1) n = 1;
  if (tasks < n) n = static_cast<int>(tasks);
  return n;
}

template <class Acc>
std::vector<Mixture<Acc>> build_mixtures(const View& mu, const View& omega, const View& alpha, const Dims& d,
                                         double sigma_eps) {
  std::vector<Mixture<Acc>> mix(d.H);
  for (int64_t h = 0; h < d.H; ++h) mix[h].build(mu, omega, alpha, h, d.K, d.D, sigma_eps);
  return mix;
}

// keep[r] for rows [row0, row0+rows) of batch b; nullptr when there is no mask.
inline const uint8_t* mask_rows(const View& mask, int64_t b, int64_t row0, int64_t rows, uint8_t* buf) {
  if (!mask.present()) return nullptr;
  for (int64_t r = 0; r < rows; ++r) buf[r] = *at<const uint8_t>(mask, b, row0 + r) != 0;
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Forward

template <class T, class Acc>
void forward_pair(const ForwardArgs& a, const Mixture<Acc>& mix, int64_t b, int64_t h, Workspace<Acc>& w) {
  const Dims& d = a.dims;
  const int64_t N = d.N, K = d.K, D = d.D, Dv = d.Dv, C = kChunk;
  const Acc eps = static_cast<Acc>(a.opt.eps);
  const bool save = a.gq.present();
  uint8_t keep_buf[kChunk];
  read_state(a.S0, a.z0, b, h, K, Dv, w.S, w.z);

  // write: S += Gk^T V, z += Gk^T 1 for one chunk whose Gk is in w.gk and values in w.v
  auto write_state_chunk = [&](int64_t n) {
    transpose(n, K, w.gk, K, w.gkT, C);
    gemm(K, Dv, n, w.gkT, C, w.v, Dv, w.S, Dv, true);
    add_column_sums(w.gk, n, K, w.z);
  };
  // read: out = (Gq S [+ A V]) / (Gq z [+ rowsum A] + eps) for a chunk whose Gq is in w.gq
  auto read_out = [&](int64_t row0, int64_t n, bool intra) {
    gemm(n, Dv, K, w.gq, K, w.S, Dv, w.num, Dv, false);
    for (int64_t i = 0; i < n; ++i) {
      Acc den = 0;
      for (int64_t k = 0; k < K; ++k) den += w.gq[i * K + k] * w.z[k];
      if (intra) {
        for (int64_t j = 0; j <= i; ++j) den += w.A[i * C + j];
      }
      w.den[i] = den + eps;
    }
    if (intra) gemm(n, Dv, n, w.A, C, w.v, Dv, w.num, Dv, true);
    for (int64_t i = 0; i < n; ++i) {
      const Acc inv = Acc(1) / w.den[i];
      for (int64_t e = 0; e < Dv; ++e) w.num[i * Dv + e] *= inv;
    }
    scatter_rows<T>(a.out, b, h, row0, n, Dv, w.num);
    if (save) {
      write_saved(a.gq, b, h, row0, n, K, w.gq);
      write_den(a.den, b, h, row0, n, w.den);
    }
  };
  auto route_keys = [&](int64_t row0, int64_t n) {
    gather_rows<T>(a.k, b, h, row0, n, D, w.xk);
    gather_rows<T>(a.v, b, h, row0, n, Dv, w.v);
    mix.responsibilities(w.xk, n, w.gk, mask_rows(a.mask, b, row0, n, keep_buf));
    if (save) write_saved(a.gk, b, h, row0, n, K, w.gk);
  };
  auto route_queries = [&](int64_t row0, int64_t n) {
    gather_rows<T>(a.q, b, h, row0, n, D, w.xq);
    mix.responsibilities(w.xq, n, w.gq, nullptr);
  };

  if (a.opt.causal) {
    for (int64_t row0 = 0; row0 < N; row0 += C) {
      const int64_t n = std::min(C, N - row0);
      route_keys(row0, n);
      route_queries(row0, n);
      // intra-chunk affinity A = tril(Gq Gk^T)
      transpose(n, K, w.gk, K, w.gkT, C);
      gemm(n, n, K, w.gq, K, w.gkT, C, w.A, C, false);
      keep_lower(w.A, n, C);
      read_out(row0, n, true);
      write_state_chunk(n);
    }
  } else {
    for (int64_t row0 = 0; row0 < N; row0 += C) {
      const int64_t n = std::min(C, N - row0);
      route_keys(row0, n);
      write_state_chunk(n);
    }
    for (int64_t row0 = 0; row0 < N; row0 += C) {
      const int64_t n = std::min(C, N - row0);
      route_queries(row0, n);
      read_out(row0, n, false);
    }
  }
  write_state(a.S_final, a.z_final, b, h, K, Dv, w.S, w.z);
}

template <class T, class Acc>
void forward_typed(const ForwardArgs& a) {
  const Dims& d = a.dims;
  const auto mix = build_mixtures<Acc>(a.mu, a.omega, a.alpha, d, a.opt.sigma_eps);
  const int64_t pairs = d.B * d.H;
  const int nt = thread_count(a.opt.num_threads, pairs);
  std::vector<Workspace<Acc>> ws;
  ws.reserve(nt);
  for (int t = 0; t < nt; ++t) ws.emplace_back(kChunk, d.K, d.D, d.Dv);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t b = p / d.H, h = p % d.H;
    forward_pair<T, Acc>(a, mix[h], b, h, ws[omp_get_thread_num()]);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

template <class T, class Acc>
void backward_pair(const BackwardArgs& a, const Mixture<Acc>& mix, int64_t b, int64_t h, Workspace<Acc>& w,
                   ParamSums<Acc> sums) {
  const Dims& d = a.dims;
  const int64_t N = d.N, K = d.K, D = d.D, Dv = d.Dv, C = kChunk;

  // Loads saved Gq, Gk, den and the chunk's v, out, dout; forms dnum = g/den and
  // dden = -(g . out)/den.
  auto load_chunk = [&](int64_t row0, int64_t n) {
    read_saved(a.gq, b, h, row0, n, K, w.gq);
    read_saved(a.gk, b, h, row0, n, K, w.gk);
    read_den(a.den, b, h, row0, n, w.den);
    gather_rows<T>(a.v, b, h, row0, n, Dv, w.v);
    gather_rows<T>(a.out, b, h, row0, n, Dv, w.o);
    gather_rows<T>(a.dout, b, h, row0, n, Dv, w.g);
    for (int64_t i = 0; i < n; ++i) {
      const Acc inv = Acc(1) / w.den[i];
      Acc dot = 0;
      for (int64_t e = 0; e < Dv; ++e) {
        w.dnum[i * Dv + e] = w.g[i * Dv + e] * inv;
        dot += w.g[i * Dv + e] * w.o[i * Dv + e];
      }
      w.dden[i] = -dot * inv;
    }
  };
  // Queries: dGq -> ds (softmax backward) -> dq and parameter sums.
  auto finish_queries = [&](int64_t row0, int64_t n) {
    softmax_backward(w.gq, w.dgq, n, K);
    gather_rows<T>(a.q, b, h, row0, n, D, w.xq);
    density_backward(mix, w.xq, w.dgq, n, w.dx, sums);
    scatter_rows<T>(a.dq, b, h, row0, n, D, w.dx);
  };
  auto finish_keys = [&](int64_t row0, int64_t n) {
    softmax_backward(w.gk, w.dgk, n, K);  // masked rows have gk == 0, hence ds == 0
    gather_rows<T>(a.k, b, h, row0, n, D, w.xk);
    density_backward(mix, w.xk, w.dgk, n, w.dx, sums);
    scatter_rows<T>(a.dk, b, h, row0, n, D, w.dx);
  };
  // dGq += dnum S^T + dden z^T (state read by every query of the chunk)
  auto grad_queries_from_state = [&](int64_t n, bool accumulate) {
    transpose(K, Dv, w.S, Dv, w.ST, K);
    gemm(n, K, Dv, w.dnum, Dv, w.ST, K, w.dgq, K, accumulate);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t k = 0; k < K; ++k) w.dgq[i * K + k] += w.dden[i] * w.z[k];
    }
  };
  // dGk = V dS^T + dz, dv = Gk dS (the part through the state after the chunk)
  auto grad_keys_from_state = [&](int64_t n, bool accumulate) {
    transpose(K, Dv, w.dS, Dv, w.dST, K);
    gemm(n, K, Dv, w.v, Dv, w.dST, K, w.dgk, K, accumulate);
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t k = 0; k < K; ++k) w.dgk[j * K + k] += w.dz[k];
    }
    gemm(n, Dv, K, w.gk, K, w.dS, Dv, w.num, Dv, accumulate);
  };
  auto write_state_chunk = [&](int64_t n) {
    transpose(n, K, w.gk, K, w.gkT, C);
    gemm(K, Dv, n, w.gkT, C, w.v, Dv, w.S, Dv, true);
    add_column_sums(w.gk, n, K, w.z);
  };
  // dS += Gq^T dnum, dz += Gq^T dden
  auto accumulate_state_grad = [&](int64_t n) {
    transpose(n, K, w.gq, K, w.gqT, C);
    gemm(K, Dv, n, w.gqT, C, w.dnum, Dv, w.dS, Dv, true);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t k = 0; k < K; ++k) w.dz[k] += w.gq[i * K + k] * w.dden[i];
    }
  };
  // Bm = tril(dnum V^T + dden 1^T): Bm[i][j] = dL/dA[i][j], the gradient of the intra-chunk affinity
  auto affinity_grad = [&](int64_t n) {
    transpose(n, Dv, w.v, Dv, w.vT, C);
    gemm(n, n, Dv, w.dnum, Dv, w.vT, C, w.Bm, C, false);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j <= i; ++j) w.Bm[i * C + j] += w.dden[i];
    }
    keep_lower(w.Bm, n, C);
  };

  read_state(a.S0, a.z0, b, h, K, Dv, w.S, w.z);
  read_state(a.dS_final, a.dz_final, b, h, K, Dv, w.dS, w.dz);

  if (a.opt.causal) {
    // Forward scan: prefix state S, z before each chunk -> dGq -> dq.
    for (int64_t row0 = 0; row0 < N; row0 += C) {
      const int64_t n = std::min(C, N - row0);
      load_chunk(row0, n);
      affinity_grad(n);
      gemm(n, K, n, w.Bm, C, w.gk, K, w.dgq, K, false);  // intra-chunk: Bm Gk
      grad_queries_from_state(n, true);
      finish_queries(row0, n);
      write_state_chunk(n);
    }
    // Reverse scan: suffix gradient state dS, dz after each chunk -> dGk, dv -> dk.
    const int64_t last = ((N - 1) / C) * C;
    for (int64_t row0 = last; row0 >= 0; row0 -= C) {
      const int64_t n = std::min(C, N - row0);
      load_chunk(row0, n);
      affinity_grad(n);
      grad_keys_from_state(n, false);
      // intra-chunk: dGk += Bm^T Gq, dv += A^T dnum with A = tril(Gq Gk^T)
      transpose(n, n, w.Bm, C, w.T, C);
      gemm(n, K, n, w.T, C, w.gq, K, w.dgk, K, true);
      transpose(n, K, w.gk, K, w.gkT, C);
      gemm(n, n, K, w.gq, K, w.gkT, C, w.A, C, false);
      keep_lower(w.A, n, C);
      transpose(n, n, w.A, C, w.T, C);
      gemm(n, Dv, n, w.T, C, w.dnum, Dv, w.num, Dv, true);
      scatter_rows<T>(a.dv, b, h, row0, n, Dv, w.num);
      finish_keys(row0, n);
      accumulate_state_grad(n);
    }
  } else {
    // Totals: S, z (what every query read) and dS, dz (what every key's write received).
    for (int64_t row0 = 0; row0 < N; row0 += C) {
      const int64_t n = std::min(C, N - row0);
      load_chunk(row0, n);
      write_state_chunk(n);
      accumulate_state_grad(n);
    }
    for (int64_t row0 = 0; row0 < N; row0 += C) {
      const int64_t n = std::min(C, N - row0);
      load_chunk(row0, n);
      grad_queries_from_state(n, false);
      finish_queries(row0, n);
      grad_keys_from_state(n, false);
      scatter_rows<T>(a.dv, b, h, row0, n, Dv, w.num);
      finish_keys(row0, n);
    }
  }
  write_state(a.dS0, a.dz0, b, h, K, Dv, w.dS, w.dz);
}

template <class T, class Acc>
void backward_typed(const BackwardArgs& a) {
  const Dims& d = a.dims;
  const int64_t K = d.K, D = d.D, pairs = d.B * d.H;
  const auto mix = build_mixtures<Acc>(a.mu, a.omega, a.alpha, d, a.opt.sigma_eps);
  const int nt = thread_count(a.opt.num_threads, pairs);
  std::vector<Workspace<Acc>> ws;
  ws.reserve(nt);
  for (int t = 0; t < nt; ++t) ws.emplace_back(kChunk, d.K, d.D, d.Dv);
  // One slot of parameter sums per (b, h), reduced over b in a fixed order afterwards, so the
  // parameter gradients do not depend on which thread ran which pair.
  const int64_t slot = 2 * K * D + K;
  std::vector<Acc> partial(pairs * slot, Acc(0));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t b = p / d.H, h = p % d.H;
    Acc* base = partial.data() + p * slot;
    backward_pair<T, Acc>(a, mix[h], b, h, ws[omp_get_thread_num()], ParamSums<Acc>{base, base + K * D, base + 2 * K * D});
  }
  for (int64_t h = 0; h < d.H; ++h) {
    std::vector<Acc> total(slot, Acc(0));
    for (int64_t b = 0; b < d.B; ++b) {
      const Acc* src = partial.data() + (b * d.H + h) * slot;
      for (int64_t i = 0; i < slot; ++i) total[i] += src[i];
    }
    const Mixture<Acc>& m = mix[h];
    const Acc* t1 = total.data();
    const Acc* t2 = t1 + K * D;
    const Acc* ds_sum = t2 + K * D;
    Acc ds_all = 0;
    for (int64_t k = 0; k < K; ++k) ds_all += ds_sum[k];
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t e = 0; e < D; ++e) {
        const int64_t i = k * D + e;
        const Acc lam = m.lam[i];
        *at<Acc>(a.dmu, h, k, e) = lam * t1[i];
        const Acc dsigma2 = Acc(-0.5) * (lam * ds_sum[k] - lam * lam * t2[i]);
        *at<Acc>(a.domega, h, k, e) = dsigma2 * m.dsigma2_domega[i];
      }
      *at<Acc>(a.dalpha, h, k) = ds_sum[k] - m.pi[k] * ds_all;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points of this ISA build

void forward(const ForwardArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: forward_typed<float, float>(a); break;
    case DType::kFloat64: forward_typed<double, double>(a); break;
    case DType::kBFloat16: forward_typed<bf16_t, float>(a); break;
    case DType::kFloat16: forward_typed<f16_t, float>(a); break;
  }
}

void backward(const BackwardArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: backward_typed<float, float>(a); break;
    case DType::kFloat64: backward_typed<double, double>(a); break;
    case DType::kBFloat16: backward_typed<bf16_t, float>(a); break;
    case DType::kFloat16: backward_typed<f16_t, float>(a); break;
  }
}

}  // namespace GMATTN_ISA
}  // namespace cpu
}  // namespace gmattn
