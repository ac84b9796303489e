// The forward pass: forward_chunk (the chunked read of the state, chunk after chunk) and the
// host's plan and launch sequence (forward_impl).
#pragma once

#include "plan.cuh"

namespace gmattn {
namespace cuda_impl {

// --------------------------------------------------------------------------------------------
// forward_chunk: per (b, h, segment, slice), chunk after chunk
//   A   = tril(Gq_c Gk_c^T)                       (causal only)
//   num = Gq_c S + A V_c,  den = Gq_c z + rowsum(A) + eps,  out = num / den
//   S  += Gk_c^T V_c,      z  += Gk_c^T 1          (causal only; bidirectional S is the total)
// --------------------------------------------------------------------------------------------

template <class S, class T>
struct FwdChunkParams {
  ChunkGeometry g;
  DView<const T> gq, gk;       // (B, H, N, K), or computed from q_src, k_src when g.own_responsibilities
  RespSource<S, T> q_src, k_src;
  DView<const S> v;            // (B, N, H, Dv)
  DView<S> out;                // (B, N, H, Dv)
  DView<T> den;                // (B, H, N), optional
  StateRef<T> init;            // workspace: the state before the segment (bidirectional: the total)
  StateRef<T> S0;              // the caller's initial state (a block that streams its state)
  DView<T> S_final, z_final;   // written here by a block that streams its state (streams_state)
  T eps;
};

template <class T>
struct FwdChunkSmem {
  T *S, *Sc, *z, *zc, *Gq, *Gk, *V, *A, *O, *den;
  RespScratch<T> resp;  // g.own_responsibilities only
  __host__ __device__ FwdChunkSmem(Carver& c, const ChunkGeometry& g) {
    S = c.take<T>((size_t)g.Kp * padded_ld(g.DvT));
    Sc = c.take<T>((size_t)g.Kp * padded_ld(g.DvT));
    z = c.take<T>(g.Kp);
    zc = c.take<T>(g.Kp);
    Gq = c.take<T>((size_t)g.C * padded_ld(g.Kp));
    Gk = c.take<T>((size_t)g.C * padded_ld(g.Kp));
    V = c.take<T>((size_t)g.C * padded_ld(g.DvT));
    A = c.take<T>((size_t)g.C * padded_ld(g.C));
    O = c.take<T>((size_t)g.C * padded_ld(g.DvT));
    den = c.take<T>(g.C);
    if (g.own_responsibilities) resp = RespScratch<T>(c, g.Kp, g.C);
  }
};

template <class S, class T, bool CAUSAL, bool TC>
__global__ void __launch_bounds__(kThreads) forward_chunk_kernel(const FwdChunkParams<S, T> p) {
  GMA_DYNAMIC_SMEM(smem_raw);
  const ChunkGeometry& g = p.g;
  Carver carver{reinterpret_cast<uintptr_t>(smem_raw)};
  FwdChunkSmem<T> sm(carver, g);
  const ChunkBlock blk = chunk_block(g);
  const BlockCoords& bc = blk.bc;
  const int tid = threadIdx.x;
  const int K = g.K, Kp = g.Kp, C = g.C, DvT = g.DvT;
  const int ldK = blk.ldK, ldS = blk.ldS, ldC = blk.ldC;
  if (!bc.valid) return;  // the whole block: before any barrier

  load_block_state(sm.S, ldS, sm.z, p.S0, p.init, bc, CAUSAL, K, Kp, DvT);
  clear_compensation(sm.Sc, ldS, sm.zc, Kp, DvT);
  __syncthreads();
  for (int64_t c0 = bc.n_begin; c0 < bc.n_end; c0 += C) {
    const int rows = chunk_rows(g, bc, c0);
    stage_responsibilities(sm.Gq, ldK, p.gq, p.q_src, sm.resp, g, bc, c0, rows);
    if (CAUSAL) {
      stage_responsibilities(sm.Gk, ldK, p.gk, p.k_src, sm.resp, g, bc, c0, rows);
      stage_values(sm.V, ldS, p.v, DView<const T>{}, g, bc, c0, rows);
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
    if (CAUSAL)
      add_chunk_to_state<TC>(sm.S, sm.Sc, ldS, sm.z, sm.zc, sm.Gk, ldK, sm.V, static_cast<const T*>(nullptr), g);
    __syncthreads();
  }
  if (streams_state(bc, CAUSAL))
    store_state(p.S_final, p.z_final, sm.S, ldS, sm.z, bc.seq, bc.h, K, DvT, bc.e0, bc.ev, bc.slice == 0);
}

// ============================================================================================
// Host side
// ============================================================================================

// The sizes a forward call chooses and its workspace layout (accumulator dtype T).
template <class T>
struct ForwardPlan {
  ChunkGeometry g;
  bool save = false;      // gq, gk, den are written (saved for backward); else the chunk kernels
                          // compute responsibilities chunk by chunk and nothing O(B H N K) exists
  bool need_seg = false;  // segment states (causal, several segments) or the total (bidirectional)
  WorkspaceLayout ws;
  size_t o_lam = 0, o_mu = 0, o_logc = 0, o_Sseg = 0, o_zseg = 0;
  SequenceTableLayout table;
};

template <class T>
ForwardPlan<T> plan_forward(const ForwardArgs& a, const DeviceInfo& dev) {
  const Dims& d = a.dims;
  ForwardPlan<T> p;
  p.save = a.gq.present();
  p.g = choose_geometry<T, FwdChunkSmem<T>>(d, dev, a.opt.causal, packed_sequences(a.cu_seqlens), !p.save);
  // Causal with one segment per (b, h) streams the state from S0; otherwise segment states
  // (causal) or the total state (bidirectional) are computed first. Packed: per sequence.
  p.need_seg = needs_segment_states(p.g, a.opt.causal);
  WorkspaceLayout& ws = p.ws;
  p.o_lam = ws.reserve<T>(d.H * d.K * d.D);
  p.o_mu = ws.reserve<T>(d.H * d.K * d.D);
  p.o_logc = ws.reserve<T>(d.H * d.K);
  const int64_t seg_count = p.need_seg ? d.B * d.H * p.g.P_state : 0;
  p.o_Sseg = ws.reserve<T>(seg_count * d.K * d.Dv);
  p.o_zseg = ws.reserve<T>(seg_count * d.K);
  p.table.reserve(ws, p.g);
  return p;
}

template <class S>
void forward_impl(const ForwardArgs& a) {
  using T = typename AccumulatorOf<S>::type;
  constexpr bool TC = kUseTensorCores<S>;
  const Dims& d = a.dims;
  const bool causal = a.opt.causal;
  cudaStream_t stream = static_cast<cudaStream_t>(a.opt.stream);
  const DeviceInfo dev = device_info();
  const ForwardPlan<T> plan = plan_forward<T>(a, dev);
  ChunkGeometry g = plan.g;
  const bool need_seg = plan.need_seg;

  WorkspaceMemory ws(plan.ws, a.opt);
  plan.table.build(g, ws, a.cu_seqlens, causal, stream);
  T* lam = ws.at<T>(plan.o_lam);
  T* mu_c = ws.at<T>(plan.o_mu);
  T* logc = ws.at<T>(plan.o_logc);
  T* S_seg = ws.at<T>(plan.o_Sseg);
  T* z_seg = ws.at<T>(plan.o_zseg);

  launch_prep<T>(a.mu, a.omega, a.alpha, d, (T)a.opt.sigma_eps, lam, mu_c, logc, stream);
  const RespSource<S, T> q_src = resp_source<S, T>(a.q, View{}, d, lam, mu_c, logc);
  const RespSource<S, T> k_src = resp_source<S, T>(a.k, a.mask, d, lam, mu_c, logc);
  if (plan.save) {
    launch_responsibilities<S, T>(q_src, a.gq, d, dev, stream);
    launch_responsibilities<S, T>(k_src, a.gk, d, dev, stream);
  }
  const DView<const T> gq = make_view<const T>(a.gq);  // null unless saved
  const DView<const T> gk = make_view<const T>(a.gk);

  if (need_seg) {
    launch_seg_state<S, T, TC>(g, gk, k_src, a.v, View{}, nullptr, S_seg, z_seg, causal, stream);
    launch_scan(make_scan<T>(S_seg, z_seg, g, causal ? kExclusivePrefix : kTotal, a.S0, a.z0, a.S_final, a.z_final),
                stream);
  }

  FwdChunkParams<S, T> fp;
  fp.g = g;
  fp.gq = gq;
  fp.gk = gk;
  fp.q_src = q_src;
  fp.k_src = k_src;
  fp.v = make_view<const S>(a.v);
  fp.out = make_view<S>(a.out);
  fp.den = make_view<T>(a.den);
  fp.init = state_ref_from_workspace<T>(S_seg, z_seg, d.H, g.P_state, d.K, d.Dv);
  fp.S0 = state_ref_from_views<T>(a.S0, a.z0);
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

}  // namespace cuda_impl
}  // namespace gmattn
