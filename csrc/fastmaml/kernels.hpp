// Row kernels: the SIMD dot products and axpy every pass over a task's rows
// is made of, with their run-time dispatch over instruction sets, and the
// portability switches of the core.
//
// Pure C++17, no Python. Every routine takes raw pointers and sizes and is
// templated on the storage type T (float or double). Dot products are
// accumulated in double: a float32 logit summed over 784 features in float32
// loses ~3 digits, which the float32 tolerance (2e-4 against float64) cannot
// afford once it is pushed through K steps and a reverse sweep.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastmaml {

using index_t = std::int64_t;

// Portability. Every compiler-specific construct has a standard C++17
// fallback, and FASTMAML_PORTABLE_FALLBACKS=1 (CMake option of the same
// name) forces all of them under any compiler, so that a g++ build tests the
// code an MSVC or other build runs:
//   FASTMAML_RESTRICT    __restrict (GCC, clang, MSVC)    | nothing
//   FASTMAML_CLONES      GCC target_clones (x86-64 ELF) | one baseline build
//   mul_hi_lo (sampling.hpp)  unsigned __int128         | 32-bit halves
// FASTMAML_NO_MULTIVERSION=1 turns off only the run-time dispatch.
#if !defined(FASTMAML_PORTABLE_FALLBACKS)
#define FASTMAML_PORTABLE_FALLBACKS 0
#endif

#if !FASTMAML_PORTABLE_FALLBACKS && (defined(__GNUC__) || defined(__clang__) || defined(_MSC_VER))
#define FASTMAML_RESTRICT __restrict
#else
#define FASTMAML_RESTRICT
#endif

// Hot row kernels are compiled for several instruction sets and chosen at
// load time (GCC function multi-versioning): AVX-512 and AVX2+FMA where the
// CPU has them, baseline x86-64 otherwise. Never -march=native, so a wheel
// runs on any x86-64. Other compilers and other architectures (aarch64, ...)
// get the baseline build only; its results are those of the "default" clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTMAML_NO_MULTIVERSION) && !FASTMAML_PORTABLE_FALLBACKS
#define FASTMAML_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTMAML_MULTIVERSIONED 1
#else
#define FASTMAML_CLONES
#define FASTMAML_MULTIVERSIONED 0
#endif

// Whether the CPU runs the x86-64-v4 clone (AVX-512: 32 vector registers),
// for the choice of a register tile's shape (tile::lanes_gram,
// tile::gram_body), which never changes a bit.
inline bool has_32_vector_registers() {
#if !FASTMAML_PORTABLE_FALLBACKS && (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__x86_64__) || defined(__i386__))
  static const bool wide = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return wide;
#else
  return false;
#endif
}

// <x, w>: float64 rows accumulate in float64. float32 rows accumulate in
// float32 lanes over blocks of 256 features and the blocks in float64: the
// rounding error stays ~1e-6 relative while the loop runs at float32 width.
FASTMAML_CLONES inline double dot_kernel(const double* FASTMAML_RESTRICT x, const double* FASTMAML_RESTRICT w, index_t d) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (index_t k = 0; k < d; ++k) acc += x[k] * w[k];
  return acc;
}

FASTMAML_CLONES inline double dot_kernel(const float* FASTMAML_RESTRICT x, const float* FASTMAML_RESTRICT w, index_t d) {
  double total = 0.0;
  for (index_t k0 = 0; k0 < d; k0 += 256) {
    const index_t k1 = std::min(d, k0 + 256);
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (index_t k = k0; k < k1; ++k) acc += x[k] * w[k];
    total += static_cast<double>(acc);
  }
  return total;
}

// Four dot products <a_r, b> sharing each load of b (the Gram matrix of a
// task's rows): about 1.6x fewer loads than four separate dots. Same
// accumulation scheme as dot_kernel.
FASTMAML_CLONES inline void dot4_kernel(const double* FASTMAML_RESTRICT a0, const double* FASTMAML_RESTRICT a1,
                                        const double* FASTMAML_RESTRICT a2, const double* FASTMAML_RESTRICT a3,
                                        const double* FASTMAML_RESTRICT b, index_t d, double* out) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (index_t k = 0; k < d; ++k) {
    const double bk = b[k];
    s0 += a0[k] * bk;
    s1 += a1[k] * bk;
    s2 += a2[k] * bk;
    s3 += a3[k] * bk;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

FASTMAML_CLONES inline void dot4_kernel(const float* FASTMAML_RESTRICT a0, const float* FASTMAML_RESTRICT a1,
                                        const float* FASTMAML_RESTRICT a2, const float* FASTMAML_RESTRICT a3,
                                        const float* FASTMAML_RESTRICT b, index_t d, double* out) {
  out[0] = out[1] = out[2] = out[3] = 0.0;
  for (index_t k0 = 0; k0 < d; k0 += 256) {
    const index_t k1 = std::min(d, k0 + 256);
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (index_t k = k0; k < k1; ++k) {
      const float bk = b[k];
      s0 += a0[k] * bk;
      s1 += a1[k] * bk;
      s2 += a2[k] * bk;
      s3 += a3[k] * bk;
    }
    out[0] += static_cast<double>(s0);
    out[1] += static_cast<double>(s1);
    out[2] += static_cast<double>(s2);
    out[3] += static_cast<double>(s3);
  }
}

FASTMAML_CLONES inline void axpy_kernel(double* FASTMAML_RESTRICT y, const double* FASTMAML_RESTRICT x, index_t d, double c) {
#pragma omp simd
  for (index_t k = 0; k < d; ++k) y[k] += c * x[k];
}

FASTMAML_CLONES inline void axpy_kernel(float* FASTMAML_RESTRICT y, const float* FASTMAML_RESTRICT x, index_t d, double c) {
  const float cc = static_cast<float>(c);
#pragma omp simd
  for (index_t k = 0; k < d; ++k) y[k] += cc * x[k];
}

// <x, w> + bias
template <class T>
inline double dot_bias(const T* FASTMAML_RESTRICT x, const T* FASTMAML_RESTRICT w, index_t d, double bias) {
  return dot_kernel(x, w, d) + bias;
}

// y[0:d] += c * x[0:d]
template <class T>
inline void axpy(T* FASTMAML_RESTRICT y, const T* FASTMAML_RESTRICT x, index_t d, double c) {
  axpy_kernel(y, x, d, c);
}

// out[0:D] = X~^T coef where X~ = [rows, 1]: out[0:d] = sum_i coef_i x_i and
// out[d] = sum_i coef_i (the bias column). Rows are given by pointer so that
// dense and gathered (index-form) tasks share one kernel.
template <class T>
inline void xt_times(const T* const* rows, const double* coef, index_t n,
                     index_t d, T* FASTMAML_RESTRICT out) {
  std::fill(out, out + d + 1, T(0));
  double bias = 0.0;
  for (index_t i = 0; i < n; ++i) {
    axpy(out, rows[i], d, coef[i]);
    bias += coef[i];
  }
  out[d] = static_cast<T>(bias);
}

template <class T>
inline bool all_finite(const T* x, index_t len) {
  // A sum propagates any inf/NaN; one branch instead of one per element.
  // Four independent chains, so the adds do not wait on each other (one
  // chain made this check a visible share of a small task's sweep); the
  // answer is the same in any order.
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
  index_t k = 0;
  for (; k + 4 <= len; k += 4) {
    a0 += static_cast<double>(x[k]) * 0.0;
    a1 += static_cast<double>(x[k + 1]) * 0.0;
    a2 += static_cast<double>(x[k + 2]) * 0.0;
    a3 += static_cast<double>(x[k + 3]) * 0.0;
  }
  for (; k < len; ++k) a0 += static_cast<double>(x[k]) * 0.0;
  return (a0 + a1) + (a2 + a3) == 0.0;
}

}  // namespace fastmaml
