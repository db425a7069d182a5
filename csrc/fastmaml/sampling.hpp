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

// Uniform integer in [0, n), unbiased (Lemire's multiply-and-reject).
inline std::uint64_t bounded(BitGen* g, std::uint64_t n) {
  std::uint64_t x = g->next_uint64(g->state);
  __uint128_t prod = static_cast<__uint128_t>(x) * n;
  std::uint64_t low = static_cast<std::uint64_t>(prod);
  if (low < n) {
    const std::uint64_t threshold = (0 - n) % n;
    while (low < threshold) {
      x = g->next_uint64(g->state);
      prod = static_cast<__uint128_t>(x) * n;
      low = static_cast<std::uint64_t>(prod);
    }
  }
  return static_cast<std::uint64_t>(prod >> 64);
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
