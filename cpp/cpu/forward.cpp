// The CPU forward (docs/design.md section 1), compiled once per instruction set into namespace
// gmattn::cpu::GMATTN_ISA; dispatch.cpp picks one at run time. Per chunk: the keys' and queries'
// responsibilities (mixture.h), the read of the state before the chunk and, causal, of the chunk
// itself; the state moves on (plan.h).
#include <omp.h>

#include "mixture.h"
#include "plan.h"
#include "step.h"

namespace gmattn {
namespace cpu {
namespace GMATTN_ISA {  // (rows.h: the ISA name, and cpu_detail in scope)

template <class T, class Acc>
void forward_typed(const ForwardArgs& a) {
  constexpr int W = Simd<Acc>::W;
  const Shape s = Shape::make<Acc>(a.dims, a.cu_seqlens);
  const int64_t N = s.N, K = s.K, D = s.D, Dv = s.Dv, Kp = s.Kp, Dp = s.Dp, Dvp = s.Dvp, C = s.C;
  const int64_t SS = Kp * Dvp, SZ = SS + Kp;  // a state: S (Kp x Dvp), then z (Kp)
  if (row_path_applies(s)) {  // a decoding step, a few tokens: no chunks (step.h)
    forward_rows<T, Acc>(a, s, threads_for(s, a.opt.num_threads));
    return;
  }
  const Plan pl = make_plan(s, threads_for(s, a.opt.num_threads));
  const int64_t G = pl.group;
  const bool causal = a.opt.causal, save = a.gq.present();
  const bool from_state = a.S0.present() || a.z0.present(), final_state = a.S_final.present();
  const Acc eps = static_cast<Acc>(a.opt.eps);

  const auto prepared = prepared_heads<Acc>(a.mu, a.omega, a.alpha, s, a.opt.sigma_eps, pl.nt);
  const std::vector<Head<Acc>>& heads = *prepared;
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
  // A block's reads of a state (S, then z): num = Gq S, den = Gq z (+ eps in write_out).
  auto read_state_of = [&](const Acc* gq, int64_t L, const Acc* S, Acc* num, Acc* den) {
    gemm(L, Dvp / W, K, gq, Kp, 1, S, Dvp, num, Dvp, false);
    for (int64_t i = 0; i < L; ++i) den[i] = dot(gq + i * Kp, S + SS, Kp);
  };
  // A chunk's query responsibilities in w.gq; and its outputs num / (den + eps), written out
  // (with the saved Gq and denominators when asked for).
  auto route_queries = [&](Workspace<Acc>& w, const Head<Acc>& hd, int64_t b, int64_t h, int64_t row0, int64_t n) {
    gather_rows<T>(a.q, b, h, row0, n, D, w.xq, Dp, C);
    responsibilities(hd, s, w, w.xq, n, w.gq, nullptr, Ahead::of<T>({{&a.q, D}}, b, h, row0 + C, N, C));
  };
  auto write_out = [&](Workspace<Acc>& w, int64_t b, int64_t h, int64_t row0, int64_t n) {
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
  // A chunk's outputs from the state before it (S, then z; nullptr: a state known to be zero, the
  // first causal chunk without an initial state, whose read would add Gq 0) and, causal, from the
  // chunk's own keys (gk, v from route_keys).
  auto read_out = [&](Workspace<Acc>& w, const Head<Acc>& hd, int64_t b, int64_t h, int64_t row0, int64_t n,
                      const Acc* S, const Acc* gk, const Acc* v) {
    route_queries(w, hd, b, h, row0, n);
    if (S) {
      read_state_of(w.gq, n, S, w.num, w.den);
    } else {
      std::fill(w.num, w.num + n * Dvp, Acc(0));
      std::fill(w.den, w.den + n, Acc(0));
    }
    if (causal) {  // intra-chunk: A = tril(Gq Gk^T); num += A V, den += rowsum(A)
      block_affinity(s, w.gq, gk, n, true, w.gkT, w.A);
      block_read(s, w.A, v, n, true, w.num, w.den);
    }
    write_out(w, b, h, row0, n);
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
      read_out(ws[thread], heads[h], b, h, row0, n, c == 0 && !from_state ? nullptr : S, gk, gk + C * Kp);
    };
    relay.run(sums, work, static_cast<NoCombine*>(nullptr));
    write_relay_ends(s, relay, a.S_final, a.z_final);
    return;
  }

  // Otherwise a task owns whole sequences (causal: one pass, the state carried from chunk to
  // chunk) or, bidirectional, segments of them in two passes: pass 1 sums each lane's keys,
  // pass 2 reads the total.
  const bool two_pass = !causal;
  Buffer<Acc> seg(two_pass ? pl.lanes * 2 * SZ : 0);  // each lane's sums, compensated
  auto pass1 = [&](int64_t task, int64_t q) {
    Workspace<Acc>& w = ws[omp_get_thread_num()];
    zero_lane_states(pl, s, task, seg);  // (a unit's sequences reuse its lanes)
    for_each_chunk(pl, s, task, q, [&](int64_t, int64_t b, int64_t h, int64_t ln, int64_t row0, int64_t n) {
      route_keys(w, heads[h], b, h, row0, n, w.gk, w.v);
      accumulate_state(s, w.gk, w.v, n, seg.data() + ln * 2 * SZ, w.delta);
    });
  };
  // The starting state of sequence q's lanes of unit u, head h: the initial state, plus
  // bidirectionally all the sums (what every query reads).
  UnclearedBuffer<Acc> start(pl.lanes * SZ);  // (each lane's set by `starts` before pass 2 reads it)
  // Formed in the first lane's start, copied to the others.
  auto starts = [&](int64_t u, int64_t q, int64_t h) {
    Acc* run = start.data() + pl.lane(u, h, 0) * SZ;
    read_state(a.S0, a.z0, q, h, K, Dv, Kp, Dvp, run, run + SS);
    if (!causal) {
      for (int64_t sg = 0; sg < pl.segs; ++sg) add_lane_state(s, seg, pl.lane(u, h, sg), run);
      write_state(a.S_final, a.z_final, q, h, K, Dv, Dvp, run, run + SS);
    }
    for (int64_t sg = 1; sg < pl.segs; ++sg) std::copy(run, run + SZ, start.data() + pl.lane(u, h, sg) * SZ);
  };
  // Pass 2: the queries read the state (causal: and the chunk itself), the state moves on.
  auto pass2 = [&](int64_t task, int64_t q) {
    int64_t b, h0, sg;
    pl.task(task, b, h0, sg);
    Workspace<Acc>& w = ws[omp_get_thread_num()];
    for (int64_t l = 0; l < G; ++l) {
      set_state(s, start.data() + pl.lane(b, h0 + l, sg) * SZ, w.lstate.data() + l * 2 * SZ);
    }
    const Shape::SeqAt seq = s.seq_at(q);
    for_each_chunk(pl, s, task, q, [&](int64_t, int64_t bb, int64_t h, int64_t, int64_t row0, int64_t n) {
      Acc* S = w.lstate.data() + (h - h0) * 2 * SZ;
      if (!causal) {
        read_out(w, heads[h], bb, h, row0, n, S, w.gk, w.v);
        return;
      }
      // (A causal task owns the whole sequence: its first chunk reads the initial state; nothing
      // reads the state after its last unless the final state is asked for.)
      route_keys(w, heads[h], bb, h, row0, n, w.gk, w.v);
      read_out(w, heads[h], bb, h, row0, n, row0 == seq.row0 && !from_state ? nullptr : S, w.gk, w.v);
      if (final_state || row0 + n < seq.row0 + seq.len) accumulate_state(s, w.gk, w.v, n, S, w.delta);
    });
    if (causal) {  // the task's whole sequence: its final states
      for (int64_t l = 0; l < G; ++l) {
        const Acc* S = w.lstate.data() + l * 2 * SZ;
        write_state(a.S_final, a.z_final, q, h0 + l, K, Dv, Dvp, S, S + SS);
      }
    }
  };

  // A packed chunk (Plan::packs): the short sequences [q0, q1), routed together as one chunk's
  // rows, each sequence a block that reads its initial state (if any) and its own rows (causal:
  // up to the query; bidirectional: all of them, so no pass over the keys comes first: they all
  // lie in the chunk). Its final state is its initial state plus its keys' sums.
  auto packed = [&](int64_t task, int64_t q0, int64_t q1) {
    int64_t u, h0, sg;
    pl.task(task, u, h0, sg);
    Workspace<Acc>& w = ws[omp_get_thread_num()];
    const int64_t row0 = s.starts[q0], n = s.starts[q1] - row0;
    Acc* state = w.lstate.data();  // (2 SZ: with its compensation)
    for (int64_t h = h0; h < h0 + G; ++h) {
      if (n > 0) {
        route_keys(w, heads[h], 0, h, row0, n, w.gk, w.v);
        route_queries(w, heads[h], 0, h, row0, n);
      }
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t o = s.starts[q] - row0, L = s.len(q);
        const Acc *gq = w.gq + o * Kp, *gk = w.gk + o * Kp, *v = w.v + o * Dvp;
        Acc *num = w.num + o * Dvp, *den = w.den + o;
        if (from_state || final_state) read_state(a.S0, a.z0, q, h, K, Dv, Kp, Dvp, state, state + SS);
        if (L > 0) {
          if (from_state) {
            read_state_of(gq, L, state, num, den);
          } else {
            std::fill(num, num + L * Dvp, Acc(0));
            std::fill(den, den + L, Acc(0));
          }
          block_affinity(s, gq, gk, L, causal, w.gkT, w.A + o * C);
          block_read(s, w.A + o * C, v, L, causal, num, den);
        }
        if (final_state) {
          if (L > 0) {
            std::fill(state + SZ, state + 2 * SZ, Acc(0));  // (from the state with zero compensation)
            accumulate_state(s, gk, v, L, state, w.delta);
          }
          write_state(a.S_final, a.z_final, q, h, K, Dv, Dvp, state, state + SS);
        }
      }
      if (n > 0) write_out(w, 0, h, row0, n);
    }
  };

  run_passes(pl, s, two_pass, pass1, starts, pass2, packed);
}

// The entry point of this ISA build.
void forward(const ForwardArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: forward_typed<float, float>(a); break;
    case DType::kFloat64: forward_typed<double, double>(a); break;
    case DType::kBFloat16: forward_typed<bf16_t, float>(a); break;
    case DType::kFloat16: forward_typed<f16_t, float>(a); break;
  }
}

}  // namespace GMATTN_ISA
}  // namespace cpu
}  // namespace gmattn
