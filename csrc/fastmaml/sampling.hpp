// Sampling without replacement for the episode samplers, driven by NumPy's
// bit generator (the bitgen_t C API), so streams are reproducible from a
// numpy.random.Generator's state and checkpointable with it.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.hpp"

namespace fastmaml {

// Layout of numpy/random/bitgen.h (stable C API of numpy.random).
struct BitGen {
  void* state;
  std::uint64_t (*next_uint64)(void* st);
  std::uint32_t (*next_uint32)(void* st);
  double (*next_double)(void* st);
  std::uint64_t (*next_raw)(void* st);
};

// The full 128-bit product x * n as (high, low) 64-bit halves. With a
// native 128-bit integer (GCC, clang) one multiply; otherwise (MSVC, or
// FASTMAML_PORTABLE_FALLBACKS) schoolbook multiplication of 32-bit halves,
// which is exact: each partial product fits in 64 bits, and so do the sums
// of 32-bit pieces that carry into the high word.
inline std::uint64_t mul_hi_lo_portable(std::uint64_t x, std::uint64_t n, std::uint64_t* low) {
  const std::uint64_t mask = 0xffffffffu;
  const std::uint64_t x0 = x & mask, x1 = x >> 32, n0 = n & mask, n1 = n >> 32;
  const std::uint64_t p00 = x0 * n0, p01 = x0 * n1, p10 = x1 * n0, p11 = x1 * n1;
  const std::uint64_t mid = (p00 >> 32) + (p01 & mask) + (p10 & mask);  // < 3 * 2^32
  *low = (mid << 32) | (p00 & mask);
  return p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
}

#if defined(__SIZEOF_INT128__) && !FASTMAML_PORTABLE_FALLBACKS
#define FASTMAML_HAVE_INT128 1
inline std::uint64_t mul_hi_lo(std::uint64_t x, std::uint64_t n, std::uint64_t* low) {
  const unsigned __int128 prod = static_cast<unsigned __int128>(x) * n;
  *low = static_cast<std::uint64_t>(prod);
  return static_cast<std::uint64_t>(prod >> 64);
}
#else
#define FASTMAML_HAVE_INT128 0
inline std::uint64_t mul_hi_lo(std::uint64_t x, std::uint64_t n, std::uint64_t* low) {
  return mul_hi_lo_portable(x, n, low);
}
#endif

// Uniform integer in [0, n), unbiased (Lemire's multiply-and-reject).
inline std::uint64_t bounded(BitGen* g, std::uint64_t n) {
  std::uint64_t low = 0;
  std::uint64_t high = mul_hi_lo(g->next_uint64(g->state), n, &low);
  if (low < n) {
    const std::uint64_t threshold = (0 - n) % n;
    while (low < threshold) high = mul_hi_lo(g->next_uint64(g->state), n, &low);
  }
  return high;
}

// For each r, m distinct integers in [0, counts[r]) in uniformly random
// order (Floyd's algorithm, then a Fisher-Yates shuffle): out is R x m.
// O(m^2) per row with no scratch proportional to counts[r].
inline void sample_without_replacement(BitGen* g, const index_t* counts, index_t R, index_t m, index_t* out) {
  for (index_t r = 0; r < R; ++r) {
    index_t* o = out + r * m;
    const index_t N = counts[r];
    index_t filled = 0;
    for (index_t j = N - m; j < N; ++j) {
      const index_t t = static_cast<index_t>(bounded(g, static_cast<std::uint64_t>(j + 1)));
      bool seen = false;
      for (index_t q = 0; q < filled; ++q) seen = seen || (o[q] == t);
      o[filled++] = seen ? j : t;
    }
    for (index_t q = m - 1; q > 0; --q) {
      const index_t s = static_cast<index_t>(bounded(g, static_cast<std::uint64_t>(q + 1)));
      const index_t tmp = o[q];
      o[q] = o[s];
      o[s] = tmp;
    }
  }
}

}  // namespace fastmaml
