// The backward pass: dden, backward_chunk (a forward sweep for dGq, a reverse sweep for dGk
// and dv) and the host's plan and launch sequence (backward_impl), which ends in the mixture's
// backward (mixture.cuh).
#pragma once

#include "plan.cuh"

namespace gmattn {
namespace cuda_impl {

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
  StateRef<T> fwd_init;   // workspace: S, z before the segment (total when bidirectional)
  StateRef<T> bwd_init;   // workspace: dS, dz after the segment (total when bidirectional)
  StateRef<T> S0, dS_final;  // the caller's, for a block that streams its state (streams_state)
  T* dGq;                 // [nslices][B*H][N][K]
  T* dGk;                 // [nslices][B*H][N][K]
  int64_t slice_stride;   // B*H*N*K
  DView<S> dv;            // (B, N, H, Dv)
  DView<T> dS0, dz0;      // written here by a block that streams its state
};

template <class T>
struct BwdChunkSmem {
  T *S, *Sc, *z, *zc, *Gq, *Gk, *dG, *V, *Dn, *dV, *A, *Bm, *dd;
  __host__ __device__ BwdChunkSmem(Carver& c, const ChunkGeometry& g) {
    S = c.take<T>((size_t)g.Kp * padded_ld(g.DvT));
    Sc = c.take<T>((size_t)g.Kp * padded_ld(g.DvT));
    z = c.take<T>(g.Kp);
    zc = c.take<T>(g.Kp);
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
  const ChunkBlock blk = chunk_block(g);
  const BlockCoords& bc = blk.bc;
  const int tid = threadIdx.x;
  const int K = g.K, Kp = g.Kp, C = g.C, DvT = g.DvT;
  const int ldK = blk.ldK, ldS = blk.ldS, ldC = blk.ldC;
  if (!bc.valid) return;  // the whole block: before any barrier
  const bool first_slice = bc.slice == 0;
  T* dGq = p.dGq + bc.slice * p.slice_stride + bc.bh * g.N * K;
  T* dGk = p.dGk + bc.slice * p.slice_stride + bc.bh * g.N * K;

  // Stages the tiles of the chunk a sweep needs (the saved responsibilities, v, dnum = dout / den,
  // dden).
  const RespSource<S, T> saved{};  // responsibilities always come from the forward's tensors here
  const RespScratch<T> no_scratch{};
  auto load_chunk = [&](int64_t c0, int rows, bool need_gq, bool need_gk, bool need_v, bool need_dn) {
    if (need_gq) stage_responsibilities(sm.Gq, ldK, p.gq, saved, no_scratch, g, bc, c0, rows);
    if (need_gk) stage_responsibilities(sm.Gk, ldK, p.gk, saved, no_scratch, g, bc, c0, rows);
    if (need_v) stage_values(sm.V, ldS, p.v, DView<const T>{}, g, bc, c0, rows);
    if (need_dn) stage_values(sm.Dn, ldS, p.dout, p.den, g, bc, c0, rows);
    for (int r = tid; r < C; r += kThreads) sm.dd[r] = r < rows ? p.dden[bc.bh * g.N + c0 + r] : T(0);
  };
  auto store_dG = [&](T* dst, int64_t c0, int rows) {
    for (int idx = tid; idx < rows * K; idx += kThreads) {
      const int r = idx / K, k = idx % K;
      dst[(c0 + r) * K + k] = sm.dG[r * ldK + k];
    }
  };

  // ---- forward sweep: dGq ----
  load_block_state(sm.S, ldS, sm.z, p.S0, p.fwd_init, bc, CAUSAL, K, Kp, DvT);
  clear_compensation(sm.Sc, ldS, sm.zc, Kp, DvT);
  __syncthreads();
  for (int64_t c0 = bc.n_begin; c0 < bc.n_end; c0 += C) {
    const int rows = chunk_rows(g, bc, c0);
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
    if (CAUSAL)
      add_chunk_to_state<TC>(sm.S, sm.Sc, ldS, sm.z, sm.zc, sm.Gk, ldK, sm.V, static_cast<const T*>(nullptr), g);
    __syncthreads();
  }

  // ---- reverse sweep: dGk, dv ----
  load_block_state(sm.S, ldS, sm.z, p.dS_final, p.bwd_init, bc, CAUSAL, K, Kp, DvT);
  clear_compensation(sm.Sc, ldS, sm.zc, Kp, DvT);
  __syncthreads();
  const int64_t nchunks = (bc.n_end - bc.n_begin + C - 1) / C;
  for (int64_t ci = nchunks - 1; ci >= 0; --ci) {
    const int64_t c0 = bc.n_begin + ci * C;
    const int rows = chunk_rows(g, bc, c0);
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
    if (CAUSAL) add_chunk_to_state<TC>(sm.S, sm.Sc, ldS, sm.z, sm.zc, sm.Gq, ldK, sm.Dn, sm.dd, g);  // dS += Gq^T dnum
    __syncthreads();
  }
  if (streams_state(bc, CAUSAL))
    store_state(p.dS0, p.dz0, sm.S, ldS, sm.z, bc.seq, bc.h, K, DvT, bc.e0, bc.ev, first_slice);
}

// ============================================================================================
// Host side
// ============================================================================================

// The sizes a backward call chooses and its workspace layout (accumulator dtype T).
template <class T>
struct BackwardPlan {
  ChunkGeometry g;
  bool need_seg = false;
  int Kp = 0;
  int R = 0, DT = 0;  // row tile and D step of responsibilities_bwd
  int64_t row_tiles = 0;
  int groups = 0;     // responsibilities_bwd blocks per (head, path)
  int slots_per_head = 0;
  int64_t slot_size = 0, slots_elems = 0, slice_stride = 0;
  WorkspaceLayout ws;
  size_t o_lam = 0, o_mu = 0, o_logc = 0, o_dden = 0, o_fS = 0, o_fz = 0, o_bS = 0, o_bz = 0, o_dGq = 0,
         o_dGk = 0, o_slots = 0;
  SequenceTableLayout table;
};

template <class T>
BackwardPlan<T> plan_backward(const BackwardArgs& a, const DeviceInfo& dev) {
  const Dims& d = a.dims;
  BackwardPlan<T> p;
  p.g = choose_geometry<T, BwdChunkSmem<T>>(d, dev, a.opt.causal, packed_sequences(a.cu_seqlens));
  p.need_seg = needs_segment_states(p.g, a.opt.causal);

  // Row tile and D step of responsibilities_bwd: the largest that fit the shared memory.
  p.Kp = round_up16(d.K);
  {
    const int rows_max = std::min(64, responsibility_rows(p.Kp));
    static const int dts[] = {32, 16, 8};
    for (int rows = rows_max; rows >= kMicro && p.R == 0; rows = rows / 2 / kMicro * kMicro)
      for (int dt : dts) {
        Carver c;
        RespBwdSmem<T> layout(c, p.Kp, rows, dt);
        (void)layout;
        if (c.offset + 128 <= (size_t)dev.max_smem_optin) {
          p.R = rows;
          p.DT = dt;
          break;
        }
      }
  }
  require(p.R > 0, "K = " + std::to_string(d.K) + " needs more shared memory than this GPU has");
  p.row_tiles = ceil_div(d.N, p.R);
  p.groups = (int)std::max<int64_t>(
      1, std::min<int64_t>(d.B * p.row_tiles, ceil_div(std::max(dev.sm_count, 1), d.H)));
  p.slots_per_head = a.opt.deterministic ? 2 * p.groups : 1;
  p.slot_size = d.K + 2 * d.K * d.D;

  WorkspaceLayout& ws = p.ws;
  p.o_lam = ws.reserve<T>(d.H * d.K * d.D);
  p.o_mu = ws.reserve<T>(d.H * d.K * d.D);
  p.o_logc = ws.reserve<T>(d.H * d.K);
  p.o_dden = ws.reserve<T>(d.B * d.H * d.N);
  const int64_t seg_count = p.need_seg ? d.B * d.H * p.g.P_state : 0;
  p.o_fS = ws.reserve<T>(seg_count * d.K * d.Dv);
  p.o_fz = ws.reserve<T>(seg_count * d.K);
  p.o_bS = ws.reserve<T>(seg_count * d.K * d.Dv);
  p.o_bz = ws.reserve<T>(seg_count * d.K);
  p.slice_stride = d.B * d.H * d.N * d.K;
  p.o_dGq = ws.reserve<T>(p.g.nslices * p.slice_stride);
  p.o_dGk = ws.reserve<T>(p.g.nslices * p.slice_stride);
  // Deterministic slots are followed by their compensation terms (responsibilities_bwd).
  p.slots_elems = d.H * p.slots_per_head * p.slot_size * (a.opt.deterministic ? 2 : 1);
  p.o_slots = ws.reserve<T>(p.slots_elems);
  p.table.reserve(ws, p.g);
  return p;
}

template <class S>
void backward_impl(const BackwardArgs& a) {
  using T = typename AccumulatorOf<S>::type;
  constexpr bool TC = kUseTensorCores<S>;
  const Dims& d = a.dims;
  const bool causal = a.opt.causal;
  cudaStream_t stream = static_cast<cudaStream_t>(a.opt.stream);
  const DeviceInfo dev = device_info();
  const BackwardPlan<T> plan = plan_backward<T>(a, dev);
  ChunkGeometry g = plan.g;
  const bool need_seg = plan.need_seg;
  const int Kp = plan.Kp, R = plan.R, DT = plan.DT, groups = plan.groups, slots_per_head = plan.slots_per_head;
  const int64_t row_tiles = plan.row_tiles, slot_size = plan.slot_size, slots_elems = plan.slots_elems;
  const int64_t slice_stride = plan.slice_stride;

  WorkspaceMemory ws(plan.ws, a.opt);
  T* lam = ws.at<T>(plan.o_lam);
  T* mu_c = ws.at<T>(plan.o_mu);
  T* logc = ws.at<T>(plan.o_logc);
  T* dden = ws.at<T>(plan.o_dden);
  T* fS = ws.at<T>(plan.o_fS);
  T* fz = ws.at<T>(plan.o_fz);
  T* bS = ws.at<T>(plan.o_bS);
  T* bz = ws.at<T>(plan.o_bz);
  T* dGq = ws.at<T>(plan.o_dGq);
  T* dGk = ws.at<T>(plan.o_dGk);
  T* slots = ws.at<T>(plan.o_slots);
  plan.table.build(g, ws, a.cu_seqlens, causal, stream);

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
    launch_seg_state<S, T, TC>(g, gk, {}, a.v, View{}, nullptr, fS, fz, causal, stream);
    launch_scan(make_scan<T>(fS, fz, g, causal ? kExclusivePrefix : kTotal, a.S0, a.z0, View{}, View{}), stream);
    launch_seg_state<S, T, TC>(g, gq, {}, a.dout, a.den, dden, bS, bz, causal, stream);
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
  bp.fwd_init = state_ref_from_workspace<T>(fS, fz, d.H, g.P_state, d.K, d.Dv);
  bp.bwd_init = state_ref_from_workspace<T>(bS, bz, d.H, g.P_state, d.K, d.Dv);
  bp.S0 = state_ref_from_views<T>(a.S0, a.z0);
  bp.dS_final = state_ref_from_views<T>(a.dS_final, a.dz_final);
  bp.dGq = dGq;
  bp.dGk = dGk;
  bp.slice_stride = slice_stride;
  bp.dv = make_view<S>(a.dv);
  bp.dS0 = make_view<T>(a.dS0);
  bp.dz0 = make_view<T>(a.dz0);
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
  rb.slot_comp_offset = a.opt.deterministic ? slots_elems / 2 : 0;
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

}  // namespace cuda_impl
}  // namespace gmattn
