// Run-time choice among the ISA builds of cpu/kernels.cpp, and the core's own argument checks.
#include <cstdint>
#include <cstdlib>
#include <cstring>
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

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

void check_dims(const Dims& d) {
  require(d.B >= 1 && d.N >= 1 && d.H >= 1 && d.K >= 1 && d.D >= 1 && d.Dv >= 1,
          "all of B, N, H, K, D, Dv must be >= 1");
}

inline size_t dtype_bytes(DType t) {
  return t == DType::kFloat64 ? 8 : (t == DType::kFloat32 ? 4 : 2);
}

bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("GMATTN_HUGEPAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

constexpr size_t kHugePage = size_t(1) << 21;

// Large buffers: the outputs the core is handed, and the blocks of the buffer cache below.
//
// Big blocks are usually fresh memory: glibc maps them anew (or trims them back to the system
// after use), and the first write to each 4 KiB page then costs a page fault, which includes
// zeroing the page (on our test VM ~2 us a page: ~16 ms for a 32 MiB buffer, more than writing it).
// Two remedies. Outputs: transparent huge pages are requested on the 2 MiB-aligned interior of
// each, one fault per 2 MiB where THP is available (a hint only: nothing changes where THP is off,
// as on our test VM; memory already touched keeps its pages; GMATTN_HUGEPAGES=0 turns it off).
// Blocks: acquire_scratch/release_scratch (gmattn.h) keep released blocks for reuse, so a
// repeated call of the same shape faults nothing; the torch front end's large CPU outputs come
// from there.
//
// Advises huge pages for the whole 2 MiB pages inside [data, data + bytes).
void advise_huge_pages(const void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_pages_enabled()) return;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(data), hi = lo + bytes;
  const uintptr_t a0 = (lo + kHugePage - 1) & ~(kHugePage - 1), a1 = hi & ~(kHugePage - 1);
  if (a1 > a0) madvise(reinterpret_cast<void*>(a0), a1 - a0, MADV_HUGEPAGE);  // failure is harmless
#else
  (void)data;
  (void)bytes;
#endif
}

// An output: huge pages for the extent reachable from its data pointer.
void advise_huge_pages(const View& v, DType dtype) {
  if (!v.present()) return;
  uintptr_t extent = 1;  // elements reachable from data, for non-negative strides
  for (int i = 0; i < 4; ++i) {
    if (v.stride[i] < 0) return;
    if (v.shape[i] > 1) extent += static_cast<uintptr_t>(v.shape[i] - 1) * static_cast<uintptr_t>(v.stride[i]);
  }
  advise_huge_pages(v.data, extent * dtype_bytes(dtype));
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
  // Blocks of at least a huge page start on one and are whole pages long (aligned_alloc wants a
  // multiple of the alignment); smaller ones are ordinary, cache-line aligned.
  const size_t align = bytes >= kHugePage ? kHugePage : 64;
  const size_t size = (bytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, size);
  if (p == nullptr) throw std::bad_alloc();
  if (align == kHugePage) advise_huge_pages(p, size);
  std::lock_guard<std::mutex> lock(c.mu);
  c.sizes[p] = size;
  return p;
}

void release_scratch(void* p) {
  ScratchCache& c = scratch_cache();
  std::vector<void*> to_free;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    const size_t size = c.sizes.at(p);
    // A block over a quarter of the budget is not kept: it would push out several smaller ones,
    // and a mix of sizes would then keep none of them.
    const size_t budget = scratch_cache_bytes();
    if (size > budget / 4) {
      c.sizes.erase(p);
      to_free.push_back(p);
    } else {
      c.free_blocks.push_back({p, size});
      c.cached += size;
      // Over the budget: the least recently released blocks go back to the system.
      while (c.cached > budget) {
        const ScratchCache::Block old = c.free_blocks.front();
        c.free_blocks.erase(c.free_blocks.begin());
        c.cached -= old.bytes;
        c.sizes.erase(old.p);
        to_free.push_back(old.p);
      }
    }
  }
  for (void* q : to_free) std::free(q);
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
  const DType acc = accumulator_dtype(a.dtype);
  advise_huge_pages(a.out, a.dtype);
  advise_huge_pages(a.gq, acc);
  advise_huge_pages(a.gk, acc);
  switch (selected()) {
#ifdef GMATTN_X86_ISAS
    case Isa::kAvx512: avx512::forward(a); return;
    case Isa::kAvx2: avx2::forward(a); return;
#endif
    default: generic::forward(a); return;
  }
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
  advise_huge_pages(a.dq, a.dtype);
  advise_huge_pages(a.dk, a.dtype);
  advise_huge_pages(a.dv, a.dtype);
  switch (selected()) {
#ifdef GMATTN_X86_ISAS
    case Isa::kAvx512: avx512::backward(a); return;
    case Isa::kAvx2: avx2::backward(a); return;
#endif
    default: generic::backward(a); return;
  }
}

}  // namespace cpu
}  // namespace gmattn
