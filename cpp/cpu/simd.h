// Portable SIMD for the CPU kernels: GCC/Clang vector extensions of GMATTN_VECTOR_BYTES bytes
// (16 in the generic build: SSE2 on x86-64, NEON on ARM; 32 for AVX2; 64 for AVX-512). The
// compiler maps them onto the registers of the ISA the translation unit is built for, so one
// source gives every build; no intrinsics, nothing ISA-specific outside the build flags.
#pragma once

#ifndef GMATTN_ISA
#define GMATTN_ISA generic
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#ifndef GMATTN_VECTOR_BYTES
#define GMATTN_VECTOR_BYTES 16
#endif

namespace gmattn {
namespace cpu_detail {
// One copy per ISA build (GMATTN_ISA): inline functions compiled with different instruction
// sets must not share symbols, or the linker would merge them across builds.
inline namespace GMATTN_ISA {

template <class Acc>
struct Simd;

template <>
struct Simd<float> {
  static constexpr int W = GMATTN_VECTOR_BYTES / 4;
  typedef float V __attribute__((vector_size(GMATTN_VECTOR_BYTES)));
  typedef int32_t Int;  // the integer of float's width, and its vector (comparison results)
  typedef int32_t I __attribute__((vector_size(GMATTN_VECTOR_BYTES)));
};

template <>
struct Simd<double> {
  static constexpr int W = GMATTN_VECTOR_BYTES / 8;
  typedef double V __attribute__((vector_size(GMATTN_VECTOR_BYTES)));
  typedef int64_t Int;
  typedef int64_t I __attribute__((vector_size(GMATTN_VECTOR_BYTES)));
};

template <class Acc>
using VecT = typename Simd<Acc>::V;

template <class Acc>
inline VecT<Acc> loadu(const Acc* p) {
  VecT<Acc> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class Acc>
inline void storeu(Acc* p, VecT<Acc> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <class Acc, size_t... L>
inline VecT<Acc> splat_impl(Acc s, std::index_sequence<L...>) {
  return VecT<Acc>{((void)L, s)...};
}
// A vector constructor with every lane s: one broadcast instruction. (A lane-by-lane loop can
// be assembled through the stack by the SLP vectoriser, with a store-forwarding stall.)
template <class Acc>
inline VecT<Acc> splat(Acc s) {
  return splat_impl<Acc>(s, std::make_index_sequence<Simd<Acc>::W>{});
}
template <class Acc>
inline VecT<Acc> vmax(VecT<Acc> a, VecT<Acc> b) {
  return a > b ? a : b;
}

// Horizontal reductions by halving (log2(W) steps).
template <class Acc, int BYTES>
struct VecOf {
  typedef Acc V __attribute__((vector_size(BYTES)));
};
// __builtin_shufflevector (Clang, GCC >= 12): lane permutations in registers. small_gemm.h's
// transposes use it too.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define GMATTN_HAVE_SHUFFLEVECTOR 1
#endif
#ifdef GMATTN_HAVE_SHUFFLEVECTOR
// Lanes [Off, Off + sizeof(H) / sizeof(Acc)) of v, in registers.
template <class H, int Off, class Vec, size_t... L>
inline H lanes_of(Vec v, std::index_sequence<L...>) {
  return __builtin_shufflevector(v, v, (static_cast<int>(L) + Off)...);
}
#endif
// The two halves of v. Without __builtin_shufflevector (GCC < 12) through memory, which the
// compiler may turn into a store and two loads (a store-forwarding stall on the wide store).
template <class Acc, int BYTES>
inline void halves(typename VecOf<Acc, BYTES>::V v, typename VecOf<Acc, BYTES / 2>::V& lo,
                   typename VecOf<Acc, BYTES / 2>::V& hi) {
  typedef typename VecOf<Acc, BYTES / 2>::V H;
#ifdef GMATTN_HAVE_SHUFFLEVECTOR
  constexpr int kHalf = BYTES / 2 / static_cast<int>(sizeof(Acc));
  lo = lanes_of<H, 0>(v, std::make_index_sequence<kHalf>{});
  hi = lanes_of<H, kHalf>(v, std::make_index_sequence<kHalf>{});
#else
  std::memcpy(&lo, &v, sizeof(H));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
#endif
}
template <class Acc, int BYTES, bool kMax>
inline Acc reduce_tree(typename VecOf<Acc, BYTES>::V v) {
  if constexpr (BYTES == static_cast<int>(sizeof(Acc))) {
    return v[0];
  } else {
    typedef typename VecOf<Acc, BYTES / 2>::V H;
    H lo, hi;
    halves<Acc, BYTES>(v, lo, hi);
    H m;
    if constexpr (kMax) {
      m = lo > hi ? lo : hi;
    } else {
      m = lo + hi;
    }
    return reduce_tree<Acc, BYTES / 2, kMax>(m);
  }
}
template <class Acc>
inline Acc hsum(VecT<Acc> v) {
  return reduce_tree<Acc, GMATTN_VECTOR_BYTES, false>(v);
}
template <class Acc>
inline Acc hmax(VecT<Acc> v) {
  return reduce_tree<Acc, GMATTN_VECTOR_BYTES, true>(v);
}

// The smallest lane of an integer vector of Acc's width (as the largest of its negation).
template <class Acc>
inline int64_t hmin(typename Simd<Acc>::I v) {
  return -static_cast<int64_t>(reduce_tree<typename Simd<Acc>::Int, GMATTN_VECTOR_BYTES, true>(-v));
}
// The lane numbers 0, 1, ..., W - 1, in the integer vector of Acc's width.
template <class Acc, size_t... L>
inline typename Simd<Acc>::I lane_index_impl(std::index_sequence<L...>) {
  return typename Simd<Acc>::I{static_cast<typename Simd<Acc>::Int>(L)...};
}
template <class Acc>
inline typename Simd<Acc>::I lane_index() {
  return lane_index_impl<Acc>(std::make_index_sequence<Simd<Acc>::W>{});
}

// Whether any lane of a comparison result (all-ones or zero lanes) is set: the vector folded
// into 64-bit words and OR-ed, no lane-by-lane extraction.
template <class Acc>
inline bool any_lane(typename Simd<Acc>::I v) {
  uint64_t words[sizeof(v) / 8];
  std::memcpy(words, &v, sizeof(v));
  uint64_t any = 0;
  for (uint64_t w : words) any |= w;
  return any != 0;
}

// Writes n values from src to dst, the whole vectors bypassing the cache where the ISA has
// streaming stores and dst is vector aligned: outputs are written once and read by the caller
// later, so an ordinary store would first read each line from memory (a write-allocate) and evict
// data still in use. The one place with ISA intrinsics; stream_fence() must follow before another
// thread reads dst (streaming stores are weakly ordered).
template <class Acc>
inline void stream_copy(Acc* dst, const Acc* src, int64_t n) {
  int64_t done = 0;
#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__)
  constexpr int W = Simd<Acc>::W;
  if (reinterpret_cast<uintptr_t>(dst) % GMATTN_VECTOR_BYTES == 0) {
    done = n - n % W;
    for (int64_t i = 0; i < done; i += W) {
      const VecT<Acc> v = loadu(src + i);
#if GMATTN_VECTOR_BYTES == 64 && defined(__AVX512F__)
      if constexpr (sizeof(Acc) == 4) {
        _mm512_stream_ps(reinterpret_cast<float*>(dst + i), reinterpret_cast<__m512>(v));
      } else {
        _mm512_stream_pd(reinterpret_cast<double*>(dst + i), reinterpret_cast<__m512d>(v));
      }
#elif GMATTN_VECTOR_BYTES == 32 && defined(__AVX__)
      if constexpr (sizeof(Acc) == 4) {
        _mm256_stream_ps(reinterpret_cast<float*>(dst + i), reinterpret_cast<__m256>(v));
      } else {
        _mm256_stream_pd(reinterpret_cast<double*>(dst + i), reinterpret_cast<__m256d>(v));
      }
#else
      if constexpr (sizeof(Acc) == 4) {
        _mm_stream_ps(reinterpret_cast<float*>(dst + i), reinterpret_cast<__m128>(v));
      } else {
        _mm_stream_pd(reinterpret_cast<double*>(dst + i), reinterpret_cast<__m128d>(v));
      }
#endif
    }
  }
#endif
  std::memcpy(dst + done, src + done, (n - done) * sizeof(Acc));
}
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// exp(x) for x <= 0 (softmax after max subtraction); exactly 0 below -87. Float: range
// reduction x = n ln2 + r (round-to-nearest n by the 1.5 * 2^23 trick, pure arithmetic so it
// vectorises in every build), degree-7 polynomial; relative error below 2e-7.
inline VecT<float> exp_nonpositive(VecT<float> x) {
  using V = VecT<float>;
  using I = Simd<float>::I;
  const V lo = splat(-87.0f);
  const V xc = x < lo ? lo : x;
  const V magic = splat(12582912.0f);  // 1.5 * 2^23
  const V y = xc * 1.44269504088896341f + magic;
  const V n = y - magic;
  V r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  V p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I yi, mi;
  std::memcpy(&yi, &y, sizeof(y));
  std::memcpy(&mi, &magic, sizeof(magic));
  const I e = ((yi - mi) + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof(e));
  const V res = p * scale;
  return x < lo ? V{} : res;
}
inline VecT<double> exp_nonpositive(VecT<double> x) {
  VecT<double> r;
  for (int l = 0; l < Simd<double>::W; ++l) r[l] = x[l] < -745.0 ? 0.0 : std::exp(x[l]);
  return r;
}

// softplus(w) = max(w, 0) + log1p(e) and sigmoid(w) = (w >= 0 ? 1 : e) / (1 + e), both from
// e = exp(-|w|) (stable for any w). log1p(e) for 0 < e <= 1 as 2 atanh(s), s = e / (2 + e) <= 1/3:
// the odd series 2 s (1 + s^2/3 + s^4/5 + ...), cut where its rest is below the type's rounding
// (7 terms for float: (1/9)^7 / 15 < 2e-8; 17 for double).
template <class Acc>
inline void softplus_sigmoid(VecT<Acc> w, VecT<Acc>& softplus, VecT<Acc>& sigmoid) {
  using V = VecT<Acc>;
  const V zero{};
  const V a = w < zero ? -w : w;
  const V e = exp_nonpositive(-a);
  const V s = e / (Acc(2) + e);
  const V s2 = s * s;
  constexpr int kTerms = sizeof(Acc) == 4 ? 7 : 17;
  V p = splat<Acc>(Acc(1) / Acc(2 * kTerms - 1));
#pragma GCC unroll 17
  for (int i = kTerms - 2; i >= 0; --i) p = p * s2 + Acc(1) / Acc(2 * i + 1);
  softplus = (w > zero ? w : zero) + Acc(2) * s * p;
  sigmoid = (w >= zero ? splat<Acc>(Acc(1)) : e) / (Acc(1) + e);
}

}  // namespace GMATTN_ISA
}  // namespace cpu_detail
}  // namespace gmattn
