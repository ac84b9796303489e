// The forward of short sequences, a row at a time: decoding steps (one new token with the carried
// state) and calls of a few tokens. The chunked scan (forward.cpp, plan.h) pays per call for
// per-thread chunk buffers and per chunk for centring the chunk and for the C x C intra-chunk
// products, more than the arithmetic of a one-token step; here every (sequence, head) pair walks
// its rows directly:
//   key row j:   gk = gamma(k_j) (0 for a masked key), S += gk^T v_j, z += gk
//   query row i: out_i = (gq S) / (gq . z + eps), gq = gamma(q_i)
// causal: each row's key, then its query (the query reads the state with its own key in, as the
// chunk's tril(Gq Gk^T) makes it); bidirectional: all keys, then all queries. The numerics are the
// chunked path's (docs/design.md section 4): responsibilities in the direct form (the form the
// centred form's guard falls back to, at least as accurate), the state summed with compensation
// one row's contribution at a time and starting from the given state with zero compensation, as
// a chunk's sum is added. Outputs, saved tensors and final states are written in the same layouts.
#pragma once

#include <omp.h>

#include "mixture.h"
#include "plan.h"

namespace gmattn {
namespace cpu {
namespace GMATTN_ISA {  // (rows.h: the ISA name, and cpu_detail in scope)

// Sequences of at most this many rows take the row-at-a-time path (forward_rows). Per row it
// computes the responsibilities in the direct form (3 operations per component and dimension
// against the centred form's 2) and adds to the state with compensation per row rather than per
// chunk; a chunk's fixed costs (its buffers, centring, the C x C products) outweigh that for a
// few rows only.
constexpr int64_t kRowPathRows = 4;

// Packed sequences (cu_seqlens) take it only in a small call (at most a chunk's rows) or a
// decoding step (at most one token per sequence on average: each token's state read and written
// once dominates). Otherwise packed chunks, several short sequences to a chunk, cost per token
// about a third of the row path without a state, half with one (2 to 4 tokens per sequence).
inline bool row_path_applies(const Shape& s) {
  return s.longest <= kRowPathRows && (s.starts.empty() || s.N <= kChunk || s.N <= s.seqs);
}

// Working memory kept by each thread from call to call (a decoding loop calls thousands of times
// with the same sizes), up to kKeptBytes; a larger request, or one made while the thread's block
// is in use, gets memory of its own for the call. Uncleared: every use writes before it reads.
constexpr size_t kKeptBytes = size_t(4) << 20;

template <class Acc>
class KeptMemory {
 public:
  explicit KeptMemory(size_t n) {
    Kept& kept = thread_kept();
    if (n * sizeof(Acc) <= kKeptBytes && !kept.in_use) {
      if (kept.block.size() < n) kept.block = UnclearedBuffer<Acc>(n);
      kept.in_use = true;
      kept_ = &kept;
      p_ = kept.block.data();
    } else {
      own_ = UnclearedBuffer<Acc>(n);
      p_ = own_.data();
    }
  }
  ~KeptMemory() {
    if (kept_) kept_->in_use = false;
  }
  KeptMemory(const KeptMemory&) = delete;
  KeptMemory& operator=(const KeptMemory&) = delete;
  Acc* data() const { return p_; }

 private:
  struct Kept {
    UnclearedBuffer<Acc> block;
    bool in_use = false;
  };
  static Kept& thread_kept() {
    static thread_local Kept kept;
    return kept;
  }
  Kept* kept_ = nullptr;
  UnclearedBuffer<Acc> own_;
  Acc* p_ = nullptr;
};

// The row paths' tasks: work(m, t) for t in [0, tasks) on up to nt threads, then (once all are
// done) after(m, i) for i in [0, after_count); m is the running thread's working memory of
// `per_thread` values (64-byte aligned): on one thread the block it keeps from call to call, on
// several one block per thread for the call. Static schedules: a task's thread does not matter.
template <class Acc, class Work, class After>
void run_row_tasks(int nt, int64_t tasks, int64_t per_thread, Work&& work, int64_t after_count, After&& after) {
  nt = static_cast<int>(std::min<int64_t>(nt, tasks));
  if (nt <= 1) {  // (the caller's thread flushes subnormals for the whole call: dispatch.cpp)
    KeptMemory<Acc> mem(per_thread);
    Acc* m = align64(mem.data());
    for (int64_t t = 0; t < tasks; ++t) work(m, t);
    for (int64_t i = 0; i < after_count; ++i) after(m, i);
    stream_fence();  // outputs written with streaming stores (stream_copy) are visible
    return;
  }
  // (All memory before the parallel region: an exception must not escape it, working_memory.h.)
  UnclearedBuffer<Acc> mem(nt * per_thread);
#pragma omp parallel num_threads(nt)
  {
    const FlushSubnormals flush;  // (the thread's own setting back at the region's end: numeric.h)
    Acc* m = align64(mem.data() + omp_get_thread_num() * per_thread);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) work(m, t);
    if (after_count > 0) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < after_count; ++i) after(m, i);
    }
    stream_fence();
  }
}

// Consecutive parts of a block of working memory, each on 64-byte lines: part(n) is where the
// next part of n values starts; total() the block's size, with room to align its start.
template <class Acc>
struct LineParts {
  int64_t at = 0;
  int64_t operator()(int64_t n) {
    const int64_t start = at;
    at += round_up(n, kLine<Acc>);
    return start;
  }
  int64_t total() const { return at + kLine<Acc>; }
};

// One (sequence, head) pair's working memory in forward_rows: the running state with its
// compensation (2 (Kp x Dvp + Kp), the layout of plan.h's running states), then a gathered row
// (Dp), the rows' key responsibilities (L x Kp) and values (L x Dvp), one query's responsibilities
// (Kp) and its output row (Dvp); each part 64-byte aligned.
struct RowPathLayout {
  int64_t state, x, gk, v, gq, num, total;
  template <class Acc>
  static RowPathLayout of(const Shape& s) {
    const int64_t L = s.longest;
    RowPathLayout l;
    LineParts<Acc> part;
    l.state = part(2 * (s.Kp * s.Dvp + s.Kp));
    l.x = part(s.Dp);
    l.gk = part(L * s.Kp);
    l.v = part(L * s.Dvp);
    l.gq = part(s.Kp);
    l.num = part(s.Dvp);
    l.total = part.total();
    return l;
  }
};

// One token's pass over a state whose rows are contiguous (S0, S_final: K rows, `rs` apart, either
// absent): S_final[k] = S0[k] + gk[k] v (gk null: a masked key, nothing added), and the query's
// num = gq S_final, for NV vectors of columns from column e0, the sums kept in registers. Which of
// S0, gk and S_final are present is a template argument of the loop (kS0, kGk, kSf): tested per
// row and vector, the tests cost as much as the arithmetic.
template <class Acc>
struct StateRows {
  const Acc* S0;
  int64_t s0_rs;
  Acc* Sf;
  int64_t sf_rs;
  const Acc *gk, *v, *gq;
  int64_t K;
  template <int NV, bool kS0, bool kGk, bool kSf>
  void columns(int64_t e0, Acc* num) const {
    using V = VecT<Acc>;
    constexpr int W = Simd<Acc>::W;
    // (in locals: the stores through Sf could otherwise alias the members, reloaded per store)
    const Acc* const s0 = kS0 ? S0 + e0 : nullptr;
    Acc* const sf = kSf ? Sf + e0 : nullptr;
    const Acc* const g_k = gk;
    const Acc* const g_q = gq;
    const int64_t s0_stride = s0_rs, sf_stride = sf_rs, rows = K;
    V acc[NV], vv[NV];
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) {
      acc[i] = V{};
      vv[i] = kGk ? loadu(v + e0 + i * W) : V{};
    }
    for (int64_t k = 0; k < rows; ++k) {
      const V g = splat(kGk ? g_k[k] : Acc(0)), r = splat(g_q[k]);
#pragma GCC unroll 4
      for (int i = 0; i < NV; ++i) {
        V sk = kS0 ? loadu(s0 + k * s0_stride + i * W) : V{};
        if (kGk) sk += g * vv[i];
        if (kSf) storeu(sf + k * sf_stride + i * W, sk);
        acc[i] += r * sk;
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) storeu(num + e0 + i * W, acc[i]);
  }
  // num's whole vectors of columns (the first Dvw = Dv - Dv % W).
  template <bool kS0, bool kGk, bool kSf>
  void whole_vectors(int64_t Dvw, Acc* num) const {
    constexpr int W = Simd<Acc>::W;
    int64_t e = 0;
    for (; e + 4 * W <= Dvw; e += 4 * W) columns<4, kS0, kGk, kSf>(e, num);
    switch ((Dvw - e) / W) {
      case 3: columns<3, kS0, kGk, kSf>(e, num); break;
      case 2: columns<2, kS0, kGk, kSf>(e, num); break;
      case 1: columns<1, kS0, kGk, kSf>(e, num); break;
      default: break;
    }
  }
  void whole_vectors(int64_t Dvw, Acc* num) const {
    const int which = (S0 ? 4 : 0) + (gk ? 2 : 0) + (Sf ? 1 : 0);
    switch (which) {
      case 0: whole_vectors<false, false, false>(Dvw, num); break;
      case 1: whole_vectors<false, false, true>(Dvw, num); break;
      case 2: whole_vectors<false, true, false>(Dvw, num); break;
      case 3: whole_vectors<false, true, true>(Dvw, num); break;
      case 4: whole_vectors<true, false, false>(Dvw, num); break;
      case 5: whole_vectors<true, false, true>(Dvw, num); break;
      case 6: whole_vectors<true, true, false>(Dvw, num); break;
      default: whole_vectors<true, true, true>(Dvw, num); break;
    }
  }
};

// The forward of a call whose sequences are all at most kRowPathRows long (row_path_applies), on
// `nt` threads over the (sequence, head) pairs.
template <class T, class Acc>
void forward_rows(const ForwardArgs& a, const Shape& s, int nt) {
  using V = VecT<Acc>;
  constexpr int W = Simd<Acc>::W;
  const int64_t K = s.K, D = s.D, Dv = s.Dv, Kp = s.Kp, Dp = s.Dp, Dvp = s.Dvp;
  const int64_t SS = Kp * Dvp, SZ = SS + Kp;
  const bool causal = a.opt.causal, save = a.gq.present();
  const Acc eps = static_cast<Acc>(a.opt.eps);
  const auto prepared = prepared_heads<Acc>(a.mu, a.omega, a.alpha, s, a.opt.sigma_eps, nt);
  const std::vector<Head<Acc>>& heads = *prepared;
  const RowPathLayout lay = RowPathLayout::of<Acc>(s);

  // out = num / (gq . z + eps) for one query row whose num = gq S is formed, written out, and
  // gq and the denominator saved for the backward (shared by both row paths below).
  auto read_out_row = [&](const Acc* gq, const Acc* z, Acc* num, int64_t b, int64_t h, int64_t row) {
    Acc den = dot(gq, z, Kp) + eps;
    const Acc inv = Acc(1) / den;
    for (int64_t e = 0; e < Dvp; e += W) storeu(num + e, loadu(num + e) * inv);
    scatter_rows<T>(a.out, b, h, row, 1, Dv, num, Dvp);
    if (save) {
      write_saved(a.gq, b, h, row, 1, K, gq, Kp);
      write_den(a.den, b, h, row, 1, &den);
    }
  };

  // A one-token sequence whose state rows are contiguous (the decoding step): the state goes from
  // S0 straight to S_final, a row of it at a time, and the query reads each row as it is formed,
  // S_final[k] = S0[k] + gk[k] v, num += gq[k] S_final[k]: the state is read once and written
  // once (the general path below copies it into working memory and back). One row's contribution
  // needs no compensation.
  auto one_token = [&](Acc* mem, int64_t q, int64_t h, const Shape::SeqAt& sq) {
    const Head<Acc>& hd = heads[h];
    Acc* x = mem + lay.x;
    Acc* gk = mem + lay.gk;
    Acc* v = mem + lay.v;
    Acc* gq = mem + lay.gq;
    Acc* num = mem + lay.num;
    Acc* z = mem + lay.state;  // (Kp) the new z
    const int64_t row = sq.row0;
    uint8_t keep = 1;
    gather_rows<T>(a.k, sq.b, h, row, 1, D, x, Dp, 1);
    const bool written = !(mask_rows(a.mask, sq.b, row, 1, &keep) && !keep);
    if (written) {
      row_responsibilities(hd, x, gk);
      gather_rows<T>(a.v, sq.b, h, row, 1, Dv, v, Dvp, 1);
    } else {
      std::fill(gk, gk + Kp, Acc(0));
    }
    if (save) write_saved(a.gk, sq.b, h, row, 1, K, gk, Kp);
    gather_rows<T>(a.q, sq.b, h, row, 1, D, x, Dp, 1);
    row_responsibilities(hd, x, gq);
    const Acc* S0 = a.S0.present() ? at<const Acc>(a.S0, q, h) : nullptr;
    Acc* Sf = a.S_final.present() ? at<Acc>(a.S_final, q, h) : nullptr;
    const StateRows<Acc> st{S0, a.S0.stride[2], Sf, a.S_final.stride[2], written ? gk : nullptr, v, gq, K};
    const int64_t Dvw = Dv - Dv % W;  // whole vectors of a state row
    st.whole_vectors(Dvw, num);
    for (int64_t e = Dvw; e < Dvp; ++e) num[e] = Acc(0);
    for (int64_t k = 0; k < K && Dvw < Dv; ++k) {  // the columns past the whole vectors, if any
      for (int64_t e = Dvw; e < Dv; ++e) {
        Acc sk = S0 ? S0[k * st.s0_rs + e] : Acc(0);
        if (written) sk += gk[k] * v[e];
        if (Sf) Sf[k * st.sf_rs + e] = sk;
        num[e] += gq[k] * sk;
      }
    }
    std::fill(z, z + Kp, Acc(0));
    if (a.z0.present()) {
      const Acc* z0 = at<const Acc>(a.z0, q, h);
      for (int64_t k = 0; k < K; ++k) z[k] = z0[k * a.z0.stride[2]];
    }
    if (written) {
      for (int64_t k = 0; k < Kp; k += W) storeu(z + k, loadu(z + k) + loadu(gk + k));
    }
    if (Sf) {
      Acc* zf = at<Acc>(a.z_final, q, h);
      for (int64_t k = 0; k < K; ++k) zf[k * a.z_final.stride[2]] = z[k];
    }
    read_out_row(gq, z, num, sq.b, h, row);
  };

  auto pair_rows = [&](Acc* mem, int64_t pair) {
    const int64_t q = pair / s.H, h = pair % s.H;
    const Shape::SeqAt sq = s.seq_at(q);
    if (sq.len == 1 && (!a.S0.present() || a.S0.stride[3] == 1) && (!a.S_final.present() || a.S_final.stride[3] == 1)) {
      one_token(mem, q, h, sq);
      return;
    }
    const Head<Acc>& hd = heads[h];
    Acc* S = mem + lay.state;  // S (Kp x Dvp), z (Kp), then their compensation terms
    Acc* x = mem + lay.x;
    read_state(a.S0, a.z0, q, h, K, Dv, Kp, Dvp, S, S + SS);
    // One row's contribution needs no compensation (the given state enters with zero compensation,
    // and what is left after the last row is dropped, as the chunked path drops it).
    const bool compensate = sq.len > 1;
    if (compensate) std::fill(S + SZ, S + 2 * SZ, Acc(0));
    uint8_t keep = 1;
    auto key_row = [&](int64_t j) {
      const int64_t row = sq.row0 + j;
      Acc* gk = mem + lay.gk + j * Kp;
      Acc* v = mem + lay.v + j * Dvp;
      gather_rows<T>(a.k, sq.b, h, row, 1, D, x, Dp, 1);
      if (mask_rows(a.mask, sq.b, row, 1, &keep) && !keep) {
        std::fill(gk, gk + Kp, Acc(0));
      } else {
        row_responsibilities(hd, x, gk);
        gather_rows<T>(a.v, sq.b, h, row, 1, Dv, v, Dvp, 1);
        // S += gk^T v, z += gk
        for (int64_t k = 0; k < K; ++k) {
          const V g = splat(gk[k]);
          Acc* Sk = S + k * Dvp;
          for (int64_t e = 0; e < Dvp; e += W) {
            V sum = loadu(Sk + e);
            if (compensate) {
              V comp = loadu(Sk + SZ + e);
              math::compensated_add(sum, comp, g * loadu(v + e));
              storeu(Sk + SZ + e, comp);
            } else {
              sum += g * loadu(v + e);
            }
            storeu(Sk + e, sum);
          }
        }
        Acc* z = S + SS;
        if (compensate) {
          add_compensated(z, z + SZ, gk, Kp);
        } else {
          for (int64_t k = 0; k < Kp; k += W) storeu(z + k, loadu(z + k) + loadu(gk + k));
        }
      }
      if (save) write_saved(a.gk, sq.b, h, row, 1, K, gk, Kp);
    };
    auto query_row = [&](int64_t i) {
      const int64_t row = sq.row0 + i;
      Acc* gq = mem + lay.gq;
      Acc* num = mem + lay.num;
      gather_rows<T>(a.q, sq.b, h, row, 1, D, x, Dp, 1);
      row_responsibilities(hd, x, gq);
      // num = gq S, den = gq . z + eps
      gemm(1, Dvp / W, K, gq, Kp, 1, S, Dvp, num, Dvp, false);
      read_out_row(gq, S + SS, num, sq.b, h, row);
    };
    if (causal) {
      for (int64_t r = 0; r < sq.len; ++r) {
        key_row(r);
        query_row(r);
      }
    } else {
      for (int64_t r = 0; r < sq.len; ++r) key_row(r);
      for (int64_t r = 0; r < sq.len; ++r) query_row(r);
    }
    write_state(a.S_final, a.z_final, q, h, K, Dv, Dvp, S, S + SS);
  };

  run_row_tasks<Acc>(nt, s.seqs * s.H, lay.total, pair_rows, 0, [](Acc*, int64_t) {});
}

}  // namespace GMATTN_ISA
}  // namespace cpu
}  // namespace gmattn
