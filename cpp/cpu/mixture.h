// The mixture of each head: its parameters (Head), the responsibilities of a chunk's rows, and
// their backward (softmax backward, density backward, the chain rule to mu, omega, alpha).
//
// Responsibilities. s[i,k] = log_norm[k] - 0.5 Q[i,k], Q = sum_d lam (x - mu)^2, computed per
// chunk as Q = sum_d (a x' - b)^2 with a = sqrt(lam), x' = x - c (c: the chunk's mean), and
// b = a (mu - c): two fused multiply-adds per (row, component, dimension), the same count as the
// expanded quadratic form, but without its catastrophic cancellation. Its rounding error is about
// eps sqrt(Q B), B = sum_d lam x'^2 + 4 sum_d lam (mu - c)^2, against about eps Q for the direct
// form sum_d lam (x - mu)^2: the two agree unless x' and mu - c are large next to x - mu (data far
// from the chunk mean, or tight clusters far from the origin with tiny variances). A guard bounds
// B per row and component from row norms (B <= |x'|^2 max_d lam + 4 sum_d lam (mu - c)^2) and
// recomputes a row in the direct form, on the raw inputs, when a component that matters (within
// 64 nats of the row maximum) has B > 4 (Q + D): the centred form then stays within a small
// factor of the direct form's accuracy. Chunks whose bound already satisfies B <= 4 D skip the
// per-element check.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "rows.h"

namespace gmattn {
namespace cpu {
namespace GMATTN_ISA {  // (rows.h: the ISA name, and cpu_detail in scope)

#if GMATTN_VECTOR_BYTES >= 64
constexpr int kQuadMR = 4, kQuadNV = 4;  // responsibilities tile
constexpr int kDensKT = 4;               // components per pass of the density backward
#else
constexpr int kQuadMR = 4, kQuadNV = 2;
constexpr int kDensKT = 2;
#endif

// ---------------------------------------------------------------------------------------------
// Per-head parameters

template <class Acc>
struct Head {
  int64_t K = 0, D = 0, Kp = 0, Dp = 0;
  Buffer<Acc> aT, muT, lamT;  // Dp x Kp: sqrt(lam), mu, lam (transposed, zero padded)
  Buffer<Acc> mu, lam;        // K x Dp
  Buffer<Acc> ln0;            // Kp: logpi - 0.5 sum_d log sigma2; -inf on padding
  Buffer<Acc> lmax;           // Kp: max_d lam
  Acc lmax_all = 0;                // max_k lmax
  Buffer<Acc> pi;             // K: softmax(alpha)
  Buffer<Acc> dsigma2_domega; // K x D: sigmoid(omega)
  Buffer<Acc> omega, sigma2, sig;  // Dp: one row of omega, its variances and sigmoids (zero padded)
  Buffer<double> ln0d;             // K: ln0 before its shift

  // Sizes every buffer (zeroed): done for all heads before the parallel build (see working_memory.h).
  void allocate(const Shape& s) {
    K = s.K; D = s.D; Kp = s.Kp; Dp = s.Dp;
    aT.assign(Dp * Kp, Acc(0));
    muT.assign(Dp * Kp, Acc(0));
    lamT.assign(Dp * Kp, Acc(0));
    mu.assign(K * Dp, Acc(0));
    lam.assign(K * Dp, Acc(0));
    ln0.assign(Kp, -std::numeric_limits<Acc>::infinity());
    lmax.assign(Kp, Acc(0));
    pi.assign(K, Acc(0));
    dsigma2_domega.assign(K * D, Acc(0));
    omega.assign(Dp, Acc(0));
    sigma2.assign(Dp, Acc(0));
    sig.assign(Dp, Acc(0));
    ln0d.assign(K, 0.0);
  }

  // Head h's parameters, into the allocated buffers; allocates nothing.
  void build(const View& mu_v, const View& omega_v, const View& alpha_v, int64_t h, double sigma_eps) {
    // log_norm in double, shifted by its maximum (softmax is shift invariant): s = ln0 - Q / 2
    // then carries no large constant whose rounding would differ between components (with tiny
    // variances sum_d log sigma2 is ~ -10 D).
    const double log_z =
        math::log_sum_exp([&](int64_t k) { return static_cast<double>(*at<const Acc>(alpha_v, h, k)); }, K);
    // A row of omega at a time: softplus and sigmoid a vector at a time (the transcendentals
    // dominate the set-up), padding lanes zero.
    constexpr int W = Simd<Acc>::W;
    for (int64_t k = 0; k < K; ++k) {
      const double logpi = static_cast<double>(*at<const Acc>(alpha_v, h, k)) - log_z;
      pi[k] = static_cast<Acc>(std::exp(logpi));
      for (int64_t d = 0; d < D; ++d) omega[d] = *at<const Acc>(omega_v, h, k, d);
      for (int64_t d = 0; d < Dp; d += W) {
        VecT<Acc> sp, sg;
        softplus_sigmoid<Acc>(loadu(omega.data() + d), sp, sg);
        storeu(sigma2.data() + d, sp + static_cast<Acc>(sigma_eps));
        storeu(sig.data() + d, sg);
      }
      Acc lm = 0;
      for (int64_t d = 0; d < D; ++d) {
        const Acc m = *at<const Acc>(mu_v, h, k, d);
        const Acc l = Acc(1) / sigma2[d];
        mu[k * Dp + d] = m;
        lam[k * Dp + d] = l;
        muT[d * Kp + k] = m;
        lamT[d * Kp + k] = l;
        aT[d * Kp + k] = std::sqrt(l);
        dsigma2_domega[k * D + d] = sig[d];
        lm = std::max(lm, l);
      }
      ln0d[k] = math::log_norm(logpi, sum_log(sigma2.data(), D));
      lmax[k] = lm;
      lmax_all = std::max(lmax_all, lm);
    }
    const double shift = *std::max_element(ln0d.begin(), ln0d.end());
    for (int64_t k = 0; k < K; ++k) ln0[k] = static_cast<Acc>(ln0d[k] - shift);
  }

  // The chain rule from the head's summed parameter sums (ParamSums::size values: t1, t2 (K x Dp),
  // ds_sum (Kp); see density_backward) to its rows of dmu, domega (H, K, D) and dalpha (H, K).
  void write_parameter_gradients(const Acc* sums, int64_t h, const View& dmu, const View& domega,
                                 const View& dalpha) const {
    const Acc* t1 = sums;
    const Acc* t2 = t1 + K * Dp;
    const Acc* ds_sum = t2 + K * Dp;
    Acc ds_all = 0;
    for (int64_t k = 0; k < K; ++k) ds_all += ds_sum[k];
    for (int64_t k = 0; k < K; ++k) {
      // A row at a time through pointers and one stride each (a vector loop where the rows are
      // contiguous, the usual case): an N = 1 backward spent a third of its time here otherwise.
      Acc* dmu_row = at<Acc>(dmu, h, k);
      Acc* domega_row = at<Acc>(domega, h, k);
      const int64_t sm = dmu.stride[2], so = domega.stride[2];
      const Acc* l_row = lam.data() + k * Dp;
      const Acc* t1_row = t1 + k * Dp;
      const Acc* t2_row = t2 + k * Dp;
      const Acc* ds_row = dsigma2_domega.data() + k * D;
      const Acc dsk = ds_sum[k];
#pragma omp simd
      for (int64_t e = 0; e < D; ++e) {
        dmu_row[e * sm] = math::dmu_from_sums(l_row[e], t1_row[e]);
        domega_row[e * so] = math::domega_from_sums(l_row[e], dsk, t2_row[e], ds_row[e]);
      }
      *at<Acc>(dalpha, h, k) = math::dalpha_from_sums(ds_sum[k], pi[k], ds_all);
    }
  }
};

// The per-head mixture parameters (transcendentals for every (h, k, d): worth a parallel loop).
template <class Acc>
void build_heads(std::vector<Head<Acc>>& heads, const View& mu, const View& omega, const View& alpha, const Shape& s,
                 double sigma_eps, int nt) {
  const int64_t H = static_cast<int64_t>(heads.size());
  for (Head<Acc>& head : heads) head.allocate(s);
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(nt, H))) if (nt > 1)
  {
    const FlushSubnormals flush;  // (each thread's own setting)
#pragma omp for schedule(static, 1)
    for (int64_t h = 0; h < H; ++h) heads[h].build(mu, omega, alpha, h, sigma_eps);
  }
}

// Prepared mixtures, kept for later calls with the same parameters. Preparing the heads costs
// transcendentals for every (h, k, d) (about 0.6 ms for H = 8, K = D = 64 on one core): more than
// the whole work of a short call, and a decoding loop, or a backward after its forward, calls
// again with unchanged parameters. An entry keeps the parameters' values it was built from and is
// reused only when a call's mu, omega, alpha and sigma_eps are bit for bit the same (compared
// in full: a few microseconds, where the parameters were read anyway); where they live and how
// they were changed (in place or not) does not matter. At most kMixtureCacheEntries entries and
// kMixtureCacheBytes in all, the least recently used dropped first; a mixture larger than a
// quarter of that is built for its call only.
constexpr size_t kMixtureCacheEntries = 16;
constexpr size_t kMixtureCacheBytes = size_t(64) << 20;

// Whether view x of these sizes is C-contiguous (the strides of size-1 dimensions do not matter).
inline bool is_contiguous(const View& x, std::initializer_list<int64_t> sizes) {
  int64_t expect = 1, i = static_cast<int64_t>(sizes.size());
  for (auto n = sizes.end(); n != sizes.begin();) {
    --n;
    --i;
    if (*n != 1 && x.stride[i] != expect) return false;
    expect *= *n;
  }
  return true;
}

template <class Acc>
struct PreparedMixture {
  int64_t H = 0, K = 0, D = 0;
  double sigma_eps = 0;
  Buffer<Acc> values;  // mu (H K D), omega (H K D), alpha (H K), in that order
  std::vector<Head<Acc>> heads;
  size_t bytes = 0;

  // Whether mu, omega, alpha (views of the call's shape) hold exactly `values`. Contiguous
  // parameters (the usual case) are compared in one memcmp each rather than one per row.
  bool holds(const View& mu, const View& omega, const View& alpha, const Shape& s, double eps) const {
    if (H != s.H || K != s.K || D != s.D || sigma_eps != eps) return false;
    const Acc* p = values.data();
    const int64_t HKD = H * K * D;
    for (const View* x : {&mu, &omega}) {
      if (is_contiguous(*x, {H, K, D})) {
        if (std::memcmp(x->data, p, HKD * sizeof(Acc)) != 0) return false;
        p += HKD;
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t k = 0; k < K; ++k, p += D) {
          const Acc* row = at<const Acc>(*x, h, k);
          if (x->stride[2] == 1) {
            if (std::memcmp(row, p, D * sizeof(Acc)) != 0) return false;
          } else {
            for (int64_t d = 0; d < D; ++d) {
              const Acc value = row[d * x->stride[2]];
              if (std::memcmp(&value, p + d, sizeof(Acc)) != 0) return false;
            }
          }
        }
      }
    }
    if (is_contiguous(alpha, {H, K})) return std::memcmp(alpha.data, p, H * K * sizeof(Acc)) == 0;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t k = 0; k < K; ++k, ++p) {
        const Acc value = *at<const Acc>(alpha, h, k);
        if (std::memcmp(&value, p, sizeof(Acc)) != 0) return false;
      }
    }
    return true;
  }
};

template <class Acc>
struct MixtureCache {
  std::mutex mu;
  std::vector<std::shared_ptr<const PreparedMixture<Acc>>> entries;  // least recently used first
};

template <class Acc>
MixtureCache<Acc>& mixture_cache() {
  static MixtureCache<Acc>* cache = new MixtureCache<Acc>;  // never destroyed: no order-of-exit issues
  return *cache;
}

// The heads of the mixture (mu, omega, alpha, sigma_eps): from the cache when it holds them, else
// built (on up to nt threads) and kept.
template <class Acc>
std::shared_ptr<const std::vector<Head<Acc>>> prepared_heads(const View& mu, const View& omega, const View& alpha,
                                                             const Shape& s, double sigma_eps, int nt) {
  using Entry = PreparedMixture<Acc>;
  MixtureCache<Acc>& cache = mixture_cache<Acc>();
  std::vector<std::shared_ptr<const Entry>> entries;
  {
    std::lock_guard<std::mutex> lock(cache.mu);
    entries = cache.entries;
  }
  for (auto it = entries.rbegin(); it != entries.rend(); ++it) {  // the most recently used first
    if ((*it)->holds(mu, omega, alpha, s, sigma_eps)) {
      std::lock_guard<std::mutex> lock(cache.mu);
      auto& kept = cache.entries;
      const auto at_ = std::find(kept.begin(), kept.end(), *it);
      if (at_ != kept.end()) std::rotate(at_, at_ + 1, kept.end());  // now the most recently used
      return std::shared_ptr<const std::vector<Head<Acc>>>(*it, &(*it)->heads);
    }
  }
  auto entry = std::make_shared<Entry>();
  entry->heads.resize(s.H);
  build_heads(entry->heads, mu, omega, alpha, s, sigma_eps, nt);
  const int64_t per_head = 3 * s.Dp * s.Kp + 2 * s.K * s.Dp + s.K * s.D + 3 * s.Kp + s.K + 3 * s.Dp + s.K;
  const size_t values = static_cast<size_t>(s.H * s.K * (2 * s.D + 1));
  entry->bytes = (values + static_cast<size_t>(s.H * per_head)) * sizeof(Acc);
  if (entry->bytes <= kMixtureCacheBytes / 4) {
    entry->H = s.H;
    entry->K = s.K;
    entry->D = s.D;
    entry->sigma_eps = sigma_eps;
    entry->values.resize(values);
    Acc* p = entry->values.data();
    for (const View* x : {&mu, &omega}) {
      for (int64_t h = 0; h < s.H; ++h) {
        for (int64_t k = 0; k < s.K; ++k) {
          for (int64_t d = 0; d < s.D; ++d) *p++ = *at<const Acc>(*x, h, k, d);
        }
      }
    }
    for (int64_t h = 0; h < s.H; ++h) {
      for (int64_t k = 0; k < s.K; ++k) *p++ = *at<const Acc>(alpha, h, k);
    }
    std::lock_guard<std::mutex> lock(cache.mu);
    auto& kept = cache.entries;
    kept.push_back(entry);
    size_t total = 0;
    for (const auto& e : kept) total += e->bytes;
    while (kept.size() > kMixtureCacheEntries || total > kMixtureCacheBytes) {
      total -= kept.front()->bytes;
      kept.erase(kept.begin());
    }
  }
  return std::shared_ptr<const std::vector<Head<Acc>>>(entry, &entry->heads);
}

// Drops every kept mixture; returns the bytes they held.
template <class Acc>
size_t empty_mixture_cache() {
  MixtureCache<Acc>& cache = mixture_cache<Acc>();
  std::lock_guard<std::mutex> lock(cache.mu);
  size_t bytes = 0;
  for (const auto& e : cache.entries) bytes += e->bytes;
  cache.entries.clear();
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// Responsibilities

// acc[r][v] = Q[r][k] = sum_d (aT[d][k] x[r][d] - bT[d][k])^2 for an MR x NV tile, in registers.
template <class Acc, int MR, int NV>
inline void quad_tile(int64_t D, const Acc* x, int64_t ldx, const Acc* aT, const Acc* bT, int64_t ldk,
                      VecT<Acc> (&acc)[MR][NV]) {
  using V = VecT<Acc>;
  constexpr int W = Simd<Acc>::W;
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  }
  for (int64_t d = 0; d < D; ++d) {
    V av[NV], bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      av[v] = loadu(aT + d * ldk + v * W);
      bv[v] = loadu(bT + d * ldk + v * W);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V xb = splat(x[r * ldx + d]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += math::centred_term(av[v], xb, bv[v]);
    }
  }
}

// Q (MR x NV vectors) = the tile's quadratic forms.
template <class Acc, int MR, int NV>
inline void quad_micro(int64_t D, const Acc* x, int64_t ldx, const Acc* aT, const Acc* bT, int64_t ldk, Acc* Q,
                       int64_t ldq) {
  constexpr int W = Simd<Acc>::W;
  VecT<Acc> acc[MR][NV];
  quad_tile<Acc, MR, NV>(D, x, ldx, aT, bT, ldk, acc);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) storeu(Q + r * ldq + v * W, acc[r][v]);
  }
}

// G (MR rows of NV vectors: every component) = softmax(ln0 - 0.5 Q) of the tile's rows, formed in
// the tile's registers: the steps of softmax_rows without its guard (check = false), the same
// operations in the same order, without storing Q and reading it back in three passes.
template <class Acc, int MR, int NV>
inline void quad_softmax_micro(int64_t D, const Acc* x, int64_t ldx, const Acc* aT, const Acc* bT, int64_t ldk,
                               const Acc* ln0, Acc* G, int64_t ldg) {
  using V = VecT<Acc>;
  constexpr int W = Simd<Acc>::W;
  V acc[MR][NV];
  quad_tile<Acc, MR, NV>(D, x, ldx, aT, bT, ldk, acc);
  V l0[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) l0[v] = loadu(ln0 + v * W);
  // (Each step for all the rows before the next: a row's steps are a chain of dependent
  // reductions, the rows' chains independent.)
  Acc smax[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    V mv = splat<Acc>(-std::numeric_limits<Acc>::infinity());
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = l0[v] - Acc(0.5) * acc[r][v];
      mv = vmax<Acc>(mv, acc[r][v]);
    }
    smax[r] = hmax<Acc>(mv);
  }
  V sum[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    sum[r] = V{};
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = exp_nonpositive(acc[r][v] - smax[r]);
      sum[r] += acc[r][v];
    }
  }
  V inv[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) inv[r] = splat<Acc>(Acc(1) / hsum<Acc>(sum[r]));
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) storeu(G + r * ldg + v * W, acc[r][v] * inv[r]);
  }
}

// gamma (rows x nvec vectors) = softmax(ln0 - 0.5 Q) for components that fit one tile's width
// (nvec <= kQuadNV), tiled as quad tiles them.
template <class Acc, int NV>
void quad_softmax_nv(int64_t rows, int64_t D, const Acc* x, int64_t ldx, const Acc* aT, const Acc* bT, int64_t ldk,
                     const Acc* ln0, Acc* G, int64_t ldg, const Ahead& ahead) {
  constexpr int MR = NV == 1 ? 8 : kQuadMR;  // (one vector of components: taller tiles, as in quad)
  int64_t i0 = 0;
  for (; i0 + MR <= rows; i0 += MR) {
    ahead.fetch(i0, i0 + MR);
    quad_softmax_micro<Acc, MR, NV>(D, x + i0 * ldx, ldx, aT, bT, ldk, ln0, G + i0 * ldg, ldg);
  }
  ahead.fetch(i0, rows);
  for (; i0 < rows; ++i0) quad_softmax_micro<Acc, 1, NV>(D, x + i0 * ldx, ldx, aT, bT, ldk, ln0, G + i0 * ldg, ldg);
}
template <class Acc>
void quad_softmax(int64_t rows, int64_t nvec, int64_t D, const Acc* x, int64_t ldx, const Acc* aT, const Acc* bT,
                  int64_t ldk, const Acc* ln0, Acc* G, int64_t ldg, const Ahead& ahead) {
  switch (nvec) {
    case 1: quad_softmax_nv<Acc, 1>(rows, D, x, ldx, aT, bT, ldk, ln0, G, ldg, ahead); break;
    case 2: quad_softmax_nv<Acc, 2>(rows, D, x, ldx, aT, bT, ldk, ln0, G, ldg, ahead); break;
#if GMATTN_VECTOR_BYTES >= 64
    case 3: quad_softmax_nv<Acc, 3>(rows, D, x, ldx, aT, bT, ldk, ln0, G, ldg, ahead); break;
    case 4: quad_softmax_nv<Acc, 4>(rows, D, x, ldx, aT, bT, ldk, ln0, G, ldg, ahead); break;
#endif
    default: break;
  }
}

template <class Acc, int MR>
inline void quad_micro_nv(int nv, int64_t D, const Acc* x, int64_t ldx, const Acc* aT, const Acc* bT, int64_t ldk,
                          Acc* Q, int64_t ldq) {
  switch (nv) {
    case 1: quad_micro<Acc, MR, 1>(D, x, ldx, aT, bT, ldk, Q, ldq); break;
    case 2: quad_micro<Acc, MR, 2>(D, x, ldx, aT, bT, ldk, Q, ldq); break;
#if GMATTN_VECTOR_BYTES >= 64
    case 3: quad_micro<Acc, MR, 3>(D, x, ldx, aT, bT, ldk, Q, ldq); break;
    case 4: quad_micro<Acc, MR, 4>(D, x, ldx, aT, bT, ldk, Q, ldq); break;
#endif
    default: break;
  }
}

template <class Acc>
void quad(int64_t rows, int64_t nvec, int64_t D, const Acc* x, int64_t ldx, const Acc* aT, const Acc* bT,
          int64_t ldk, Acc* Q, int64_t ldq, const Ahead& ahead) {
  constexpr int W = Simd<Acc>::W;
  if (nvec == 1) {  // one vector of components (K <= W): taller tiles keep the FMA units busy
    int64_t i0 = 0;
    for (; i0 + 8 <= rows; i0 += 8) {
      ahead.fetch(i0, i0 + 8);
      quad_micro<Acc, 8, 1>(D, x + i0 * ldx, ldx, aT, bT, ldk, Q + i0 * ldq, ldq);
    }
    ahead.fetch(i0, rows);
    for (; i0 < rows; ++i0) quad_micro<Acc, 1, 1>(D, x + i0 * ldx, ldx, aT, bT, ldk, Q + i0 * ldq, ldq);
    return;
  }
  for (int64_t i0 = 0; i0 < rows; i0 += kQuadMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kQuadMR, rows - i0));
    ahead.fetch(i0, i0 + mr);
    for (int64_t v0 = 0; v0 < nvec; v0 += kQuadNV) {
      const int nv = static_cast<int>(std::min<int64_t>(kQuadNV, nvec - v0));
      const Acc* xi = x + i0 * ldx;
      Acc* Qi = Q + i0 * ldq + v0 * W;
      const Acc* a = aT + v0 * W;
      const Acc* bb = bT + v0 * W;
      switch (mr) {
        case 4: quad_micro_nv<Acc, 4>(nv, D, xi, ldx, a, bb, ldk, Qi, ldq); break;
        case 3: quad_micro_nv<Acc, 3>(nv, D, xi, ldx, a, bb, ldk, Qi, ldq); break;
        case 2: quad_micro_nv<Acc, 2>(nv, D, xi, ldx, a, bb, ldk, Qi, ldq); break;
        default: quad_micro_nv<Acc, 1>(nv, D, xi, ldx, a, bb, ldk, Qi, ldq); break;
      }
    }
  }
}

// In place over R rows (stride ld): Q (Kp) -> gamma = softmax(ln0 - 0.5 Q). The rows run
// interleaved: each row is a short chain of dependent steps (max, exp, sum, scale) whose
// latency, not its arithmetic, would bound a row at a time. With `check`, first verifies the
// error bound of the centred form (see the top of the file) per row; a row where a component
// that matters might be inaccurate is left untouched (still Q) and its bit set in the result.
template <class Acc, int R>
unsigned softmax_rows(Acc* rows, int64_t ld, const Acc* ln0, const Acc* lmax, const Acc* mk, const Acc* xn, Acc Dd,
                      int64_t nvec, bool check) {
  using V = VecT<Acc>;
  using I = typename Simd<Acc>::I;
  constexpr int W = Simd<Acc>::W;
  V mv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) mv[r] = splat<Acc>(-std::numeric_limits<Acc>::infinity());
  for (int64_t v = 0; v < nvec; ++v) {
    const V l0 = loadu(ln0 + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) mv[r] = vmax<Acc>(mv[r], l0 - Acc(0.5) * loadu(rows + r * ld + v * W));
  }
  Acc smax[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) smax[r] = hmax<Acc>(mv[r]);
  unsigned failed = 0;
  if (check) {
    I bad[R] = {};
    for (int64_t v = 0; v < nvec; ++v) {
      const V l0 = loadu(ln0 + v * W), lm = loadu(lmax + v * W), m4 = Acc(4) * loadu(mk + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V q = loadu(rows + r * ld + v * W);
        const V s = l0 - Acc(0.5) * q;
        const V bnd = xn[r] * lm + m4;
        bad[r] |= math::centred_form_inaccurate<Acc>(q, bnd, s, smax[r], Dd);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) failed |= any_lane<Acc>(bad[r]) ? 1u << r : 0u;
  }
  V sum[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) sum[r] = V{};
  for (int64_t v = 0; v < nvec; ++v) {
    const V l0 = loadu(ln0 + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (failed >> r & 1u) continue;
      Acc* p = rows + r * ld + v * W;
      const V e = exp_nonpositive((l0 - Acc(0.5) * loadu(p)) - smax[r]);
      storeu(p, e);
      sum[r] += e;
    }
  }
  V inv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) inv[r] = splat<Acc>(Acc(1) / hsum<Acc>(sum[r]));
  for (int64_t v = 0; v < nvec; ++v) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (failed >> r & 1u) continue;
      Acc* p = rows + r * ld + v * W;
      storeu(p, loadu(p) * inv[r]);
    }
  }
  return failed;
}

// Direct form on the raw row: Q[k] = sum_d lam (x - mu)^2 (the guard's fallback, and the row
// path's form), summing four dimensions at a time before accumulating (a shorter chain of
// roundings). NV vectors of components from component k0, their sums kept in registers.
template <class Acc, int NV>
inline void direct_tile(const Head<Acc>& hd, const Acc* x, Acc* Q, int64_t k0) {
  using V = VecT<Acc>;
  using math::direct_term;
  constexpr int W = Simd<Acc>::W;
  const int64_t Kp = hd.Kp, D = hd.D;
  V acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = V{};
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const V x0 = splat(x[d]), x1 = splat(x[d + 1]), x2 = splat(x[d + 2]), x3 = splat(x[d + 3]);
    const Acc* m = hd.muT.data() + d * Kp + k0;
    const Acc* l = hd.lamT.data() + d * Kp + k0;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const int64_t o = v * W;
      acc[v] += (direct_term(loadu(l + o), x0, loadu(m + o)) + direct_term(loadu(l + Kp + o), x1, loadu(m + Kp + o))) +
                (direct_term(loadu(l + 2 * Kp + o), x2, loadu(m + 2 * Kp + o)) +
                 direct_term(loadu(l + 3 * Kp + o), x3, loadu(m + 3 * Kp + o)));
    }
  }
  for (; d < D; ++d) {
    const V xd = splat(x[d]);
    const Acc* m = hd.muT.data() + d * Kp + k0;
    const Acc* l = hd.lamT.data() + d * Kp + k0;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] += direct_term(loadu(l + v * W), xd, loadu(m + v * W));
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) storeu(Q + k0 + v * W, acc[v]);
}

// Calls f(std::integral_constant<int, NV>{}, v0) for blocks [v0, v0 + NV) covering nvec vectors,
// four at a time and then the 1 to 3 left: loops over a block keep NV accumulators in registers.
template <class F>
inline void in_vector_blocks(int64_t nvec, F&& f) {
  int64_t v = 0;
  for (; v + 4 <= nvec; v += 4) f(std::integral_constant<int, 4>{}, v);
  switch (nvec - v) {
    case 3: f(std::integral_constant<int, 3>{}, v); break;
    case 2: f(std::integral_constant<int, 2>{}, v); break;
    case 1: f(std::integral_constant<int, 1>{}, v); break;
    default: break;
  }
}

template <class Acc>
void direct_row(const Head<Acc>& hd, const Acc* x, Acc* Q) {
  constexpr int W = Simd<Acc>::W;
  in_vector_blocks(hd.Kp / W, [&](auto nv, int64_t v0) { direct_tile<Acc, decltype(nv)::value>(hd, x, Q, v0 * W); });
}

// gamma (Kp) = the responsibilities of one raw row x (Dp), in the direct form (one row has no
// chunk to centre on; the centred form's guard would fall back to this form anyway).
template <class Acc>
void row_responsibilities(const Head<Acc>& hd, const Acc* x, Acc* gamma) {
  direct_row(hd, x, gamma);
  const Acc unused = 0;  // (the guard's inputs; not read without the check)
  softmax_rows<Acc, 1>(gamma, hd.Kp, hd.ln0.data(), hd.lmax.data(), hd.lmax.data(), &unused, Acc(hd.D),
                       hd.Kp / Simd<Acc>::W, false);
}

// gamma (C x Kp) = responsibilities of the raw rows x (C x Dp, n valid); rows with keep[r] == 0
// and rows >= n are zero.
template <class Acc>
void responsibilities(const Head<Acc>& hd, const Shape& s, Workspace<Acc>& w, const Acc* x, int64_t n,
                      Acc* gamma, const uint8_t* keep, const Ahead& ahead) {
  using V = VecT<Acc>;
  constexpr int W = Simd<Acc>::W;
  const int64_t Dp = s.Dp, Kp = s.Kp, D = s.D, C = s.C;
  // Centre the chunk: cen = mean of the rows, xc = x - cen, xn = |xc|^2.
  const int64_t dvec = Dp / W;
  Acc* cen = w.cen;
  const Acc inv_n = Acc(1) / static_cast<Acc>(n);
  // (Each vector's sum runs over the rows in order; blocks of vectors side by side, so that the
  // dependent additions of one vector do not set the pace.)
  // (The lambdas copy what they read into locals: a store through memcpy (storeu) may alias
  // anything, and the captures would be loaded again after every store.)
  in_vector_blocks(dvec, [&](auto nv_, int64_t v0) {
    constexpr int nv = decltype(nv_)::value;
    const Acc* const xv = x + v0 * W;
    Acc* const cv = cen + v0 * W;
    const int64_t rows = n, ld = Dp;
    V acc[nv];
#pragma GCC unroll 8
    for (int v = 0; v < nv; ++v) acc[v] = V{};
    for (int64_t r = 0; r < rows; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < nv; ++v) acc[v] += loadu(xv + r * ld + v * W);
    }
#pragma GCC unroll 8
    for (int v = 0; v < nv; ++v) {
      V c = acc[v] * inv_n;
      // A NaN or Inf row must poison only its own responsibilities: centre on 0 where the mean
      // is not finite (any centre is exact math; it only matters for rounding).
      const V big = splat<Acc>(std::numeric_limits<Acc>::max());
      c = (c >= -big && c <= big) ? c : V{};
      storeu(cv + v * W, c);
    }
  });
  Acc *const xc = w.xc, *const xn = w.xn;
  for (int64_t r = 0; r < n; ++r) {
    V ss{};
    for (int64_t v = 0; v < dvec; ++v) {
      const V c = loadu(x + r * Dp + v * W) - loadu(cen + v * W);
      storeu(xc + r * Dp + v * W, c);
      ss += c * c;
    }
    xn[r] = hsum<Acc>(ss);
  }
  // bT = a (mu - cen), mk = |bT_k|^2 = sum_d lam (mu - cen)^2.
  // (Rows of bT in order, blocks of components side by side, as for the mean.)
  const int64_t nvec = Kp / W;
  in_vector_blocks(nvec, [&](auto nv_, int64_t v0) {
    constexpr int nv = decltype(nv_)::value;
    const Acc* const aT = hd.aT.data() + v0 * W;
    const Acc* const muT = hd.muT.data() + v0 * W;
    const Acc* const c = cen;
    Acc* const bT = w.bT + v0 * W;
    const int64_t dims = D, ld = Kp;
    V m[nv];
#pragma GCC unroll 8
    for (int v = 0; v < nv; ++v) m[v] = V{};
    for (int64_t d = 0; d < dims; ++d) {
      const V cd = splat(c[d]);
#pragma GCC unroll 8
      for (int v = 0; v < nv; ++v) {
        const V b = loadu(aT + d * ld + v * W) * (loadu(muT + d * ld + v * W) - cd);
        storeu(bT + d * ld + v * W, b);
        m[v] += b * b;
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < nv; ++v) storeu(w.mk + (v0 + v) * W, m[v]);
  });
  for (int64_t d = D; d < Dp; ++d) std::fill(w.bT + d * Kp, w.bT + (d + 1) * Kp, Acc(0));
  // The per-element guard B <= 4 (Q + D) holds for every row and component when B <= 4 D:
  // check element by element only when the chunk's bound max_r xn * max_k lmax + 4 max_k mk
  // exceeds that.
  const Acc Dd = static_cast<Acc>(D);
  Acc xn_max = 0, mk_max = 0;
  for (int64_t r = 0; r < n; ++r) xn_max = std::max(xn_max, w.xn[r]);
  for (int64_t k = 0; k < s.K; ++k) mk_max = std::max(mk_max, w.mk[k]);
  const bool check = !(xn_max * hd.lmax_all + Acc(4) * mk_max <= Acc(4) * Dd);
  if (!check && nvec <= kQuadNV) {  // no guard, and a tile holds whole rows: softmax in its registers
    quad_softmax(n, nvec, Dp, w.xc, Dp, hd.aT.data(), w.bT, Kp, hd.ln0.data(), gamma, Kp, ahead);
    for (int64_t r = 0; keep && r < n; ++r) {
      if (!keep[r]) std::fill(gamma + r * Kp, gamma + (r + 1) * Kp, Acc(0));
    }
    if (C > n) std::fill(gamma + n * Kp, gamma + C * Kp, Acc(0));
    return;
  }
  quad(n, nvec, Dp, w.xc, Dp, hd.aT.data(), w.bT, Kp, gamma, Kp, ahead);
  constexpr int kRows = 4;
  for (int64_t r0 = 0; r0 < n; r0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, n - r0));
    Acc* block = gamma + r0 * Kp;
    unsigned failed = 0;
    if (rows == kRows) {
      failed = softmax_rows<Acc, kRows>(block, Kp, hd.ln0.data(), hd.lmax.data(), w.mk, w.xn + r0, Dd, nvec, check);
    } else {
      for (int r = 0; r < rows; ++r) {
        failed |= softmax_rows<Acc, 1>(block + r * Kp, Kp, hd.ln0.data(), hd.lmax.data(), w.mk, w.xn + r0 + r, Dd,
                                       nvec, check) << r;
      }
    }
    for (int r = 0; r < rows; ++r) {
      Acc* row = block + r * Kp;
      if (keep && !keep[r0 + r]) {
        std::fill(row, row + Kp, Acc(0));
      } else if (failed >> r & 1u) {  // recompute in the direct form
        direct_row(hd, x + (r0 + r) * Dp, row);
        softmax_rows<Acc, 1>(row, Kp, hd.ln0.data(), hd.lmax.data(), w.mk, w.xn + r0 + r, Dd, nvec, false);
      }
    }
  }
  if (C > n) std::fill(gamma + n * Kp, gamma + C * Kp, Acc(0));
}

// ---------------------------------------------------------------------------------------------
// Backward through the responsibilities

template <class Acc, int R>
void softmax_backward_rows(const Acc* gamma, Acc* dgamma, int64_t K, int64_t Kp) {
  using V = VecT<Acc>;
  constexpr int W = Simd<Acc>::W;
  const int64_t nvec = Kp / W;
  // a: the first component holding the row's largest responsibility (padding lanes are 0). Each
  // lane keeps its largest value and the first component reaching it (a strict comparison); a is
  // the smallest such component among the lanes holding the row's largest value. (No branch on
  // where the maximum lies: its position is data, a branch on it mispredicts.)
  using I = typename Simd<Acc>::I;
  using Int = typename Simd<Acc>::Int;
  int64_t a[R];
  bool live[R];
  V mv[R];
  I first[R];
  I comp = lane_index<Acc>();
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    mv[r] = V{};
    first[r] = I{};
  }
  for (int64_t v = 0; v < nvec; ++v, comp += static_cast<Int>(W)) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V g = loadu(gamma + r * Kp + v * W);
      const I above = g > mv[r];
      mv[r] = above ? g : mv[r];
      first[r] = above ? comp : first[r];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const Acc top = hmax<Acc>(mv[r]);
    live[r] = top != Acc(0);  // masked rows are all zero; a NaN row stays live (and NaN)
    // A NaN row has no lane at top: K - 1 then (any component in range will do).
    const I at_top = mv[r] == top;
    a[r] = std::min<int64_t>(hmin<Acc>(at_top ? first[r] : static_cast<Int>(K - 1)), K - 1);
  }
  V acc[R];
  Acc dga[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc[r] = V{};
    dga[r] = dgamma[r * Kp + a[r]];
  }
  for (int64_t v = 0; v < nvec; ++v) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      acc[r] += loadu(gamma + r * Kp + v * W) * (loadu(dgamma + r * Kp + v * W) - dga[r]);  // the a term is 0
    }
  }
  // ds_l = gamma_l ((dgamma_l - dgamma_a) - (mean - dgamma_a)); ds_a = -sum_{l != a} ds_l, summed
  // without a's own term (it would cancel the others) and written last.
  V mean_off[R], tot[R];
  I at_a[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    mean_off[r] = splat<Acc>(hsum<Acc>(acc[r]));  // mean - dgamma_a
    tot[r] = V{};
    at_a[r] = I{} + static_cast<Int>(a[r]);
  }
  comp = lane_index<Acc>();
  for (int64_t v = 0; v < nvec; ++v, comp += static_cast<Int>(W)) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      Acc* dg = dgamma + r * Kp + v * W;
      const V ds = loadu(gamma + r * Kp + v * W) * ((loadu(dg) - dga[r]) - mean_off[r]);
      storeu(dg, ds);
      tot[r] += comp == at_a[r] ? V{} : ds;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    Acc* dg = dgamma + r * Kp;
    if (live[r]) {
      dg[a[r]] = -hsum<Acc>(tot[r]);
    } else {
      std::fill(dg, dg + Kp, Acc(0));
    }
  }
}

// ds = gamma * (dgamma - sum_k gamma dgamma), in place over dgamma (rows x Kp), pivoted on the
// row's largest responsibility: the steps of gma_math.h's softmax_backward_pivoted (which the
// CUDA kernels run a row per thread) on SIMD vectors of components. Rows with gamma = 0 (masked
// keys) give ds = 0. Four rows at a time, interleaved (each row is a chain of dependent
// reductions).
template <class Acc>
void softmax_backward(const Acc* gamma, Acc* dgamma, int64_t rows, int64_t K, int64_t Kp) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) softmax_backward_rows<Acc, 4>(gamma + r * Kp, dgamma + r * Kp, K, Kp);
  for (; r < rows; ++r) softmax_backward_rows<Acc, 1>(gamma + r * Kp, dgamma + r * Kp, K, Kp);
}

// For components [k0, k0+KT): dx (n x Dp) -= sum_k ds lam (x - mu) (dx overwritten when `first`),
// t1[k] += sum_i ds (x - mu), t2[k] += sum_i ds (x - mu)^2 (per dimension; overwritten when
// `sums_fresh`). Direct form: exact up to rounding whatever |x|.
template <class Acc, int KT>
void density_tile(int64_t n, int64_t Dp, const Acc* x, const Acc* ds, int64_t Kp, int64_t k0, const Acc* mu,
                  const Acc* lam, Acc* dx, Acc* t1, Acc* t2, bool first, bool sums_fresh) {
  using V = VecT<Acc>;
  constexpr int W = Simd<Acc>::W;
  for (int64_t d0 = 0; d0 < Dp; d0 += W) {
    V m[KT], l[KT], T1[KT], T2[KT];
#pragma GCC unroll 8
    for (int kk = 0; kk < KT; ++kk) {
      m[kk] = loadu(mu + (k0 + kk) * Dp + d0);
      l[kk] = loadu(lam + (k0 + kk) * Dp + d0);
      T1[kk] = V{};
      T2[kk] = V{};
    }
    for (int64_t i = 0; i < n; ++i) {
      const V xv = loadu(x + i * Dp + d0);
      V acc = first ? V{} : loadu(dx + i * Dp + d0);
      const Acc* dsi = ds + i * Kp + k0;
#pragma GCC unroll 8
      for (int kk = 0; kk < KT; ++kk) {
        const V wv = splat(dsi[kk]);
        const V diff = xv - m[kk];
        const V wd = wv * diff;
        T1[kk] += wd;
        T2[kk] += wd * diff;
        acc -= wd * l[kk];
      }
      storeu(dx + i * Dp + d0, acc);
    }
#pragma GCC unroll 8
    for (int kk = 0; kk < KT; ++kk) {
      Acc* p1 = t1 + (k0 + kk) * Dp + d0;
      Acc* p2 = t2 + (k0 + kk) * Dp + d0;
      storeu(p1, sums_fresh ? T1[kk] : loadu(p1) + T1[kk]);
      storeu(p2, sums_fresh ? T2[kk] : loadu(p2) + T2[kk]);
    }
  }
}

// Parameter-gradient sums of one lane: t1, t2 (K x Dp) and ds_sum (Kp), followed by their
// compensation terms. The sums of a block of chunks are formed plainly (density_backward adds
// each chunk's to them), then added to the lane with compensation (add).
template <class Acc>
struct ParamSums {
  static int64_t size(const Shape& s) { return 2 * s.K * s.Dp + s.Kp; }
  Acc* lane;  // 2 * size values
  void add(const Shape& s, const Acc* block) const { add_compensated(lane, lane + size(s), block, size(s)); }
};

// The chunk's dx (n x Dp), from ds (n x Kp); its parameter sums (ParamSums::size values: t1, t2,
// ds_sum) are added to `param_sums`, or written there when `sums_fresh` (the first chunk of a
// block: no clearing of the block before it, the same values).
template <class Acc>
void density_backward(const Head<Acc>& hd, const Shape& s, const Acc* x, const Acc* ds, int64_t n, Acc* dx,
                      Acc* param_sums, bool sums_fresh, const Ahead& ahead) {
  const int64_t K = s.K, Kp = s.Kp, Dp = s.Dp;
  Acc* t1 = param_sums;
  Acc* t2 = t1 + K * Dp;
  Acc* ds_sum = t2 + K * Dp;
  int64_t k0 = 0;
  const int64_t tiles = K / kDensKT;
  for (; k0 + kDensKT <= K; k0 += kDensKT) {
    ahead.fetch_part(k0 / kDensKT, tiles);
    density_tile<Acc, kDensKT>(n, Dp, x, ds, Kp, k0, hd.mu.data(), hd.lam.data(), dx, t1, t2, k0 == 0, sums_fresh);
  }
  if (tiles == 0) ahead.fetch(0, n);
  for (; k0 < K; ++k0) {
    density_tile<Acc, 1>(n, Dp, x, ds, Kp, k0, hd.mu.data(), hd.lam.data(), dx, t1, t2, k0 == 0, sums_fresh);
  }
  if (sums_fresh) std::fill(ds_sum, ds_sum + Kp, Acc(0));
  for (int64_t r = 0; r < n; ++r) {
#pragma omp simd
    for (int64_t k = 0; k < Kp; ++k) ds_sum[k] += ds[r * Kp + k];
  }
}

}  // namespace GMATTN_ISA
}  // namespace cpu
}  // namespace gmattn
