// The CPU backward (docs/design.md section 1), compiled once per instruction set into namespace
// gmattn::cpu::GMATTN_ISA; dispatch.cpp picks one at run time. It recomputes what it needs from
// the saved responsibilities: causal, with one forward scan (the state before each chunk -> dq) and
// one reverse scan (the gradient state after each chunk -> dk, dv); bidirectional, with a pass over
// the queries (dq, and the state gradient) and then one over the keys (dk, dv). Every chunk ends
// in the backward through its responsibilities (mixture.h), whose parameter sums are reduced to
// the gradients of mu, omega and alpha at the end.
#include <omp.h>

#include <vector>

#include "mixture.h"
#include "plan.h"
#include "step_backward.h"

namespace gmattn {
namespace cpu {
namespace GMATTN_ISA {  // (rows.h: the ISA name, and cpu_detail in scope)

template <class T, class Acc>
class Backward {
 public:
  Backward(const BackwardArgs& args, Shape shape)
      : a(args), s(std::move(shape)), pl(make_plan(s, threads_for(s, args.opt.num_threads))),
        causal(args.opt.causal), state_given(!causal && args.S_end.present()) {
    ws.reserve(pl.nt);
    for (int t = 0; t < pl.nt; ++t) ws.emplace_back(s, G);
  }

  void run() {
    if (!causal) {
      bidirectional();
    } else if (pl.segs > 1) {
      causal_relays();
    } else {
      causal_scans();
    }
    parameter_gradients();
  }

 private:
  static constexpr int W = Simd<Acc>::W;
  const BackwardArgs& a;
  const Shape s;
  const int64_t N = s.N, K = s.K, D = s.D, Dv = s.Dv, Kp = s.Kp, Dp = s.Dp, Dvp = s.Dvp, C = s.C;
  const int64_t SS = Kp * Dvp, SZ = SS + Kp;  // a state: S (Kp x Dvp), then z (Kp)
  const Plan pl;
  const int64_t G = pl.group;
  const bool causal;
  // Bidirectional with the forward's final state: the state every query read is given, not summed.
  const bool state_given;

  const std::shared_ptr<const std::vector<Head<Acc>>> prepared =
      prepared_heads<Acc>(a.mu, a.omega, a.alpha, s, a.opt.sigma_eps, pl.nt);
  const std::vector<Head<Acc>>& heads = *prepared;
  std::vector<Workspace<Acc>> ws;
  // One slot of parameter sums per lane (with compensation), reduced in a fixed order at the end.
  // A lane's first block is copied in, its compensation zeroed (what adding it to zero with
  // compensation gives, bit for bit): clearing every slot first cost a short call more than its
  // work (0.5 MB at H = 8, K = D = 64). A lane that received nothing is skipped in the reduction.
  const int64_t slot = ParamSums<Acc>::size(s);
  UnclearedBuffer<Acc> partial = UnclearedBuffer<Acc>(pl.lanes * 2 * slot);
  std::vector<uint8_t> lane_started = std::vector<uint8_t>(pl.lanes, 0);  // (a lane's adds are ordered)
  // Causal: dden of every row, from the first pass that computes it (pass 1, else the forward
  // scan) to the later ones, which then do not read `out` again.
  Buffer<Acc> dden_store = Buffer<Acc>(causal ? s.B * s.H * N : 0);

  void add_to_lane(int64_t lane, const Acc* block) {
    Acc* sums = partial.data() + lane * 2 * slot;
    if (lane_started[lane]) {
      ParamSums<Acc>{sums}.add(s, block);
    } else {
      std::copy(block, block + slot, sums);
      std::fill(sums + slot, sums + 2 * slot, Acc(0));
      lane_started[lane] = 1;
    }
  }
  Acc* dden_of(int64_t b, int64_t h, int64_t row0) { return dden_store.data() + (b * s.H + h) * N + row0; }

  // Where a chunk's inputs are loaded to: its keys' rows (saved Gk, C x Kp; v, C x Dvp) and its
  // gradients' rows (saved Gq, C x Kp; dnum, C x Dvp; dden, C). The workspace's rows, or the rows a
  // relay task keeps from its state sums for its work (kept_keys, kept_grads).
  struct KeyRows {
    Acc *gk, *v;
  };
  struct GradRows {
    Acc *gq, *dnum, *dden;
  };
  static KeyRows keys_in(Workspace<Acc>& w) { return KeyRows{w.gk, w.v}; }
  static GradRows grads_in(Workspace<Acc>& w) { return GradRows{w.gq, w.dnum, w.dden}; }
  KeyRows kept_keys(Acc* rows) const { return KeyRows{rows, rows + C * Kp}; }
  GradRows kept_grads(Acc* rows) const { return GradRows{rows, rows + C * Kp, rows + C * (Kp + Dvp)}; }

  // The chunk's saved Gk and its v.
  void load_keys(KeyRows to, int64_t b, int64_t h, int64_t row0, int64_t n) {
    read_saved(a.gk, b, h, row0, n, K, to.gk, Kp, C);
    gather_rows<T>(a.v, b, h, row0, n, Dv, to.v, Dvp, C);
  }
  // The chunk's saved Gq, den and its dout, out: dnum = g / den, dden = -(g . out) / den. With
  // `dden_stored`, dden is read from dden_store (an earlier pass computed it), else computed from
  // `out` (and stored there when there is a store).
  void load_grads(Workspace<Acc>& w, GradRows to, int64_t b, int64_t h, int64_t row0, int64_t n, bool dden_stored) {
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
  }
  // The state gradient: dS += Gq^T dnum, dz += Gq^T dden.
  void state_grad_update(Workspace<Acc>& w, int64_t n, Acc* dstate) {
    accumulate_state(s, w.gq, w.dnum, w.dden, n, dstate, w.delta);
  }
  // Bm = dnum V^T + dden 1^T over a block (rows.h; causal: its lower triangle): the gradient of
  // the block's affinity A. Pointers at the block's first row.
  void affinity_grad(Workspace<Acc>& w, const Acc* v, const Acc* dnum, const Acc* dden, int64_t L, bool tril,
                     Acc* Bm) {
    transpose(L, Dvp, v, Dvp, w.vT, C);  // (columns past L: never read)
    gemm(L, round_up(L, W) / W, Dvp, dnum, Dvp, 1, w.vT, C, Bm, C, false, out_tri(tril));
    for (int64_t i = 0; i < L; ++i) {
      const Acc dd = dden[i];
      const int64_t cols = block_cols(tril, i, L);
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) Bm[i * C + j] += dd;
    }
    if (tril) keep_lower(Bm, L, C);
  }
  // The key side of a block's own part of the gradients (Bm from affinity_grad): dGk += Bm^T Gq
  // and dv += A^T dnum (A = Gq Gk^T, rows.h; in w.A from row o). Pointers at the block's first row.
  void block_key_grads(Workspace<Acc>& w, const Acc* gq, const Acc* gk, const Acc* dnum, const Acc* Bm, int64_t L,
                       bool tril, Acc* dgk, Acc* dv, int64_t o) {
    Acc* A = w.A + o * C;
    gemm(L, Kp / W, L, Bm, 1, C, gq, Kp, dgk, Kp, true, depth_upper(tril));  // + Bm^T Gq
    block_affinity(s, gq, gk, L, tril, w.gkT, A);
    gemm(L, Dvp / W, L, A, 1, C, dnum, Dvp, dv, Dvp, true, depth_upper(tril));  // dv += A^T dnum
  }
  // dGq -> ds (softmax backward) -> dq and parameter sums; likewise dGk -> dk.
  // `ahead`: rows of the chunk computed next, fetched meanwhile. The chunk's parameter sums are
  // added to param_sums (written there when `sums_fresh`: see density_backward).
  void finish(Workspace<Acc>& w, const Head<Acc>& hd, const View& x_in, const View& dx_out, Acc* gamma, Acc* dgamma,
              Acc* xbuf, int64_t b, int64_t h, int64_t row0, int64_t n, Acc* param_sums, bool sums_fresh,
              const Ahead& ahead) {
    softmax_backward(gamma, dgamma, n, K, Kp);
    gather_rows<T>(x_in, b, h, row0, n, D, xbuf, Dp, n);
    density_backward(hd, s, xbuf, dgamma, n, w.dx, param_sums, sums_fresh, ahead);
    scatter_rows<T>(dx_out, b, h, row0, n, D, w.dx, Dp);
  }
  // dGq += dden z^T (dGq holds dnum S^T), rows [o, o + n) of the chunk.
  void add_dden_z(Workspace<Acc>& w, int64_t n, const Acc* z, int64_t o = 0) {
    for (int64_t i = o; i < o + n; ++i) {
      const Acc dd = w.dden[i];
#pragma omp simd
      for (int64_t k = 0; k < Kp; ++k) w.dgq[i * Kp + k] += dd * z[k];
    }
  }
  // dGk = V dS^T + dz (dST: dS transposed), dv = Gk dS (in w.num, written out by the caller),
  // rows [o, o + n) of the chunk.
  void key_grads(Workspace<Acc>& w, const Acc* dstate, const Acc* dST, int64_t n, int64_t o = 0) {
    Acc* dgk = w.dgk + o * Kp;
    gemm(n, Kp / W, Dvp, w.v + o * Dvp, Dvp, 1, dST, Kp, dgk, Kp, false);
    const Acc* dz = dstate + SS;
    for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
      for (int64_t k = 0; k < Kp; ++k) dgk[i * Kp + k] += dz[k];
    }
    gemm(n, Dvp / W, K, w.gk + o * Kp, Kp, 1, dstate, Dvp, w.num + o * Dvp, Dvp, false);
  }

  // Bidirectional. Every query read the same state (S, z) = S0 + sum_j Gk[j]^T (v[j], 1), and
  // every key's gradient uses the same (dS, dz) = (dS, dz)_final + sum_i Gq[i]^T (dnum[i], dden[i]).
  // Pass 1, the query path: dGq = dnum S^T + dden z^T -> dq, and the sums of (dS, dz); pass 2,
  // the key path: dGk = V dS^T + dz, dv = Gk dS -> dk. (S, z) is the forward's final state when
  // given, else the keys are summed in a pass of their own first. Each input is read once, except
  // Gk and v without the final state.
  void bidirectional() {
    // Per (unit, head): the state of the unit's sequence being run (S, z and dS, dz).
    Buffer<Acc> state(pl.B * s.H * SZ), dstate(pl.B * s.H * SZ);
    auto pair_state = [&](Buffer<Acc>& x, int64_t u, int64_t h) { return x.data() + (u * s.H + h) * SZ; };
    Buffer<Acc> seg(state_given ? 0 : pl.lanes * 2 * SZ), seg_d(pl.lanes * 2 * SZ);
    // (S, z), or (dS, dz), of sequence q of unit u, head h: `from` (absent: zero) plus the sums of
    // its lanes (if any).
    auto total = [&](Buffer<Acc>& to, const View& S_from, const View& z_from, const Buffer<Acc>& sums, int64_t u,
                     int64_t q, int64_t h) {
      Acc* t = pair_state(to, u, h);
      read_state(S_from, z_from, q, h, K, Dv, Kp, Dvp, t, t + SS);
      for (int64_t sg = 0; sg < pl.segs && !sums.empty(); ++sg) add_lane_state(s, sums, pl.lane(u, h, sg), t);
    };
    auto sum_keys = [&](int64_t task, int64_t q) {
      Workspace<Acc>& w = ws[omp_get_thread_num()];
      zero_lane_states(pl, s, task, seg);  // (a unit's sequences reuse its lanes)
      for_each_chunk(pl, s, task, q, [&](int64_t, int64_t b, int64_t h, int64_t ln, int64_t row0, int64_t n) {
        load_keys(keys_in(w), b, h, row0, n);
        accumulate_state(s, w.gk, w.v, n, seg.data() + ln * 2 * SZ, w.delta);
      });
    };
    // The state every query of the sequence read: the forward's final state, or S0 + the key sums.
    auto key_totals = [&](int64_t u, int64_t q, int64_t h) {
      if (state_given) {
        total(state, a.S_end, a.z_end, seg, u, q, h);
      } else {
        total(state, a.S0, a.z0, seg, u, q, h);
      }
    };
    // Each task's heads' states, transposed, in the workspace (lST: S^T; ldST: dS^T).
    auto transposed = [&](Buffer<Acc>& x, UnclearedBuffer<Acc>& xT, int64_t task) {
      int64_t u, h0, sg;
      pl.task(task, u, h0, sg);
      for (int64_t l = 0; l < G; ++l) transpose(Kp, Dvp, pair_state(x, u, h0 + l), Dvp, xT.data() + l * SS, Kp);
      return u;
    };
    // Each chunk's parameter sums are a block of their own: written fresh in the workspace, then
    // added to the lane.
    auto query_pass = [&](int64_t task, int64_t q) {
      Workspace<Acc>& w = ws[omp_get_thread_num()];
      zero_lane_states(pl, s, task, seg_d);
      const int64_t u = transposed(state, w.lST, task);
      for_each_chunk(pl, s, task, q, [&](int64_t, int64_t b, int64_t h, int64_t ln, int64_t row0, int64_t n) {
        load_grads(w, grads_in(w), b, h, row0, n, false);
        state_grad_update(w, n, seg_d.data() + ln * 2 * SZ);
        gemm(n, Kp / W, Dvp, w.dnum, Dvp, 1, w.lST.data() + (h % G) * SS, Kp, w.dgq, Kp, false);  // dnum S^T
        add_dden_z(w, n, pair_state(state, u, h) + SS);
        finish(w, heads[h], a.q, a.dq, w.gq, w.dgq, w.xq, b, h, row0, n, w.psum, true,
               Ahead::of<T>({{&a.dout, Dv}, {&a.out, Dv}, {&a.q, D}}, b, h, row0 + C, N, C));
        add_to_lane(ln, w.psum);
      });
    };
    auto grad_totals = [&](int64_t u, int64_t q, int64_t h) {
      total(dstate, a.dS_final, a.dz_final, seg_d, u, q, h);
      const Acc* t = pair_state(dstate, u, h);
      write_state(a.dS0, a.dz0, q, h, K, Dv, Dvp, t, t + SS);  // every query read S0
    };
    auto key_pass = [&](int64_t task, int64_t q) {
      Workspace<Acc>& w = ws[omp_get_thread_num()];
      const int64_t u = transposed(dstate, w.ldST, task);
      for_each_chunk(pl, s, task, q, [&](int64_t, int64_t b, int64_t h, int64_t ln, int64_t row0, int64_t n) {
        load_keys(keys_in(w), b, h, row0, n);
        key_grads(w, pair_state(dstate, u, h), w.ldST.data() + (h % G) * SS, n);
        scatter_rows<T>(a.dv, b, h, row0, n, Dv, w.num, Dvp);
        finish(w, heads[h], a.k, a.dk, w.gk, w.dgk, w.xk, b, h, row0, n, w.psum, true,
               Ahead::of<T>({{&a.v, Dv}, {&a.k, D}}, b, h, row0 + C, N, C));  // masked: gk = 0, ds = 0
        add_to_lane(ln, w.psum);
      });
    };
    if (pl.segs == 1) {
      // A task owns whole sequences: for each in turn, its key totals, then both passes.
      auto keys_then_queries = [&](int64_t task, int64_t q) {
        int64_t u, h0, sg;
        pl.task(task, u, h0, sg);
        if (!state_given) sum_keys(task, q);
        for (int64_t h = h0; h < h0 + G; ++h) key_totals(u, q, h);
        query_pass(task, q);
      };
      auto packed = [this](int64_t task, int64_t q0, int64_t q1) { packed_chunk(task, q0, q1); };
      run_passes(pl, s, true, keys_then_queries, grad_totals, key_pass, packed);
      return;
    }
    // Segments (a unit is one sequence): the key totals need every segment's sums first.
    if (state_given) {
      for (int64_t u = 0; u < pl.B; ++u) {
        for (int64_t h = 0; h < s.H; ++h) key_totals(u, u, h);
      }
    } else {
      auto nothing = [](int64_t, int64_t) {};
      run_passes(pl, s, true, sum_keys, key_totals, nothing);
    }
    run_passes(pl, s, true, query_pass, grad_totals, key_pass);
  }

  // Causal: a forward scan (the state before each chunk -> dGq -> dq), then a reverse scan (the
  // gradient state after each chunk -> dGk, dv -> dk), a chunk at a time:
  // The query side of a chunk from the state S before it, its keys' rows loaded.
  void query_chunk(Workspace<Acc>& w, KeyRows keys, int64_t b, int64_t h, int64_t row0, int64_t n, const Acc* S,
                   Acc* param_sums, bool sums_fresh) {
    load_grads(w, grads_in(w), b, h, row0, n, false);  // computes dden, kept in dden_store for the key side
    affinity_grad(w, keys.v, w.dnum, w.dden, n, true, w.Bm);
    gemm(n, Kp / W, n, w.Bm, C, 1, keys.gk, Kp, w.dgq, Kp, false, Tri::kDepthLower);  // Bm Gk
    transpose(Kp, Dvp, S, Dvp, w.ST, Kp);
    gemm(n, Kp / W, Dvp, w.dnum, Dvp, 1, w.ST, Kp, w.dgq, Kp, true);  // dnum S^T
    add_dden_z(w, n, S + SS);
    finish(w, heads[h], a.q, a.dq, w.gq, w.dgq, w.xq, b, h, row0, n, param_sums, sums_fresh,
           Ahead::of<T>({{&a.v, Dv}, {&a.dout, Dv}, {&a.q, D}, {&a.out, Dv}}, b, h, row0 + C, N, C));
  }
  // The key side of a chunk from the gradient state dS after it, its gradients' rows loaded.
  void key_chunk(Workspace<Acc>& w, GradRows grads, int64_t b, int64_t h, int64_t row0, int64_t n, const Acc* dS,
                 Acc* param_sums, bool sums_fresh) {
    load_keys(keys_in(w), b, h, row0, n);
    affinity_grad(w, w.v, grads.dnum, grads.dden, n, true, w.Bm);
    transpose(Kp, Dvp, dS, Dvp, w.dST, Kp);
    key_grads(w, dS, w.dST, n);
    block_key_grads(w, grads.gq, w.gk, grads.dnum, w.Bm, n, true, w.dgk, w.num, 0);
    scatter_rows<T>(a.dv, b, h, row0, n, Dv, w.num, Dvp);
    // masked rows: gk = 0, hence ds = 0
    finish(w, heads[h], a.k, a.dk, w.gk, w.dgk, w.xk, b, h, row0, n, param_sums, sums_fresh,
           Ahead::of<T>({{&a.v, Dv}, {&a.dout, Dv}, {&a.k, D}}, b, h, row0 - C, N, C));
  }
  // The parameter sums of a scan add up plainly over blocks of kRelayChunks chunks in scan order
  // (a relay's blocks), each block's then added to the lane with compensation: the same
  // additions whether relays (causal_relays) or one task per sequence (causal_scans) run the scans.

  // Fewer pairs than threads (or an uneven split): the two scans as relays, a block's parameter
  // sums its partial. A task keeps the rows its state sums loaded for its work (the forward scan
  // its keys', the reverse scan its gradients').
  void causal_relays() {
    auto add_sums = [&](int64_t pair, const Acc* sums) { add_to_lane(pl.lane(pair / s.H, pair % s.H, 0), sums); };
    Relay<Acc> forward_scan = relay_from<Acc>(s, pl.nt, false, slot, C * (Kp + Dvp), a.S0, a.z0);
    auto key_sums = [&](int64_t thread, int64_t pair, int64_t c, int64_t j, Acc* delta) {
      const auto [b, h, row0, n] = s.chunk_at(pair, c);
      const KeyRows keys = kept_keys(forward_scan.rows(thread, j));
      load_keys(keys, b, h, row0, n);
      chunk_state_sums<Acc>(s, keys.gk, keys.v, nullptr, n, delta);
    };
    auto query_work = [&](int64_t thread, int64_t pair, int64_t c, int64_t j, const Acc* S, Acc* sums) {
      const auto [b, h, row0, n] = s.chunk_at(pair, c);
      query_chunk(ws[thread], kept_keys(forward_scan.rows(thread, j)), b, h, row0, n, S, sums, j == 0);
    };
    forward_scan.run(key_sums, query_work, &add_sums);

    Relay<Acc> reverse_scan = relay_from<Acc>(s, pl.nt, true, slot, C * (Kp + Dvp + 1), a.dS_final, a.dz_final);
    auto grad_sums = [&](int64_t thread, int64_t pair, int64_t c, int64_t j, Acc* delta) {
      const auto [b, h, row0, n] = s.chunk_at(pair, c);
      const GradRows grads = kept_grads(reverse_scan.rows(thread, j));
      load_grads(ws[thread], grads, b, h, row0, n, true);
      chunk_state_sums<Acc>(s, grads.gq, grads.dnum, grads.dden, n, delta);
    };
    auto key_work = [&](int64_t thread, int64_t pair, int64_t c, int64_t j, const Acc* dS, Acc* sums) {
      const auto [b, h, row0, n] = s.chunk_at(pair, c);
      key_chunk(ws[thread], kept_grads(reverse_scan.rows(thread, j)), b, h, row0, n, dS, sums, j == 0);
    };
    reverse_scan.run(grad_sums, key_work, &add_sums);
    write_relay_ends(s, reverse_scan, a.dS0, a.dz0);
  }

  // A task owns whole sequences: both scans in one go, the state carried from chunk to chunk.
  void causal_scans() {
    // Each lane's block of parameter sums (G per thread): written fresh by the block's first chunk
    // (place p in scan order), added to by the others, added to the lane after its last. (Never
    // cleared: a short call would spend more on clearing than on its work.)
    UnclearedBuffer<Acc> scan_blocks(pl.nt * G * slot);
    auto scans = [&](int64_t task, int64_t q) {
      int64_t u, h0, sg;
      pl.task(task, u, h0, sg);
      const int64_t nc = s.chunks(q);
      Workspace<Acc>& w = ws[omp_get_thread_num()];
      Acc* blocks = scan_blocks.data() + omp_get_thread_num() * G * slot;
      auto block_sums = [&](int64_t l) { return blocks + l * slot; };
      auto block_starts = [](int64_t p) { return p % kRelayChunks == 0; };
      auto block_done = [&](int64_t l, int64_t p) {
        if (p % kRelayChunks == kRelayChunks - 1 || p == nc - 1) {
          add_to_lane(pl.lane(u, h0 + l, sg), blocks + l * slot);
        }
      };
      for (int64_t l = 0; l < G; ++l) {
        Acc* S = w.lstate.data() + l * 2 * SZ;
        Acc* dS = w.ldstate.data() + l * 2 * SZ;
        read_state(a.S0, a.z0, q, h0 + l, K, Dv, Kp, Dvp, S, S + SS);
        read_state(a.dS_final, a.dz_final, q, h0 + l, K, Dv, Kp, Dvp, dS, dS + SS);
        std::fill(S + SZ, S + 2 * SZ, Acc(0));  // no compensation yet
        std::fill(dS + SZ, dS + 2 * SZ, Acc(0));
      }
      for (int64_t c = 0; c < nc; ++c) {
        const auto [b, h, row0, n] = s.chunk_at(q * s.H, c);
        for (int64_t l = 0; l < G; ++l) {
          Acc* S = w.lstate.data() + l * 2 * SZ;
          load_keys(keys_in(w), b, h0 + l, row0, n);
          query_chunk(w, keys_in(w), b, h0 + l, row0, n, S, block_sums(l), block_starts(c));
          block_done(l, c);
          if (c + 1 < nc) accumulate_state(s, w.gk, w.v, n, S, w.delta);  // (no chunk reads the final state)
        }
      }
      for (int64_t c = nc - 1; c >= 0; --c) {
        const auto [b, h, row0, n] = s.chunk_at(q * s.H, c);
        for (int64_t l = 0; l < G; ++l) {
          Acc* dS = w.ldstate.data() + l * 2 * SZ;
          load_grads(w, grads_in(w), b, h0 + l, row0, n, true);
          key_chunk(w, grads_in(w), b, h0 + l, row0, n, dS, block_sums(l), block_starts(nc - 1 - c));
          block_done(l, nc - 1 - c);
          if (c > 0 || a.dS0.present()) state_grad_update(w, n, dS);  // (the last one only for dS0)
        }
      }
      for (int64_t l = 0; l < G; ++l) {
        const Acc* dS = w.ldstate.data() + l * 2 * SZ;
        write_state(a.dS0, a.dz0, q, h0 + l, K, Dv, Dvp, dS, dS + SS);
      }
    };
    auto nothing = [](int64_t, int64_t) {};
    auto no_starts = [](int64_t, int64_t, int64_t) {};  // each task sets its own
    auto packed = [this](int64_t task, int64_t q0, int64_t q1) { packed_chunk(task, q0, q1); };
    run_passes(pl, s, false, nothing, no_starts, scans, packed);
  }

  // A packed chunk (Plan::packs): the short sequences [q0, q1), causal or bidirectional, in one go.
  // Each sequence is a block (rows.h) whose gradients come from its own rows, from its initial
  // state (dGq += dnum S0^T + dden z0^T) and from its final state's gradient (dGk += V dS^T + dz,
  // dv += Gk dS); its dS0 is that gradient plus Gq^T (dnum, dden) summed over its rows (every
  // query read S0). Then the backward through the responsibilities of all the chunk's rows,
  // queries and keys, their parameter sums added to the lane as one block.
  void packed_chunk(int64_t task, int64_t q0, int64_t q1) {
    int64_t u, h0, sg;
    pl.task(task, u, h0, sg);
    Workspace<Acc>& w = ws[omp_get_thread_num()];
    const int64_t row0 = s.starts[q0], n = s.starts[q1] - row0;
    const bool from_state = a.S0.present() || a.z0.present();
    const bool state_grad = a.dS_final.present() || a.dz_final.present(), state_out = a.dS0.present();
    Acc* S = w.lstate.data();
    Acc* dS = w.ldstate.data();  // (2 SZ: with its compensation)
    for (int64_t h = h0; h < h0 + G; ++h) {
      if (n > 0) {
        load_keys(keys_in(w), 0, h, row0, n);
        load_grads(w, grads_in(w), 0, h, row0, n, false);
      }
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t o = s.starts[q] - row0, L = s.len(q);
        if (state_grad || state_out) read_state(a.dS_final, a.dz_final, q, h, K, Dv, Kp, Dvp, dS, dS + SS);
        if (L > 0) {
          const Acc *gq = w.gq + o * Kp, *gk = w.gk + o * Kp, *dnum = w.dnum + o * Dvp, *dden = w.dden + o;
          Acc *dgq = w.dgq + o * Kp, *dgk = w.dgk + o * Kp, *dv = w.num + o * Dvp, *Bm = w.Bm + o * C;
          affinity_grad(w, w.v + o * Dvp, dnum, dden, L, causal, Bm);
          gemm(L, Kp / W, L, Bm, C, 1, gk, Kp, dgq, Kp, false, depth_lower(causal));  // Bm Gk
          if (from_state) {
            read_state(a.S0, a.z0, q, h, K, Dv, Kp, Dvp, S, S + SS);
            transpose(Kp, Dvp, S, Dvp, w.ST, Kp);
            gemm(L, Kp / W, Dvp, dnum, Dvp, 1, w.ST, Kp, dgq, Kp, true);  // dnum S0^T
            add_dden_z(w, L, S + SS, o);
          }
          if (state_grad) {
            transpose(Kp, Dvp, dS, Dvp, w.dST, Kp);
            key_grads(w, dS, w.dST, L, o);
          } else {
            std::fill(dgk, dgk + L * Kp, Acc(0));
            std::fill(dv, dv + L * Dvp, Acc(0));
          }
          block_key_grads(w, gq, gk, dnum, Bm, L, causal, dgk, dv, o);
          if (state_out) {
            std::fill(dS + SZ, dS + 2 * SZ, Acc(0));  // (from dS_final with zero compensation)
            accumulate_state(s, gq, dnum, dden, L, dS, w.delta);
          }
        }
        if (state_out) write_state(a.dS0, a.dz0, q, h, K, Dv, Dvp, dS, dS + SS);
      }
      if (n == 0) continue;
      scatter_rows<T>(a.dv, 0, h, row0, n, Dv, w.num, Dvp);
      finish(w, heads[h], a.q, a.dq, w.gq, w.dgq, w.xq, 0, h, row0, n, w.psum, true,
             Ahead::of<T>({{&a.k, D}}, 0, h, row0, N, C));
      finish(w, heads[h], a.k, a.dk, w.gk, w.dgk, w.xk, 0, h, row0, n, w.psum, false,
             Ahead::of<T>({{&a.v, Dv}, {&a.dout, Dv}, {&a.out, Dv}, {&a.q, D}}, 0, h, row0 + n, N, C));
      add_to_lane(pl.lane(u, h, sg), w.psum);
    }
  }

  // Parameter gradients: the lane slots of each head summed in a fixed order, then the chain rule.
  void parameter_gradients() {
    Buffer<Acc> total(slot);
    for (int64_t h = 0; h < s.H; ++h) {
      std::fill(total.begin(), total.end(), Acc(0));
      for (int64_t b = 0; b < pl.B; ++b) {  // (the units)
        for (int64_t sg = 0; sg < pl.segs; ++sg) {
          if (!lane_started[pl.lane(b, h, sg)]) continue;
          const Acc* src = partial.data() + pl.lane(b, h, sg) * 2 * slot;
          for (int64_t i = 0; i < slot; ++i) total[i] += src[i];
        }
      }
      heads[h].write_parameter_gradients(total.data(), h, a.dmu, a.domega, a.dalpha);
    }
  }
};

template <class T, class Acc>
void backward_typed(const BackwardArgs& a) {
  Shape s = Shape::make<Acc>(a.dims, a.cu_seqlens);
  if (row_path_applies(s)) {  // a few tokens per sequence: no chunks (step_backward.h)
    backward_rows<T, Acc>(a, s, threads_for(s, a.opt.num_threads));
    return;
  }
  Backward<T, Acc>(a, std::move(s)).run();
}

// The entry point of this ISA build.
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
