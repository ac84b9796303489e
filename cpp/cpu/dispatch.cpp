// Run-time choice among the ISA builds of cpu/kernels.cpp, and the core's own argument checks.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
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

// Large outputs are usually fresh memory: glibc maps big blocks anew on every allocation, and the
// first write to each 4 KiB page then costs a page fault (about a quarter of the time of writing
// a 32 MiB output on our test machine). Asking for transparent huge pages on the 2 MiB-aligned
// interior of an output makes that one fault per 2 MiB. A hint only: nothing changes where THP is
// off, memory already touched keeps its pages, and other systems skip it. GMATTN_HUGEPAGES=0
// turns it off.
void advise_huge_pages(const View& v, DType dtype) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (!v.present() || !huge_pages_enabled()) return;
  uintptr_t extent = 1;  // elements reachable from data, for non-negative strides
  for (int i = 0; i < 4; ++i) {
    if (v.stride[i] < 0) return;
    if (v.shape[i] > 1) extent += static_cast<uintptr_t>(v.shape[i] - 1) * static_cast<uintptr_t>(v.stride[i]);
  }
  const uintptr_t lo = reinterpret_cast<uintptr_t>(v.data);
  const uintptr_t hi = lo + extent * dtype_bytes(dtype);
  const uintptr_t a0 = (lo + kHuge - 1) & ~(kHuge - 1), a1 = hi & ~(kHuge - 1);
  if (a1 > a0) madvise(reinterpret_cast<void*>(a0), a1 - a0, MADV_HUGEPAGE);  // failure is harmless
#else
  (void)v;
  (void)dtype;
#endif
}

}  // namespace

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
