// The backward of short sequences, a row at a time: the calls whose forward step.h runs a row at a
// time (every sequence at most kRowPathRows long). The chunked backward (backward.cpp) sets up, per
// call, per-thread chunk workspaces, per-lane parameter sums with compensation, transposed states
// and C x C products: at N = 1 nearly all of its time. Here each task, one head over a run of
// sequences, walks its sequences' rows directly. For rows i, j of a sequence (causal: j <= i,
// else all), dnum_i = dout_i / den_i and dden_i = -(dout_i . out_i) / den_i:
//   Bm[i][j] = dnum_i . v_j + dden_i,   A[i][j] = gq_i . gk_j
//   dGq_i = sum_j Bm[i][j] gk_j + S0 dnum_i + dden_i z0
//   dGk_j = sum_i Bm[i][j] gq_i + dS v_j + dz          ((dS, dz): the final state's gradient)
//   dv_j  = sum_i A[i][j] dnum_i + gk_j^T dS
//   dS0 = dS + sum_i gq_i^T dnum_i,  dz0 = dz + sum_i dden_i gq_i   (every query read S0)
// then the softmax and density backward of the query and key rows (mixture.h), whose parameter
// sums the task adds up over its sequences. (Bidirectional, the forward's final state is not
// needed: S0 and the sequence's own rows give what every query read.)
#pragma once

#include "mixture.h"
#include "plan.h"
#include "step.h"

namespace gmattn {
namespace cpu {
namespace GMATTN_ISA {  // (rows.h: the ISA name, and cpu_detail in scope)

// Sequences per task: a head's sequences are cut into runs of this many, whatever the thread
// count, and the runs' parameter sums reduced in order, so results do not depend on it.
constexpr int64_t kRowRunSeqs = 16;

// One thread's working memory in backward_rows (each part 64-byte aligned): a sequence's rows
// (L <= kRowPathRows) of saved Gq then Gk (2L x Kp) and their gradients likewise, v, dnum, dv,
// out (L x Dvp), dden and den (L), the L x L products Bm and A, raw query then key rows and their
// gradients (2L x Dp: the backward through the responsibilities takes both in one pass over the
// parameters), the initial state and the final state's gradient with their transposes (Kp x Dvp
// + Kp each; only with a state), and one task's parameter sums (ParamSums::size).
struct RowBackwardLayout {
  int64_t g, dg, v, dnum, dv, o, dden, den, Bm, A, x, dx, S, ST, dS, dST, sums, total;
  template <class Acc>
  static RowBackwardLayout of(const Shape& s) {
    const int64_t L = s.longest, SZ = s.Kp * s.Dvp + s.Kp;
    RowBackwardLayout l;
    LineParts<Acc> part;
    l.g = part(2 * L * s.Kp);
    l.dg = part(2 * L * s.Kp);
    l.v = part(L * s.Dvp);
    l.dnum = part(L * s.Dvp);
    l.dv = part(L * s.Dvp);
    l.o = part(L * s.Dvp);
    l.dden = part(L);
    l.den = part(L);
    l.Bm = part(kRowPathRows * kRowPathRows);
    l.A = part(kRowPathRows * kRowPathRows);
    l.x = part(2 * L * s.Dp);
    l.dx = part(2 * L * s.Dp);
    l.S = part(SZ);
    l.ST = part(s.Kp * s.Dvp);
    l.dS = part(SZ);
    l.dST = part(s.Kp * s.Dvp);
    l.sums = part(ParamSums<Acc>::size(s));
    l.total = part.total();
    return l;
  }
};

// The backward of a call whose sequences are all at most kRowPathRows long (row_path_applies), on
// up to `nt` threads over (head, run of sequences) tasks.
template <class T, class Acc>
void backward_rows(const BackwardArgs& a, const Shape& s, int nt) {
  constexpr int W = Simd<Acc>::W;
  constexpr int64_t LB = kRowPathRows;  // (row stride of Bm and A)
  const int64_t K = s.K, D = s.D, Dv = s.Dv, Kp = s.Kp, Dp = s.Dp, Dvp = s.Dvp, SS = Kp * Dvp;
  const bool causal = a.opt.causal;
  const bool from_state = a.S0.present() || a.z0.present();
  const bool state_grad = a.dS_final.present() || a.dz_final.present(), state_out = a.dS0.present();
  const auto prepared = prepared_heads<Acc>(a.mu, a.omega, a.alpha, s, a.opt.sigma_eps, nt);
  const std::vector<Head<Acc>>& heads = *prepared;
  const RowBackwardLayout lay = RowBackwardLayout::of<Acc>(s);
  const int64_t slot = ParamSums<Acc>::size(s);
  const int64_t runs = (s.seqs + kRowRunSeqs - 1) / kRowRunSeqs, tasks = s.H * runs;

  // Sequence q, head h: its rows' gradients written out, their parameter sums added to `sums`
  // (written there while `fresh`, which it then clears).
  auto sequence = [&](Acc* m, int64_t q, int64_t h, Acc* sums, bool& fresh) {
    const Head<Acc>& hd = heads[h];
    const Shape::SeqAt sq = s.seq_at(q);
    const int64_t L = sq.len, b = sq.b, row0 = sq.row0;
    Acc *gq = m + lay.g, *gk = gq + L * Kp, *dgq = m + lay.dg, *dgk = dgq + L * Kp;
    Acc *v = m + lay.v, *dnum = m + lay.dnum, *dv = m + lay.dv, *o = m + lay.o;
    Acc *dden = m + lay.dden, *den = m + lay.den, *Bm = m + lay.Bm, *A = m + lay.A;
    Acc *x = m + lay.x, *dx = m + lay.dx, *dS = m + lay.dS;
    if (state_grad || state_out) read_state(a.dS_final, a.dz_final, q, h, K, Dv, Kp, Dvp, dS, dS + SS);
    if (L > 0) {
      read_saved(a.gq, b, h, row0, L, K, gq, Kp, L);
      read_saved(a.gk, b, h, row0, L, K, gk, Kp, L);
      read_den(a.den, b, h, row0, L, den);
      gather_rows<T>(a.v, b, h, row0, L, Dv, v, Dvp, L);
      gather_rows<T>(a.dout, b, h, row0, L, Dv, dnum, Dvp, L);
      gather_rows<T>(a.out, b, h, row0, L, Dv, o, Dvp, L);
      for (int64_t i = 0; i < L; ++i) {
        const Acc inv = Acc(1) / den[i];
        dden[i] = -dot(dnum + i * Dvp, o + i * Dvp, Dvp) * inv;
        for (int64_t e = 0; e < Dvp; e += W) storeu(dnum + i * Dvp + e, loadu(dnum + i * Dvp + e) * inv);
      }
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t j = 0; j < L; ++j) {
          const bool read = !causal || j <= i;
          Bm[i * LB + j] = read ? dot(dnum + i * Dvp, v + j * Dvp, Dvp) + dden[i] : Acc(0);
          A[i * LB + j] = read ? dot(gq + i * Kp, gk + j * Kp, Kp) : Acc(0);
        }
      }
      gemm(L, Kp / W, L, Bm, LB, 1, gk, Kp, dgq, Kp, false);   // dGq = Bm Gk
      gemm(L, Kp / W, L, Bm, 1, LB, gq, Kp, dgk, Kp, false);   // dGk = Bm^T Gq
      gemm(L, Dvp / W, L, A, 1, LB, dnum, Dvp, dv, Dvp, false);  // dv = A^T dnum
      if (from_state) {
        Acc *S = m + lay.S, *ST = m + lay.ST;
        read_state(a.S0, a.z0, q, h, K, Dv, Kp, Dvp, S, S + SS);
        transpose(Kp, Dvp, S, Dvp, ST, Kp);
        gemm(L, Kp / W, Dvp, dnum, Dvp, 1, ST, Kp, dgq, Kp, true);  // + dnum S0^T
        for (int64_t i = 0; i < L; ++i) {
          const VecT<Acc> dd = splat(dden[i]);
          for (int64_t k = 0; k < Kp; k += W) storeu(dgq + i * Kp + k, loadu(dgq + i * Kp + k) + dd * loadu(S + SS + k));
        }
      }
      if (state_grad) {
        Acc* dST = m + lay.dST;
        transpose(Kp, Dvp, dS, Dvp, dST, Kp);
        gemm(L, Kp / W, Dvp, v, Dvp, 1, dST, Kp, dgk, Kp, true);  // + V dS^T
        for (int64_t j = 0; j < L; ++j) {
          for (int64_t k = 0; k < Kp; k += W) storeu(dgk + j * Kp + k, loadu(dgk + j * Kp + k) + loadu(dS + SS + k));
        }
        gemm(L, Dvp / W, K, gk, Kp, 1, dS, Dvp, dv, Dvp, true);  // + Gk dS
      }
      if (state_out) {
        gemm(Kp, Dvp / W, L, gq, 1, Kp, dnum, Dvp, dS, Dvp, true);  // dS += Gq^T dnum
        for (int64_t i = 0; i < L; ++i) {
          const VecT<Acc> dd = splat(dden[i]);
          for (int64_t k = 0; k < Kp; k += W) storeu(dS + SS + k, loadu(dS + SS + k) + dd * loadu(gq + i * Kp + k));
        }
      }
      scatter_rows<T>(a.dv, b, h, row0, L, Dv, dv, Dvp);
      // Through the responsibilities, query and key rows together: dGq -> dq, dGk -> dk (masked
      // keys: gk = 0, hence ds = 0).
      softmax_backward(gq, dgq, 2 * L, K, Kp);
      gather_rows<T>(a.q, b, h, row0, L, D, x, Dp, L);
      gather_rows<T>(a.k, b, h, row0, L, D, x + L * Dp, Dp, L);
      density_backward(hd, s, x, dgq, 2 * L, dx, sums, fresh, Ahead{});
      scatter_rows<T>(a.dq, b, h, row0, L, D, dx, Dp);
      scatter_rows<T>(a.dk, b, h, row0, L, D, dx + L * Dp, Dp);
      fresh = false;
    }
    if (state_out) write_state(a.dS0, a.dz0, q, h, K, Dv, Dvp, dS, dS + SS);
  };

  // Task t: head t / runs over run t % runs of its sequences, the sums in `sums` (all zero when the
  // run holds no rows).
  auto task = [&](Acc* m, int64_t t, Acc* sums) {
    const int64_t h = t / runs, r = t % runs;
    bool fresh = true;
    for (int64_t q = r * kRowRunSeqs; q < std::min(s.seqs, (r + 1) * kRowRunSeqs); ++q) sequence(m, q, h, sums, fresh);
    if (fresh) std::fill(sums, sums + slot, Acc(0));
  };
  // One run per head: a task ends with its head's parameter gradients. Several: each task's sums
  // in a block of `blocks`, then each head's blocks added in order with compensation.
  UnclearedBuffer<Acc> blocks(runs > 1 ? tasks * slot : 0);
  auto run_task = [&](Acc* m, int64_t t) {
    if (runs == 1) {
      task(m, t, m + lay.sums);
      heads[t].write_parameter_gradients(m + lay.sums, t, a.dmu, a.domega, a.dalpha);
    } else {
      task(m, t, blocks.data() + t * slot);
    }
  };
  auto reduce_head = [&](Acc* comp, int64_t h) {
    Acc* total = blocks.data() + h * runs * slot;
    std::fill(comp, comp + slot, Acc(0));
    for (int64_t r = 1; r < runs; ++r) add_compensated(total, comp, total + r * slot, slot);
    heads[h].write_parameter_gradients(total, h, a.dmu, a.domega, a.dalpha);
  };

  run_row_tasks<Acc>(nt, tasks, lay.total, run_task, runs > 1 ? s.H : 0,
                     [&](Acc* m, int64_t h) { reduce_head(m + lay.sums, h); });
}

}  // namespace GMATTN_ISA
}  // namespace cpu
}  // namespace gmattn
