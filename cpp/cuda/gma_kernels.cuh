// gmattn CUDA kernels: Gaussian Mixture Attention forward and backward (docs/design.md section 1).
//
// Templated on the input dtype S (half, bfloat16, float, double) and the accumulator dtype T
// (float, or double for double inputs). Each dtype's translation unit instantiates
// forward_impl<S> / backward_impl<S>; dispatch.cu switches on ForwardArgs::dtype.
//
// Pipeline (per batch row b and head h; "chunk" = C consecutive tokens, "segment" = a run of
// chunks processed sequentially by one thread block, "slice" = DvT consecutive value columns).
// Packed sequences (cu_seqlens): each sequence of the one row is walked like a batch row, its
// segments and chunks starting at its first token; sequence_table first builds, on the GPU, where
// each sequence's segments and state slots are (plan.cuh, SequenceTable):
//
//   forward
//     prep_params            lam = 1/sigma2, log pi - 0.5 sum log sigma2         (H, K[, D])
//     responsibilities x2    Gq = gamma(q), Gk = gamma(k) * mask                  (B, H, N, K)
//                            when saved for backward; otherwise the chunk kernels below
//                            compute each chunk's rows themselves (same bits), and inference
//                            keeps nothing O(B H N K)
//     seg_state + state_scan segment-local sums Gk^T V, Gk^T 1 then a prefix over segments
//                            (causal, when there is more than one segment) or the total
//                            (bidirectional); skipped for causal with one segment
//     forward_chunk          out = (Gq S_prev + tril(Gq Gk^T) V) / (Gq z_prev + rowsum + eps),
//                            then S += Gk^T V, z += Gk^T 1, chunk after chunk
//   backward
//     dden                   dden = -(g . out) / den                              (B, H, N)
//     seg_state + state_scan forward states as above; the backward states dS, dz (sums of
//                            Gq^T dnum, Gq^T dden) as suffix sums over segments
//     backward_chunk         a forward sweep over the segment's chunks for dGq, a reverse sweep
//                            for dGk and dv (docs/design.md section 1, chunked)
//     responsibilities_bwd   softmax backward, dq / dk, per-block partial sums of the
//                            parameter gradients
//     finalize_params        fixed-order sum of the partials, chain rule to mu, omega, alpha
//
// Memory: backward's workspace is O(B H N K) (the gradients of the responsibilities) plus
// O(B H P K Dv) segment states with P chosen from the GPU size, never O(N K Dv) or O(N^2);
// forward's is the segment states and the set-up mixture alone.
// Chunk products run on tensor cores (tf32 WMMA, fp32 accumulate) for half / bfloat16 inputs
// and as register-tiled FMA loops in the accumulator dtype for float / double inputs.
//
// Files, by step of the algorithm (the CPU kernels in cpp/cpu mirror them):
//   common.cuh    numeric helpers, device views, shared-memory carving, block GEMM, host checks
//   mixture.cuh   prep_params, responsibilities, responsibilities_bwd, finalize_params
//   plan.cuh      geometry, workspace, StateRef, seg_state, state_scan, chunk staging,
//                 sequence_table (packed sequences)
//   forward.cuh   forward_chunk, forward_impl
//   backward.cuh  dden, backward_chunk, backward_impl
//   this header   the entry points' validation
#pragma once

#include "backward.cuh"
#include "forward.cuh"

namespace gmattn {
namespace cuda_impl {

// Packed sequences: cu_seqlens (S + 1 int64 offsets, on the device) with B = 1 and no mask.
// Returns the number of sequences the state tensors hold: S, or B without cu_seqlens. (The
// offsets' values are not read here, which would synchronise with the GPU: the kernels clamp
// them into [0, N] and make them non-decreasing, see sequence_table_kernel.)
inline int64_t check_sequences(const Dims& d, const View& cu_seqlens, const View& mask) {
  if (!cu_seqlens.present()) return d.B;
  const int64_t S = packed_sequences(cu_seqlens);
  require(S >= 1 && S < (int64_t(1) << 30),
          "cu_seqlens must hold S + 1 offsets with 1 <= S < 2^30 sequences, got " + std::to_string(S + 1) +
              " offsets");
  require(d.B == 1, "with cu_seqlens (packed sequences) B must be 1, got " + std::to_string(d.B));
  require(!mask.present(), "cu_seqlens and mask cannot be combined");
  return S;
}

// Validation shared by the entry points (the bindings validate first; this is the last line
// of defence against out-of-bounds writes).
inline void validate(const ForwardArgs& a) {
  const Dims& d = a.dims;
  check_sizes(d);
  const int64_t seqs = check_sequences(d, a.cu_seqlens, a.mask);
  check_view(a.q, "q", {d.B, d.N, d.H, d.D});
  check_view(a.k, "k", {d.B, d.N, d.H, d.D});
  check_view(a.v, "v", {d.B, d.N, d.H, d.Dv});
  check_view(a.mu, "mu", {d.H, d.K, d.D});
  check_view(a.omega, "omega", {d.H, d.K, d.D});
  check_view(a.alpha, "alpha", {d.H, d.K});
  check_optional_view(a.mask, "mask", {d.B, d.N});
  check_optional_view(a.S0, "S0", {seqs, d.H, d.K, d.Dv});
  check_optional_view(a.z0, "z0", {seqs, d.H, d.K});
  check_view(a.out, "out", {d.B, d.N, d.H, d.Dv});
  check_optional_view(a.S_final, "S_final", {seqs, d.H, d.K, d.Dv});
  check_optional_view(a.z_final, "z_final", {seqs, d.H, d.K});
  if (a.gq.present() || a.gk.present() || a.den.present()) {
    check_view(a.gq, "gq", {d.B, d.H, d.N, d.K});
    check_view(a.gk, "gk", {d.B, d.H, d.N, d.K});
    check_view(a.den, "den", {d.B, d.H, d.N});
  }
}

inline void validate(const BackwardArgs& a) {
  const Dims& d = a.dims;
  check_sizes(d);
  const int64_t seqs = check_sequences(d, a.cu_seqlens, a.mask);
  check_view(a.q, "q", {d.B, d.N, d.H, d.D});
  check_view(a.k, "k", {d.B, d.N, d.H, d.D});
  check_view(a.v, "v", {d.B, d.N, d.H, d.Dv});
  check_view(a.mu, "mu", {d.H, d.K, d.D});
  check_view(a.omega, "omega", {d.H, d.K, d.D});
  check_view(a.alpha, "alpha", {d.H, d.K});
  check_optional_view(a.mask, "mask", {d.B, d.N});
  check_optional_view(a.S0, "S0", {seqs, d.H, d.K, d.Dv});
  check_optional_view(a.z0, "z0", {seqs, d.H, d.K});
  check_view(a.out, "out", {d.B, d.N, d.H, d.Dv});
  check_view(a.gq, "gq", {d.B, d.H, d.N, d.K});
  check_view(a.gk, "gk", {d.B, d.H, d.N, d.K});
  check_view(a.den, "den", {d.B, d.H, d.N});
  check_view(a.dout, "dout", {d.B, d.N, d.H, d.Dv});
  check_optional_view(a.dS_final, "dS_final", {seqs, d.H, d.K, d.Dv});
  check_optional_view(a.dz_final, "dz_final", {seqs, d.H, d.K});
  check_view(a.dq, "dq", {d.B, d.N, d.H, d.D});
  check_view(a.dk, "dk", {d.B, d.N, d.H, d.D});
  check_view(a.dv, "dv", {d.B, d.N, d.H, d.Dv});
  check_view(a.dmu, "dmu", {d.H, d.K, d.D});
  check_view(a.domega, "domega", {d.H, d.K, d.D});
  check_view(a.dalpha, "dalpha", {d.H, d.K});
  check_optional_view(a.dS0, "dS0", {seqs, d.H, d.K, d.Dv});
  check_optional_view(a.dz0, "dz0", {seqs, d.H, d.K});
}

}  // namespace cuda_impl
}  // namespace gmattn
