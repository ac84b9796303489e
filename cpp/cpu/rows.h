// The rows of a chunk: shapes and padding, strided gathers and scatters of the inputs, outputs
// and saved tensors (any layout), the prefetch of the next chunk, and the per-thread chunk
// buffers (Workspace) that all arithmetic runs in. Part of the CPU kernels (forward.cpp,
// backward.cpp), compiled once per instruction set into namespace gmattn::cpu::GMATTN_ISA.
//
// Layout of the work. Each (batch, head) pair walks its sequence in chunks of kChunk rows. A
// chunk is gathered (any strides, any storage dtype) into contiguous accumulator buffers whose
// widths (K, D, Dv) are padded with zeros to whole SIMD vectors; all arithmetic runs there on
// register-tiled products (small_gemm.h); results are scattered back. The causal state (S, z)
// is carried across chunks; backward recomputes what it needs from the saved responsibilities:
// causal, with one forward scan (dq) and one reverse scan (dk, dv); bidirectional, with a pass over
// the queries (dq, and the state gradient) and then one over the keys (dk, dv).
#pragma once

#ifndef GMATTN_ISA
#define GMATTN_ISA generic
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

#include "gmattn/gmattn.h"
#include "numeric.h"
#include "simd.h"
#include "small_gemm.h"
#include "working_memory.h"

namespace gmattn {
namespace cpu {
namespace GMATTN_ISA {

using namespace cpu_detail;

constexpr int64_t kChunk = 64;  // rows per chunk; a multiple of every vector length

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

// A block of n rows and `cols` columns of a strided tensor: element (r, c) at base[r * rs + c * cs]
// (strides in elements, any sign, zero allowed). It is walked along whichever axis lies closer
// together in memory: along each row when its columns are adjacent or at least as close as the
// rows (the (B, N, H, D) layout and its permutations with D innermost), else down each column (D
// not innermost: a Fortran-order array, D the outermost axis), so that every cache line is used
// up before the next one is read, whatever the layout.
template <class T>
struct Block {
  T* base;
  int64_t rs, cs;
  bool by_rows() const { return cs == 1 || std::abs(cs) <= std::abs(rs); }
};
template <class T>
inline Block<const T> input_rows(const View& x, int64_t b, int64_t h, int64_t row0) {  // x[b, row0 + r, h, c]
  return {at<const T>(x, b, row0, h), x.stride[1], x.stride[3]};
}
template <class T>
inline Block<T> output_rows(const View& x, int64_t b, int64_t h, int64_t row0) {
  return {at<T>(x, b, row0, h), x.stride[1], x.stride[3]};
}

// dst (rows_total x ld) <- the block's n x cols values; zeros elsewhere.
template <class T, class Acc>
void gather(Block<const T> x, int64_t n, int64_t cols, Acc* dst, int64_t ld, int64_t rows_total) {
  if (x.cs == 1) {
    for (int64_t r = 0; r < n; ++r) {
      const T* src = x.base + r * x.rs;
      Acc* d = dst + r * ld;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) d[c] = load_as<Acc>(src[c]);
    }
  } else if (x.by_rows()) {
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = load_as<Acc>(x.base[r * x.rs + c * x.cs]);
    }
  } else {
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = 0; r < n; ++r) dst[r * ld + c] = load_as<Acc>(x.base[r * x.rs + c * x.cs]);
    }
  }
  for (int64_t r = 0; r < n; ++r) std::fill(dst + r * ld + cols, dst + (r + 1) * ld, Acc(0));
  if (rows_total > n) std::fill(dst + n * ld, dst + rows_total * ld, Acc(0));
}

// The block's n x cols values <- src (n x ld).
template <class T, class Acc>
void scatter(Block<T> y, int64_t n, int64_t cols, const Acc* src, int64_t ld) {
  if (y.cs == 1) {
    for (int64_t r = 0; r < n; ++r) {
      T* d = y.base + r * y.rs;
      const Acc* s = src + r * ld;
      if constexpr (std::is_same_v<T, Acc>) {
        stream_copy(d, s, cols);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) d[c] = store_as<T>(s[c]);
      }
    }
  } else if (y.by_rows()) {
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < cols; ++c) y.base[r * y.rs + c * y.cs] = store_as<T>(src[r * ld + c]);
    }
  } else {
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = 0; r < n; ++r) y.base[r * y.rs + c * y.cs] = store_as<T>(src[r * ld + c]);
    }
  }
}

// dst (rows_total x ld) <- x[b, row0 + r, h, 0:cols] for r < n; zeros elsewhere.
template <class T, class Acc>
void gather_rows(const View& x, int64_t b, int64_t h, int64_t row0, int64_t n, int64_t cols, Acc* dst, int64_t ld,
                 int64_t rows_total) {
  gather<T, Acc>(input_rows<T>(x, b, h, row0), n, cols, dst, ld, rows_total);
}
template <class T, class Acc>
void scatter_rows(const View& y, int64_t b, int64_t h, int64_t row0, int64_t n, int64_t cols, const Acc* src,
                  int64_t ld) {
  scatter<T, Acc>(output_rows<T>(y, b, h, row0), n, cols, src, ld);
}

// A (B, H, N, cols) accumulator-typed view: rows [row0, row0+n) of (b, h) in or out.
template <class Acc>
void read_saved(const View& x, int64_t b, int64_t h, int64_t row0, int64_t n, int64_t cols, Acc* dst, int64_t ld,
                int64_t rows_total) {
  gather<Acc, Acc>({at<const Acc>(x, b, h, row0), x.stride[2], x.stride[3]}, n, cols, dst, ld, rows_total);
}
template <class Acc>
void write_saved(const View& x, int64_t b, int64_t h, int64_t row0, int64_t n, int64_t cols, const Acc* src,
                 int64_t ld) {
  scatter<Acc, Acc>({at<Acc>(x, b, h, row0), x.stride[2], x.stride[3]}, n, cols, src, ld);
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

// to[0:n] = from[0:n], a vector at a time: for the short rows of a state, where a call of memmove
// per row (what std::copy becomes) costs more than the copy.
template <class Acc>
inline void copy_short(const Acc* from, Acc* to, int64_t n) {
  constexpr int W = Simd<Acc>::W;
  int64_t i = 0;
  for (; i + W <= n; i += W) storeu(to + i, loadu(from + i));
  for (; i < n; ++i) to[i] = from[i];
}

// State (B, H, K, Dv) / (B, H, K) in and out of a Kp x Dvp / Kp buffer (zero padded); an absent
// tensor reads as zeros (S and z are independent: autograd may hand a gradient for one only).
// A row of K or Dv values at a time (a decoding step reads and writes the whole state per call).
template <class Acc>
void read_state(const View& S, const View& z, int64_t b, int64_t h, int64_t K, int64_t Dv, int64_t Kp, int64_t Dvp,
                Acc* S_buf, Acc* z_buf) {
  if (S.present()) {
    const int64_t se = S.stride[3];
    for (int64_t k = 0; k < K; ++k) {
      const Acc* row = at<const Acc>(S, b, h, k);
      Acc* to = S_buf + k * Dvp;
      if (se == 1) {
        copy_short(row, to, Dv);
      } else {
        for (int64_t e = 0; e < Dv; ++e) to[e] = row[e * se];
      }
      std::fill(to + Dv, to + Dvp, Acc(0));
    }
    std::fill(S_buf + K * Dvp, S_buf + Kp * Dvp, Acc(0));
  } else {
    std::fill(S_buf, S_buf + Kp * Dvp, Acc(0));
  }
  std::fill(z_buf, z_buf + Kp, Acc(0));
  if (z.present()) {
    const Acc* zs = at<const Acc>(z, b, h);
    for (int64_t k = 0; k < K; ++k) z_buf[k] = zs[k * z.stride[2]];
  }
}
template <class Acc>
void write_state(const View& S, const View& z, int64_t b, int64_t h, int64_t K, int64_t Dv, int64_t Dvp,
                 const Acc* S_buf, const Acc* z_buf) {
  if (!S.present()) return;
  const int64_t se = S.stride[3];
  for (int64_t k = 0; k < K; ++k) {
    Acc* row = at<Acc>(S, b, h, k);
    const Acc* from = S_buf + k * Dvp;
    if (se == 1) {
      copy_short(from, row, Dv);
    } else {
      for (int64_t e = 0; e < Dv; ++e) row[e * se] = from[e];
    }
  }
  Acc* zs = at<Acc>(z, b, h);
  for (int64_t k = 0; k < K; ++k) zs[k * z.stride[2]] = z_buf[k];
}

// Rows of up to four inputs to fetch into cache ahead of use: the next chunk of the same (b, h),
// requested while this chunk computes. The rows of a head are strided by H * D elements, a walk
// the hardware prefetchers do not run ahead of, so a chunk's gather would otherwise wait on
// memory; the requests are spread over the compute (a few rows at a time) so that they never
// queue up behind each other. A block is requested line by line along the axis its gather walks
// (Block::by_rows): each of its lines once, whatever the layout (walking a row of a Fortran-order
// array in 64-byte steps would request everything between its first and last element).
struct Ahead {
  static constexpr int kStreams = 4;
  // Per stream, in bytes: `outer` walks of `inner` requests each, walk o starting at
  // first + o * outer_step, its requests `step` apart.
  const char* first[kStreams] = {};
  int64_t outer[kStreams] = {}, outer_step[kStreams] = {}, inner[kStreams] = {}, step[kStreams] = {};
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
      const Block<const T> blk = input_rows<T>(*x, b, h, row0);
      const bool by_rows = blk.by_rows();
      constexpr int64_t size = sizeof(T);
      const int64_t outer_n = by_rows ? ah.rows : cols, inner_n = by_rows ? cols : ah.rows;
      const int64_t outer_s = (by_rows ? blk.rs : blk.cs) * size, inner_s = (by_rows ? blk.cs : blk.rs) * size;
      // A walk's lowest byte and its extent; adjacent elements (at most a line apart) are
      // requested a line at a time from the walk's first line, far apart ones one by one.
      const char* lo = reinterpret_cast<const char*>(blk.base) + std::min<int64_t>(0, (inner_n - 1) * inner_s);
      const int64_t span = (inner_n - 1) * std::abs(inner_s) + size;
      if (std::abs(inner_s) <= 64) {
        const int64_t skip = static_cast<int64_t>(reinterpret_cast<uintptr_t>(lo) % 64);
        ah.first[i] = lo - skip;
        ah.inner[i] = (span + skip + 63) / 64;
        ah.step[i] = 64;
      } else {
        ah.first[i] = lo;
        ah.inner[i] = inner_n;
        ah.step[i] = std::abs(inner_s);
      }
      ah.outer[i] = outer_n;
      ah.outer_step[i] = outer_s;
      ++i;
    }
    return ah;
  }
  // Part `part` of `parts` equal parts of the rows.
  __attribute__((always_inline)) inline void fetch_part(int64_t part, int64_t parts) const {
    fetch(part * rows / parts, (part + 1) * rows / parts);
  }
  // Requests rows [r0, r1) of every stream (for a stream walked down its columns: the same share
  // of its columns). Always inlined: as a call, GCC's IPA pass finds the function free of side
  // effects (a prefetch has none, formally) and deletes the call.
  __attribute__((always_inline)) inline void fetch(int64_t r0, int64_t r1) const {
    r1 = std::min(r1, rows);
    if (r0 >= r1) return;
    for (int i = 0; i < kStreams; ++i) {
      if (first[i] == nullptr) continue;
      const int64_t o0 = r0 * outer[i] / rows, o1 = r1 * outer[i] / rows;
      for (int64_t o = o0; o < o1; ++o) {
        const char* walk = first[i] + o * outer_step[i];
        for (int64_t j = 0; j < inner[i]; ++j) __builtin_prefetch(walk + j * step[i], 0, 2);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Shapes and per-thread buffers

struct Shape {
  int64_t B, N, H, K, D, Dv;
  int64_t Kp, Dp, Dvp;  // padded to whole vectors
  int64_t C = kChunk;
  // Sequences: each batch row is one (seqs = B), or, packed (cu_seqlens), batch row 0 holds seqs
  // of them, sequence q its rows [starts[q], starts[q + 1]). A sequence longer than a chunk has
  // chunks of its own, from its first row (the last one may be short); packed, shorter ones may
  // share a chunk (piece_end), but never a chunk with part of another sequence.
  int64_t seqs;
  std::vector<int64_t> starts;  // packed only: seqs + 1 row offsets
  int64_t longest;              // rows of the longest sequence
  int64_t nchunks;              // chunks of the longest sequence
  template <class Acc>
  static Shape make(const Dims& d, const View& cu_seqlens) {
    constexpr int W = Simd<Acc>::W;
    Shape s;
    s.B = d.B; s.N = d.N; s.H = d.H; s.K = d.K; s.D = d.D; s.Dv = d.Dv;
    s.Kp = round_up(d.K, W);
    s.Dp = round_up(d.D, W);
    s.Dvp = round_up(d.Dv, W);
    s.seqs = d.B;
    // A sequence shorter than a chunk is one chunk of its own length (whole vectors): the
    // per-thread buffers (Workspace, C x C products) shrink with it, so a one-token step does not
    // allocate and clear buffers for 64 rows.
    int64_t longest = d.N;
    if (cu_seqlens.present()) {
      s.seqs = cu_seqlens.shape[0] - 1;
      s.starts.resize(s.seqs + 1);
      longest = 0;
      for (int64_t q = 0; q <= s.seqs; ++q) {
        s.starts[q] = *at<const int64_t>(cu_seqlens, q, 0);
        if (q > 0) longest = std::max(longest, s.starts[q] - s.starts[q - 1]);
      }
    }
    s.longest = longest;
    // (Packed: a chunk may hold several short sequences, so the whole row sets it.)
    s.C = std::max<int64_t>(W, std::min(kChunk, round_up(cu_seqlens.present() ? d.N : longest, W)));
    s.nchunks = (longest + s.C - 1) / s.C;
    return s;
  }
  // Sequence q: its batch row, first row and length.
  struct SeqAt {
    int64_t b, row0, len;
  };
  SeqAt seq_at(int64_t q) const { return starts.empty() ? SeqAt{q, 0, N} : SeqAt{0, starts[q], starts[q + 1] - starts[q]}; }
  int64_t chunks(int64_t q) const { return (seq_at(q).len + C - 1) / C; }
  int64_t len(int64_t q) const { return seq_at(q).len; }
  // Packed: the end of the piece that starts at sequence q. A sequence longer than a chunk is a
  // piece of its own (q + 1); shorter ones are packed, in order, as many as fit, into one chunk
  // of up to C rows (a packed chunk: forward.cpp, backward.cpp). Pieces are cut greedily from
  // the first sequence, so they do not depend on the thread count.
  int64_t piece_end(int64_t q) const {
    if (len(q) > C) return q + 1;
    int64_t rows = len(q), e = q + 1;
    while (e < seqs && rows + len(e) <= C) rows += len(e++);
    return e;
  }
  // Where chunk c of (sequence, head) pair `pair` (= q * H + h) lies: its batch row b, h, its
  // first row, its rows.
  struct ChunkAt {
    int64_t b, h, row0, n;
  };
  ChunkAt chunk_at(int64_t pair, int64_t c) const {
    const SeqAt sq = seq_at(pair / H);
    return {sq.b, pair % H, sq.row0 + c * C, std::min(C, sq.len - c * C)};
  }
};

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
  // Uncleared: every use writes a buffer's rows before it reads them (a build that filled it with
  // NaN passed the suites), and clearing ~0.3 MB a thread costs a short call more than its work.
  UnclearedBuffer<Acc> storage;
  // Per-lane running states of the task being run, each with its compensation (see
  // accumulate_state): group x 2 (Kp x Dvp + Kp); transposed states, group x Dvp x Kp. Set in
  // full by each task before use (set_state, read_state, transpose).
  UnclearedBuffer<Acc> lstate, ldstate, lST, ldST;

  Workspace(const Shape& s, int64_t group)
      : lstate(group * 2 * (s.Kp * s.Dvp + s.Kp)), ldstate(group * 2 * (s.Kp * s.Dvp + s.Kp)),
        lST(group * s.Kp * s.Dvp), ldST(group * s.Kp * s.Dvp) {
    const int64_t SS = s.Kp * s.Dvp;
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
    storage = UnclearedBuffer<Acc>(total);
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
// Chunk arithmetic shared by forward and backward

// Zero the strict upper triangle of the first n rows of a C x C block.
template <class Acc>
void keep_lower(Acc* a, int64_t n, int64_t C) {
  for (int64_t i = 0; i < n; ++i) std::fill(a + i * C + i + 1, a + i * C + C, Acc(0));
}

template <class Acc>
inline Acc row_sum(const Acc* a, int64_t n) {
  Acc r = 0;
#pragma omp simd reduction(+ : r)
  for (int64_t j = 0; j < n; ++j) r += a[j];
  return r;
}

// A block: L consecutive rows of one sequence inside a chunk (a whole chunk of a sequence, or one
// of the short sequences of a packed chunk). Its products pair its rows with each other only:
// causal, each row with itself and the rows before it (the lower triangle, entries above the
// diagonal zero); bidirectional, with every row of the block. Pointers are at the block's first
// row; L x L products have leading dimension C.
inline Tri out_tri(bool causal) { return causal ? Tri::kOutLower : Tri::kNone; }
inline Tri depth_lower(bool causal) { return causal ? Tri::kDepthLower : Tri::kNone; }
inline Tri depth_upper(bool causal) { return causal ? Tri::kDepthUpper : Tri::kNone; }
inline int64_t block_cols(bool causal, int64_t i, int64_t L) { return causal ? i + 1 : L; }  // of row i

// A = Gq Gk^T over a block (gq, gk: L x Kp). gkT: scratch, Kp x C.
template <class Acc>
void block_affinity(const Shape& s, const Acc* gq, const Acc* gk, int64_t L, bool causal, Acc* gkT, Acc* A) {
  constexpr int W = Simd<Acc>::W;
  transpose(L, s.Kp, gk, s.Kp, gkT, s.C);  // (columns past L: whatever they hold; never read)
  gemm(L, round_up(L, W) / W, s.Kp, gq, s.Kp, 1, gkT, s.C, A, s.C, false, out_tri(causal));
  if (causal) keep_lower(A, L, s.C);
}

// The block's reads of its own rows: num += A V, den += rowsum(A) (A from block_affinity).
template <class Acc>
void block_read(const Shape& s, const Acc* A, const Acc* v, int64_t L, bool causal, Acc* num, Acc* den) {
  constexpr int W = Simd<Acc>::W;
  gemm(L, s.Dvp / W, L, A, s.C, 1, v, s.Dvp, num, s.Dvp, true, depth_lower(causal));
  for (int64_t i = 0; i < L; ++i) den[i] += row_sum(A + i * s.C, block_cols(causal, i, L));
}

template <class Acc>
inline Acc dot(const Acc* a, const Acc* b, int64_t n) {
  using V = VecT<Acc>;
  constexpr int W = Simd<Acc>::W;
  V acc{};
  for (int64_t i = 0; i < n; i += W) acc += loadu(a + i) * loadu(b + i);
  return hsum<Acc>(acc);
}

}  // namespace GMATTN_ISA
}  // namespace cpu
}  // namespace gmattn
