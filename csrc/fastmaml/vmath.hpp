// Vectorisable elementary functions for the binary link over a buffer of
// logits (PROTOTYPE, issue 13 item 1).
//
// exp_nonpos(x) = exp(x) for x <= 0, written without calls or branches so
// that a loop of it vectorises under the dispatch of kernels.hpp (AVX-512,
// AVX2+FMA, baseline). The link only ever needs exp(-|z|), so the argument
// is never positive: no overflow path exists. Accuracy: Cody-Waite range
// reduction with a two-part ln 2 and a degree-13 Taylor polynomial on
// |r| <= ln2/2 (truncation 1.7e-16), about 2 ulp against std::exp. Results
// below 2^-1022 (x < -708.39) are flushed to zero: every place that uses e
// adds it to 1 or multiplies it by something O(1), so a subnormal e changes
// no digit a caller can see (|z| ~ 5000 gives 0 exactly as std::exp does).
// NaN in, NaN out (the same propagation as the scalar link of links.hpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.hpp"

// Bodies are force-inlined into the per-ISA clones (FASTMAML_CLONES): a
// body left out of line would be compiled once, for baseline x86-64.
#if (defined(__GNUC__) || defined(__clang__)) && !FASTMAML_PORTABLE_FALLBACKS
#define FASTMAML_INLINE __attribute__((always_inline))
#else
#define FASTMAML_INLINE
#endif

namespace fastmaml {
namespace vmath {

FASTMAML_INLINE inline double exp_nonpos(double x) {
  // No clamp of x: below -708 the bits computed are garbage (inf, NaN) and
  // the mask below replaces them by 0.
  const double shifter = 6755399441055744.0;  // 0x1.8p52: round to nearest integer
  const double t = x * 1.4426950408889634 + shifter;
  const double kd = t - shifter;
  const double r = (x - kd * 6.93147180369123816490e-01) - kd * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  std::uint64_t tb;
  std::memcpy(&tb, &t, sizeof tb);
  // low bits of t hold k; (k + 1023) << 52 is 2^k for k >= -1022
  const std::uint64_t sb = (tb + 1023u) << 52;
  double scale;
  std::memcpy(&scale, &sb, sizeof scale);
  // The two selects as bit masks, not ?: (nor a clamp of x): with ?: GCC
  // threads the branches, sinks the polynomial into one of them and, under
  // -ftrapping-math, then vectorises the callers' loops only with AVX-512
  // masking: AVX2 ran them scalar (seen on a Zen 3: W3 15% slower). Same
  // values as the ?: form: 0 below -708, NaN in gives x back.
  const double e = p * scale;
  std::uint64_t eb, xb;
  std::memcpy(&eb, &e, sizeof eb);
  std::memcpy(&xb, &x, sizeof xb);
  const std::uint64_t keep = std::uint64_t(0) - static_cast<std::uint64_t>(x >= -708.0);
  const std::uint64_t nan = std::uint64_t(0) - static_cast<std::uint64_t>(x != x);
  const std::uint64_t ob = ((eb & keep) & ~nan) | (xb & nan);
  double out;
  std::memcpy(&out, &ob, sizeof out);
  return out;
}

FASTMAML_INLINE inline double flip_sign(double v, std::uint64_t mask) {
  std::uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  b ^= mask;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// Binary link over n rows, given logits z (bias included) and labels y:
//   r_i = (p_i - y_i) * scale    written without cancellation as in links.hpp
//   s_i = p_i (1 - p_i)          (when s is non-null)
// and, when tails is non-null, tails_i = exp(-|z_i|) and the returned value
// is sum_i max(+-z_i, 0) (the non-log part of the row losses).
template <class Y>
FASTMAML_INLINE inline double binary_rows_body(const double* FASTMAML_RESTRICT z, const Y* FASTMAML_RESTRICT y, index_t n,
                                               double scale, double* FASTMAML_RESTRICT r, double* FASTMAML_RESTRICT s,
                                               double* FASTMAML_RESTRICT tails) {
  // Every output is written unconditionally (callers pass scratch for what
  // they do not need): conditional stores keep GCC from vectorising.
  double hinge = 0.0;
#pragma omp simd reduction(+ : hinge)
  for (index_t i = 0; i < n; ++i) {
    const double zi = z[i];
    const double e = exp_nonpos(-std::fabs(zi));
    const double big = 1.0 / (1.0 + e), small = e * big;
    const bool pos = zi >= 0.0;
    const double pz = pos ? big : small;
    const double pm = pos ? small : big;
    // y = 1: r = -pm * scale, h = -z. The sign flips as bit masks, for the
    // reason given in exp_nonpos (a negation is exactly a sign-bit flip).
    const std::uint64_t flip = (std::uint64_t(0) - static_cast<std::uint64_t>(y[i] == 1)) & (std::uint64_t(1) << 63);
    const double pick = y[i] == 1 ? pm : pz;
    r[i] = flip_sign(pick, flip) * scale;
    s[i] = big * small;
    tails[i] = e;
    const double h = flip_sign(zi, flip);
    hinge += h > 0.0 ? h : 0.0;
  }
  return hinge;
}

FASTMAML_CLONES inline double binary_rows(const double* z, const std::int32_t* y, index_t n, double scale,
                                          double* r, double* s, double* tails) {
  return binary_rows_body(z, y, n, scale, r, s, tails);
}

// sum_i log1p(tails_i) for tails_i in [0, 1] with one log1p per 512 rows:
// q_{i+1} = q_i + t_i + q_i t_i tracks prod(1 + t_i) - 1 without cancellation
// (all terms >= 0), so tiny tails keep their digits; 512 rows keep
// prod(1 + t) <= 2^512, far from overflow. Sequential and fixed-order.
inline double sum_log1p(const double* tails, index_t n) {
  double total = 0.0;
  for (index_t i0 = 0; i0 < n; i0 += 512) {
    const index_t i1 = i0 + 512 < n ? i0 + 512 : n;
    double q = 0.0;
    for (index_t i = i0; i < i1; ++i) q = q + tails[i] + q * tails[i];
    total += std::log1p(q);
  }
  return total;
}

}  // namespace vmath
}  // namespace fastmaml
