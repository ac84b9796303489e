// The chunked decomposition of a sequence and its scans: the geometry (chunk length, value
// slices, segments per sequence) chosen for the GPU, the workspace, where a block's state comes
// from (StateRef), the segment-local state sums (seg_state) and the scan over segments
// (state_scan), and the staging of a chunk's tiles that every chunk kernel starts from.
#pragma once

#include "mixture.cuh"

namespace gmattn {
namespace cuda_impl {

// Where a block finds the (K x Dv) state and (K) normaliser it starts from: either a
// caller's tensor (sequences, H, K, Dv) / (sequences, H, K) (seg strides 0), or the segment
// workspace [B*H][P_state][K][Dv] / [B*H][P_state][K] (slot strides). S == nullptr means zeros.
template <class T>
struct StateRef {
  const T* S = nullptr;
  int64_t S_b = 0, S_h = 0, S_seg = 0, S_k = 0, S_e = 0;
  const T* z = nullptr;
  int64_t z_b = 0, z_h = 0, z_seg = 0, z_k = 0;
};

template <class T>
inline StateRef<T> state_ref_from_views(const View& S, const View& z) {
  StateRef<T> r;
  if (S.present()) {
    r.S = static_cast<const T*>(S.data);
    r.S_b = S.stride[0];
    r.S_h = S.stride[1];
    r.S_k = S.stride[2];
    r.S_e = S.stride[3];
  }
  if (z.present()) {
    r.z = static_cast<const T*>(z.data);
    r.z_b = z.stride[0];
    r.z_h = z.stride[1];
    r.z_k = z.stride[2];
  }
  return r;
}

template <class T>
inline StateRef<T> state_ref_from_workspace(const T* S_seg, const T* z_seg, int64_t H, int64_t P_state, int64_t K,
                                            int64_t Dv) {
  StateRef<T> r;
  r.S = S_seg;
  r.S_h = P_state * K * Dv;
  r.S_b = H * r.S_h;
  r.S_seg = K * Dv;
  r.S_k = Dv;
  r.S_e = 1;
  r.z = z_seg;
  r.z_h = P_state * K;
  r.z_b = H * r.z_h;
  r.z_seg = K;
  r.z_k = 1;
  return r;
}

// Loads the (K x DvT) state slice [e0, e0 + ev) and the normaliser a block starts from into
// shared memory, zero-padded to Kp rows and DvT columns.
template <class T>
__device__ void load_state(T* S, int ldS, T* z, const StateRef<T>& ref, int64_t b, int64_t h, int64_t seg,
                           int K, int Kp, int DvT, int e0, int ev) {
  for (int idx = threadIdx.x; idx < Kp * DvT; idx += kThreads) {
    const int k = idx / DvT, c = idx % DvT;
    T val = T(0);
    if (ref.S != nullptr && k < K && c < ev)
      val = ref.S[b * ref.S_b + h * ref.S_h + seg * ref.S_seg + k * ref.S_k + (e0 + c) * ref.S_e];
    S[k * ldS + c] = val;
  }
  for (int k = threadIdx.x; k < Kp; k += kThreads) {
    T val = T(0);
    if (ref.z != nullptr && k < K) val = ref.z[b * ref.z_b + h * ref.z_h + seg * ref.z_seg + k * ref.z_k];
    z[k] = val;
  }
}

// Zeroes the compensation terms of a running state (see add_chunk_to_state): a state just loaded
// or zeroed carries no rounding error yet.
template <class T>
__device__ void clear_compensation(T* Sc, int ldS, T* zc, int Kp, int DvT) {
  for (int idx = threadIdx.x; idx < Kp * DvT; idx += kThreads) Sc[(idx / DvT) * ldS + idx % DvT] = T(0);
  for (int k = threadIdx.x; k < Kp; k += kThreads) zc[k] = T(0);
}

// Writes a shared (K x DvT) state slice and (slice 0 only) its normaliser to caller tensors.
template <class T>
__device__ void store_state(DView<T> S_out, DView<T> z_out, const T* S, int ldS, const T* z, int64_t b,
                            int64_t h, int K, int DvT, int e0, int ev, bool write_z) {
  if (S_out.p != nullptr)
    for (int idx = threadIdx.x; idx < K * DvT; idx += kThreads) {
      const int k = idx / DvT, c = idx % DvT;
      if (c < ev) S_out(b, h, k, e0 + c) = S[k * ldS + c];
    }
  if (write_z && z_out.p != nullptr)
    for (int k = threadIdx.x; k < K; k += kThreads) z_out(b, h, k) = z[k];
}

// Packed sequences (cu_seqlens): the tables sequence_table_kernel builds in the workspace from
// the offsets, on the device (the host never reads the offsets: no synchronisation). A sequence
// of len rows has ceil(len / seg_len) segments (none when empty); the segments of all sequences
// are numbered in order ("block segments", the grid's seg axis), and those whose states go
// through the workspace (all but a causal sequence's only segment) have a state slot each.
struct SequenceTable {
  const int64_t* starts = nullptr;       // [S + 1] row offsets (clamped into [0, N], non-decreasing)
  const int64_t* seg_first = nullptr;    // [S + 1] each sequence's first block segment, then their count
  const int64_t* state_first = nullptr;  // [S + 1] each sequence's first state slot, then their count
  const int64_t* slot_seq = nullptr;     // [P] the sequence of each block segment; -1: unused
  int64_t count = 0;                     // S; 0: not packed (each batch row is one sequence)
};

// Sizes of the sequence decomposition shared by the chunk kernels.
struct ChunkGeometry {
  int64_t B = 0, N = 0, H = 0;
  int K = 0, Kp = 0, Dv = 0;
  int C = 0;        // chunk length (multiple of 16)
  int DvT = 0;      // value columns per slice (multiple of 16)
  int nslices = 0;  // ceil(Dv / DvT)
  int P = 0;        // segments per (b, h); packed: an upper bound of the block segments
  int P_state = 0;  // state slots per (b, h) in the segment workspace
  int64_t seg_len = 0;  // tokens per segment (a multiple of C); a sequence's last may be shorter
  // Forward without saving for backward: the chunk kernels compute each chunk's responsibilities
  // themselves (RespScratch of C rows in their shared memory) instead of reading them from an
  // O(B H N K) buffer.
  bool own_responsibilities = false;
  SequenceTable seqs;  // packed sequences (device pointers set once the workspace exists)
};

// A block's place: (b, h), its value slice, and its segment: segment `seg` of `seg_count` of
// sequence `seq` (the batch row b, or a packed sequence), rows [n_begin, n_end) of batch row b.
// Its states in the workspace start at slot state_slot0 of (b, h). !valid: a packed block segment
// beyond the used ones (the block has nothing to do).
struct BlockCoords {
  int64_t b, h, bh, seq, seg, seg_count, state_slot0, n_begin, n_end;
  int slice, e0, ev;
  bool valid;
};

// Blocks are laid out as (bh, slice, seg) with seg fastest.
__device__ __forceinline__ BlockCoords block_coords(const ChunkGeometry& g) {
  BlockCoords c;
  const int64_t bid = blockIdx.x;
  const int64_t slot = bid % g.P;
  c.slice = (int)((bid / g.P) % g.nslices);
  c.bh = bid / ((int64_t)g.P * g.nslices);
  c.b = c.bh / g.H;
  c.h = c.bh % g.H;
  c.e0 = c.slice * g.DvT;
  c.ev = g.Dv - c.e0 < g.DvT ? g.Dv - c.e0 : g.DvT;
  c.valid = true;
  if (g.seqs.count == 0) {
    c.seq = c.b;
    c.seg = slot;
    c.seg_count = g.P;
    c.state_slot0 = 0;
    c.n_begin = slot * g.seg_len;
    c.n_end = c.n_begin + g.seg_len < g.N ? c.n_begin + g.seg_len : g.N;
    return c;
  }
  c.seq = g.seqs.slot_seq[slot];
  if (c.seq < 0) {
    c.valid = false;
    c.seg = c.seg_count = c.state_slot0 = c.n_begin = c.n_end = 0;
    return c;
  }
  const int64_t first = g.seqs.seg_first[c.seq];
  c.seg = slot - first;
  c.seg_count = g.seqs.seg_first[c.seq + 1] - first;
  c.state_slot0 = g.seqs.state_first[c.seq];
  c.n_begin = g.seqs.starts[c.seq] + c.seg * g.seg_len;
  const int64_t seq_end = g.seqs.starts[c.seq + 1];
  c.n_end = c.n_begin + g.seg_len < seq_end ? c.n_begin + g.seg_len : seq_end;
  return c;
}

// A causal sequence of one segment streams its state: its block starts from the caller's initial
// state and writes the final one itself (no workspace slot, no scan). Every other block's state
// goes through its workspace slot.
__device__ __forceinline__ bool streams_state(const BlockCoords& bc, bool causal) {
  return causal && bc.seg_count == 1;
}

// Loads the state a chunk kernel's block starts from: the caller's (S0, or dS_final in the
// reverse sweep) when it streams its state, else its slot in the workspace (causal: the state
// before its segment; bidirectional: its sequence's total, in the sequence's first slot).
template <class T>
__device__ void load_block_state(T* S, int ldS, T* z, const StateRef<T>& caller, const StateRef<T>& workspace,
                                 const BlockCoords& bc, bool causal, int K, int Kp, int DvT) {
  if (streams_state(bc, causal))
    load_state(S, ldS, z, caller, bc.seq, bc.h, 0, K, Kp, DvT, bc.e0, bc.ev);
  else
    load_state(S, ldS, z, workspace, bc.b, bc.h, bc.state_slot0 + (causal ? bc.seg : 0), K, Kp, DvT, bc.e0,
               bc.ev);
}

// --------------------------------------------------------------------------------------------
// What every chunk kernel (seg_state, forward_chunk, backward_chunk) shares: its block's place,
// its tiles' leading dimensions, the staging of a chunk's rows into shared tiles (zero-padded to
// C rows and Kp / DvT columns, which the block GEMMs rely on) and the state update.
// --------------------------------------------------------------------------------------------

struct ChunkBlock {
  BlockCoords bc;
  int ldK, ldS, ldC;  // leading dimensions of tiles of Kp, DvT and C columns
};

__device__ __forceinline__ ChunkBlock chunk_block(const ChunkGeometry& g) {
  return ChunkBlock{block_coords(g), padded_ld(g.Kp), padded_ld(g.DvT), padded_ld(g.C)};
}

// Rows of the chunk starting at token c0: C, or fewer at the end of the segment.
__device__ __forceinline__ int chunk_rows(const ChunkGeometry& g, const BlockCoords& bc, int64_t c0) {
  return (int)(bc.n_end - c0 < g.C ? bc.n_end - c0 : g.C);
}

// The chunk's responsibilities into tile[C][ldK]: read from G (B, H, N, K), or computed from src
// when g.own_responsibilities (a forward that saves nothing). Callers synchronise before reading.
template <class S, class T>
__device__ void stage_responsibilities(T* tile, int ldK, const DView<const T>& G, const RespSource<S, T>& src,
                                       const RespScratch<T>& scratch, const ChunkGeometry& g, const BlockCoords& bc,
                                       int64_t c0, int rows) {
  if (g.own_responsibilities) {
    compute_responsibilities(src, bc.b, bc.h, c0, rows, g.C, g.K, g.Kp, scratch, tile, ldK);
    return;
  }
  for (int idx = threadIdx.x; idx < g.C * g.Kp; idx += kThreads) {
    const int r = idx / g.Kp, k = idx % g.Kp;
    tile[r * ldK + k] = (r < rows && k < g.K) ? G(bc.b, bc.h, c0 + r, k) : T(0);
  }
}

// The slice's columns of the chunk's rows of Y (B, N, H, Dv) into tile[C][ldS], each row divided
// by den (B, H, N) when given. Callers synchronise before reading.
template <class S, class T>
__device__ void stage_values(T* tile, int ldS, const DView<const S>& Y, const DView<const T>& den,
                             const ChunkGeometry& g, const BlockCoords& bc, int64_t c0, int rows) {
  for (int idx = threadIdx.x; idx < g.C * g.DvT; idx += kThreads) {
    const int r = idx / g.DvT, c = idx % g.DvT;
    T val = T(0);
    if (r < rows && c < bc.ev) {
      val = to_acc<T>(Y(bc.b, c0 + r, bc.h, bc.e0 + c));
      if (den.p != nullptr) val = val / den(bc.b, bc.h, c0 + r);
    }
    tile[r * ldS + c] = val;
  }
}

// S += G^T Y and z += G^T w (w == nullptr: ones) for a staged chunk. The product is summed from
// zero and added once, with compensation (Sc, zc: the running state's rounding errors, same
// layouts as S and z), as the CPU adds its chunks: float32 over a million tokens stays as
// accurate as over one chunk. Callers synchronise before reading S or z.
template <bool TC, class T>
__device__ void add_chunk_to_state(T* S, T* Sc, int ldS, T* z, T* zc, const T* G, int ldK, const T* Y, const T* w,
                                   const ChunkGeometry& g) {
  block_gemm<TC, true, ColMajor, RowMajor>(S, ldS, G, ldK, Y, ldS, g.Kp, g.DvT, g.C, Sc);
  for (int k = threadIdx.x; k < g.Kp; k += kThreads) {
    T s = T(0);
    if (w != nullptr)
      for (int r = 0; r < g.C; ++r) s += G[r * ldK + k] * w[r];
    else
      for (int r = 0; r < g.C; ++r) s += G[r * ldK + k];
    math::compensated_add(z[k], zc[k], s);
  }
}

// --------------------------------------------------------------------------------------------
// seg_state: per (b, h, segment, slice) the segment-local sums
//   S_seg[k, e] = sum_n G[n, k] * Y[n, e] / den[n]     (den optional)
//   z_seg[k]    = sum_n G[n, k] * w[n]                  (w optional, 1 when absent)
// Forward state: G = Gk, Y = v. Backward state: G = Gq, Y = dout, den, w = dden.
// --------------------------------------------------------------------------------------------

template <class S, class T>
struct SegStateParams {
  ChunkGeometry g;
  DView<const T> G;    // (B, H, N, K), or computed from src when g.own_responsibilities
  RespSource<S, T> src;
  DView<const S> Y;    // (B, N, H, Dv)
  DView<const T> den;  // (B, H, N) or p == nullptr
  const T* w;          // [B*H][N] or nullptr
  T* S_seg;            // [B*H][P_state][K][Dv]
  T* z_seg;            // [B*H][P_state][K]
  bool causal;         // a causal sequence of one segment streams its state: nothing to sum
};

template <class T>
struct SegStateSmem {
  T *S, *Sc, *z, *zc, *G, *Y, *w;
  RespScratch<T> resp;  // g.own_responsibilities only
  __host__ __device__ SegStateSmem(Carver& c, const ChunkGeometry& g) {
    S = c.take<T>((size_t)g.Kp * padded_ld(g.DvT));
    Sc = c.take<T>((size_t)g.Kp * padded_ld(g.DvT));
    z = c.take<T>(g.Kp);
    zc = c.take<T>(g.Kp);
    G = c.take<T>((size_t)g.C * padded_ld(g.Kp));
    Y = c.take<T>((size_t)g.C * padded_ld(g.DvT));
    w = c.take<T>(g.C);
    if (g.own_responsibilities) resp = RespScratch<T>(c, g.Kp, g.C);
  }
};

template <class S, class T, bool TC>
__global__ void __launch_bounds__(kThreads) seg_state_kernel(const SegStateParams<S, T> p) {
  GMA_DYNAMIC_SMEM(smem_raw);
  const ChunkGeometry& g = p.g;
  Carver carver{reinterpret_cast<uintptr_t>(smem_raw)};
  SegStateSmem<T> sm(carver, g);
  const ChunkBlock blk = chunk_block(g);
  const BlockCoords& bc = blk.bc;
  const int tid = threadIdx.x;
  const int K = g.K, Kp = g.Kp, C = g.C, DvT = g.DvT;
  const int ldK = blk.ldK, ldS = blk.ldS;
  if (!bc.valid || streams_state(bc, p.causal)) return;  // the whole block: before any barrier

  for (int idx = tid; idx < Kp * DvT; idx += kThreads) sm.S[(idx / DvT) * ldS + idx % DvT] = T(0);
  for (int k = tid; k < Kp; k += kThreads) sm.z[k] = T(0);
  clear_compensation(sm.Sc, ldS, sm.zc, Kp, DvT);
  for (int64_t c0 = bc.n_begin; c0 < bc.n_end; c0 += C) {
    const int rows = chunk_rows(g, bc, c0);
    stage_responsibilities(sm.G, ldK, p.G, p.src, sm.resp, g, bc, c0, rows);
    stage_values(sm.Y, ldS, p.Y, p.den, g, bc, c0, rows);
    for (int r = tid; r < C; r += kThreads)
      sm.w[r] = r < rows ? (p.w != nullptr ? p.w[bc.bh * g.N + c0 + r] : T(1)) : T(0);
    __syncthreads();
    add_chunk_to_state<TC>(sm.S, sm.Sc, ldS, sm.z, sm.zc, sm.G, ldK, sm.Y, sm.w, g);
    __syncthreads();
  }
  const int64_t slot = bc.bh * g.P_state + bc.state_slot0 + bc.seg;
  T* S_out = p.S_seg + slot * g.K * g.Dv;
  for (int idx = tid; idx < K * DvT; idx += kThreads) {
    const int k = idx / DvT, c = idx % DvT;
    if (c < bc.ev) S_out[(int64_t)k * g.Dv + bc.e0 + c] = sm.S[k * ldS + c];
  }
  if (bc.slice == 0)
    for (int k = tid; k < K; k += kThreads) p.z_seg[slot * g.K + k] = sm.z[k];
}

// --------------------------------------------------------------------------------------------
// state_scan: over the segment-local states of each (sequence, h), in place, in a fixed order:
//   kExclusivePrefix  slot p := init + sum_{q < p} local_q     (causal forward states)
//   kExclusiveSuffix  slot p := init + sum_{q > p} local_q     (causal backward states)
//   kTotal            slot 0 := init + sum_q local_q           (bidirectional)
// and writes init + sum_q local_q to the optional out tensors (S_final / dS0). A sequence is a
// batch row (P segments) or a packed sequence (its segments' slots, from the sequence table; an
// empty one has none: its out is its init). A causal sequence of one segment is skipped: its
// chunk kernel block streams the state (streams_state).
// --------------------------------------------------------------------------------------------

enum ScanMode : int { kExclusivePrefix = 0, kExclusiveSuffix = 1, kTotal = 2 };

template <class T>
struct ScanParams {
  T* S_seg;
  T* z_seg;
  int64_t seqs, H;                // sequences: B, or S when packed
  int K, Dv, P, P_state;
  SequenceTable table;            // packed sequences (table.count > 0)
  int mode;
  DView<const T> S_init, z_init;  // (seqs, H, K, Dv), (seqs, H, K); optional
  DView<T> S_out, z_out;          // optional
};

template <class T>
__global__ void __launch_bounds__(kThreads) state_scan_kernel(const ScanParams<T> p) {
  const int64_t per_seq = (int64_t)p.K * p.Dv + p.K;
  const int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (idx >= p.seqs * p.H * per_seq) return;  // no barriers in this kernel
  const int64_t sh = idx / per_seq, e = idx % per_seq;
  const int64_t seq = sh / p.H, h = sh % p.H;
  // The sequence's segments and the workspace index of its first state slot.
  int64_t count = p.P, first = sh * p.P_state;
  if (p.table.count > 0) {
    count = p.table.seg_first[seq + 1] - p.table.seg_first[seq];
    first = h * p.P_state + p.table.state_first[seq];
  }
  if (p.mode != kTotal && count == 1) return;  // streamed by its chunk kernel block
  const int64_t KDv = (int64_t)p.K * p.Dv;
  T* slot;
  int64_t stride;
  T acc = T(0), comp = T(0);  // compensated running sum over the segments
  if (e < KDv) {
    const int k = (int)(e / p.Dv), c = (int)(e % p.Dv);
    slot = p.S_seg + first * KDv + e;
    stride = KDv;
    if (p.S_init.p != nullptr) acc = p.S_init(seq, h, k, c);
  } else {
    const int k = (int)(e - KDv);
    slot = p.z_seg + first * p.K + k;
    stride = p.K;
    if (p.z_init.p != nullptr) acc = p.z_init(seq, h, k);
  }
  if (p.mode == kExclusivePrefix) {
    for (int64_t q = 0; q < count; ++q) {
      const T local = slot[q * stride];
      slot[q * stride] = acc;
      math::compensated_add(acc, comp, local);
    }
  } else if (p.mode == kExclusiveSuffix) {
    for (int64_t q = count - 1; q >= 0; --q) {
      const T local = slot[q * stride];
      slot[q * stride] = acc;
      math::compensated_add(acc, comp, local);
    }
  } else {
    for (int64_t q = 0; q < count; ++q) math::compensated_add(acc, comp, slot[q * stride]);
    if (count > 0) slot[0] = acc;
  }
  if (e < KDv) {
    if (p.S_out.p != nullptr) p.S_out(seq, h, e / p.Dv, e % p.Dv) = acc;
  } else {
    if (p.z_out.p != nullptr) p.z_out(seq, h, e - KDv) = acc;
  }
}

// --------------------------------------------------------------------------------------------
// sequence_table: packed sequences' tables (SequenceTable) from the offsets, by one block: the
// sequences in tiles of kThreads, each tile's running maximum of the ends (offsets are clamped
// into [0, N] and made non-decreasing, so offsets that break the rules cannot send a block
// outside the tensors) and its prefix sums of segments and state slots, carried from tile to
// tile; then the sequence of every block segment.
// --------------------------------------------------------------------------------------------

// (Templated on the offsets' integer type like the other kernels on their dtypes, so that every
// translation unit including this header may instantiate it.)
template <class Offset>
struct SequenceTableParams {
  DView<const Offset> offsets;  // (S + 1), as the caller gave them
  int64_t S, N, seg_len, P;
  bool causal;
  int64_t *starts, *seg_first, *state_first, *slot_seq;
};

// Inclusive scan with `op` of one value per thread over the block, in buf[kThreads] (Hillis-Steele);
// returns this thread's result. buf then holds every thread's result until the next call.
template <class Op>
__device__ int64_t block_inclusive_scan(int64_t* buf, int64_t x, Op op) {
  const int tid = threadIdx.x;
  __syncthreads();  // the previous call's results are read
  buf[tid] = x;
  __syncthreads();
  for (int off = 1; off < kThreads; off *= 2) {
    const int64_t mine = buf[tid], before = tid >= off ? buf[tid - off] : 0;
    __syncthreads();
    if (tid >= off) buf[tid] = op(before, mine);
    __syncthreads();
  }
  return buf[tid];
}

template <class Offset>
__global__ void __launch_bounds__(kThreads) sequence_table_kernel(const SequenceTableParams<Offset> p) {
  GMA_DYNAMIC_SMEM(smem_raw);
  int64_t* buf = reinterpret_cast<int64_t*>(smem_raw);  // [kThreads]
  const int tid = threadIdx.x;
  const auto clamp = [&](int64_t x) { return x < 0 ? int64_t(0) : (x > p.N ? p.N : x); };
  const auto larger = [](int64_t a, int64_t b) { return a < b ? b : a; };
  const auto plus = [](int64_t a, int64_t b) { return a + b; };
  for (int64_t g = tid; g < p.P; g += kThreads) p.slot_seq[g] = -1;
  // Carried over the tiles: the end of the last sequence so far, the segments and slots so far.
  int64_t end = clamp(p.offsets(0)), segs = 0, states = 0;
  if (tid == 0) {
    p.starts[0] = end;
    p.seg_first[0] = 0;
    p.state_first[0] = 0;
  }
  for (int64_t s0 = 0; s0 < p.S; s0 += kThreads) {
    const int64_t s = s0 + tid;
    const bool real = s < p.S;
    const int64_t seq_end = block_inclusive_scan(buf, real ? larger(clamp(p.offsets(s + 1)), end) : end, larger);
    const int64_t seq_begin = tid == 0 ? end : buf[tid - 1];
    const int64_t tile_end = buf[kThreads - 1];
    const int64_t nseg = (seq_end - seq_begin + p.seg_len - 1) / p.seg_len;  // 0 past the last sequence
    const int64_t nstate = p.causal && nseg == 1 ? 0 : nseg;                 // see streams_state
    const int64_t seg_sum = block_inclusive_scan(buf, nseg, plus);
    const int64_t tile_segs = buf[kThreads - 1];
    const int64_t state_sum = block_inclusive_scan(buf, nstate, plus);
    const int64_t tile_states = buf[kThreads - 1];
    if (real) {
      p.starts[s + 1] = seq_end;
      p.seg_first[s + 1] = segs + seg_sum;
      p.state_first[s + 1] = states + state_sum;
    }
    end = tile_end;
    segs += tile_segs;
    states += tile_states;
  }
  __syncthreads();  // the tables above are visible to the whole block
  for (int64_t s = tid; s < p.S; s += kThreads)
    for (int64_t g = p.seg_first[s]; g < p.seg_first[s + 1] && g < p.P; ++g) p.slot_seq[g] = s;
}

// ============================================================================================
// Host side
// ============================================================================================

// The pieces of a call's workspace: offsets into one block, each 256-byte aligned.
class WorkspaceLayout {
 public:
  static constexpr size_t kAlign = 256;
  // Reserve `count` elements; returns the offset (the pointer comes from WorkspaceMemory::at).
  template <class E>
  size_t reserve(int64_t count) {
    const size_t off = size_;
    size_ += ((size_t)count * sizeof(E) + kAlign - 1) & ~(kAlign - 1);
    return off;
  }
  size_t size() const { return size_; }
  // What a caller's block must hold: the pieces plus room to align its start.
  size_t bytes_needed() const { return size_ == 0 ? 0 : size_ + kAlign - 1; }

 private:
  size_t size_ = 0;
};

// The workspace of one call: the caller's block (Options::workspace) when given, else one
// stream-ordered allocation freed (stream-ordered) when the call returns.
class WorkspaceMemory {
 public:
  WorkspaceMemory(const WorkspaceLayout& layout, const Options& opt)
      : stream_(static_cast<cudaStream_t>(opt.stream)) {
    if (layout.size() == 0) return;
    if (opt.workspace != nullptr) {
      require(opt.workspace_bytes >= layout.bytes_needed(),
              "the workspace has " + std::to_string(opt.workspace_bytes) + " bytes, the call needs " +
                  std::to_string(layout.bytes_needed()));
      const uintptr_t p = reinterpret_cast<uintptr_t>(opt.workspace);
      base_ = reinterpret_cast<unsigned char*>((p + WorkspaceLayout::kAlign - 1) & ~(WorkspaceLayout::kAlign - 1));
    } else {
      owned_ = static_cast<unsigned char*>(malloc_async(layout.size(), stream_));
      base_ = owned_;
    }
  }
  ~WorkspaceMemory() {
    try {
      free_async(owned_, stream_);
    } catch (...) {
    }
  }
  WorkspaceMemory(const WorkspaceMemory&) = delete;
  WorkspaceMemory& operator=(const WorkspaceMemory&) = delete;
  template <class E>
  E* at(size_t offset) const {
    return reinterpret_cast<E*>(base_ + offset);
  }

 private:
  cudaStream_t stream_;
  unsigned char* owned_ = nullptr;
  unsigned char* base_ = nullptr;
};

// Shared memory per block of each chunk kernel for a geometry.
template <class T, class Layout>
inline size_t smem_bytes(const ChunkGeometry& g) {
  Carver c;
  Layout layout(c, g);
  (void)layout;
  return c.offset + 128;
}

// Chooses chunk length C, slice width DvT (largest that fit the shared memory) and the number
// of segments P (enough blocks to fill the GPU at about two blocks per SM).
// Packed sequences (S = packed > 0, B = 1; the host does not know their lengths): the segment
// length is chosen as for one sequence of all N tokens, and a sequence of len rows takes
// ceil(len / seg_len) segments; in all at most floor(N / seg_len) + S, the P block segments the
// grid has (those past the used ones exit at once). State slots: every segment of a
// bidirectional sequence (its local sums, then its total), none for a causal sequence of one
// segment (it streams its state), so that causal needs fewer than 2 N / seg_len (each sequence
// that has slots is longer than seg_len).
template <class T, class Layout>
inline ChunkGeometry choose_geometry(const Dims& d, const DeviceInfo& dev, bool causal, int64_t packed,
                                     bool own_responsibilities = false) {
  ChunkGeometry g;
  g.own_responsibilities = own_responsibilities;
  g.B = d.B;
  g.N = d.N;
  g.H = d.H;
  g.K = (int)d.K;
  g.Kp = round_up16(d.K);
  g.Dv = (int)d.Dv;
  const int64_t max_C = ceil_div(d.N, 16) * 16;  // 64 bits: N may be up to 2^31 - 1
  const int max_DvT = round_up16(d.Dv);
  static const int candidates[][2] = {{32, 64}, {32, 32}, {16, 64}, {16, 32}, {16, 16}};
  bool found = false;
  for (const auto& cand : candidates) {
    g.C = (int)std::min<int64_t>(cand[0], max_C);
    g.DvT = std::min(cand[1], max_DvT);
    if (smem_bytes<T, Layout>(g) <= (size_t)dev.max_smem_optin) {
      found = true;
      break;
    }
  }
  require(found, "K = " + std::to_string(d.K) + " needs more shared memory than this GPU has");
  g.nslices = (int)ceil_div(d.Dv, g.DvT);
  const int64_t nchunks = ceil_div(d.N, g.C);
  const int64_t base_blocks = d.B * d.H * g.nslices;
  const int64_t target_blocks = 2 * (int64_t)std::max(dev.sm_count, 1);
  int64_t P = std::max<int64_t>(1, std::min<int64_t>(nchunks, ceil_div(target_blocks, base_blocks)));
  const int64_t chunks_per_seg = ceil_div(nchunks, P);
  g.P = (int)ceil_div(nchunks, chunks_per_seg);  // no empty segments
  g.seg_len = chunks_per_seg * g.C;
  g.P_state = g.P;
  if (packed > 0) {
    const int64_t whole = ceil_div(d.N, g.seg_len);
    g.P = (int)(whole + packed);  // (check_sizes bounds S, so that this fits)
    g.P_state = causal ? (int)std::min<int64_t>(g.P, 2 * whole) : g.P;
    g.seqs.count = packed;
  }
  return g;
}

// Whether a call computes segment states (seg_state, state_scan) before its chunk kernels: not
// when every sequence streams its state (causal, one segment per batch row).
inline bool needs_segment_states(const ChunkGeometry& g, bool causal) {
  return g.seqs.count > 0 || !causal || g.P > 1;
}

template <class T>
inline ScanParams<T> make_scan(T* S_seg, T* z_seg, const ChunkGeometry& g, ScanMode mode, const View& S_init,
                               const View& z_init, const View& S_out, const View& z_out) {
  ScanParams<T> sp;
  sp.S_seg = S_seg;
  sp.z_seg = z_seg;
  sp.seqs = g.seqs.count > 0 ? g.seqs.count : g.B;
  sp.H = g.H;
  sp.K = g.K;
  sp.Dv = g.Dv;
  sp.P = g.P;
  sp.P_state = g.P_state;
  sp.table = g.seqs;
  sp.mode = mode;
  sp.S_init = make_view<const T>(S_init);
  sp.z_init = make_view<const T>(z_init);
  sp.S_out = make_view<T>(S_out);
  sp.z_out = make_view<T>(z_out);
  return sp;
}

template <class S, class T, bool TC>
inline void launch_seg_state(const ChunkGeometry& g, DView<const T> G, const RespSource<S, T>& src, const View& Y,
                             const View& den, const T* w, T* S_seg, T* z_seg, bool causal, cudaStream_t stream) {
  SegStateParams<S, T> sp;
  sp.g = g;
  sp.G = G;
  sp.src = src;
  sp.Y = make_view<const S>(Y);
  sp.den = make_view<const T>(den);
  sp.w = w;
  sp.S_seg = S_seg;
  sp.z_seg = z_seg;
  sp.causal = causal;
  launch("gmattn seg_state", seg_state_kernel<S, T, TC>, grid_size(g.B * g.H * g.nslices * g.P, "seg_state"),
         kThreads, smem_bytes<T, SegStateSmem<T>>(g), stream, sp);
}

template <class T>
inline void launch_scan(const ScanParams<T>& sp, cudaStream_t stream) {
  const int64_t total = sp.seqs * sp.H * ((int64_t)sp.K * sp.Dv + sp.K);
  launch("gmattn state_scan", state_scan_kernel<T>, grid_size(ceil_div(total, kThreads), "state_scan"), kThreads,
         0, stream, sp);
}

// The workspace of the packed sequences' tables (SequenceTable), and its build.
struct SequenceTableLayout {
  size_t o_starts = 0, o_seg_first = 0, o_state_first = 0, o_slot_seq = 0;
  // Reserves the tables of a geometry (nothing when not packed).
  void reserve(WorkspaceLayout& ws, const ChunkGeometry& g) {
    const int64_t S = g.seqs.count;
    if (S == 0) return;
    o_starts = ws.reserve<int64_t>(S + 1);
    o_seg_first = ws.reserve<int64_t>(S + 1);
    o_state_first = ws.reserve<int64_t>(S + 1);
    o_slot_seq = ws.reserve<int64_t>(g.P);
  }
  // Builds the tables from the offsets (packed only) and points g.seqs at them.
  void build(ChunkGeometry& g, const WorkspaceMemory& ws, const View& offsets, bool causal,
             cudaStream_t stream) const {
    if (g.seqs.count == 0) return;
    SequenceTableParams<int64_t> tp;
    tp.offsets = make_view<const int64_t>(offsets);
    tp.S = g.seqs.count;
    tp.N = g.N;
    tp.seg_len = g.seg_len;
    tp.P = g.P;
    tp.causal = causal;
    tp.starts = ws.at<int64_t>(o_starts);
    tp.seg_first = ws.at<int64_t>(o_seg_first);
    tp.state_first = ws.at<int64_t>(o_state_first);
    tp.slot_seq = ws.at<int64_t>(o_slot_seq);
    launch("gmattn sequence_table", sequence_table_kernel<int64_t>, 1, kThreads, kThreads * sizeof(int64_t), stream, tp);
    g.seqs.starts = tp.starts;
    g.seqs.seg_first = tp.seg_first;
    g.seqs.state_first = tp.state_first;
    g.seqs.slot_seq = tp.slot_seq;
  }
};

}  // namespace cuda_impl
}  // namespace gmattn
