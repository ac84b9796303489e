// CPU kernels for Gaussian Mixture Attention (docs/design.md section 1), compiled once per
// instruction set into namespace gmattn::cpu::GMATTN_ISA; dispatch.cpp picks one at run time.
//
// Layout of the work. Each (batch, head) pair walks its sequence in chunks of kChunk rows. A
// chunk is gathered (any strides, any storage dtype) into contiguous accumulator buffers whose
// widths (K, D, Dv) are padded with zeros to whole SIMD vectors; all arithmetic runs there on
// register-tiled products (small_gemm.h); results are scattered back. The causal state (S, z)
// is carried across chunks; backward recomputes what it needs from the saved responsibilities:
// causal, with one forward scan (dq) and one reverse scan (dk, dv); bidirectional, with a pass over
// the queries (dq, and the state gradient) and then one over the keys (dk, dv).
//
// Parallelism. A task is (batch, group of heads, segment of chunks). The heads of a group run in
// lockstep, chunk by chunk, so a task reads and writes each token's rows of all its heads together
// (contiguous in the (B, N, H, D) layout: fewer pages and streams than one head at a time). With
// enough (batch, head) pairs for the threads, a segment is the whole sequence. With fewer pairs
// than threads (or an uneven split) the causal scans run their chunks as relays between the
// threads (Relay: the state is handed on from block to block, summed in one thread's order), and
// the bidirectional passes cut every pair into segments: pass 1 computes each segment's state sums
// in parallel, the segments' sums are added up, pass 2 runs the segments in parallel. Parameter
// gradients go to one slot per (batch, head, segment) and are summed in a fixed order afterwards:
// bit-identical results run to run at a fixed thread count (causal: at any thread count).
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
#ifndef GMATTN_ISA
#define GMATTN_ISA generic
#endif

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "gmattn/gmattn.h"
#include "numeric.h"
#include "simd.h"
#include "small_gemm.h"

namespace gmattn {
namespace cpu {
namespace GMATTN_ISA {

using namespace cpu_detail;

constexpr int64_t kChunk = 64;  // rows per chunk; a multiple of every vector length
constexpr int64_t kRelayChunks = 4;  // chunks per task of a relay (see Relay)

#if GMATTN_VECTOR_BYTES >= 64
constexpr int kQuadMR = 4, kQuadNV = 4;  // responsibilities tile
constexpr int kDensKT = 4;               // components per pass of the density backward
#else
constexpr int kQuadMR = 4, kQuadNV = 2;
constexpr int kDensKT = 2;
#endif

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// Values per 64-byte line: buffers carved into 64-byte aligned parts round each part up to it.
template <class Acc>
constexpr int64_t kLine = 64 / sizeof(Acc);
// The first 64-byte boundary at or after p (buffers are allocated a line longer for it).
template <class Acc>
inline Acc* align64(Acc* p) {
  while (reinterpret_cast<uintptr_t>(p) % 64 != 0) ++p;
  return p;
}

// ---------------------------------------------------------------------------------------------
// Strided access

template <class T>
inline T* at(const View& v, int64_t i0, int64_t i1, int64_t i2 = 0, int64_t i3 = 0) {
  return static_cast<T*>(v.data) + i0 * v.stride[0] + i1 * v.stride[1] + i2 * v.stride[2] + i3 * v.stride[3];
}

// dst (rows_total x ld) <- x[b, row0 + r, h, 0:cols] for r < n; zeros elsewhere.
template <class T, class Acc>
void gather_rows(const View& x, int64_t b, int64_t h, int64_t row0, int64_t n, int64_t cols, Acc* dst, int64_t ld,
                 int64_t rows_total) {
  const int64_t sc = x.stride[3];
  for (int64_t r = 0; r < n; ++r) {
    const T* src = at<const T>(x, b, row0 + r, h);
    Acc* d = dst + r * ld;
    if (sc == 1) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) d[c] = load_as<Acc>(src[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = load_as<Acc>(src[c * sc]);
    }
    for (int64_t c = cols; c < ld; ++c) d[c] = Acc(0);
  }
  if (rows_total > n) std::fill(dst + n * ld, dst + rows_total * ld, Acc(0));
}

template <class T, class Acc>
void scatter_rows(const View& y, int64_t b, int64_t h, int64_t row0, int64_t n, int64_t cols, const Acc* src,
                  int64_t ld) {
  const int64_t sc = y.stride[3];
  for (int64_t r = 0; r < n; ++r) {
    T* d = at<T>(y, b, row0 + r, h);
    const Acc* s = src + r * ld;
    if constexpr (std::is_same_v<T, Acc>) {
      if (sc == 1) {
        stream_copy(d, s, cols);
        continue;
      }
    }
    if (sc == 1) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) d[c] = store_as<T>(s[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c * sc] = store_as<T>(s[c]);
    }
  }
}

// A (B, H, N, cols) accumulator-typed view: rows [row0, row0+n) of (b, h) in or out.
template <class Acc>
void read_saved(const View& x, int64_t b, int64_t h, int64_t row0, int64_t n, int64_t cols, Acc* dst, int64_t ld,
                int64_t rows_total) {
  const int64_t sc = x.stride[3];
  for (int64_t r = 0; r < n; ++r) {
    const Acc* src = at<const Acc>(x, b, h, row0 + r);
    Acc* d = dst + r * ld;
    if (sc == 1) {
      std::memcpy(d, src, cols * sizeof(Acc));
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = src[c * sc];
    }
    for (int64_t c = cols; c < ld; ++c) d[c] = Acc(0);
  }
  if (rows_total > n) std::fill(dst + n * ld, dst + rows_total * ld, Acc(0));
}
template <class Acc>
void write_saved(const View& x, int64_t b, int64_t h, int64_t row0, int64_t n, int64_t cols, const Acc* src,
                 int64_t ld) {
  const int64_t sc = x.stride[3];
  for (int64_t r = 0; r < n; ++r) {
    Acc* d = at<Acc>(x, b, h, row0 + r);
    if (sc == 1) {
      stream_copy(d, src + r * ld, cols);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c * sc] = src[r * ld + c];
    }
  }
}
// den is (B, H, N).
template <class Acc>
void read_den(const View& x, int64_t b, int64_t h, int64_t row0, int64_t n, Acc* dst) {
  for (int64_t r = 0; r < n; ++r) dst[r] = *at<const Acc>(x, b, h, row0 + r);
}
template <class Acc>
void write_den(const View& x, int64_t b, int64_t h, int64_t row0, int64_t n, const Acc* src) {
  for (int64_t r = 0; r < n; ++r) *at<Acc>(x, b, h, row0 + r) = src[r];
}

// State (B, H, K, Dv) / (B, H, K) in and out of a Kp x Dvp / Kp buffer (zero padded); an absent
// tensor reads as zeros (S and z are independent: autograd may hand a gradient for one only).
template <class Acc>
void read_state(const View& S, const View& z, int64_t b, int64_t h, int64_t K, int64_t Dv, int64_t Kp, int64_t Dvp,
                Acc* S_buf, Acc* z_buf) {
  std::fill(S_buf, S_buf + Kp * Dvp, Acc(0));
  std::fill(z_buf, z_buf + Kp, Acc(0));
  for (int64_t k = 0; k < K; ++k) {
    if (S.present()) {
      for (int64_t e = 0; e < Dv; ++e) S_buf[k * Dvp + e] = *at<const Acc>(S, b, h, k, e);
    }
    if (z.present()) z_buf[k] = *at<const Acc>(z, b, h, k);
  }
}
template <class Acc>
void write_state(const View& S, const View& z, int64_t b, int64_t h, int64_t K, int64_t Dv, int64_t Dvp,
                 const Acc* S_buf, const Acc* z_buf) {
  if (!S.present()) return;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t e = 0; e < Dv; ++e) *at<Acc>(S, b, h, k, e) = S_buf[k * Dvp + e];
    *at<Acc>(z, b, h, k) = z_buf[k];
  }
}

// Rows of up to four inputs to fetch into cache ahead of use: the next chunk of the same (b, h),
// requested while this chunk computes. The rows of a head are strided by H * D elements, a walk
// the hardware prefetchers do not run ahead of, so a chunk's gather would otherwise wait on
// memory; the requests are spread over the compute (a few rows at a time) so that they never
// queue up behind each other.
struct Ahead {
  static constexpr int kStreams = 4;
  const char* base[kStreams] = {};
  int64_t row_bytes[kStreams] = {}, stride[kStreams] = {};
  int64_t rows = 0;
  // Rows [row0, row0 + C) of x[b, :, h, 0:cols] (element type T) for each (x, cols) in
  // `inputs`, clipped to the sequence (N rows); nothing when row0 is outside it.
  template <class T>
  static Ahead of(std::initializer_list<std::pair<const View*, int64_t>> inputs, int64_t b, int64_t h, int64_t row0,
                  int64_t N, int64_t C) {
    Ahead ah;
    if (row0 < 0 || row0 >= N) return ah;
    ah.rows = std::min(C, N - row0);
    int i = 0;
    for (const auto& [x, cols] : inputs) {
      if (i == kStreams) break;
      if (cols == 0) continue;  // not read
      ah.base[i] = reinterpret_cast<const char*>(at<const T>(*x, b, row0, h));
      ah.stride[i] = x->stride[1] * static_cast<int64_t>(sizeof(T));
      ah.row_bytes[i] = ((cols - 1) * x->stride[3] + 1) * static_cast<int64_t>(sizeof(T));
      ++i;
    }
    return ah;
  }
  // Part `part` of `parts` equal parts of the rows.
  __attribute__((always_inline)) inline void fetch_part(int64_t part, int64_t parts) const {
    fetch(part * rows / parts, (part + 1) * rows / parts);
  }
  // Requests rows [r0, r1) of every stream. Always inlined: as a call, GCC's IPA pass finds the
  // function free of side effects (a prefetch has none, formally) and deletes the call.
  __attribute__((always_inline)) inline void fetch(int64_t r0, int64_t r1) const {
    r1 = std::min(r1, rows);
    for (int i = 0; i < kStreams; ++i) {
      if (base[i] == nullptr) continue;
      for (int64_t r = r0; r < r1; ++r) {
        const char* row = base[i] + r * stride[i];
        for (int64_t o = 0; o < row_bytes[i]; o += 64) __builtin_prefetch(row + o, 0, 2);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Shapes, the work plan, per-head mixture parameters, per-thread buffers.

struct Shape {
  int64_t B, N, H, K, D, Dv;
  int64_t Kp, Dp, Dvp;  // padded to whole vectors
  int64_t C = kChunk;
  int64_t nchunks;
  template <class Acc>
  static Shape make(const Dims& d) {
    constexpr int W = Simd<Acc>::W;
    Shape s;
    s.B = d.B; s.N = d.N; s.H = d.H; s.K = d.K; s.D = d.D; s.Dv = d.Dv;
    s.Kp = round_up(d.K, W);
    s.Dp = round_up(d.D, W);
    s.Dvp = round_up(d.Dv, W);
    s.nchunks = (d.N + kChunk - 1) / kChunk;
    return s;
  }
  // Where chunk c of (batch, head) pair `pair` (= b * H + h) lies: b, h, its first row, its rows.
  struct ChunkAt {
    int64_t b, h, row0, n;
  };
  ChunkAt chunk_at(int64_t pair, int64_t c) const { return {pair / H, pair % H, c * C, std::min(C, N - c * C)}; }
};

// The work plan. A task is (batch b, heads [h0, h0 + group), segment of chunks); its heads run in
// lockstep, chunk by chunk, so one task reads and writes each token's rows of all its heads
// together (contiguous in the (B, N, H, D) layout: fewer pages and streams than one head at a
// time). A lane (b, h, segment) owns its state sums and parameter-gradient slot.
struct Plan {
  int nt = 1;
  int64_t B = 1, H = 1, group = 1, segs = 1, nchunks = 1;
  int64_t tasks = 1, lanes = 1;
  int64_t first(int64_t sg) const { return sg * nchunks / segs; }  // chunks [first, last) of a segment
  int64_t last(int64_t sg) const { return (sg + 1) * nchunks / segs; }
  void task(int64_t t, int64_t& b, int64_t& h0, int64_t& sg) const {
    sg = t % segs;
    const int64_t r = t / segs, gpb = H / group;
    h0 = (r % gpb) * group;
    b = r / gpb;
  }
  int64_t lane(int64_t b, int64_t h, int64_t sg) const { return (b * H + h) * segs + sg; }
};

inline Plan make_plan(int64_t B, int64_t H, int64_t nchunks, int requested) {
  Plan p;
  // 64-bit: a caller may ask for up to INT_MAX threads, and the products below must not overflow.
  int64_t nt = requested > 0 ? requested : omp_get_max_threads();
  if (nt < 1) nt = 1;
  p.B = B;
  p.H = H;
  p.nchunks = nchunks;
  const int64_t pairs = B * H;
  // At least two tasks per thread where possible: on a shared machine a descheduled thread's
  // work can then move to the other threads (dynamic schedule).
  if (pairs % nt == 0 || pairs >= 4 * nt) {
    // Pairs feed every thread: no segments. Group heads: the largest group that leaves a task
    // count that is a multiple of the thread count and at least two tasks per thread (failing
    // that, a multiple of the thread count; failing that, single heads).
    bool found = false;
    for (int pass = 0; pass < 2 && !found; ++pass) {
      for (int64_t g = H; g >= 1; --g) {
        const int64_t t = B * (H / g);
        if (H % g == 0 && t % nt == 0 && (pass == 1 || t >= 2 * nt)) {
          p.group = g;
          found = true;
          break;
        }
      }
    }
  } else {
    // Too few pairs (or an uneven split): cut each pair into segments of chunks, two-pass scans
    // (the causal scans run relays instead, see Relay);
    // the fewest segments giving a multiple of the thread count and four tasks per thread (a
    // segment costs little more than its share of the work, and the two passes each end at a
    // barrier: finer tasks leave less idle time there when a thread is held up).
    // (A segment holds at least one chunk, which also bounds the search for huge thread counts.)
    int64_t segs = 1;
    while (segs < nchunks && !((pairs * segs) % nt == 0 && pairs * segs >= 4 * nt)) ++segs;
    p.segs = segs;
  }
  p.tasks = B * (H / p.group) * p.segs;
  p.lanes = B * H * p.segs;
  p.nt = static_cast<int>(std::min<int64_t>(nt, p.tasks));
  return p;
}

// Calls fn(b, h, lane, row0, n) for every chunk of a task's segment, chunk by chunk, the task's
// heads in lockstep within each chunk.
template <class Fn>
void for_each_chunk(const Plan& pl, const Shape& s, int64_t task, Fn&& fn) {
  int64_t b, h0, sg;
  pl.task(task, b, h0, sg);
  for (int64_t c = pl.first(sg); c < pl.last(sg); ++c) {
    const int64_t row0 = c * s.C, n = std::min(s.C, s.N - row0);
    for (int64_t h = h0; h < h0 + pl.group; ++h) fn(b, h, pl.lane(b, h, sg), row0, n);
  }
}

// Runs a kernel's passes over the plan: pass 1 (segment sums; skipped when !two_pass), the
// starting state of every (b, h) (`starts`), then pass 2 from those states. With one segment per
// sequence a task owns whole sequences: all three run inside one parallel region, no barrier.
template <class Pass1, class Starts, class Pass2>
void run_passes(const Plan& pl, bool two_pass, Pass1& pass1, Starts& starts, Pass2& pass2) {
  if (pl.segs == 1) {
#pragma omp parallel for num_threads(pl.nt) schedule(dynamic, 1)
    for (int64_t task = 0; task < pl.tasks; ++task) {
      if (two_pass) pass1(task);
      int64_t b, h0, sg;
      pl.task(task, b, h0, sg);
      for (int64_t h = h0; h < h0 + pl.group; ++h) starts(b, h);
      pass2(task);
      stream_fence();  // outputs written with streaming stores (stream_copy) are visible
    }
  } else {
#pragma omp parallel for num_threads(pl.nt) schedule(dynamic, 1)
    for (int64_t task = 0; task < pl.tasks; ++task) {
      pass1(task);
      stream_fence();
    }
    for (int64_t b = 0; b < pl.B; ++b) {
      for (int64_t h = 0; h < pl.H; ++h) starts(b, h);
    }
#pragma omp parallel for num_threads(pl.nt) schedule(dynamic, 1)
    for (int64_t task = 0; task < pl.tasks; ++task) {
      pass2(task);
      stream_fence();
    }
  }
}

// Waiting for another thread, briefly: pause-spin first (a hand-over is usually microseconds
// away), then yield (the thread waited for may be descheduled: more threads than cores).
inline void wait_at_least(const std::atomic<int64_t>& value, int64_t want) {
  for (int spins = 0; value.load(std::memory_order_acquire) < want; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#elif defined(__aarch64__)
      __asm__ __volatile__("yield");
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

template <class Acc>
struct Head {
  int64_t K = 0, D = 0, Kp = 0, Dp = 0;
  std::vector<Acc> aT, muT, lamT;  // Dp x Kp: sqrt(lam), mu, lam (transposed, zero padded)
  std::vector<Acc> mu, lam;        // K x Dp
  std::vector<Acc> ln0;            // Kp: logpi - 0.5 sum_d log sigma2; -inf on padding
  std::vector<Acc> lmax;           // Kp: max_d lam
  Acc lmax_all = 0;                // max_k lmax
  std::vector<Acc> pi;             // K: softmax(alpha)
  std::vector<Acc> dsigma2_domega; // K x D: sigmoid(omega)

  void build(const View& mu_v, const View& omega_v, const View& alpha_v, int64_t h, const Shape& s,
             double sigma_eps) {
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
    // log_norm in double, shifted by its maximum (softmax is shift invariant): s = ln0 - Q / 2
    // then carries no large constant whose rounding would differ between components (with tiny
    // variances sum_d log sigma2 is ~ -10 D).
    double amax = -INFINITY;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, static_cast<double>(*at<const Acc>(alpha_v, h, k)));
    double asum = 0;
    for (int64_t k = 0; k < K; ++k) asum += std::exp(static_cast<double>(*at<const Acc>(alpha_v, h, k)) - amax);
    const double log_z = amax + std::log(asum);
    std::vector<double> ln0d(K);
    // A row of omega at a time: softplus and sigmoid a vector at a time (the transcendentals
    // dominate the set-up), padding lanes zero.
    constexpr int W = Simd<Acc>::W;
    std::vector<Acc> omega(Dp, Acc(0)), sigma2(Dp), sig(Dp);
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
      ln0d[k] = logpi - 0.5 * sum_log(sigma2.data(), D);
      lmax[k] = lm;
      lmax_all = std::max(lmax_all, lm);
    }
    const double shift = *std::max_element(ln0d.begin(), ln0d.end());
    for (int64_t k = 0; k < K; ++k) ln0[k] = static_cast<Acc>(ln0d[k] - shift);
  }
};

// The per-head mixture parameters (transcendentals for every (h, k, d): worth a parallel loop).
template <class Acc>
void build_heads(std::vector<Head<Acc>>& heads, const View& mu, const View& omega, const View& alpha, const Shape& s,
                 double sigma_eps, int nt) {
  const int64_t H = static_cast<int64_t>(heads.size());
#pragma omp parallel for num_threads(static_cast<int>(std::min<int64_t>(nt, H))) schedule(static, 1)
  for (int64_t h = 0; h < H; ++h) heads[h].build(mu, omega, alpha, h, s, sigma_eps);
}

template <class Acc>
struct Workspace {
  Acc *xq, *xk, *xc, *xn, *cen, *bT, *mk;  // C x Dp (x3), C, Dp, Dp x Kp, Kp
  Acc *v, *o, *g, *num, *dnum, *vT;        // C x Dvp (x5), Dvp x C
  Acc *gq, *gk, *gkT, *dgq, *dgk;          // C x Kp (x2), Kp x C, C x Kp (x2)
  Acc *A, *Bm;                             // C x C
  Acc *den, *dden;                         // C
  Acc *delta, *ST, *dST;                   // one chunk's state sums (Kp x Dvp + Kp), Dvp x Kp (x2)
  Acc *psum;                               // one chunk's parameter-gradient sums (ParamSums::size)
  Acc* dx;                                 // C x Dp
  uint8_t keep[kChunk];
  std::vector<Acc> storage;
  // Per-lane running states of the task being run, each with its compensation (see
  // accumulate_state): group x 2 (Kp x Dvp + Kp); transposed states, group x Dvp x Kp.
  std::vector<Acc> lstate, ldstate, lST, ldST;

  Workspace(const Shape& s, int64_t group) {
    const int64_t SS = s.Kp * s.Dvp;
    lstate.assign(group * 2 * (SS + s.Kp), Acc(0));
    ldstate.assign(group * 2 * (SS + s.Kp), Acc(0));
    lST.assign(group * SS, Acc(0));
    ldST.assign(group * SS, Acc(0));
    const int64_t C = s.C, Kp = s.Kp, Dp = s.Dp, Dvp = s.Dvp;
    const int64_t sizes[] = {C * Dp,  C * Dp,  C * Dp,  C,       Dp,      Dp * Kp,      Kp,       C * Dvp,
                             C * Dvp, C * Dvp, C * Dvp, C * Dvp, Dvp * C, C * Kp,       C * Kp,   Kp * C,
                             C * Kp,  C * Kp,  C * C,   C * C,   C,       C,            SS + Kp,  Dvp * Kp,
                             Dvp * Kp, 2 * Kp * Dp + Kp, C * Dp};
    Acc** slots[] = {&xq, &xk, &xc, &xn, &cen, &bT, &mk, &v, &o, &g, &num, &dnum, &vT, &gq, &gk, &gkT, &dgq,
                     &dgk, &A, &Bm, &den, &dden, &delta, &ST, &dST, &psum, &dx};
    static_assert(sizeof(sizes) / sizeof(sizes[0]) == sizeof(slots) / sizeof(slots[0]), "workspace slots");
    int64_t total = kLine<Acc>;
    for (int64_t sz : sizes) total += round_up(sz, kLine<Acc>);
    storage.assign(total, Acc(0));
    Acc* base = align64(storage.data());
    int64_t off = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); ++i) {
      *slots[i] = base + off;
      off += round_up(sizes[i], kLine<Acc>);
    }
  }
};

// keep[r] for rows [row0, row0+n) of batch b; nullptr when there is no mask.
inline const uint8_t* mask_rows(const View& mask, int64_t b, int64_t row0, int64_t n, uint8_t* buf) {
  if (!mask.present()) return nullptr;
  for (int64_t r = 0; r < n; ++r) buf[r] = *at<const uint8_t>(mask, b, row0 + r) != 0;
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Responsibilities

// Q[r][k] = sum_d (aT[d][k] x[r][d] - bT[d][k])^2 for an MR x NV tile.
template <class Acc, int MR, int NV>
inline void quad_micro(int64_t D, const Acc* x, int64_t ldx, const Acc* aT, const Acc* bT, int64_t ldk, Acc* Q,
                       int64_t ldq) {
  using V = VecT<Acc>;
  constexpr int W = Simd<Acc>::W;
  V acc[MR][NV];
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
      for (int v = 0; v < NV; ++v) {
        const V t = av[v] * xb - bv[v];
        acc[r][v] += t * t;
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) storeu(Q + r * ldq + v * W, acc[r][v]);
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

template <class Acc>
struct GuardConst;
template <>
struct GuardConst<float> {
  static constexpr float kHuge = 1e14f;  // Q * B beyond this: error ~ eps * sqrt(Q B) > 1
};
template <>
struct GuardConst<double> {
  static constexpr double kHuge = 1e30;
};

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
    const V huge = splat<Acc>(GuardConst<Acc>::kHuge);
    I bad[R] = {};
    for (int64_t v = 0; v < nvec; ++v) {
      const V l0 = loadu(ln0 + v * W), lm = loadu(lmax + v * W), m4 = Acc(4) * loadu(mk + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V q = loadu(rows + r * ld + v * W);
        const V s = l0 - Acc(0.5) * q;
        const V bnd = xn[r] * lm + m4;
        bad[r] |= (bnd > Acc(4) * (q + Dd)) & ((s > smax[r] - Acc(64)) | (q * bnd > huge));
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

// Direct form on the raw row: Q[k] = sum_d lam (x - mu)^2 (the guard's fallback), summing four
// dimensions at a time before accumulating (a shorter chain of roundings).
template <class Acc>
void direct_row(const Head<Acc>& hd, const Acc* x, Acc* Q) {
  const int64_t Kp = hd.Kp, D = hd.D;
  std::fill(Q, Q + Kp, Acc(0));
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const Acc x0 = x[d], x1 = x[d + 1], x2 = x[d + 2], x3 = x[d + 3];
    const Acc* m = hd.muT.data() + d * Kp;
    const Acc* l = hd.lamT.data() + d * Kp;
#pragma omp simd
    for (int64_t k = 0; k < Kp; ++k) {
      const Acc e0 = x0 - m[k], e1 = x1 - m[Kp + k], e2 = x2 - m[2 * Kp + k], e3 = x3 - m[3 * Kp + k];
      Q[k] += (l[k] * e0 * e0 + l[Kp + k] * e1 * e1) + (l[2 * Kp + k] * e2 * e2 + l[3 * Kp + k] * e3 * e3);
    }
  }
  for (; d < D; ++d) {
    const Acc xd = x[d];
    const Acc* m = hd.muT.data() + d * Kp;
    const Acc* l = hd.lamT.data() + d * Kp;
#pragma omp simd
    for (int64_t k = 0; k < Kp; ++k) {
      const Acc e = xd - m[k];
      Q[k] += l[k] * e * e;
    }
  }
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
  for (int64_t v = 0; v < dvec; ++v) {
    V acc{};
    for (int64_t r = 0; r < n; ++r) acc += loadu(x + r * Dp + v * W);
    acc *= inv_n;
    // A NaN or Inf row must poison only its own responsibilities: centre on 0 where the mean
    // is not finite (any centre is exact math; it only matters for rounding).
    const V big = splat<Acc>(std::numeric_limits<Acc>::max());
    acc = (acc >= -big && acc <= big) ? acc : V{};
    storeu(cen + v * W, acc);
  }
  for (int64_t r = 0; r < n; ++r) {
    V ss{};
    for (int64_t v = 0; v < dvec; ++v) {
      const V c = loadu(x + r * Dp + v * W) - loadu(cen + v * W);
      storeu(w.xc + r * Dp + v * W, c);
      ss += c * c;
    }
    w.xn[r] = hsum<Acc>(ss);
  }
  // bT = a (mu - cen), mk = |bT_k|^2 = sum_d lam (mu - cen)^2.
  const int64_t nvec = Kp / W;
  for (int64_t v = 0; v < nvec; ++v) {
    V m{};
    for (int64_t d = 0; d < D; ++d) {
      const V b = loadu(hd.aT.data() + d * Kp + v * W) * (loadu(hd.muT.data() + d * Kp + v * W) - cen[d]);
      storeu(w.bT + d * Kp + v * W, b);
      m += b * b;
    }
    storeu(w.mk + v * W, m);
  }
  for (int64_t d = D; d < Dp; ++d) std::fill(w.bT + d * Kp, w.bT + (d + 1) * Kp, Acc(0));
  quad(n, nvec, Dp, w.xc, Dp, hd.aT.data(), w.bT, Kp, gamma, Kp, ahead);
  // The per-element guard B <= 4 (Q + D) holds for every row and component when B <= 4 D:
  // check element by element only when the chunk's bound max_r xn * max_k lmax + 4 max_k mk
  // exceeds that.
  const Acc Dd = static_cast<Acc>(D);
  Acc xn_max = 0, mk_max = 0;
  for (int64_t r = 0; r < n; ++r) xn_max = std::max(xn_max, w.xn[r]);
  for (int64_t k = 0; k < s.K; ++k) mk_max = std::max(mk_max, w.mk[k]);
  const bool check = !(xn_max * hd.lmax_all + Acc(4) * mk_max <= Acc(4) * Dd);
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

// ds = gamma * (dgamma - sum_k gamma dgamma), in place over dgamma (rows x Kp), in a form that
// does not lean on gamma near 1: with a the row's largest responsibility, the mean is
// dgamma_a + sum_{l != a} gamma_l (dgamma_l - dgamma_a), ds_l = gamma_l (dgamma_l - mean) for
// l != a, and ds_a = -sum_{l != a} ds_l (rows of ds sum to zero). For peaked routing (tiny
// variances) the rounded gamma_a ~ 1 leaves 1 - gamma_a, hence ds_a, poorly determined; the
// small responsibilities carry their full relative precision. Rows with gamma = 0 (masked keys)
// give ds = 0. Four rows at a time, interleaved (each row is a chain of dependent reductions).
template <class Acc>
void softmax_backward(const Acc* gamma, Acc* dgamma, int64_t rows, int64_t K, int64_t Kp) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) softmax_backward_rows<Acc, 4>(gamma + r * Kp, dgamma + r * Kp, K, Kp);
  for (; r < rows; ++r) softmax_backward_rows<Acc, 1>(gamma + r * Kp, dgamma + r * Kp, K, Kp);
}

// For components [k0, k0+KT): dx (n x Dp) -= sum_k ds lam (x - mu) (dx overwritten when `first`),
// t1[k] += sum_i ds (x - mu), t2[k] += sum_i ds (x - mu)^2 (per dimension). Direct form: exact
// up to rounding whatever |x|.
template <class Acc, int KT>
void density_tile(int64_t n, int64_t Dp, const Acc* x, const Acc* ds, int64_t Kp, int64_t k0, const Acc* mu,
                  const Acc* lam, Acc* dx, Acc* t1, Acc* t2, bool first) {
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
      storeu(p1, loadu(p1) + T1[kk]);
      storeu(p2, loadu(p2) + T2[kk]);
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
// ds_sum) are added to `param_sums`.
template <class Acc>
void density_backward(const Head<Acc>& hd, const Shape& s, const Acc* x, const Acc* ds, int64_t n, Acc* dx,
                      Acc* param_sums, const Ahead& ahead) {
  const int64_t K = s.K, Kp = s.Kp, Dp = s.Dp;
  Acc* t1 = param_sums;
  Acc* t2 = t1 + K * Dp;
  Acc* ds_sum = t2 + K * Dp;
  int64_t k0 = 0;
  const int64_t tiles = K / kDensKT;
  for (; k0 + kDensKT <= K; k0 += kDensKT) {
    ahead.fetch_part(k0 / kDensKT, tiles);
    density_tile<Acc, kDensKT>(n, Dp, x, ds, Kp, k0, hd.mu.data(), hd.lam.data(), dx, t1, t2, k0 == 0);
  }
  if (tiles == 0) ahead.fetch(0, n);
  for (; k0 < K; ++k0) {
    density_tile<Acc, 1>(n, Dp, x, ds, Kp, k0, hd.mu.data(), hd.lam.data(), dx, t1, t2, k0 == 0);
  }
  for (int64_t r = 0; r < n; ++r) {
#pragma omp simd
    for (int64_t k = 0; k < Kp; ++k) ds_sum[k] += ds[r * Kp + k];
  }
}

// ---------------------------------------------------------------------------------------------
// Chunk-level pieces shared by forward and backward

// Zero the strict upper triangle of the first n rows of a C x C block.
template <class Acc>
void keep_lower(Acc* a, int64_t n, int64_t C) {
  for (int64_t i = 0; i < n; ++i) std::fill(a + i * C + i + 1, a + i * C + C, Acc(0));
}

// A running state is S (Kp x Dvp) then z (Kp), followed by as many compensation terms: 2 (SS + Kp)
// values. Over the n rows of a chunk, S += gamma^T R and z += gamma^T w (w = nullptr: all ones):
// the chunk's sums are formed in `delta` (SS + Kp; chunk_state_sums), then added compensated
// (add_state), so states summed over a million tokens stay as accurate as over one chunk
// (numeric.h, add_compensated).
template <class Acc>
void chunk_state_sums(const Shape& s, const Acc* gamma, const Acc* R, const Acc* w, int64_t n, Acc* delta) {
  constexpr int W = Simd<Acc>::W;
  const int64_t SS = s.Kp * s.Dvp;
  gemm(s.K, s.Dvp / W, n, gamma, 1, s.Kp, R, s.Dvp, delta, s.Dvp, false);
  Acc* dz = delta + SS;
  std::fill(dz, dz + s.Kp, Acc(0));
  for (int64_t r = 0; r < n; ++r) {
    const Acc wr = w ? w[r] : Acc(1);
#pragma omp simd
    for (int64_t k = 0; k < s.Kp; ++k) dz[k] += gamma[r * s.Kp + k] * wr;
  }
}
// to = from + delta for running states (to may be from); rows K..Kp of S are left as they are
// (zero padding: delta's rows there are not formed).
template <class Acc>
void add_state(const Shape& s, const Acc* from, const Acc* delta, Acc* to) {
  const int64_t SS = s.Kp * s.Dvp, SZ = SS + s.Kp;
  add_compensated(from, from + SZ, delta, to, to + SZ, s.K * s.Dvp);
  add_compensated(from + SS, from + SZ + SS, delta + SS, to + SS, to + SZ + SS, s.Kp);
}
template <class Acc>
void accumulate_state(const Shape& s, const Acc* gamma, const Acc* R, const Acc* w, int64_t n, Acc* state,
                      Acc* delta) {
  chunk_state_sums(s, gamma, R, w, n, delta);
  add_state<Acc>(s, state, delta, state);
}
// Without weights (w = 1): the state S += gamma^T V, z += gamma^T 1.
template <class Acc>
void accumulate_state(const Shape& s, const Acc* gamma, const Acc* V, int64_t n, Acc* state, Acc* delta) {
  accumulate_state<Acc>(s, gamma, V, nullptr, n, state, delta);
}

// Sets a running state (with zero compensation) from SS + Kp values.
template <class Acc>
void set_state(const Shape& s, const Acc* from, Acc* state) {
  const int64_t SZ = s.Kp * s.Dvp + s.Kp;
  std::copy(from, from + SZ, state);
  std::fill(state + SZ, state + 2 * SZ, Acc(0));
}

struct NoCombine {  // a relay without partials (Relay::run)
  template <class P>
  void operator()(int64_t, const P*) const {}
};

// A causal scan over fewer (batch, head) pairs than threads, run as a relay: the threads take the
// work in order from one counter, a task being a block of kRelayChunks chunks of one pair (the
// pairs interleaved). A task first forms what each of its chunks adds to the running state
// (`sums`: needs no state), then waits for its pair's state before the block, keeps the state
// before each chunk, hands on the state after the block, and does the chunks' work from those
// states (`work`). The state is summed with the compensated additions of one thread's scan, in the
// same order, so results are bit-identical whatever the thread count; only the hand-over is serial
// (one per block: the state, 2 (SS + Kp) values, crossing between cores). A reverse relay scans
// from the last chunk back. Each pair has two state slots, the state before block j in slot j % 2:
// block j writes the slot of j + 1, which block j - 1 had copied before handing on.
//
// A task may keep `rows_size` values per chunk (rows(thread, j): e.g. the rows its sums loaded)
// from its sums to its work, so its work need not load them again.
//
// With `combine`, the work of a block's chunks adds up `partial_size` values (the backward's
// parameter sums, from zero) that combine(pair, partial) takes in scan order, as one thread's scan
// would: a finished block parks them in a ring of its pair, and whoever finishes the block next in
// line combines every parked block that is then in order (under the pair's lock), so no thread
// waits for another to finish its work.
template <class Acc>
class Relay {
 public:
  Relay(const Shape& s, int nt, bool reverse, int64_t partial_size, int64_t rows_size)
      : s_(s), nt_(nt), reverse_(reverse), pairs_(s.B * s.H), nblocks_((s.nchunks + kRelayChunks - 1) / kRelayChunks),
        size_(2 * (s.Kp * s.Dvp + s.Kp)), partial_size_(partial_size),
        ring_(std::min<int64_t>(nblocks_, 2 * static_cast<int64_t>(nt) + 2)), rows_stride_(round_up(rows_size, kLine<Acc>)),
        slots_(pairs_ * 2 * size_, Acc(0)), sync_(new PairSync[pairs_]),
        kept_(nt, std::vector<Acc>((2 * kRelayChunks + 2) * size_ / 2)),
        rows_(nt * kRelayChunks * rows_stride_ + kLine<Acc>) {
    if (partial_size_ > 0) {
      parked_.resize(pairs_ * ring_ * partial_size_);
      parked_block_.reset(new std::atomic<int64_t>[pairs_ * ring_]);
      for (int64_t i = 0; i < pairs_ * ring_; ++i) parked_block_[i].store(-1, std::memory_order_relaxed);
    }
  }
  // The state before the scan (value: SS + Kp values) of a pair, to be set before run(); after
  // run(), the state after the scan.
  Acc* start(int64_t pair) { return slot(pair, 0); }
  const Acc* end(int64_t pair) { return slot(pair, nblocks_); }
  // The rows_size values thread `thread` keeps for the chunk at place j of its block (64-byte aligned).
  Acc* rows(int thread, int64_t j) {
    return align64(rows_.data()) + (thread * kRelayChunks + j) * rows_stride_;
  }
  // sums(thread, pair, chunk, j, delta): the chunk's SS + Kp sums into delta (chunk_state_sums),
  // j its place in the block (in scan order); work(thread, pair, chunk, j, state, partial): the
  // chunk's work from the state before it, adding to its block's partial_size values in partial
  // (nullptr: none); combine(pair, partial), in scan order (nullptr: none).
  template <class Sums, class Work, class Combine>
  void run(Sums& sums, Work& work, Combine* combine) {
    std::atomic<int64_t> next{0};
    const int64_t tasks = pairs_ * nblocks_, SZ = size_ / 2;
#pragma omp parallel num_threads(nt_)
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tasks;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t pair = t % pairs_, blk = t / pairs_, thread = omp_get_thread_num();
      const int64_t p0 = blk * kRelayChunks, p1 = std::min(s_.nchunks, p0 + kRelayChunks);
      Acc* delta = kept_[thread].data();        // per chunk: its sums (SZ)
      Acc* before = delta + kRelayChunks * SZ;  // per chunk: the state before it (SZ)
      Acc* run = before + kRelayChunks * SZ;    // the running state (2 SZ)
      for (int64_t p = p0; p < p1; ++p) sums(thread, pair, chunk(p), p - p0, delta + (p - p0) * SZ);
      PairSync& sync = sync_[pair];
      wait_at_least(sync.handed, blk);
      std::copy(slot(pair, blk), slot(pair, blk) + size_, run);  // (the slot is rewritten two blocks on)
      for (int64_t p = p0; p < p1; ++p) {
        std::copy(run, run + SZ, before + (p - p0) * SZ);
        add_state(s_, run, delta + (p - p0) * SZ, run);
      }
      std::copy(run, run + size_, slot(pair, blk + 1));
      sync.handed.store(blk + 1, std::memory_order_release);
      Acc* parked = nullptr;
      if (combine) {
        wait_at_least(sync.combined, blk - ring_ + 1);  // the ring slot's last block is combined
        parked = parked_of(pair, blk);
        std::fill(parked, parked + partial_size_, Acc(0));
      }
      for (int64_t p = p0; p < p1; ++p) work(thread, pair, chunk(p), p - p0, before + (p - p0) * SZ, parked);
      if (combine) {
        parked_block_[pair * ring_ + blk % ring_].store(blk, std::memory_order_release);
        std::lock_guard<std::mutex> hold(sync.lock);
        for (int64_t b = sync.combined.load(std::memory_order_relaxed);
             b < nblocks_ && parked_block_[pair * ring_ + b % ring_].load(std::memory_order_acquire) == b; ++b) {
          (*combine)(pair, parked_of(pair, b));
          sync.combined.store(b + 1, std::memory_order_release);
        }
      }
      stream_fence();  // outputs written with streaming stores (stream_copy) are visible
    }
  }

 private:
  struct PairSync {
    alignas(64) std::atomic<int64_t> handed{0};    // blocks that handed on their state
    alignas(64) std::atomic<int64_t> combined{0};  // blocks whose partials are combined
    std::mutex lock;                               // held to combine
  };
  int64_t chunk(int64_t p) const { return reverse_ ? s_.nchunks - 1 - p : p; }
  Acc* slot(int64_t pair, int64_t blk) { return slots_.data() + (pair * 2 + blk % 2) * size_; }
  Acc* parked_of(int64_t pair, int64_t blk) {
    return parked_.data() + (pair * ring_ + blk % ring_) * partial_size_;
  }
  const Shape& s_;
  int nt_;
  bool reverse_;
  int64_t pairs_, nblocks_, size_, partial_size_, ring_, rows_stride_;
  std::vector<Acc> slots_;
  std::unique_ptr<PairSync[]> sync_;
  std::vector<std::vector<Acc>> kept_;  // per thread: a block's sums and states
  std::vector<Acc> rows_;               // per thread: a block's kept rows (see rows())
  std::vector<Acc> parked_;             // per pair: ring_ blocks' partials
  std::unique_ptr<std::atomic<int64_t>[]> parked_block_;  // the block parked in each ring slot
};

// A relay whose scan starts from each pair's state in (S, z) (absent: zero), and the states it
// ends with, written to (S, z).
template <class Acc>
Relay<Acc> relay_from(const Shape& s, int nt, bool reverse, int64_t partial_size, int64_t rows_size, const View& S,
                      const View& z) {
  Relay<Acc> relay(s, nt, reverse, partial_size, rows_size);
  for (int64_t pair = 0; pair < s.B * s.H; ++pair) {
    Acc* st = relay.start(pair);
    read_state(S, z, pair / s.H, pair % s.H, s.K, s.Dv, s.Kp, s.Dvp, st, st + s.Kp * s.Dvp);
  }
  return relay;
}
template <class Acc>
void write_relay_ends(const Shape& s, Relay<Acc>& relay, const View& S, const View& z) {
  for (int64_t pair = 0; pair < s.B * s.H; ++pair) {
    const Acc* st = relay.end(pair);
    write_state(S, z, pair / s.H, pair % s.H, s.K, s.Dv, s.Dvp, st, st + s.Kp * s.Dvp);
  }
}

// to += the running state of lane `lane` in `sums` (2 (SS + Kp) values per lane): its SS + Kp
// sums, without their compensation terms.
template <class Acc>
void add_lane_state(const Shape& s, const std::vector<Acc>& sums, int64_t lane, Acc* to) {
  const int64_t SZ = s.Kp * s.Dvp + s.Kp;
  const Acc* add = sums.data() + lane * 2 * SZ;
  for (int64_t i = 0; i < SZ; ++i) to[i] += add[i];
}

template <class Acc>
inline Acc row_sum(const Acc* a, int64_t n) {
  Acc r = 0;
#pragma omp simd reduction(+ : r)
  for (int64_t j = 0; j < n; ++j) r += a[j];
  return r;
}

template <class Acc>
inline Acc dot(const Acc* a, const Acc* b, int64_t n) {
  using V = VecT<Acc>;
  constexpr int W = Simd<Acc>::W;
  V acc{};
  for (int64_t i = 0; i < n; i += W) acc += loadu(a + i) * loadu(b + i);
  return hsum<Acc>(acc);
}

// ---------------------------------------------------------------------------------------------
// Forward

template <class T, class Acc>
void forward_typed(const ForwardArgs& a) {
  constexpr int W = Simd<Acc>::W;
  const Shape s = Shape::make<Acc>(a.dims);
  const int64_t N = s.N, K = s.K, D = s.D, Dv = s.Dv, Kp = s.Kp, Dp = s.Dp, Dvp = s.Dvp, C = s.C;
  const int64_t SS = Kp * Dvp, SZ = SS + Kp;  // a state: S (Kp x Dvp), then z (Kp)
  const Plan pl = make_plan(s.B, s.H, s.nchunks, a.opt.num_threads);
  const int64_t G = pl.group;
  const bool causal = a.opt.causal, save = a.gq.present();
  const Acc eps = static_cast<Acc>(a.opt.eps);

  std::vector<Head<Acc>> heads(s.H);
  build_heads(heads, a.mu, a.omega, a.alpha, s, a.opt.sigma_eps, pl.nt);
  std::vector<Workspace<Acc>> ws;
  ws.reserve(pl.nt);
  for (int t = 0; t < pl.nt; ++t) ws.emplace_back(s, G);

  // Each fetches the next chunk's rows of its inputs while it computes (Ahead).
  // A chunk's keys: their responsibilities in gk (C x Kp; saved when asked for), its values in v
  // (C x Dvp).
  auto route_keys = [&](Workspace<Acc>& w, const Head<Acc>& hd, int64_t b, int64_t h, int64_t row0, int64_t n,
                        Acc* gk, Acc* v) {
    gather_rows<T>(a.k, b, h, row0, n, D, w.xk, Dp, C);
    gather_rows<T>(a.v, b, h, row0, n, Dv, v, Dvp, C);
    const Ahead ahead = Ahead::of<T>({{&a.k, D}, {&a.v, Dv}}, b, h, row0 + C, N, C);
    responsibilities(hd, s, w, w.xk, n, gk, mask_rows(a.mask, b, row0, n, w.keep), ahead);
    if (save) write_saved(a.gk, b, h, row0, n, K, gk, Kp);
  };
  // A chunk's outputs from the state before it (S, then z) and, causal, from the chunk's own keys
  // (gk, v from route_keys).
  auto read_out = [&](Workspace<Acc>& w, const Head<Acc>& hd, int64_t b, int64_t h, int64_t row0, int64_t n,
                      const Acc* S, const Acc* gk, const Acc* v) {
    gather_rows<T>(a.q, b, h, row0, n, D, w.xq, Dp, C);
    responsibilities(hd, s, w, w.xq, n, w.gq, nullptr, Ahead::of<T>({{&a.q, D}}, b, h, row0 + C, N, C));
    // num = Gq S, den = Gq z (+ eps below)
    gemm(n, Dvp / W, K, w.gq, Kp, 1, S, Dvp, w.num, Dvp, false);
    for (int64_t i = 0; i < n; ++i) w.den[i] = dot(w.gq + i * Kp, S + SS, Kp);
    if (causal) {
      // Intra-chunk: A = tril(Gq Gk^T); num += A V, den += rowsum(A).
      const int64_t ncv = round_up(n, W) / W;  // vectors spanning the chunk's columns
      transpose(C, Kp, gk, Kp, w.gkT, C);
      gemm(n, ncv, Kp, w.gq, Kp, 1, w.gkT, C, w.A, C, false, Tri::kOutLower);
      keep_lower(w.A, n, C);
      gemm(n, Dvp / W, n, w.A, C, 1, v, Dvp, w.num, Dvp, true, Tri::kDepthLower);
      for (int64_t i = 0; i < n; ++i) w.den[i] += row_sum(w.A + i * C, i + 1);
    }
    for (int64_t i = 0; i < n; ++i) {
      w.den[i] += eps;
      const Acc inv = Acc(1) / w.den[i];
#pragma omp simd
      for (int64_t e = 0; e < Dvp; ++e) w.num[i * Dvp + e] *= inv;
    }
    scatter_rows<T>(a.out, b, h, row0, n, Dv, w.num, Dvp);
    if (save) {
      write_saved(a.gq, b, h, row0, n, K, w.gq, Kp);
      write_den(a.den, b, h, row0, n, w.den);
    }
  };

  if (causal && pl.segs > 1) {  // fewer pairs than threads (or an uneven split): a relay
    // Each thread keeps its block's key responsibilities and values (C x Kp, C x Dvp per chunk).
    Relay<Acc> relay = relay_from<Acc>(s, pl.nt, false, 0, C * (Kp + Dvp), a.S0, a.z0);
    auto sums = [&](int64_t thread, int64_t pair, int64_t c, int64_t j, Acc* delta) {
      const auto [b, h, row0, n] = s.chunk_at(pair, c);
      Acc* gk = relay.rows(thread, j);
      route_keys(ws[thread], heads[h], b, h, row0, n, gk, gk + C * Kp);
      chunk_state_sums<Acc>(s, gk, gk + C * Kp, nullptr, n, delta);
    };
    auto work = [&](int64_t thread, int64_t pair, int64_t c, int64_t j, const Acc* S, Acc*) {
      const auto [b, h, row0, n] = s.chunk_at(pair, c);
      const Acc* gk = relay.rows(thread, j);
      read_out(ws[thread], heads[h], b, h, row0, n, S, gk, gk + C * Kp);
    };
    relay.run(sums, work, static_cast<NoCombine*>(nullptr));
    write_relay_ends(s, relay, a.S_final, a.z_final);
    return;
  }

  // Otherwise a task owns whole sequences (causal: one pass, the state carried from chunk to
  // chunk) or, bidirectional, segments of them in two passes: pass 1 sums each lane's keys,
  // pass 2 reads the total.
  const bool two_pass = !causal;
  std::vector<Acc> seg(two_pass ? pl.lanes * 2 * SZ : 0);  // each lane's sums, compensated
  auto pass1 = [&](int64_t task) {
    Workspace<Acc>& w = ws[omp_get_thread_num()];
    for_each_chunk(pl, s, task, [&](int64_t b, int64_t h, int64_t ln, int64_t row0, int64_t n) {
      route_keys(w, heads[h], b, h, row0, n, w.gk, w.v);
      accumulate_state(s, w.gk, w.v, n, seg.data() + ln * 2 * SZ, w.delta);
    });
  };
  // The starting state of every lane of pair (b, h): the initial state, plus bidirectionally all
  // the sums (what every query reads).
  std::vector<Acc> start(pl.lanes * SZ);
  auto starts = [&](int64_t b, int64_t h) {
    std::vector<Acc> run(SZ);
    read_state(a.S0, a.z0, b, h, K, Dv, Kp, Dvp, run.data(), run.data() + SS);
    if (!causal) {
      for (int64_t sg = 0; sg < pl.segs; ++sg) add_lane_state(s, seg, pl.lane(b, h, sg), run.data());
      write_state(a.S_final, a.z_final, b, h, K, Dv, Dvp, run.data(), run.data() + SS);
    }
    for (int64_t sg = 0; sg < pl.segs; ++sg) {
      std::copy(run.begin(), run.end(), start.begin() + pl.lane(b, h, sg) * SZ);
    }
  };
  // Pass 2: the queries read the state (causal: and the chunk itself), the state moves on.
  auto pass2 = [&](int64_t task) {
    int64_t b, h0, sg;
    pl.task(task, b, h0, sg);
    Workspace<Acc>& w = ws[omp_get_thread_num()];
    for (int64_t l = 0; l < G; ++l) {
      set_state(s, start.data() + pl.lane(b, h0 + l, sg) * SZ, w.lstate.data() + l * 2 * SZ);
    }
    for_each_chunk(pl, s, task, [&](int64_t bb, int64_t h, int64_t, int64_t row0, int64_t n) {
      Acc* S = w.lstate.data() + (h - h0) * 2 * SZ;
      if (causal) route_keys(w, heads[h], bb, h, row0, n, w.gk, w.v);
      read_out(w, heads[h], bb, h, row0, n, S, w.gk, w.v);
      if (causal) accumulate_state(s, w.gk, w.v, n, S, w.delta);
    });
    if (causal) {  // the task's whole sequences: their final states
      for (int64_t l = 0; l < G; ++l) {
        const Acc* S = w.lstate.data() + l * 2 * SZ;
        write_state(a.S_final, a.z_final, b, h0 + l, K, Dv, Dvp, S, S + SS);
      }
    }
  };

  run_passes(pl, two_pass, pass1, starts, pass2);
}

// ---------------------------------------------------------------------------------------------
// Backward

template <class T, class Acc>
void backward_typed(const BackwardArgs& a) {
  constexpr int W = Simd<Acc>::W;
  const Shape s = Shape::make<Acc>(a.dims);
  const int64_t N = s.N, K = s.K, D = s.D, Dv = s.Dv, Kp = s.Kp, Dp = s.Dp, Dvp = s.Dvp, C = s.C;
  const int64_t SS = Kp * Dvp, SZ = SS + Kp;  // a state: S (Kp x Dvp), then z (Kp)
  const Plan pl = make_plan(s.B, s.H, s.nchunks, a.opt.num_threads);
  const int64_t G = pl.group;
  const bool causal = a.opt.causal;
  // Bidirectional with the forward's final state: the state every query read is given, not summed.
  const bool state_given = !causal && a.S_end.present();

  std::vector<Head<Acc>> heads(s.H);
  build_heads(heads, a.mu, a.omega, a.alpha, s, a.opt.sigma_eps, pl.nt);
  std::vector<Workspace<Acc>> ws;
  ws.reserve(pl.nt);
  for (int t = 0; t < pl.nt; ++t) ws.emplace_back(s, G);

  // One slot of parameter sums per lane (with compensation), reduced in a fixed order at the end.
  const int64_t slot = ParamSums<Acc>::size(s);
  std::vector<Acc> partial(pl.lanes * 2 * slot, Acc(0));
  auto sums_of = [&](int64_t lane) { return ParamSums<Acc>{partial.data() + lane * 2 * slot}; };

  // Causal: dden of every row, from the first pass that computes it (pass 1, else the forward
  // scan) to the later ones, which then do not read `out` again.
  std::vector<Acc> dden_store(causal ? s.B * s.H * N : 0);
  auto dden_of = [&](int64_t b, int64_t h, int64_t row0) { return dden_store.data() + (b * s.H + h) * N + row0; };
  // Where a chunk's inputs are loaded to: its keys' rows (saved Gk, C x Kp; v, C x Dvp) and its
  // gradients' rows (saved Gq, C x Kp; dnum, C x Dvp; dden, C). The workspace's rows, or the rows a
  // relay task keeps from its state sums for its work (kept_keys, kept_grads).
  struct KeyRows {
    Acc *gk, *v;
  };
  struct GradRows {
    Acc *gq, *dnum, *dden;
  };
  auto keys_in = [](Workspace<Acc>& w) { return KeyRows{w.gk, w.v}; };
  auto grads_in = [](Workspace<Acc>& w) { return GradRows{w.gq, w.dnum, w.dden}; };
  auto kept_keys = [&](Acc* rows) { return KeyRows{rows, rows + C * Kp}; };
  auto kept_grads = [&](Acc* rows) { return GradRows{rows, rows + C * Kp, rows + C * (Kp + Dvp)}; };
  // The chunk's saved Gk and its v.
  auto load_keys = [&](KeyRows to, int64_t b, int64_t h, int64_t row0, int64_t n) {
    read_saved(a.gk, b, h, row0, n, K, to.gk, Kp, C);
    gather_rows<T>(a.v, b, h, row0, n, Dv, to.v, Dvp, C);
  };
  // The chunk's saved Gq, den and its dout, out: dnum = g / den, dden = -(g . out) / den. With
  // `dden_stored`, dden is read from dden_store (an earlier pass computed it), else computed from
  // `out` (and stored there when there is a store).
  auto load_grads = [&](Workspace<Acc>& w, GradRows to, int64_t b, int64_t h, int64_t row0, int64_t n,
                        bool dden_stored) {
    Acc* dden_row = dden_store.empty() ? nullptr : dden_of(b, h, row0);
    read_saved(a.gq, b, h, row0, n, K, to.gq, Kp, C);
    read_den(a.den, b, h, row0, n, w.den);
    gather_rows<T>(a.dout, b, h, row0, n, Dv, w.g, Dvp, C);
    if (!dden_stored) gather_rows<T>(a.out, b, h, row0, n, Dv, w.o, Dvp, C);
    for (int64_t i = 0; i < n; ++i) {
      const Acc inv = Acc(1) / w.den[i];
#pragma omp simd
      for (int64_t e = 0; e < Dvp; ++e) to.dnum[i * Dvp + e] = w.g[i * Dvp + e] * inv;
      to.dden[i] = dden_stored ? dden_row[i] : -dot(w.g + i * Dvp, w.o + i * Dvp, Dvp) * inv;
    }
    if (!dden_stored && dden_row) std::copy(to.dden, to.dden + n, dden_row);
    if (n < C) std::fill(to.dnum + n * Dvp, to.dnum + C * Dvp, Acc(0));
  };
  // The state gradient: dS += Gq^T dnum, dz += Gq^T dden.
  auto state_grad_update = [&](Workspace<Acc>& w, int64_t n, Acc* dstate) {
    accumulate_state(s, w.gq, w.dnum, w.dden, n, dstate, w.delta);
  };
  // Bm = tril(dnum V^T + dden 1^T): the gradient of the intra-chunk affinity.
  auto affinity_grad = [&](Workspace<Acc>& w, const Acc* v, GradRows gr, int64_t n) {
    transpose(C, Dvp, v, Dvp, w.vT, C);
    gemm(n, round_up(n, W) / W, Dvp, gr.dnum, Dvp, 1, w.vT, C, w.Bm, C, false, Tri::kOutLower);
    for (int64_t i = 0; i < n; ++i) {
      const Acc dd = gr.dden[i];
#pragma omp simd
      for (int64_t j = 0; j <= i; ++j) w.Bm[i * C + j] += dd;
    }
    keep_lower(w.Bm, n, C);
  };
  // dGq -> ds (softmax backward) -> dq and parameter sums; likewise dGk -> dk.
  // `ahead`: rows of the chunk computed next, fetched meanwhile. The chunk's parameter sums are
  // added to param_sums.
  auto finish = [&](Workspace<Acc>& w, const Head<Acc>& hd, const View& x_in, const View& dx_out, Acc* gamma,
                    Acc* dgamma, Acc* xbuf, int64_t b, int64_t h, int64_t row0, int64_t n, Acc* param_sums,
                    const Ahead& ahead) {
    softmax_backward(gamma, dgamma, n, K, Kp);
    gather_rows<T>(x_in, b, h, row0, n, D, xbuf, Dp, n);
    density_backward(hd, s, xbuf, dgamma, n, w.dx, param_sums, ahead);
    scatter_rows<T>(dx_out, b, h, row0, n, D, w.dx, Dp);
  };
  // dGq += dden z^T (dGq holds dnum S^T).
  auto add_dden_z = [&](Workspace<Acc>& w, int64_t n, const Acc* z) {
    for (int64_t i = 0; i < n; ++i) {
      const Acc dd = w.dden[i];
#pragma omp simd
      for (int64_t k = 0; k < Kp; ++k) w.dgq[i * Kp + k] += dd * z[k];
    }
  };
  // dGk = V dS^T + dz (dST: dS transposed), dv = Gk dS, written out.
  auto key_grads = [&](Workspace<Acc>& w, int64_t b, int64_t h, int64_t row0, int64_t n, const Acc* dstate,
                       const Acc* dST) {
    gemm(n, Kp / W, Dvp, w.v, Dvp, 1, dST, Kp, w.dgk, Kp, false);
    const Acc* dz = dstate + SS;
    for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
      for (int64_t k = 0; k < Kp; ++k) w.dgk[i * Kp + k] += dz[k];
    }
    gemm(n, Dvp / W, K, w.gk, Kp, 1, dstate, Dvp, w.num, Dvp, false);
  };

  if (!causal) {
    // Bidirectional. Every query read the same state (S, z) = S0 + sum_j Gk[j]^T (v[j], 1), and
    // every key's gradient uses the same (dS, dz) = (dS, dz)_final + sum_i Gq[i]^T (dnum[i], dden[i]).
    // Pass 1, the query path: dGq = dnum S^T + dden z^T -> dq, and the sums of (dS, dz); pass 2,
    // the key path: dGk = V dS^T + dz, dv = Gk dS -> dk. (S, z) is the forward's final state when
    // given, else the keys are summed in a pass of their own first. Each input is read once, except
    // Gk and v without the final state.
    std::vector<Acc> state(s.B * s.H * SZ), dstate(s.B * s.H * SZ);  // per pair (b, h)
    auto pair_state = [&](std::vector<Acc>& x, int64_t b, int64_t h) { return x.data() + (b * s.H + h) * SZ; };
    std::vector<Acc> seg(state_given ? 0 : pl.lanes * 2 * SZ), seg_d(pl.lanes * 2 * SZ);
    // (S, z), or (dS, dz), of pair (b, h): `from` (absent: zero) plus the sums of its lanes (if any).
    auto total = [&](std::vector<Acc>& to, const View& S_from, const View& z_from, const std::vector<Acc>& sums,
                     int64_t b, int64_t h) {
      Acc* t = pair_state(to, b, h);
      read_state(S_from, z_from, b, h, K, Dv, Kp, Dvp, t, t + SS);
      for (int64_t sg = 0; sg < pl.segs && !sums.empty(); ++sg) add_lane_state(s, sums, pl.lane(b, h, sg), t);
    };
    if (state_given) {
      for (int64_t b = 0; b < s.B; ++b) {
        for (int64_t h = 0; h < s.H; ++h) total(state, a.S_end, a.z_end, seg, b, h);
      }
    } else {
      auto sum_keys = [&](int64_t task) {
        Workspace<Acc>& w = ws[omp_get_thread_num()];
        for_each_chunk(pl, s, task, [&](int64_t b, int64_t h, int64_t ln, int64_t row0, int64_t n) {
          load_keys(keys_in(w), b, h, row0, n);
          accumulate_state(s, w.gk, w.v, n, seg.data() + ln * 2 * SZ, w.delta);
        });
      };
      auto key_totals = [&](int64_t b, int64_t h) { total(state, a.S0, a.z0, seg, b, h); };
      auto nothing = [](int64_t) {};
      run_passes(pl, true, sum_keys, key_totals, nothing);
    }
    // Each task's heads' states, transposed, in the workspace (lST: S^T; ldST: dS^T).
    auto transposed = [&](Workspace<Acc>& w, std::vector<Acc>& x, std::vector<Acc>& xT, int64_t task) {
      int64_t b, h0, sg;
      pl.task(task, b, h0, sg);
      for (int64_t l = 0; l < G; ++l) transpose(Kp, Dvp, pair_state(x, b, h0 + l), Dvp, xT.data() + l * SS, Kp);
      return h0;
    };
    // Each chunk's parameter sums are a block of their own: formed from zero in the workspace, then
    // added to the lane.
    auto zeroed_sums = [&](Workspace<Acc>& w) {
      std::fill(w.psum, w.psum + slot, Acc(0));
      return w.psum;
    };
    auto query_pass = [&](int64_t task) {
      Workspace<Acc>& w = ws[omp_get_thread_num()];
      const int64_t h0 = transposed(w, state, w.lST, task);
      for_each_chunk(pl, s, task, [&](int64_t b, int64_t h, int64_t ln, int64_t row0, int64_t n) {
        load_grads(w, grads_in(w), b, h, row0, n, false);
        state_grad_update(w, n, seg_d.data() + ln * 2 * SZ);
        gemm(n, Kp / W, Dvp, w.dnum, Dvp, 1, w.lST.data() + (h - h0) * SS, Kp, w.dgq, Kp, false);  // dnum S^T
        add_dden_z(w, n, pair_state(state, b, h) + SS);
        finish(w, heads[h], a.q, a.dq, w.gq, w.dgq, w.xq, b, h, row0, n, zeroed_sums(w),
               Ahead::of<T>({{&a.dout, Dv}, {&a.out, Dv}, {&a.q, D}}, b, h, row0 + C, N, C));
        sums_of(ln).add(s, w.psum);
      });
    };
    auto grad_totals = [&](int64_t b, int64_t h) {
      total(dstate, a.dS_final, a.dz_final, seg_d, b, h);
      const Acc* t = pair_state(dstate, b, h);
      write_state(a.dS0, a.dz0, b, h, K, Dv, Dvp, t, t + SS);  // every query read S0
    };
    auto key_pass = [&](int64_t task) {
      Workspace<Acc>& w = ws[omp_get_thread_num()];
      const int64_t h0 = transposed(w, dstate, w.ldST, task);
      for_each_chunk(pl, s, task, [&](int64_t b, int64_t h, int64_t ln, int64_t row0, int64_t n) {
        load_keys(keys_in(w), b, h, row0, n);
        key_grads(w, b, h, row0, n, pair_state(dstate, b, h), w.ldST.data() + (h - h0) * SS);
        scatter_rows<T>(a.dv, b, h, row0, n, Dv, w.num, Dvp);
        finish(w, heads[h], a.k, a.dk, w.gk, w.dgk, w.xk, b, h, row0, n, zeroed_sums(w),
               Ahead::of<T>({{&a.v, Dv}, {&a.k, D}}, b, h, row0 + C, N, C));  // masked: gk = 0, ds = 0
        sums_of(ln).add(s, w.psum);
      });
    };
    run_passes(pl, true, query_pass, grad_totals, key_pass);
  } else {
    // Causal: a forward scan (the state before each chunk -> dGq -> dq), then a reverse scan (the
    // gradient state after each chunk -> dGk, dv -> dk). Per chunk:
    // The query side from the state S before the chunk, its keys' rows loaded.
    auto query_chunk = [&](Workspace<Acc>& w, KeyRows keys, int64_t b, int64_t h, int64_t row0, int64_t n,
                           const Acc* S, Acc* param_sums) {
      load_grads(w, grads_in(w), b, h, row0, n, false);  // computes dden, kept in dden_store for the key side
      affinity_grad(w, keys.v, grads_in(w), n);
      gemm(n, Kp / W, n, w.Bm, C, 1, keys.gk, Kp, w.dgq, Kp, false, Tri::kDepthLower);  // Bm Gk
      transpose(Kp, Dvp, S, Dvp, w.ST, Kp);
      gemm(n, Kp / W, Dvp, w.dnum, Dvp, 1, w.ST, Kp, w.dgq, Kp, true);  // dnum S^T
      add_dden_z(w, n, S + SS);
      finish(w, heads[h], a.q, a.dq, w.gq, w.dgq, w.xq, b, h, row0, n, param_sums,
             Ahead::of<T>({{&a.v, Dv}, {&a.dout, Dv}, {&a.q, D}, {&a.out, Dv}}, b, h, row0 + C, N, C));
    };
    // The key side from the gradient state dS after the chunk, its gradients' rows loaded.
    auto key_chunk = [&](Workspace<Acc>& w, GradRows grads, int64_t b, int64_t h, int64_t row0, int64_t n,
                         const Acc* dS, Acc* param_sums) {
      const int64_t ncv = round_up(n, W) / W;
      load_keys(keys_in(w), b, h, row0, n);
      affinity_grad(w, w.v, grads, n);
      transpose(Kp, Dvp, dS, Dvp, w.dST, Kp);
      key_grads(w, b, h, row0, n, dS, w.dST);
      gemm(n, Kp / W, n, w.Bm, 1, C, grads.gq, Kp, w.dgk, Kp, true, Tri::kDepthUpper);  // + Bm^T Gq
      transpose(C, Kp, w.gk, Kp, w.gkT, C);
      gemm(n, ncv, Kp, grads.gq, Kp, 1, w.gkT, C, w.A, C, false, Tri::kOutLower);  // A = tril(Gq Gk^T)
      keep_lower(w.A, n, C);
      gemm(n, Dvp / W, n, w.A, 1, C, grads.dnum, Dvp, w.num, Dvp, true, Tri::kDepthUpper);  // dv += A^T dnum
      scatter_rows<T>(a.dv, b, h, row0, n, Dv, w.num, Dvp);
      // masked rows: gk = 0, hence ds = 0
      finish(w, heads[h], a.k, a.dk, w.gk, w.dgk, w.xk, b, h, row0, n, param_sums,
             Ahead::of<T>({{&a.v, Dv}, {&a.dout, Dv}, {&a.k, D}}, b, h, row0 - C, N, C));
    };

    // The parameter sums of a scan add up plainly over blocks of kRelayChunks chunks in scan order
    // (a relay's blocks), each block's then added to the lane with compensation: the same
    // additions whether relays or one task per sequence run the scans.
    if (pl.segs > 1) {
      // Fewer pairs than threads (or an uneven split): the two scans as relays, a block's parameter
      // sums its partial. A task keeps the rows its state sums loaded for its work (the forward
      // scan its keys', the reverse scan its gradients').
      auto add_sums = [&](int64_t pair, const Acc* partial) {
        sums_of(pl.lane(pair / s.H, pair % s.H, 0)).add(s, partial);
      };
      Relay<Acc> forward_scan = relay_from<Acc>(s, pl.nt, false, slot, C * (Kp + Dvp), a.S0, a.z0);
      auto key_sums = [&](int64_t thread, int64_t pair, int64_t c, int64_t j, Acc* delta) {
        const auto [b, h, row0, n] = s.chunk_at(pair, c);
        const KeyRows keys = kept_keys(forward_scan.rows(thread, j));
        load_keys(keys, b, h, row0, n);
        chunk_state_sums<Acc>(s, keys.gk, keys.v, nullptr, n, delta);
      };
      auto query_work = [&](int64_t thread, int64_t pair, int64_t c, int64_t j, const Acc* S, Acc* partial) {
        const auto [b, h, row0, n] = s.chunk_at(pair, c);
        query_chunk(ws[thread], kept_keys(forward_scan.rows(thread, j)), b, h, row0, n, S, partial);
      };
      forward_scan.run(key_sums, query_work, &add_sums);

      Relay<Acc> reverse_scan = relay_from<Acc>(s, pl.nt, true, slot, C * (Kp + Dvp + 1), a.dS_final, a.dz_final);
      auto grad_sums = [&](int64_t thread, int64_t pair, int64_t c, int64_t j, Acc* delta) {
        const auto [b, h, row0, n] = s.chunk_at(pair, c);
        const GradRows grads = kept_grads(reverse_scan.rows(thread, j));
        load_grads(ws[thread], grads, b, h, row0, n, true);
        chunk_state_sums<Acc>(s, grads.gq, grads.dnum, grads.dden, n, delta);
      };
      auto key_work = [&](int64_t thread, int64_t pair, int64_t c, int64_t j, const Acc* dS, Acc* partial) {
        const auto [b, h, row0, n] = s.chunk_at(pair, c);
        key_chunk(ws[thread], kept_grads(reverse_scan.rows(thread, j)), b, h, row0, n, dS, partial);
      };
      reverse_scan.run(grad_sums, key_work, &add_sums);
      write_relay_ends(s, reverse_scan, a.dS0, a.dz0);
    } else {
      // A task owns whole sequences: both scans in one go, the state carried from chunk to chunk.
      auto scans = [&](int64_t task) {
        int64_t b, h0, sg;
        pl.task(task, b, h0, sg);
        Workspace<Acc>& w = ws[omp_get_thread_num()];
        // Each lane's block of parameter sums: zeroed at the block's first chunk (place p in scan
        // order), added to the lane after its last.
        std::vector<Acc> blocks(G * slot);
        auto block_sums = [&](int64_t l, int64_t p) {
          Acc* block = blocks.data() + l * slot;
          if (p % kRelayChunks == 0) std::fill(block, block + slot, Acc(0));
          return block;
        };
        auto block_done = [&](int64_t l, int64_t p) {
          if (p % kRelayChunks == kRelayChunks - 1 || p == s.nchunks - 1) {
            sums_of(pl.lane(b, h0 + l, sg)).add(s, blocks.data() + l * slot);
          }
        };
        for (int64_t l = 0; l < G; ++l) {
          Acc* S = w.lstate.data() + l * 2 * SZ;
          Acc* dS = w.ldstate.data() + l * 2 * SZ;
          read_state(a.S0, a.z0, b, h0 + l, K, Dv, Kp, Dvp, S, S + SS);
          read_state(a.dS_final, a.dz_final, b, h0 + l, K, Dv, Kp, Dvp, dS, dS + SS);
          std::fill(S + SZ, S + 2 * SZ, Acc(0));  // no compensation yet
          std::fill(dS + SZ, dS + 2 * SZ, Acc(0));
        }
        for (int64_t c = 0; c < s.nchunks; ++c) {
          const int64_t row0 = c * C, n = std::min(C, N - row0);
          for (int64_t l = 0; l < G; ++l) {
            Acc* S = w.lstate.data() + l * 2 * SZ;
            load_keys(keys_in(w), b, h0 + l, row0, n);
            query_chunk(w, keys_in(w), b, h0 + l, row0, n, S, block_sums(l, c));
            block_done(l, c);
            accumulate_state(s, w.gk, w.v, n, S, w.delta);
          }
        }
        for (int64_t c = s.nchunks - 1; c >= 0; --c) {
          const int64_t row0 = c * C, n = std::min(C, N - row0);
          for (int64_t l = 0; l < G; ++l) {
            Acc* dS = w.ldstate.data() + l * 2 * SZ;
            load_grads(w, grads_in(w), b, h0 + l, row0, n, true);
            key_chunk(w, grads_in(w), b, h0 + l, row0, n, dS, block_sums(l, s.nchunks - 1 - c));
            block_done(l, s.nchunks - 1 - c);
            state_grad_update(w, n, dS);
          }
        }
        for (int64_t l = 0; l < G; ++l) {
          const Acc* dS = w.ldstate.data() + l * 2 * SZ;
          write_state(a.dS0, a.dz0, b, h0 + l, K, Dv, Dvp, dS, dS + SS);
        }
      };
      auto nothing = [](int64_t) {};
      auto no_starts = [](int64_t, int64_t) {};  // each task sets its own
      run_passes(pl, false, nothing, no_starts, scans);
    }
  }

  // Parameter gradients: sum the lane slots of each head in a fixed order.
  std::vector<Acc> total(slot);
  for (int64_t h = 0; h < s.H; ++h) {
    std::fill(total.begin(), total.end(), Acc(0));
    for (int64_t b = 0; b < s.B; ++b) {
      for (int64_t sg = 0; sg < pl.segs; ++sg) {
        const Acc* src = partial.data() + pl.lane(b, h, sg) * 2 * slot;
        for (int64_t i = 0; i < slot; ++i) total[i] += src[i];
      }
    }
    const Head<Acc>& m = heads[h];
    const Acc* t1 = total.data();
    const Acc* t2 = t1 + K * Dp;
    const Acc* ds_sum = t2 + K * Dp;
    Acc ds_all = 0;
    for (int64_t k = 0; k < K; ++k) ds_all += ds_sum[k];
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t e = 0; e < D; ++e) {
        const int64_t i = k * Dp + e;
        const Acc lam = m.lam[i];
        *at<Acc>(a.dmu, h, k, e) = lam * t1[i];
        const Acc dsigma2 = Acc(-0.5) * (lam * ds_sum[k] - lam * lam * t2[i]);
        *at<Acc>(a.domega, h, k, e) = dsigma2 * m.dsigma2_domega[k * D + e];
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
