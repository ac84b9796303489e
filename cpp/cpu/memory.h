// Large buffers: the outputs the core is handed, and its own O(N) scratch (the cache behind
// make_scratch is defined once, in dispatch.cpp).
//
// Big blocks are usually fresh memory: glibc maps them anew (or trims them back to the system
// after use), and the first write to each 4 KiB page then costs a page fault, which includes
// zeroing the page (on our test VM ~2 us a page: ~16 ms for a 32 MiB buffer, more than writing it).
// Two remedies. Outputs: transparent huge pages are requested on the 2 MiB-aligned interior of
// each, one fault per 2 MiB where THP is available (a hint only: nothing changes where THP is off,
// as on our test VM; memory already touched keeps its pages; GMATTN_HUGEPAGES=0 turns it off).
// Blocks: acquire_scratch/release_scratch (gmattn.h) keep released blocks for reuse, so a
// repeated call of the same shape faults nothing; the kernels' scratch and the torch front end's
// large CPU outputs come from there.
#pragma once

#ifndef GMATTN_ISA
#define GMATTN_ISA generic
#endif

#include <cstddef>
#include <memory>

#include "gmattn/gmattn.h"

namespace gmattn {
namespace cpu_detail {
// One copy per ISA build (see small_gemm.h).
inline namespace GMATTN_ISA {

struct ScratchRelease {
  void operator()(void* p) const { cpu::release_scratch(p); }
};
// n uninitialised elements of scratch (empty when n == 0).
template <class T>
using Scratch = std::unique_ptr<T[], ScratchRelease>;
template <class T>
Scratch<T> make_scratch(size_t n) {
  return Scratch<T>(n > 0 ? static_cast<T*>(cpu::acquire_scratch(n * sizeof(T))) : nullptr);
}

}  // namespace GMATTN_ISA
}  // namespace cpu_detail
}  // namespace gmattn
