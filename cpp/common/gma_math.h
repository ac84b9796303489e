// The math the CPU kernels (cpp/cpu) and the CUDA kernels (cpp/cuda) share, written once:
// the variances from omega and their derivative, the log-normaliser of each component, the terms
// of the quadratic form (direct and centred) and the guard of the centred form, compensated
// addition, the pivoted softmax backward and the chain rule to mu, omega and alpha. Scalar
// functions that also take GCC vector types (the CPU's SIMD registers) where they use only
// arithmetic and comparisons; host and device functions under nvcc. See docs/design.md section 4.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define GMA_MATH_FN __host__ __device__ __forceinline__
#else
#define GMA_MATH_FN inline
#endif

#ifndef GMATTN_ISA
#define GMATTN_ISA generic
#endif

namespace gmattn {
namespace math {
// One copy per CPU ISA build (as in cpu/numeric.h): inline functions compiled with different
// instruction sets must not share symbols. The CUDA build has one: generic.
inline namespace GMATTN_ISA {

GMA_MATH_FN float exp_of(float x) { return expf(x); }
GMA_MATH_FN double exp_of(double x) { return exp(x); }
GMA_MATH_FN float log_of(float x) { return logf(x); }
GMA_MATH_FN double log_of(double x) { return log(x); }
GMA_MATH_FN float log1p_of(float x) { return log1pf(x); }
GMA_MATH_FN double log1p_of(double x) { return log1p(x); }

// ---------------------------------------------------------------------------------------------
// Parameters: sigma2 = softplus(omega) + sigma_eps, lam = 1 / sigma2,
// log_norm[k] = log_softmax(alpha)[k] - 0.5 sum_d log sigma2[k, d]

// softplus(x) = log(1 + e^x) without overflow for large x or loss for very negative x.
template <class T>
GMA_MATH_FN T softplus(T x) {
  return x > T(0) ? x + log1p_of(exp_of(-x)) : log1p_of(exp_of(x));
}
// d softplus / dx, the factor from dsigma2 to domega.
template <class T>
GMA_MATH_FN T sigmoid(T x) {
  return T(1) / (T(1) + exp_of(-x));
}
template <class T>
GMA_MATH_FN T variance(T omega, T sigma_eps) {
  return softplus(omega) + sigma_eps;
}

// log sum_i exp(value(i)) for i < n (n >= 1), in double, around the largest value.
template <class F>
GMA_MATH_FN double log_sum_exp(F value, int64_t n) {
  double vmax = -INFINITY;
  for (int64_t i = 0; i < n; ++i) vmax = vmax < value(i) ? value(i) : vmax;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += exp(value(i) - vmax);
  return vmax + log(sum);
}

// sum_i log(value(i)) in double, for values > 0: one logarithm per product of up to eight values
// (the product rounded like one more addition would be), per value where a product leaves
// [1e-300, 1e300] (or is NaN or infinite). With tiny variances sum_d log sigma2 is ~ -10 D: a
// float sum of D logarithms would carry an absolute error of ~ D ulp(10 D), enough to shift
// contested responsibilities.
template <class F>
GMA_MATH_FN double sum_log(F value, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t m = n - i < 8 ? n - i : 8;
    double p = 1;
    for (int64_t j = 0; j < m; ++j) p *= value(i + j);
    if (p > 1e-300 && p < 1e300) {
      total += log(p);
    } else {
      for (int64_t j = 0; j < m; ++j) total += log(value(i + j));
    }
  }
  return total;
}

// log_norm of a component before its shift: log pi - 0.5 sum_d log sigma2. Both kernel sets
// shift every component's by the head's largest (softmax is shift invariant) before rounding it
// to the accumulator type, so s = log_norm - Q / 2 carries no large constant.
GMA_MATH_FN double log_norm(double log_prior, double sum_log_sigma2) { return log_prior - 0.5 * sum_log_sigma2; }

// ---------------------------------------------------------------------------------------------
// The quadratic form Q[k] = sum_d lam (x - mu)^2

// One dimension's term in the direct form: accurate up to rounding whatever |x| and |mu|.
template <class V>
GMA_MATH_FN V direct_term(V lam, V x, V mu) {
  const V e = x - mu;
  return lam * e * e;
}
// One dimension's term in the centred form (a x' - b)^2, a = sqrt(lam), x' = x - c, b = a (mu - c)
// for a centre c: two fused multiply-adds per term with the accumulation.
template <class V>
GMA_MATH_FN V centred_term(V a, V xc, V b) {
  const V t = a * xc - b;
  return t * t;
}

// The centred form's rounding error is about eps sqrt(Q B), B = sum_d lam x'^2 + 4 sum_d lam
// (mu - c)^2 (bounded by the caller from row norms); the direct form's about eps Q. Where this is
// true (non-zero) the centred Q of a component may be inaccurate and the row must be recomputed in
// the direct form: B > 4 (Q + D), and the component matters (its score s within 64 nats of the
// row's maximum s_max) or Q B is so large that eps sqrt(Q B) > 1. V: a scalar or SIMD vector; S
// its element type.
template <class S>
struct CentredGuard;
template <>
struct CentredGuard<float> {
  static constexpr float kHuge = 1e14f;
};
template <>
struct CentredGuard<double> {
  static constexpr double kHuge = 1e30;
};
template <class S, class V>
GMA_MATH_FN auto centred_form_inaccurate(V q, V bound, V s, S s_max, S D) {
  return (bound > S(4) * (q + D)) & ((s > s_max - S(64)) | (q * bound > CentredGuard<S>::kHuge));
}

// ---------------------------------------------------------------------------------------------
// Compensated (Kahan) addition: sum += x, comp holding the rounding error of the additions so
// far (negated) and feeding it back into the next one. A running sum over N / C chunk
// contributions then keeps an error of a few ulp whatever N, where plain float32 addition drifts
// like sqrt(N / C) ulp, or N / C ulp when the terms share a sign. Needs IEEE arithmetic (no fast
// math, which would simplify the compensation away). V: a scalar or SIMD vector.
template <class V>
GMA_MATH_FN void compensated_add(V& sum, V& comp, V x) {
  const V y = x - comp;
  const V t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

// ---------------------------------------------------------------------------------------------
// Softmax backward, pivoted: ds = gamma * (dgamma - sum_k gamma dgamma), formed around the row's
// largest responsibility a (the first component holding it): the mean is dgamma_a +
// sum_{l != a} gamma_l (dgamma_l - dgamma_a), ds_l = gamma_l ((dgamma_l - dgamma_a) - (mean -
// dgamma_a)) for l != a, and ds_a = -sum_{l != a} ds_l (rows of ds sum to zero). For peaked
// routing (tiny variances) the rounded gamma_a ~ 1 leaves 1 - gamma_a, hence the plain form's
// ds_a, poorly determined; the small responsibilities carry their full relative precision. An
// all-zero row (a masked key) gives ds = 0; a row with a NaN stays NaN.
//
// One row, in place over dgamma (K values, stride 1); the CPU kernels run the same steps on SIMD
// vectors of components, several rows interleaved (cpu/mixture.h, softmax_backward_rows).
template <class T>
GMA_MATH_FN void softmax_backward_pivoted(const T* gamma, T* dgamma, int K) {
  int a = 0;
  T top = gamma[0];
  bool live = gamma[0] != T(0);
  for (int k = 1; k < K; ++k) {
    if (gamma[k] > top) {
      top = gamma[k];
      a = k;
    }
    live = live || gamma[k] != T(0);
  }
  if (!live) {
    for (int k = 0; k < K; ++k) dgamma[k] = T(0);
    return;
  }
  const T dga = dgamma[a];
  T mean_off = T(0);  // mean - dgamma_a (the a term is 0)
  for (int k = 0; k < K; ++k) mean_off += gamma[k] * (dgamma[k] - dga);
  T others = T(0);
  for (int k = 0; k < K; ++k) {
    if (k == a) continue;
    const T ds = gamma[k] * ((dgamma[k] - dga) - mean_off);
    dgamma[k] = ds;
    others += ds;
  }
  dgamma[a] = -others;
}

// ---------------------------------------------------------------------------------------------
// The chain rule from the parameter sums of a head (over every query and key row, with ds the
// softmax backward and x - mu per dimension):
//   ds_sum[k] = sum ds,  t1[k, d] = sum ds (x - mu),  t2[k, d] = sum ds (x - mu)^2
// to dmu = lam t1, domega = dsigma2 sigmoid(omega) with dsigma2 = -0.5 (lam ds_sum - lam^2 t2),
// and dalpha = ds_sum - pi sum_l ds_sum[l].
template <class T>
GMA_MATH_FN T dmu_from_sums(T lam, T t1) {
  return lam * t1;
}
template <class T>
GMA_MATH_FN T domega_from_sums(T lam, T ds_sum, T t2, T dsigma2_domega) {
  const T dsigma2 = T(-0.5) * (lam * ds_sum - lam * lam * t2);
  return dsigma2 * dsigma2_domega;
}
template <class T>
GMA_MATH_FN T dalpha_from_sums(T ds_sum, T pi, T ds_all) {
  return ds_sum - pi * ds_all;
}

}  // namespace GMATTN_ISA
}  // namespace math
}  // namespace gmattn
