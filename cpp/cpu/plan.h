// The work plan of the CPU kernels: tasks over (batch, heads, segment of chunks), the loops that
// run them (run_passes), the causal relays between threads (Relay), and the running states
// (S, z) with their compensated sums.
//
// Parallelism. A task is (sequence, group of heads, segment of chunks); a sequence is a batch row,
// or one of the packed sequences of cu_seqlens (many short ones are many tasks, so they spread over
// the threads like batch rows). The heads of a group run in
// lockstep, chunk by chunk, so a task reads and writes each token's rows of all its heads together
// (contiguous in the (B, N, H, D) layout: fewer pages and streams than one head at a time). With
// enough (batch, head) pairs for the threads, a segment is the whole sequence. With fewer pairs
// than threads (or an uneven split) the causal scans run their chunks as relays between the
// threads (Relay: the state is handed on from block to block, summed in one thread's order), and
// the bidirectional passes cut every pair into segments: pass 1 computes each segment's state sums
// in parallel, the segments' sums are added up, pass 2 runs the segments in parallel. Parameter
// gradients go to one slot per (batch, head, segment) and are summed in a fixed order afterwards:
// bit-identical results run to run at a fixed thread count (causal: at any thread count).
// Packed sequences no longer than a chunk share chunks (Shape::piece_end, Plan::packs): a chunk
// then holds several whole sequences, each a block of rows that reads only its own (rows.h).
#pragma once

#include <omp.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <thread>

#include "rows.h"

namespace gmattn {
namespace cpu {
namespace GMATTN_ISA {  // (rows.h: the ISA name, and cpu_detail in scope)

constexpr int64_t kRelayChunks = 4;  // chunks per task of a relay (see Relay)

// The work plan. A task is (unit b, heads [h0, h0 + group), segment of chunks); its heads run
// in lockstep, chunk by chunk, so one task reads and writes each token's rows of all its heads
// together (contiguous in the (B, N, H, D) layout: fewer pages and streams than one head at a
// time). A lane (b, h, segment) owns its state sums and parameter-gradient slot. A unit is one
// sequence (a batch row, or a packed sequence), or, with many packed sequences, a run of
// consecutive ones of about equal tokens, which its task runs one after another (the lane's
// buffers reused): memory and set-up then grow with the units (a few per thread), not with the
// sequences. B counts the units.
struct Plan {
  int nt = 1;
  int64_t B = 1, H = 1, group = 1, segs = 1;
  int64_t tasks = 1, lanes = 1;
  // Runs of sequences: the first sequence of each unit, then the number of sequences; empty: unit
  // u is sequence u. (Only with one segment: a segment cuts one sequence.)
  std::vector<int64_t> unit_first;
  // Packed chunks (Shape::piece_end): units are runs of whole pieces, and a task runs a piece of
  // short sequences as one chunk. (Only with one segment.)
  bool packs = false;
  int64_t seq_begin(int64_t u) const { return unit_first.empty() ? u : unit_first[u]; }
  int64_t seq_end(int64_t u) const { return unit_first.empty() ? u + 1 : unit_first[u + 1]; }
  // Chunks [first, last) of segment sg of a sequence of nc chunks (a segment may be empty).
  int64_t first(int64_t sg, int64_t nc) const { return sg * nc / segs; }
  int64_t last(int64_t sg, int64_t nc) const { return (sg + 1) * nc / segs; }
  void task(int64_t t, int64_t& b, int64_t& h0, int64_t& sg) const {
    sg = t % segs;
    const int64_t r = t / segs, gpb = H / group;
    h0 = (r % gpb) * group;
    b = r / gpb;
  }
  int64_t lane(int64_t b, int64_t h, int64_t sg) const { return (b * H + h) * segs + sg; }
};

// The threads a call of this shape gets: one when its work is tiny (a decoding step, a few
// tokens), where starting the other threads costs more than they could save (on an oversubscribed
// machine a parallel region waits for a descheduled thread: milliseconds), else `requested`
// (0: OpenMP's default). The work counts rows x components x (D + Dv): about 80 ps each on one
// core, so the limit is about 20 us of work.
constexpr int64_t kTinyWork = int64_t(1) << 18;
inline int threads_for(const Shape& s, int requested) {
  const double work = static_cast<double>(s.B) * s.H * s.N * s.K * (s.D + s.Dv);  // (no overflow)
  return work < static_cast<double>(kTinyWork) ? 1 : requested;
}

constexpr int64_t kUnitsPerThread = 8;  // packed: runs of sequences per thread (see Plan)

// The plan over units made of the candidates `firsts` (ascending first sequences of the runs a
// unit may start at; empty: every sequence is a unit): each candidate a unit when there are at
// most kUnitsPerThread * nt of them, else kUnitsPerThread * nt runs of consecutive candidates,
// cut where the tokens before a candidate reach the next share of N (a run holds at least one).
inline Plan plan_of(const Shape& s, int64_t nt, const std::vector<int64_t>& firsts) {
  Plan p;
  const int64_t H = s.H, nchunks = s.nchunks;
  int64_t B = s.seqs;
  if (!firsts.empty()) {
    const int64_t count = static_cast<int64_t>(firsts.size()), units = kUnitsPerThread * nt;
    if (count <= units) {
      p.unit_first = firsts;
    } else {
      p.unit_first.push_back(0);
      for (int64_t i = 1; i < count; ++i) {
        const int64_t cuts = static_cast<int64_t>(p.unit_first.size());
        if (cuts < units && s.starts[firsts[i]] * units >= cuts * s.N) p.unit_first.push_back(firsts[i]);
      }
    }
    p.unit_first.push_back(s.seqs);
    B = static_cast<int64_t>(p.unit_first.size()) - 1;
  }
  p.B = B;
  p.H = H;
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

inline Plan make_plan(const Shape& s, int requested) {
  // 64-bit: a caller may ask for up to INT_MAX threads, and the products below must not overflow.
  int64_t nt = requested > 0 ? requested : omp_get_max_threads();
  if (nt < 1) nt = 1;
  std::vector<int64_t> firsts;
  if (!s.starts.empty()) {
    // Packed: units of whole pieces, unless the pieces are too few for the threads (segments
    // then cut sequences).
    for (int64_t q = 0; q < s.seqs; q = s.piece_end(q)) firsts.push_back(q);
    Plan p = plan_of(s, nt, firsts);
    if (p.segs == 1) {
      p.packs = true;
      return p;
    }
    firsts.clear();
    if (s.seqs > kUnitsPerThread * nt) {
      for (int64_t q = 0; q < s.seqs; ++q) firsts.push_back(q);
    }
  }
  return plan_of(s, nt, firsts);
}

// Calls fn(q, b, h, lane, row0, n) for every chunk of sequence q in a task's segment (in batch row
// b, rows [row0, row0 + n)), chunk by chunk, the task's heads in lockstep within each chunk.
template <class Fn>
void for_each_chunk(const Plan& pl, const Shape& s, int64_t task, int64_t q, Fn&& fn) {
  int64_t u, h0, sg;
  pl.task(task, u, h0, sg);
  const int64_t nc = s.chunks(q);
  for (int64_t c = pl.first(sg, nc); c < pl.last(sg, nc); ++c) {
    const Shape::ChunkAt at = s.chunk_at(q * s.H, c);
    for (int64_t h = h0; h < h0 + pl.group; ++h) fn(q, at.b, h, pl.lane(u, h, sg), at.row0, at.n);
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

// The end of a parallel region with no thread asleep where it matters: under
// OMP_WAIT_POLICY=passive a thread that reaches the region's closing barrier before the others
// sleeps there, and waking the calling thread costs about a tenth of a millisecond on a virtual
// machine (a short call's whole task). So every thread waits (spin, then yield: at most the
// rest of the last task) until all `tasks` are done; the other threads then enter the barrier
// and the calling thread, last, leaves it without sleeping. Not with more threads than
// processors: waiting threads would take turns from those still working (the barrier then, as
// before: N = 256 at 8 threads on 2 cores took 1.44 ms with the wait, 0.88-0.94 without).
class FinishLine {
 public:
  explicit FinishLine(int64_t tasks) : tasks_(tasks) {}
  void task_done() { done_.fetch_add(1, std::memory_order_release); }
  void reach(int threads) {
    static const int procs = omp_get_num_procs();
    if (threads == 1 || threads > procs) return;
    wait_at_least(done_, tasks_);
    if (omp_get_thread_num() != 0) {
      left_.fetch_add(1, std::memory_order_release);
      return;
    }
    wait_at_least(left_, threads - 1);
#if defined(__x86_64__) || defined(__i386__)
    for (int i = 0; i < 64; ++i) __builtin_ia32_pause();  // (the last one's step into the barrier)
#endif
  }

 private:
  const int64_t tasks_;
  std::atomic<int64_t> done_{0}, left_{0};
};

// Runs a kernel's passes over the plan: pass1(task, q) (segment sums of sequence q; skipped when
// !two_pass), the starting state of every (unit, sequence, head) (`starts(u, q, h)`), then
// pass2(task, q) from those states. With one segment per sequence a task owns whole sequences:
// all three run for each sequence of its unit in turn inside one parallel region, no barrier.
// (With segments a unit is one sequence: q = u.) With packed chunks (Plan::packs), a piece of
// short sequences [q0, q1) runs as one chunk instead: packed(task, q0, q1).
template <class Pass1, class Starts, class Pass2, class Packed>
void run_passes(const Plan& pl, const Shape& s, bool two_pass, Pass1& pass1, Starts& starts, Pass2& pass2,
                Packed& packed) {
  // (Each region's threads flush subnormals, their own setting back at its end: numeric.h.)
  if (pl.segs == 1) {
    FinishLine finish(pl.tasks);
#pragma omp parallel num_threads(pl.nt) if (pl.nt > 1)
    {
      const FlushSubnormals flush;
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t task = 0; task < pl.tasks; ++task) {
        int64_t u, h0, sg;
        pl.task(task, u, h0, sg);
        for (int64_t q = pl.seq_begin(u), next; q < pl.seq_end(u); q = next) {
          next = pl.packs ? s.piece_end(q) : q + 1;
          if (pl.packs && s.len(q) <= s.C) {
            packed(task, q, next);
            continue;
          }
          if (two_pass) pass1(task, q);
          for (int64_t h = h0; h < h0 + pl.group; ++h) starts(u, q, h);
          pass2(task, q);
        }
        stream_fence();  // outputs written with streaming stores (stream_copy) are visible
        finish.task_done();
      }
      finish.reach(omp_get_num_threads());
    }
  } else {
    // One parallel region per pass (the states between them are summed on one thread).
    auto every_task = [&pl](auto& pass) {
      FinishLine finish(pl.tasks);
#pragma omp parallel num_threads(pl.nt) if (pl.nt > 1)
      {
        const FlushSubnormals flush;
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t task = 0; task < pl.tasks; ++task) {
          pass(task, task / (pl.segs * (pl.H / pl.group)));
          stream_fence();
          finish.task_done();
        }
        finish.reach(omp_get_num_threads());
      }
    };
    every_task(pass1);
    for (int64_t b = 0; b < pl.B; ++b) {
      for (int64_t h = 0; h < pl.H; ++h) starts(b, b, h);
    }
    every_task(pass2);
  }
}
// Without packed chunks (a plan with segments, or a kernel that runs every sequence alone).
template <class Pass1, class Starts, class Pass2>
void run_passes(const Plan& pl, const Shape& s, bool two_pass, Pass1& pass1, Starts& starts, Pass2& pass2) {
  auto none = [](int64_t, int64_t, int64_t) {};
  if (!pl.packs) {
    run_passes(pl, s, two_pass, pass1, starts, pass2, none);
    return;
  }
  Plan unpacked = pl;  // (a copy only where packs is set: every sequence then runs alone)
  unpacked.packs = false;
  run_passes(unpacked, s, two_pass, pass1, starts, pass2, none);
}

// ---------------------------------------------------------------------------------------------
// Running states

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

// A causal scan over fewer (sequence, head) pairs than threads, run as a relay: the threads take the
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
// parameter sums; the block's first chunk, j = 0, writes them fresh: the block is not cleared
// before) that combine(pair, partial) takes in scan order, as one thread's scan
// would: a finished block parks them in a ring of its pair, and whoever finishes the block next in
// line combines every parked block that is then in order (under the pair's lock), so no thread
// waits for another to finish its work.
template <class Acc>
class Relay {
 public:
  Relay(const Shape& s, int nt, bool reverse, int64_t partial_size, int64_t rows_size)
      : s_(s), nt_(nt), reverse_(reverse), pairs_(s.seqs * s.H), nblocks_(blocks(s.nchunks)),
        size_(2 * (s.Kp * s.Dvp + s.Kp)), partial_size_(partial_size),
        ring_(std::min<int64_t>(nblocks_, 2 * static_cast<int64_t>(nt) + 2)), rows_stride_(round_up(rows_size, kLine<Acc>)),
        slots_(pairs_ * 2 * size_, Acc(0)), sync_(new PairSync[pairs_]),
        kept_(nt, Buffer<Acc>((2 * kRelayChunks + 2) * size_ / 2)),
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
  const Acc* end(int64_t pair) { return slot(pair, blocks_of(pair)); }
  // The rows_size values thread `thread` keeps for the chunk at place j of its block (64-byte aligned).
  Acc* rows(int thread, int64_t j) {
    return align64(rows_.data()) + (thread * kRelayChunks + j) * rows_stride_;
  }
  // sums(thread, pair, chunk, j, delta): the chunk's SS + Kp sums into delta (chunk_state_sums),
  // j its place in the block (in scan order); work(thread, pair, chunk, j, state, partial): the
  // chunk's work from the state before it, adding to its block's partial_size values in partial
  // (nullptr: none; written fresh at j = 0); combine(pair, partial), in scan order (nullptr: none).
  template <class Sums, class Work, class Combine>
  void run(Sums& sums, Work& work, Combine* combine) {
    std::atomic<int64_t> next{0};
    const int64_t tasks = pairs_ * nblocks_, SZ = size_ / 2;
#pragma omp parallel num_threads(nt_)
    {
      const FlushSubnormals flush;  // (the thread's own setting back at the region's end: numeric.h)
      for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tasks;
           t = next.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t pair = t % pairs_, blk = t / pairs_, thread = omp_get_thread_num();
        // (Packed sequences of different lengths: a pair's blocks end at its own sequence's end.)
        const int64_t nc = s_.chunks(pair / s_.H);
        if (blk >= blocks(nc)) continue;
        const int64_t p0 = blk * kRelayChunks, p1 = std::min(nc, p0 + kRelayChunks);
        Acc* delta = kept_[thread].data();        // per chunk: its sums (SZ)
        Acc* before = delta + kRelayChunks * SZ;  // per chunk: the state before it (SZ)
        Acc* run = before + kRelayChunks * SZ;    // the running state (2 SZ)
        for (int64_t p = p0; p < p1; ++p) sums(thread, pair, chunk(p, nc), p - p0, delta + (p - p0) * SZ);
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
        }
        for (int64_t p = p0; p < p1; ++p) work(thread, pair, chunk(p, nc), p - p0, before + (p - p0) * SZ, parked);
        if (combine) {
          parked_block_[pair * ring_ + blk % ring_].store(blk, std::memory_order_release);
          std::lock_guard<std::mutex> hold(sync.lock);
          for (int64_t b = sync.combined.load(std::memory_order_relaxed);
               b < blocks(nc) && parked_block_[pair * ring_ + b % ring_].load(std::memory_order_acquire) == b; ++b) {
            (*combine)(pair, parked_of(pair, b));
            sync.combined.store(b + 1, std::memory_order_release);
          }
        }
        stream_fence();  // outputs written with streaming stores (stream_copy) are visible
      }
    }
  }

 private:
  struct PairSync {
    alignas(64) std::atomic<int64_t> handed{0};    // blocks that handed on their state
    alignas(64) std::atomic<int64_t> combined{0};  // blocks whose partials are combined
    std::mutex lock;                               // held to combine
  };
  static int64_t blocks(int64_t nchunks) { return (nchunks + kRelayChunks - 1) / kRelayChunks; }
  int64_t blocks_of(int64_t pair) const { return blocks(s_.chunks(pair / s_.H)); }
  int64_t chunk(int64_t p, int64_t nc) const { return reverse_ ? nc - 1 - p : p; }  // place p of nc in scan order
  Acc* slot(int64_t pair, int64_t blk) { return slots_.data() + (pair * 2 + blk % 2) * size_; }
  Acc* parked_of(int64_t pair, int64_t blk) {
    return parked_.data() + (pair * ring_ + blk % ring_) * partial_size_;
  }
  const Shape& s_;
  int nt_;
  bool reverse_;
  int64_t pairs_, nblocks_, size_, partial_size_, ring_, rows_stride_;
  Buffer<Acc> slots_;
  std::unique_ptr<PairSync[]> sync_;
  std::vector<Buffer<Acc>> kept_;  // per thread: a block's sums and states
  Buffer<Acc> rows_;               // per thread: a block's kept rows (see rows())
  Buffer<Acc> parked_;             // per pair: ring_ blocks' partials
  std::unique_ptr<std::atomic<int64_t>[]> parked_block_;  // the block parked in each ring slot
};

// A relay whose scan starts from each pair's state in (S, z) (absent: zero), and the states it
// ends with, written to (S, z).
template <class Acc>
Relay<Acc> relay_from(const Shape& s, int nt, bool reverse, int64_t partial_size, int64_t rows_size, const View& S,
                      const View& z) {
  Relay<Acc> relay(s, nt, reverse, partial_size, rows_size);
  for (int64_t pair = 0; pair < s.seqs * s.H; ++pair) {
    Acc* st = relay.start(pair);
    read_state(S, z, pair / s.H, pair % s.H, s.K, s.Dv, s.Kp, s.Dvp, st, st + s.Kp * s.Dvp);
  }
  return relay;
}
template <class Acc>
void write_relay_ends(const Shape& s, Relay<Acc>& relay, const View& S, const View& z) {
  for (int64_t pair = 0; pair < s.seqs * s.H; ++pair) {
    const Acc* st = relay.end(pair);
    write_state(S, z, pair / s.H, pair % s.H, s.K, s.Dv, s.Dvp, st, st + s.Kp * s.Dvp);
  }
}

// Zeroes the running states (2 (SS + Kp) values per lane) of a task's lanes in `sums`.
template <class Acc>
void zero_lane_states(const Plan& pl, const Shape& s, int64_t task, Buffer<Acc>& sums) {
  int64_t u, h0, sg;
  pl.task(task, u, h0, sg);
  const int64_t SZ2 = 2 * (s.Kp * s.Dvp + s.Kp);
  for (int64_t h = h0; h < h0 + pl.group; ++h) {
    Acc* lane = sums.data() + pl.lane(u, h, sg) * SZ2;
    std::fill(lane, lane + SZ2, Acc(0));
  }
}

// to += the running state of lane `lane` in `sums` (2 (SS + Kp) values per lane): its SS + Kp
// sums, without their compensation terms.
template <class Acc>
void add_lane_state(const Shape& s, const Buffer<Acc>& sums, int64_t lane, Acc* to) {
  const int64_t SZ = s.Kp * s.Dvp + s.Kp;
  const Acc* add = sums.data() + lane * 2 * SZ;
  for (int64_t i = 0; i < SZ; ++i) to[i] += add[i];
}

}  // namespace GMATTN_ISA
}  // namespace cpu
}  // namespace gmattn
