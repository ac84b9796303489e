// Scalar helpers of the CPU kernels: storage conversions for 16-bit floats, and the shared math
// of gma_math.h (sums of logarithms, compensated addition) on arrays (vectorised exp and softplus
// are in simd.h). Header-only so every ISA build inlines them.
#pragma once

#ifndef GMATTN_ISA
#define GMATTN_ISA generic
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "../common/gma_math.h"

namespace gmattn {
namespace cpu_detail {
// One copy per ISA build (GMATTN_ISA): inline functions compiled with different instruction
// sets must not share symbols, or the linker would merge them across builds.
inline namespace GMATTN_ISA {

// Subnormal numbers flushed to zero, as results (FTZ) and as operands (DAZ), from construction to
// destruction on the calling thread; the thread's own setting is put back on destruction, also
// when an exception unwinds. Far components' responsibilities are e^-88..e^-103 in float32:
// subnormal, and arithmetic on them runs microcode assists (the backward was a third slower).
// Flushing changes any value by less than the smallest normal number (1.2e-38 in float32,
// 2.2e-308 in float64; docs/design.md section 4). Every thread that runs kernel code holds one:
// the caller's thread for the whole call (dispatch.cpp) and each OpenMP thread inside each
// parallel region (its setting is its own). Elsewhere than x86 and AArch64 it changes nothing.
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtzDaz); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtzDaz = 0x8040u;  // MXCSR bits FTZ (15) and DAZ (6)
  unsigned saved_;
#elif defined(__aarch64__)
  FlushSubnormals() {
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t fz = saved_ | (uint64_t(1) << 24);  // FPCR.FZ: inputs and results
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fz));
  }
  ~FlushSubnormals() { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_)); }

 private:
  uint64_t saved_;
#else
  FlushSubnormals() {}
#endif
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(bf16_t x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

inline bf16_t to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

inline float to_float(f16_t x) {
  const uint32_t sign = (x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  const uint32_t man = x.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    // zero or subnormal: value = man * 2^-24
    const float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline f16_t to_f16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (a >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (a < 0x38800000u) {
    // result is subnormal or zero: round a * 2^24 to an integer (nearest even)
    const float scaled = bits_float(a) * 16777216.0f;
    const float r = std::nearbyint(scaled);  // default rounding mode: nearest even
    return f16_t{static_cast<uint16_t>(sign | static_cast<uint16_t>(r))};
  }
  // normal: rebias exponent, round mantissa from 23 to 10 bits (nearest even)
  uint32_t m = a - 0x38000000u;  // exponent rebias by (127 - 15) << 23
  m += 0xfffu + ((m >> 13) & 1u);
  return f16_t{static_cast<uint16_t>(sign | (m >> 13))};
}

template <class Acc>
inline Acc to_acc(float x) { return static_cast<Acc>(x); }

template <class Acc, class T>
inline Acc load_as(const T& x) {
  return static_cast<Acc>(x);
}
template <>
inline float load_as<float, bf16_t>(const bf16_t& x) { return to_float(x); }
template <>
inline float load_as<float, f16_t>(const f16_t& x) { return to_float(x); }

template <class T, class Acc>
inline T store_as(Acc x) {
  return static_cast<T>(x);
}
template <>
inline bf16_t store_as<bf16_t, float>(float x) { return to_bf16(x); }
template <>
inline f16_t store_as<f16_t, float>(float x) { return to_f16(x); }

// sum_i log(x[i]) in double, for x > 0 (gma_math.h: sum_log).
template <class Acc>
inline double sum_log(const Acc* x, int64_t n) {
  return math::sum_log([x](int64_t i) { return static_cast<double>(x[i]); }, n);
}

// sum[i] += x[i] for i < n, compensated (gma_math.h: compensated_add): comp[i] holds the
// rounding error of the additions so far (negated) and feeds it back into the next one.
// The same into another sum: (sum_out, comp_out) = (sum_in, comp_in) + x; the pairs may be one.
template <class Acc>
inline void add_compensated(const Acc* sum_in, const Acc* comp_in, const Acc* x, Acc* sum_out, Acc* comp_out,
                            int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    Acc sum = sum_in[i], comp = comp_in[i];
    math::compensated_add(sum, comp, x[i]);
    comp_out[i] = comp;
    sum_out[i] = sum;
  }
}
template <class Acc>
inline void add_compensated(Acc* sum, Acc* comp, const Acc* x, int64_t n) {
  add_compensated<Acc>(sum, comp, x, sum, comp, n);
}

}  // namespace GMATTN_ISA
}  // namespace cpu_detail
}  // namespace gmattn
