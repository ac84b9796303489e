// Run-time choice among the ISA builds of cpu/forward.cpp and cpu/backward.cpp, the core's own
// argument checks, and the buffer cache.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "gmattn/gmattn.h"
#include "numeric.h"
#include "working_memory.h"

namespace gmattn {
namespace cpu {

#define GMATTN_DECLARE_ISA(name)          \
  namespace name {                        \
  void forward(const ForwardArgs& a);     \
  void backward(const BackwardArgs& a);   \
  }
GMATTN_DECLARE_ISA(generic)
#ifdef GMATTN_X86_ISAS
GMATTN_DECLARE_ISA(avx2)
GMATTN_DECLARE_ISA(avx512)
#endif
#undef GMATTN_DECLARE_ISA

namespace {

enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa best_supported() {
#ifdef GMATTN_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

// GMATTN_CPU_ISA=generic|avx2|avx512 forces a (supported) build, for tests and comparisons.
Isa selected() {
  const Isa best = best_supported();
  const char* env = std::getenv("GMATTN_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  Isa isa;
  if (want == "generic") {
    isa = Isa::kGeneric;
  } else if (want == "avx2") {
    isa = Isa::kAvx2;
  } else if (want == "avx512") {
    isa = Isa::kAvx512;
  } else {
    throw std::invalid_argument("GMATTN_CPU_ISA must be generic, avx2 or avx512, got '" + want + "'");
  }
  if (static_cast<int>(isa) > static_cast<int>(best)) {
    throw std::invalid_argument("GMATTN_CPU_ISA=" + want + " is not supported by this processor or build");
  }
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

// Runs one ISA build's kernel; memory exhaustion comes out as an OutOfMemory that names the pass,
// the call's shape and the request that failed.
template <class Args, class Kernel>
void run_kernel(const char* pass, const Args& a, Kernel&& kernel) {
  try {
    const cpu_detail::FlushSubnormals flush;  // (the caller's setting back on return or throw)
    kernel();
  } catch (const std::bad_alloc& e) {
    const Dims& d = a.dims;
    throw cpu_detail::OutOfMemory(std::string("gmattn: the CPU ") + pass + " ran out of memory (B=" +
                                  std::to_string(d.B) + ", N=" + std::to_string(d.N) + ", H=" + std::to_string(d.H) +
                                  ", K=" + std::to_string(d.K) + ", D=" + std::to_string(d.D) + ", Dv=" +
                                  std::to_string(d.Dv) + ", " + dtype_name(a.dtype) + "): " + e.what());
  }
}

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

void check_dims(const Dims& d) {
  require(d.B >= 1 && d.N >= 1 && d.H >= 1 && d.K >= 1 && d.D >= 1 && d.Dv >= 1,
          "all of B, N, H, K, D, Dv must be >= 1");
}

// Packed sequences: B = 1, no mask, offsets from 0 to N that never decrease (the bindings check
// the same with messages naming the argument).
void check_sequences(const Dims& d, const View& cu_seqlens, const View& mask) {
  if (!cu_seqlens.present()) return;
  require(d.B == 1 && !mask.present(), "packed sequences (cu_seqlens) need B = 1 and no mask");
  const int64_t S = cu_seqlens.shape[0] - 1;
  require(S >= 1, "cu_seqlens needs at least two offsets");
  const auto at = [&](int64_t i) { return static_cast<const int64_t*>(cu_seqlens.data)[i * cu_seqlens.stride[0]]; };
  require(at(0) == 0 && at(S) == d.N, "cu_seqlens must run from 0 to N");
  for (int64_t i = 0; i < S; ++i) require(at(i) <= at(i + 1), "cu_seqlens must not decrease");
}

bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("GMATTN_HUGEPAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

constexpr size_t kHugePage = size_t(1) << 21;

// Advises transparent huge pages for a block of the buffer cache below; never for the caller's
// memory (its pages are the caller's business: advice would split the caller's mappings and change
// how they are backed).
//
// Big blocks are usually fresh memory: glibc maps them anew (or trims them back to the system
// after use), and the first write to each 4 KiB page then costs a page fault, which includes
// zeroing the page (on our test VM ~2 us a page: ~16 ms for a 32 MiB buffer, more than writing it).
// Two remedies: acquire_scratch/release_scratch (gmattn.h) keep released blocks for reuse, so a
// repeated call of the same shape faults nothing (the torch front end's large CPU outputs come
// from there); and a block of at least 2 MiB asks for transparent huge pages, one fault per 2 MiB
// where THP is available (a hint only: nothing changes where THP is off; GMATTN_HUGEPAGES=0 turns
// it off).
void advise_huge_pages(void* block, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge_pages_enabled()) madvise(block, bytes, MADV_HUGEPAGE);  // failure is harmless
#else
  (void)block;
  (void)bytes;
#endif
}

// Free scratch blocks kept for reuse, most recently released last.
struct ScratchCache {
  struct Block {
    void* p;
    size_t bytes;
  };
  std::mutex mu;
  std::vector<Block> free_blocks;
  std::unordered_map<void*, size_t> sizes;  // every block handed out, by address
  size_t cached = 0;                        // bytes in free_blocks
};

ScratchCache& scratch_cache() {
  static ScratchCache* cache = new ScratchCache;  // never destroyed: no order-of-exit issues
  return *cache;
}

// The machine's physical memory in bytes (0 where unknown).
size_t physical_memory() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) return static_cast<size_t>(pages) * static_cast<size_t>(page);
#endif
  return 0;
}

// The cache's budget: GMATTN_BUFFER_CACHE_MIB (0 turns the cache off); by default an eighth of the
// physical memory, at least 512 MiB. A budget caps what released blocks the cache may keep, it
// reserves nothing: a steady loop keeps about what one step allocates (which it needs anyway).
size_t scratch_cache_bytes() {
  static const size_t bytes = [] {
    const char* env = std::getenv("GMATTN_BUFFER_CACHE_MIB");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const unsigned long long v = std::strtoull(env, &end, 10);
      if (end == env || *end != '\0' || v > (size_t(1) << 40)) {
        throw std::invalid_argument(std::string("GMATTN_BUFFER_CACHE_MIB must be a number of MiB, got '") + env + "'");
      }
      return static_cast<size_t>(v) << 20;
    }
    return std::max(size_t(512) << 20, physical_memory() / 8);
  }();
  return bytes;
}

}  // namespace

void* acquire_scratch(size_t bytes) {
  // Blocks of at least a huge page start on one and are whole pages long (aligned_alloc wants a
  // multiple of the alignment); smaller ones are ordinary, cache-line aligned.
  const size_t align = bytes >= kHugePage ? kHugePage : 64;
  if (bytes > std::numeric_limits<size_t>::max() - (align - 1)) {  // the rounding below would wrap
    throw cpu_detail::OutOfMemory("gmattn: a buffer of " + std::to_string(bytes) +
                                  " bytes is larger than the address space");
  }
  const size_t size = (bytes + align - 1) / align * align;
  ScratchCache& c = scratch_cache();
  if (scratch_cache_bytes() > 0) {  // (reads the budget here, where a bad setting can throw)
    // The smallest cached block that fits and is at most twice the request (a much larger block
    // would be held by a small call).
    std::lock_guard<std::mutex> lock(c.mu);
    size_t best = c.free_blocks.size();
    for (size_t i = 0; i < c.free_blocks.size(); ++i) {
      const size_t have = c.free_blocks[i].bytes;
      if (have >= bytes && have / 2 <= bytes && (best == c.free_blocks.size() || have < c.free_blocks[best].bytes)) {
        best = i;
      }
    }
    if (best < c.free_blocks.size()) {
      void* p = c.free_blocks[best].p;
      c.cached -= c.free_blocks[best].bytes;
      c.free_blocks.erase(c.free_blocks.begin() + static_cast<std::ptrdiff_t>(best));
      return p;
    }
  }
  void* p = std::aligned_alloc(align, size);
  if (p == nullptr) {
    throw cpu_detail::OutOfMemory("gmattn: a buffer of " + cpu_detail::bytes_text(static_cast<double>(size)) +
                                  " could not be allocated");
  }
  if (align == kHugePage) advise_huge_pages(p, size);
  try {
    std::lock_guard<std::mutex> lock(c.mu);
    c.sizes[p] = size;
  } catch (...) {
    std::free(p);
    throw;
  }
  return p;
}

// Never throws (it runs in destructors): a pointer the cache did not hand out is left alone, and
// a block the cache cannot keep (no memory for its list) goes back to the system.
void release_scratch(void* p) noexcept {
  if (p == nullptr) return;
  size_t budget = 0;
  try {
    budget = scratch_cache_bytes();  // (a bad setting already threw in acquire_scratch)
  } catch (...) {
  }
  ScratchCache& c = scratch_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const auto it = c.sizes.find(p);
  if (it == c.sizes.end()) return;
  const size_t size = it->second;
  // A block over a quarter of the budget is not kept: it would push out several smaller ones,
  // and a mix of sizes would then keep none of them.
  bool keep = size <= budget / 4;
  if (keep) {
    try {
      c.free_blocks.push_back({p, size});
    } catch (const std::bad_alloc&) {
      keep = false;
    }
  }
  if (!keep) {
    c.sizes.erase(it);
    std::free(p);
    return;
  }
  c.cached += size;
  // Over the budget: the least recently released blocks go back to the system.
  while (c.cached > budget) {
    const ScratchCache::Block old = c.free_blocks.front();
    c.free_blocks.erase(c.free_blocks.begin());
    c.cached -= old.bytes;
    c.sizes.erase(old.p);
    std::free(old.p);
  }
}

size_t empty_scratch_cache() {
  ScratchCache& c = scratch_cache();
  std::vector<ScratchCache::Block> blocks;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    blocks.swap(c.free_blocks);
    c.cached = 0;
    for (const ScratchCache::Block& b : blocks) c.sizes.erase(b.p);
  }
  size_t released = 0;
  for (const ScratchCache::Block& b : blocks) {
    std::free(b.p);
    released += b.bytes;
  }
  return released;
}

void scratch_cache_info(size_t& held, size_t& budget) {
  budget = scratch_cache_bytes();
  ScratchCache& c = scratch_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  held = c.cached;
}

const char* isa() { return isa_name(selected()); }

void forward(const ForwardArgs& a) {
  check_dims(a.dims);
  require(a.q.present() && a.k.present() && a.v.present() && a.out.present(), "q, k, v and out are required");
  require(a.mu.present() && a.omega.present() && a.alpha.present(), "mu, omega and alpha are required");
  require(a.S0.present() == a.z0.present(), "initial state needs both S and z");
  require(a.S_final.present() == a.z_final.present(), "final state needs both S and z");
  require(a.gq.present() == a.gk.present() && a.gq.present() == a.den.present(), "gq, gk, den go together");
  check_sequences(a.dims, a.cu_seqlens, a.mask);
  const Isa isa = selected();
  run_kernel("forward", a, [&] {
    switch (isa) {
#ifdef GMATTN_X86_ISAS
      case Isa::kAvx512: avx512::forward(a); return;
      case Isa::kAvx2: avx2::forward(a); return;
#endif
      default: generic::forward(a); return;
    }
  });
}

void backward(const BackwardArgs& a) {
  check_dims(a.dims);
  require(a.q.present() && a.k.present() && a.v.present(), "q, k, v are required");
  require(a.mu.present() && a.omega.present() && a.alpha.present(), "mu, omega and alpha are required");
  require(a.out.present() && a.gq.present() && a.gk.present() && a.den.present() && a.dout.present(),
          "out, gq, gk, den and dout are required");
  require(a.dq.present() && a.dk.present() && a.dv.present(), "dq, dk and dv are required");
  require(a.dmu.present() && a.domega.present() && a.dalpha.present(), "dmu, domega and dalpha are required");
  require(a.S0.present() == a.z0.present(), "initial state needs both S and z");
  require(a.dS0.present() == a.dz0.present(), "dS0 and dz0 go together");
  require(a.S_end.present() == a.z_end.present(), "S_end and z_end go together");
  check_sequences(a.dims, a.cu_seqlens, a.mask);
  const Isa isa = selected();
  run_kernel("backward", a, [&] {
    switch (isa) {
#ifdef GMATTN_X86_ISAS
      case Isa::kAvx512: avx512::backward(a); return;
      case Isa::kAvx2: avx2::backward(a); return;
#endif
      default: generic::backward(a); return;
    }
  });
}

}  // namespace cpu
}  // namespace gmattn
