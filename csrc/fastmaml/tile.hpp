// Register-tiled micro-kernels over a task's rows (PROTOTYPE, issue 13 item 1).
//
// Rows are given by pointer (dense and index-form tasks alike) and are never
// copied. Three products cover both sweeps:
//   gram   G = X X^T            4 x 4 tiles of dot products: 8 loads feed 16 FMAs
//   xv     z = X v              8 rows per load of v (9 loads per 8 FMAs)
//   xtr    o = c0 base + X^T r  64 float32 features (32 float64) of o held in
//                               registers over all n rows (one load per FMA)
// plus fused_rows, one pass that forms 4 logits, applies a row function and
// adds the 4 rows into X^T coef while they are in L1 (the plain sweep).
//
// Vectors are 32 bytes (8 floats / 4 doubles) through GCC vector extensions:
// native on AVX2, and on AVX-512 parts the 32 ymm registers hold a 4 x 4 tile
// with room to spare (Zen 4 splits 512-bit FMAs in two, so wider vectors buy
// nothing there). Each kernel is compiled per ISA by FASTMAML_CLONES.
//
// Accumulation, as in kernels.hpp: float64 rows in float64; float32 rows in
// float32 lanes over blocks of 256 features (32 terms per lane; the Gram
// tiles 1024 features, 128 terms per lane), each block's lanes summed into
// float64. Every output entry is computed by the same
// sequence of operations wherever it sits in a tile (tail tiles repeat the
// last row and drop the extra results), so G[i][k] depends only on rows i and
// k — never on n, the tile grid or the thread.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.hpp"
#include "vmath.hpp"

// The 32-byte vector helpers below are always inlined into the per-ISA
// clones; no vector crosses a call boundary, so the ABI note GCC gives for
// the baseline build does not apply.
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// GCC / clang vector extensions, or (FASTMAML_PORTABLE_FALLBACKS, other
// compilers) a standard C++ struct with the same elementwise operations in
// the same order: the baseline build gives the same bits either way.
#if (defined(__GNUC__) || defined(__clang__)) && !FASTMAML_PORTABLE_FALLBACKS
#define FASTMAML_VECTOR_EXT 1
#else
#define FASTMAML_VECTOR_EXT 0
#endif

namespace fastmaml {
namespace tile {

#if FASTMAML_VECTOR_EXT
typedef float vf8 __attribute__((vector_size(32)));
typedef double vd4 __attribute__((vector_size(32)));
#else
template <class T, int N>
struct Vec {
  T v[N];
  T operator[](int i) const { return v[i]; }
  T& operator[](int i) { return v[i]; }
  Vec& operator+=(const Vec& o) {
    for (int i = 0; i < N; ++i) v[i] += o.v[i];
    return *this;
  }
  friend Vec operator+(Vec a, const Vec& b) { return a += b; }
  friend Vec operator*(const Vec& a, const Vec& b) {
    Vec r;
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  friend Vec operator*(T a, const Vec& b) {
    Vec r;
    for (int i = 0; i < N; ++i) r.v[i] = a * b.v[i];
    return r;
  }
};
typedef Vec<float, 8> vf8;
typedef Vec<double, 4> vd4;
#endif
#if FASTMAML_VECTOR_EXT
typedef double vd8 __attribute__((vector_size(64)));
#else
typedef Vec<double, 8> vd8;
#endif

template <class T>
struct Lanes;
template <>
struct Lanes<float> {
  using V = vf8;
  static constexpr index_t W = 8;
  static constexpr index_t kBlock = 256;  // features per float32 block
  // The Gram tiles' block: their reduction into float64 (shuffles, converts)
  // was 11% of a tile at 256 (W2: n = 100, d = 784); at 1024 a tile runs at
  // the FMA peak. Each lane still sums at most 128 products in float32.
  static constexpr index_t kGramBlock = 1024;
};
template <>
struct Lanes<double> {
  using V = vd4;
  static constexpr index_t W = 4;
  static constexpr index_t kBlock = index_t(1) << 40;  // one block
  static constexpr index_t kGramBlock = kBlock;
};

template <class V, class T>
FASTMAML_INLINE inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V, class T>
FASTMAML_INLINE inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// Four accumulators reduced at once by a shuffle tree (one transpose-add
// instead of four horizontal sums): returns their lane sums, each formed in
// the same fixed order.
#if FASTMAML_VECTOR_EXT
FASTMAML_INLINE inline void reduce4(const vf8& v0, const vf8& v1, const vf8& v2, const vf8& v3, double* out) {
  const vf8 s01 = __builtin_shufflevector(v0, v1, 0, 8, 1, 9, 2, 10, 3, 11) +
                  __builtin_shufflevector(v0, v1, 4, 12, 5, 13, 6, 14, 7, 15);
  const vf8 s23 = __builtin_shufflevector(v2, v3, 0, 8, 1, 9, 2, 10, 3, 11) +
                  __builtin_shufflevector(v2, v3, 4, 12, 5, 13, 6, 14, 7, 15);
  const vf8 u = __builtin_shufflevector(s01, s23, 0, 1, 8, 9, 2, 3, 10, 11) +
                __builtin_shufflevector(s01, s23, 4, 5, 12, 13, 6, 7, 14, 15);
  for (int q = 0; q < 4; ++q) out[q] += static_cast<double>(u[q]) + static_cast<double>(u[q + 4]);
}
FASTMAML_INLINE inline void reduce4(const vd4& v0, const vd4& v1, const vd4& v2, const vd4& v3, double* out) {
  const vd4 s01 = __builtin_shufflevector(v0, v1, 0, 4, 1, 5) + __builtin_shufflevector(v0, v1, 2, 6, 3, 7);
  const vd4 s23 = __builtin_shufflevector(v2, v3, 0, 4, 1, 5) + __builtin_shufflevector(v2, v3, 2, 6, 3, 7);
  const vd4 u = __builtin_shufflevector(s01, s23, 0, 1, 4, 5) + __builtin_shufflevector(s01, s23, 2, 3, 6, 7);
  for (int q = 0; q < 4; ++q) out[q] += u[q];
}
#else
// The same shuffle tree, lane by lane: shuffle(a, b, idx)[j] picks lane
// idx[j] of the concatenation [a, b].
template <class V, int N>
FASTMAML_INLINE inline V shuffle_add(const V& a, const V& b, const int (&lo)[N], const int (&hi)[N]) {
  V r;
  for (int j = 0; j < N; ++j)
    r.v[j] = (lo[j] < N ? a.v[lo[j]] : b.v[lo[j] - N]) + (hi[j] < N ? a.v[hi[j]] : b.v[hi[j] - N]);
  return r;
}
FASTMAML_INLINE inline void reduce4(const vf8& v0, const vf8& v1, const vf8& v2, const vf8& v3, double* out) {
  static constexpr int p[8] = {0, 8, 1, 9, 2, 10, 3, 11}, q[8] = {4, 12, 5, 13, 6, 14, 7, 15};
  static constexpr int r[8] = {0, 1, 8, 9, 2, 3, 10, 11}, s[8] = {4, 5, 12, 13, 6, 7, 14, 15};
  const vf8 u = shuffle_add(shuffle_add(v0, v1, p, q), shuffle_add(v2, v3, p, q), r, s);
  for (int k = 0; k < 4; ++k) out[k] += static_cast<double>(u[k]) + static_cast<double>(u[k + 4]);
}
FASTMAML_INLINE inline void reduce4(const vd4& v0, const vd4& v1, const vd4& v2, const vd4& v3, double* out) {
  static constexpr int p[4] = {0, 4, 1, 5}, q[4] = {2, 6, 3, 7}, r[4] = {0, 1, 4, 5}, s[4] = {2, 3, 6, 7};
  const vd4 u = shuffle_add(shuffle_add(v0, v1, p, q), shuffle_add(v2, v3, p, q), r, s);
  for (int k = 0; k < 4; ++k) out[k] += u[k];
}
#endif

// out[a][b] = <A_a, B_b> for 4 x NB rows (NB = 1, 2 or 4): one register tile,
// float32 sums in blocks of `Block` features added in float64. reduce4 sums
// each of its four vectors by the same tree, whichever slot it takes, so an
// entry's bits do not depend on NB.
// hook() runs before every kHookStep vector steps (gram_tiles spreads its
// prefetches with it); the sums do not see it.
struct NoHook {
  FASTMAML_INLINE void operator()() const {}
};
constexpr index_t kHookStep = 32;
// One block of a register tile: acc[a][b] = sum over k in [k0, k1) of
// A_a[k] * B_b[k], lane by lane in float32 (T), hook() before every
// kHookStep vector steps.
template <class T, int MA, int NB, class V, class Hook>
FASTMAML_INLINE inline void tile_sums(const T* const* A, const T* const* B, index_t k0, index_t k1, V (&acc)[MA][NB],
                                      const Hook& hook) {
  constexpr index_t W = Lanes<T>::W;
  for (int a = 0; a < MA; ++a)
    for (int b = 0; b < NB; ++b) acc[a][b] = V{};
  for (index_t kc = k0; kc < k1; kc += kHookStep * W) {
    hook();
    const index_t kce = std::min(k1, kc + kHookStep * W);
    for (index_t k = kc; k < kce; k += W) {
      V bv[NB];
      for (int b = 0; b < NB; ++b) bv[b] = vload<V>(B[b] + k);
      for (int a = 0; a < MA; ++a) {
        const V av = vload<V>(A[a] + k);
        for (int b = 0; b < NB; ++b) acc[a][b] += av * bv[b];
      }
    }
  }
}
template <class T, int NB, index_t Block = Lanes<T>::kBlock, class Hook = NoHook>
FASTMAML_INLINE inline void dot_tile(const T* const* A, const T* const* B, index_t d, double (*out)[4],
                                     const Hook& hook = Hook{}) {
  using L = Lanes<T>;
  using V = typename L::V;
  constexpr index_t W = L::W;
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) out[a][b] = 0.0;
  const index_t dv = d - d % W;
  for (index_t k0 = 0; k0 < dv; k0 += Block) {
    const index_t k1 = std::min(dv, k0 + Block);
    V acc[4][NB];
    tile_sums<T, 4, NB>(A, B, k0, k1, acc, hook);
    if constexpr (NB == 4) {
      for (int a = 0; a < 4; ++a) reduce4(acc[a][0], acc[a][1], acc[a][2], acc[a][3], out[a]);
    } else if constexpr (NB == 2) {
      for (int a = 0; a < 4; a += 2) {
        double two[4] = {out[a][0], out[a][1], out[a + 1][0], out[a + 1][1]};
        reduce4(acc[a][0], acc[a][1], acc[a + 1][0], acc[a + 1][1], two);
        out[a][0] = two[0];
        out[a][1] = two[1];
        out[a + 1][0] = two[2];
        out[a + 1][1] = two[3];
      }
    } else {
      double col[4] = {out[0][0], out[1][0], out[2][0], out[3][0]};
      reduce4(acc[0][0], acc[1][0], acc[2][0], acc[3][0], col);
      for (int a = 0; a < 4; ++a) out[a][0] = col[a];
    }
  }
  for (index_t k = dv; k < d; ++k)  // feature tail, scalar in double
    for (int a = 0; a < 4; ++a)
      for (int b = 0; b < NB; ++b) out[a][b] += static_cast<double>(A[a][k]) * static_cast<double>(B[b][k]);
}

// out[a][b] = <A_a, B_b> for MA x NB rows: dot_tile's operations for a
// larger tile (gram_tiles' 5 x 5 for n = 5, 9, 10 on 32 vector registers: 25
// accumulators, 10 loads a step feeding 25 FMAs). Each entry is reduced by
// reduce4's tree into float64 per block, as in dot_tile, so it has the same
// bits in any tile.
template <class T, int MA, int NB, index_t Block = Lanes<T>::kBlock, class Hook = NoHook>
FASTMAML_INLINE inline void dot_tile_mn(const T* const* A, const T* const* B, index_t d, double (*out)[NB],
                                        const Hook& hook = Hook{}) {
  using L = Lanes<T>;
  using V = typename L::V;
  constexpr index_t W = L::W;
  constexpr int N = MA * NB, NP = (N + 3) / 4 * 4;
  double flat[NP];
  for (int q = 0; q < NP; ++q) flat[q] = 0.0;
  const index_t dv = d - d % W;
  for (index_t k0 = 0; k0 < dv; k0 += Block) {
    const index_t k1 = std::min(dv, k0 + Block);
    V acc[MA][NB];
    tile_sums<T, MA, NB>(A, B, k0, k1, acc, hook);
    V all[NP];
    for (int a = 0; a < MA; ++a)
      for (int b = 0; b < NB; ++b) all[a * NB + b] = acc[a][b];
    for (int q = N; q < NP; ++q) all[q] = V{};
    for (int q = 0; q < NP; q += 4) reduce4(all[q], all[q + 1], all[q + 2], all[q + 3], flat + q);
  }
  for (index_t k = dv; k < d; ++k)  // feature tail, scalar in double
    for (int a = 0; a < MA; ++a)
      for (int b = 0; b < NB; ++b) flat[a * NB + b] += static_cast<double>(A[a][k]) * static_cast<double>(B[b][k]);
  for (int a = 0; a < MA; ++a)
    for (int b = 0; b < NB; ++b) out[a][b] = flat[a * NB + b];
}

// z[a] = <A_a, v> for 8 rows: dot_tile<T, 1> on rows 0-3 and 4-7 at once.
// Eight independent accumulator chains instead of four (a chain of FMAs
// waits on its own latency), and every row's sum is formed by exactly the
// operations dot_tile<T, 1> uses for it: the same bits, more in flight.
template <class T>
FASTMAML_INLINE inline void dot_col8(const T* const* A, const T* v, index_t d, double* z) {
  using L = Lanes<T>;
  using V = typename L::V;
  constexpr index_t W = L::W;
  double lo[4] = {0.0, 0.0, 0.0, 0.0}, hi[4] = {0.0, 0.0, 0.0, 0.0};
  const index_t dv = d - d % W;
  for (index_t k0 = 0; k0 < dv; k0 += L::kBlock) {
    const index_t k1 = std::min(dv, k0 + L::kBlock);
    V acc[8];
    for (int a = 0; a < 8; ++a) acc[a] = V{};
    for (index_t k = k0; k < k1; k += W) {
      const V bv = vload<V>(v + k);
      for (int a = 0; a < 8; ++a) acc[a] += vload<V>(A[a] + k) * bv;
    }
    reduce4(acc[0], acc[1], acc[2], acc[3], lo);
    reduce4(acc[4], acc[5], acc[6], acc[7], hi);
  }
  for (index_t k = dv; k < d; ++k)  // feature tail, scalar in double
    for (int a = 0; a < 4; ++a) {
      lo[a] += static_cast<double>(A[a][k]) * static_cast<double>(v[k]);
      hi[a] += static_cast<double>(A[a + 4][k]) * static_cast<double>(v[k]);
    }
  for (int a = 0; a < 4; ++a) {
    z[a] = lo[a];
    z[a + 4] = hi[a];
  }
}

// z[a] = <A_a, v> for the first min(left, 8) of 8 rows: dot_col8, or the
// 4-row tile when at most 4 are left (small n wastes no row-sized work; a
// row's result is the same either way).
template <class T>
FASTMAML_INLINE inline void dot_rows(const T* const* A, index_t left, const T* v, index_t d, double* z) {
  if (left > 4) {
    dot_col8(A, v, d, z);
    return;
  }
  const T* B[1] = {v};
  double o[4][4];
  dot_tile<T, 1>(A, B, d, o);
  for (int a = 0; a < 4; ++a) z[a] = o[a][0];
}

// Software prefetch of rows a later pass reads for the first time (the
// query rows, while the Gram tiles run): `per_step` cache lines a step, into
// L2, row by row. A hint only: it never changes a result. gram_tiles sizes
// the steps by the first `first_rows` rows (those it must cover, or none);
// rows after them (the next task's) take what the cap per step leaves.
template <class T>
struct RowPrefetch {
  const T* const* rows = nullptr;
  index_t nrows = 0, row_bytes = 0, row = 0, off = 0;
  index_t per_step = 0;
  index_t first_rows = -1;  // -1: all nrows
  static constexpr index_t kMaxPerTile = 32;
  FASTMAML_INLINE void step() {
    for (index_t s = 0; s < per_step && row < nrows; ++s) {
#if defined(__GNUC__) || defined(__clang__)
      __builtin_prefetch(reinterpret_cast<const char*>(rows[row]) + off, 0, 2);
#endif
      off += 64;
      if (off >= row_bytes) {
        off = 0;
        ++row;
      }
    }
  }
};

// G = X X^T (both triangles) in 4 x NB register tiles of rows. With v, also
// z[i] = <x_i, v>: each row tile's 4 rows against v while they are in L1
// after the tile row, by dot_tile<T, 1> (xv_body's operations, so the same
// bits as an X v pass, without the pass).
template <class T, int NB, int MA = 4>
FASTMAML_INLINE inline void gram_tiles(const T* const* rows, index_t n, index_t d, double* FASTMAML_RESTRICT G,
                                       RowPrefetch<T>* pf, const T* v, double* FASTMAML_RESTRICT z) {
  static_assert(MA == 4 || MA == NB, "row tiles of 4, or square");
  const T* A[MA];
  const T* B[NB > 4 ? NB : 4] = {};
  double tileo[MA][NB > 4 ? NB : 4];
  if (pf) {
    // Spread the lines over the tiles; only where the tiles are many enough
    // (a burst of more lines a tile stalls them: W1's n = 20 measured slower
    // with 4 x 4 tiles). The bound scales with the tile's size.
    index_t tiles = 0;
    for (index_t i0 = 0; i0 < n; i0 += MA) tiles += (std::min(n, i0 + MA) + NB - 1) / NB;
    const index_t row_lines = (pf->row_bytes + 63) / 64, cap = RowPrefetch<T>::kMaxPerTile * NB / 4;
    const index_t first = pf->first_rows < 0 ? pf->nrows : std::min(pf->first_rows, pf->nrows);
    if ((first * row_lines + tiles - 1) / tiles > cap) {
      pf = nullptr;
    } else {
      // a tile's lines in even shares, one before every kHookStep vector steps
      const index_t W = Lanes<T>::W, dv = d - d % W;
      const index_t hooks = std::max<index_t>(1, (dv / W + kHookStep - 1) / kHookStep);
      const index_t per_tile = std::min(cap, (pf->nrows * row_lines + tiles - 1) / tiles);
      pf->per_step = (per_tile + hooks - 1) / hooks;
    }
  }
  auto hook = [pf]() {
    if (pf) pf->step();
  };
  for (index_t i0 = 0; i0 < n; i0 += MA) {
    for (int a = 0; a < MA; ++a) A[a] = rows[std::min(i0 + a, n - 1)];
    for (index_t k0 = 0; k0 < std::min(n, i0 + MA); k0 += NB) {
      for (int b = 0; b < NB; ++b) B[b] = rows[std::min(k0 + b, n - 1)];
      if constexpr (MA == 4)
        dot_tile<T, NB, Lanes<T>::kGramBlock>(A, B, d, tileo, hook);
      else
        dot_tile_mn<T, MA, NB, Lanes<T>::kGramBlock>(A, B, d, tileo, hook);
      for (int a = 0; a < MA && i0 + a < n; ++a)
        for (int b = 0; b < NB && k0 + b < n; ++b) {
          const index_t i = i0 + a, k = k0 + b;
          if (k > i) continue;  // the tiles across the diagonal: keep one triangle, mirror it
          G[i * n + k] = tileo[a][b];
          G[k * n + i] = tileo[a][b];
        }
    }
    if (v) {
      // each row against v by dot_tile<T, 1>, 4 rows at a time
      const T* V1[1] = {v};
      for (index_t r0 = i0; r0 < std::min(n, i0 + MA); r0 += 4) {
        const T* A4[4];
        for (int a = 0; a < 4; ++a) A4[a] = rows[std::min(r0 + a, n - 1)];
        double o[4][4];
        dot_tile<T, 1>(A4, V1, d, o);
        for (int a = 0; a < 4 && r0 + a < std::min(n, i0 + MA); ++a) z[r0 + a] = o[a][0];
      }
    }
  }
}
// 4 x 4 tiles with 32 vector registers (AVX-512), 4 x 2 with 16 (AVX2, where
// 16 accumulators and 4 B vectors spilled in the inner loop): the same bits.
template <class T>
FASTMAML_INLINE inline void gram_body(const T* const* rows, index_t n, index_t d, double* FASTMAML_RESTRICT G,
                                      RowPrefetch<T>* pf = nullptr, const T* v = nullptr,
                                      double* FASTMAML_RESTRICT z = nullptr) {
  if (has_32_vector_registers()) {
    // n = 5, 9, 10: 5 x 5 tiles, fewer products than the 4 x 4 tiles (n = 10:
    // 3 tiles, 75 products, 10 loads a step for 25 FMAs, against 6 tiles and
    // 96 products; n = 5: 25 against 48). Zen 4, float32, d = 784, 32 tasks
    // (L3), per task: n = 10 1.75-1.85 -> 1.34-1.36 us, n = 5 0.85 -> 0.42 us.
    // At n = 6 ... 8 the 4 x 4 tiles make 48 products against 75 (0.85
    // against 1.22 us), and from 11 on 96 against 150.
    if (n == 5 || n == 9 || n == 10)
      gram_tiles<T, 5, 5>(rows, n, d, G, pf, v, z);
    else
      gram_tiles<T, 4>(rows, n, d, G, pf, v, z);
  } else {
    gram_tiles<T, 2>(rows, n, d, G, pf, v, z);
  }
}

// z[i] = <x_i, v> (weights only; no bias)
template <class T>
FASTMAML_INLINE inline void xv_body(const T* const* rows, index_t n, index_t d, const T* v, double* FASTMAML_RESTRICT z) {
  const T* A[8];
  double o[8];
  for (index_t i0 = 0; i0 < n; i0 += 8) {
    for (int a = 0; a < 8; ++a) A[a] = rows[std::min(i0 + a, n - 1)];
    dot_rows(A, n - i0, v, d, o);
    for (int a = 0; a < 8 && i0 + a < n; ++a) z[i0 + a] = o[a];
  }
}

// out += c[0] A[0] + ... + c[R-1] A[R-1], entry by entry in row order (FMA
// after FMA), with out loaded and stored once per R rows: the same bits for
// any R.
template <class T, int R>
FASTMAML_INLINE inline void add_rows(T* FASTMAML_RESTRICT out, const T* const* A, const T* c, index_t d) {
  using V = typename Lanes<T>::V;
  constexpr index_t W = Lanes<T>::W;
  const index_t dw = d - d % W;
  for (index_t k = 0; k < dw; k += W) {
    V acc = vload<V>(out + k);
    for (int a = 0; a < R; ++a) acc += c[a] * vload<V>(A[a] + k);
    vstore(out + k, acc);
  }
  for (index_t k = dw; k < d; ++k) {
    T acc = out[k];
    for (int a = 0; a < R; ++a) acc += c[a] * A[a][k];
    out[k] = acc;
  }
}

// out[k] = c0 * base[k] + sum_i coef[i] x_i[k]  for k < d, in T, rows in order
// (base may be null: c0 ignored). 8 vectors of features at a time stay in registers.
template <class T>
FASTMAML_INLINE inline void xtr_body(const T* const* rows, index_t n, index_t d, const double* coef, double c0, const T* base,
                     T* FASTMAML_RESTRICT out) {
  using L = Lanes<T>;
  using V = typename L::V;
  constexpr index_t W = L::W;
  // 8 vectors a strip: eight independent FMA chains (four left the FMA
  // units half idle, each chain waiting on its own latency). Each feature is
  // the same row-ordered sum at any strip width.
  constexpr index_t S = 8 * W;
  T cf[256];
  const index_t nb = std::min<index_t>(n, 256);
  for (index_t i = 0; i < nb; ++i) cf[i] = static_cast<T>(coef[i]);
  if (n >= 12) {
    // From 12 rows on: out starts as c0 base, then takes 4 rows at a time
    // over all features (add_rows: out loaded and stored once per 4 rows).
    // The strips below read a few lines of every row per strip, n streams at
    // once, which the L2 prefetcher does not follow: on a Zen 4, float32,
    // d = 784, hot in L2, n = 20 0.79 -> 0.64 us, n = 100 4.4 -> 3.1 us (the
    // L2's bandwidth); at n = 10 the strips win (0.31 against 0.36 us).
    // Each entry is the same row-ordered chain of FMAs: the same bits.
    const index_t dw = d - d % W;
    for (index_t k = 0; k < dw; k += W) vstore(out + k, base ? static_cast<T>(c0) * vload<V>(base + k) : V{});
    for (index_t k = dw; k < d; ++k) out[k] = base ? static_cast<T>(c0) * base[k] : T(0);
    T c4[4];
    index_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int a = 0; a < 4; ++a) c4[a] = i + a < nb ? cf[i + a] : static_cast<T>(coef[i + a]);
      add_rows<T, 4>(out, rows + i, c4, d);
    }
    for (; i < n; ++i) {
      c4[0] = i < nb ? cf[i] : static_cast<T>(coef[i]);
      add_rows<T, 1>(out, rows + i, c4, d);
    }
    return;
  }
  const index_t ds = d - d % S;
  for (index_t k = 0; k < ds; k += S) {
    V acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = base ? static_cast<T>(c0) * vload<V>(base + k + q * W) : V{};
    for (index_t i = 0; i < n; ++i) {
      const T c = i < nb ? cf[i] : static_cast<T>(coef[i]);
      const T* x = rows[i] + k;
      for (int q = 0; q < 8; ++q) acc[q] += c * vload<V>(x + q * W);
    }
    for (int q = 0; q < 8; ++q) vstore(out + k + q * W, acc[q]);
  }
  const index_t dw = d - d % W;
  for (index_t k = ds; k < dw; k += W) {
    V acc = base ? static_cast<T>(c0) * vload<V>(base + k) : V{};
    for (index_t i = 0; i < n; ++i) acc += (i < nb ? cf[i] : static_cast<T>(coef[i])) * vload<V>(rows[i] + k);
    vstore(out + k, acc);
  }
  for (index_t k = dw; k < d; ++k) {
    T acc = base ? static_cast<T>(c0) * base[k] : T(0);
    for (index_t i = 0; i < n; ++i) acc += (i < nb ? cf[i] : static_cast<T>(coef[i])) * rows[i][k];
    out[k] = acc;
  }
}

// One pass over the rows in blocks of 4 (the plain sweep): z = X v + vb for
// the block, coef = row_fn(z) (binary link residual and curvature, or the
// Hessian row s z), then out += X^T coef while the 4 rows are in L1. out is
// zeroed first; returns sum(coef) (the bias entry). mode 0: forward link
// (y, scale -> coef = (p - y) scale, curv = p (1 - p)); mode 1: HVP
// (coef = curv z scale).
template <class T>
FASTMAML_INLINE inline double fused_rows_body(const T* const* rows, index_t n, index_t d, const T* v, double vb, int mode,
                              const std::int32_t* y, double scale, double* coef, double* curv, T* FASTMAML_RESTRICT out,
                              double* hinge) {
  std::fill(out, out + d, T(0));
  // Blocks of 8 rows: 8 independent chains for the logits (dot_col8), and
  // out is loaded and stored once per 8 rows. Each entry of out is still the
  // row-ordered chain out += c_i x_i (FMA after FMA), so the bits do not
  // depend on the block size; the link runs row by row in order.
  const T* A[8];
  double o[8];
  double bias = 0.0;
  for (index_t i0 = 0; i0 < n; i0 += 8) {
    const index_t nb = std::min<index_t>(8, n - i0);
    for (int a = 0; a < 8; ++a) A[a] = rows[std::min(i0 + a, n - 1)];
    dot_rows(A, nb, v, d, o);
    double z[8];
    for (index_t a = 0; a < nb; ++a) z[a] = o[a] + vb;  // dot_rows sets only these
    if (mode != 1) {
      // The link over the block's 8 slots at once (vmath::binary_rows_body,
      // vectorised; a short block's spare slots take z = 0, label 0, and
      // are dropped): the same values per row as a row-by-row link, which
      // cost about 60 cycles a row in scalar code. mode 0: curv = p (1 - p);
      // mode 2 (query): curv = exp(-|z|), hinge += max(+-z, 0) in row order.
      double zz[8], cf8[8], s8[8], e8[8];
      std::int32_t y8[8];
      for (int a = 0; a < 8; ++a) {
        zz[a] = a < nb ? z[a] : 0.0;
        y8[a] = a < nb ? y[i0 + a] : 0;
      }
      (void)vmath::binary_rows_body(zz, y8, 8, scale, cf8, s8, e8);
      for (index_t a = 0; a < nb; ++a) {
        const index_t i = i0 + a;
        coef[i] = cf8[a];
        curv[i] = mode == 0 ? s8[a] : e8[a];
        if (mode == 2) {
          const double h = y[i] == 1 ? -z[a] : z[a];
          *hinge += h > 0.0 ? h : 0.0;
        }
        bias += coef[i];
      }
    } else {
      for (index_t a = 0; a < nb; ++a) {
        const index_t i = i0 + a;
        coef[i] = curv[i] * z[a] * scale;
        bias += coef[i];
      }
    }
    T c[8];
    for (index_t a = 0; a < nb; ++a) c[a] = static_cast<T>(coef[i0 + a]);
    if (nb == 8) {
      add_rows<T, 8>(out, A, c, d);
    } else {
      index_t a = 0;
      if (nb >= 4) {  // the tail block's first 4 rows in one pass
        add_rows<T, 4>(out, A, c, d);
        a = 4;
      }
      for (; a < nb; ++a) add_rows<T, 1>(out, A + a, c + a, d);
    }
  }
  return bias;
}

// Whether x (len) is all finite: the vectorised form of all_finite
// (kernels.hpp), for outputs as large as the feature gradients. x * 0 is 0
// for finite x and NaN otherwise, so the sum is 0 in any order.
template <class T>
FASTMAML_INLINE inline bool finite_body(const T* x, index_t len) {
  using Vt = typename Lanes<T>::V;
  constexpr index_t W = Lanes<T>::W;
  Vt acc[4] = {Vt{}, Vt{}, Vt{}, Vt{}};  // four chains: the adds do not wait on each other
  index_t k = 0;
  for (; k + 4 * W <= len; k += 4 * W)
    for (int q = 0; q < 4; ++q) acc[q] += T(0) * vload<Vt>(x + k + q * W);
  for (; k + W <= len; k += W) acc[0] += T(0) * vload<Vt>(x + k);
  T s = T(0);
  for (int q = 0; q < 4; ++q)
    for (index_t l = 0; l < W; ++l) s += acc[q][static_cast<int>(l)];
  for (; k < len; ++k) s += T(0) * x[k];
  return s == T(0);
}

// out (n x d) row i = sum_l cf[l * n + i] V_l, l in order, for L vectors V_l
// (d, by pointer) and coefficients cf (L x n): the per-step rank-1 terms of
// the feature gradients (fastsweep.hpp) as one product (n x L)(L x d).
// 4 rows x 2 vectors of features stay in registers over all L terms; each
// output entry is the same l-ordered sum wherever it sits in the tile grid
// (tail tiles repeat the last row and drop its results).
template <class T>
FASTMAML_INLINE inline void combine_body(index_t n, index_t d, index_t L, const T* cf, const T* const* V,
                                         T* FASTMAML_RESTRICT out) {
  using Ln = Lanes<T>;
  using Vt = typename Ln::V;
  constexpr index_t W = Ln::W;
  const index_t ds = d - d % (2 * W), dw = d - d % W;
  for (index_t i0 = 0; i0 < n; i0 += 4) {
    const index_t nb = std::min<index_t>(4, n - i0);
    index_t ri[4];
    for (int a = 0; a < 4; ++a) ri[a] = std::min(i0 + a, n - 1);
    for (index_t k = 0; k < ds; k += 2 * W) {
      Vt acc[4][2];
      for (int a = 0; a < 4; ++a) acc[a][0] = acc[a][1] = Vt{};
      for (index_t l = 0; l < L; ++l) {
        const Vt v0 = vload<Vt>(V[l] + k), v1 = vload<Vt>(V[l] + k + W);
        const T* c = cf + l * n;
        for (int a = 0; a < 4; ++a) {
          const T ca = c[ri[a]];
          acc[a][0] += ca * v0;
          acc[a][1] += ca * v1;
        }
      }
      for (index_t a = 0; a < nb; ++a) {
        vstore(out + (i0 + a) * d + k, acc[a][0]);
        vstore(out + (i0 + a) * d + k + W, acc[a][1]);
      }
    }
    for (index_t k = ds; k < dw; k += W) {
      Vt acc[4];
      for (int a = 0; a < 4; ++a) acc[a] = Vt{};
      for (index_t l = 0; l < L; ++l) {
        const Vt v0 = vload<Vt>(V[l] + k);
        const T* c = cf + l * n;
        for (int a = 0; a < 4; ++a) acc[a] += c[ri[a]] * v0;
      }
      for (index_t a = 0; a < nb; ++a) vstore(out + (i0 + a) * d + k, acc[a]);
    }
    for (index_t k = dw; k < d; ++k) {
      for (index_t a = 0; a < nb; ++a) {
        T acc = T(0);
        for (index_t l = 0; l < L; ++l) acc += cf[l * n + i0 + a] * V[l][k];
        out[(i0 + a) * d + k] = acc;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Lane-major kernels (LockstepGram's packed path, fastsweep.hpp): 8 tasks'
// rows packed as P[(i * d + q) * 8 + l] (row i, feature q, task lane l), so
// every product below is elementwise over the 8 lanes: no horizontal sums,
// and a task's result is the same in every lane. Sums over features run in
// order in the rows' dtype over chunks of 32 features (float32; one chunk
// in float64), the chunks added in float64, as accurate as the tile
// kernels' blocks; sums over rows run in order as in xtr_body. Packing
// (pack_lanes) is 8 x 8 transposes into bounded per-thread scratch: the pass
// that reads the task data.
template <class T>
struct Lane8;
template <>
struct Lane8<float> {
  using V = vf8;
  // Features per float32 partial sum, then added into float64: 32 terms, as
  // many as a lane of the tile kernels' float32 blocks sums.
  static constexpr index_t kChunk = 32;
};
template <>
struct Lane8<double> {
  using V = vd8;
  static constexpr index_t kChunk = index_t(1) << 40;  // one chunk
};

template <class V, class T>
FASTMAML_INLINE inline V splat(T s) {
  V v;
  for (int l = 0; l < 8; ++l) v[l] = s;
  return v;
}

// dst[j * 8 + l] = src[l][j] for j, l < 8: one 8 x 8 block of the packing.
FASTMAML_INLINE inline void transpose8(const float* const* src, float* FASTMAML_RESTRICT dst) {
#if FASTMAML_VECTOR_EXT
  vf8 r[8];
  for (int l = 0; l < 8; ++l) r[l] = vload<vf8>(src[l]);
  vf8 t[8], u[8];
  for (int p = 0; p < 4; ++p) {
    t[2 * p] = __builtin_shufflevector(r[2 * p], r[2 * p + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[2 * p + 1] = __builtin_shufflevector(r[2 * p], r[2 * p + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int h = 0; h < 2; ++h) {
    const int b = 4 * h;
    u[b + 0] = __builtin_shufflevector(t[b + 0], t[b + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[b + 1] = __builtin_shufflevector(t[b + 0], t[b + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[b + 2] = __builtin_shufflevector(t[b + 1], t[b + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[b + 3] = __builtin_shufflevector(t[b + 1], t[b + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int j = 0; j < 4; ++j) {
    vstore(dst + j * 8, vf8(__builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11)));
    vstore(dst + (j + 4) * 8, vf8(__builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15)));
  }
#else
  for (int j = 0; j < 8; ++j)
    for (int l = 0; l < 8; ++l) dst[j * 8 + l] = src[l][j];
#endif
}
FASTMAML_INLINE inline void transpose8(const double* const* src, double* FASTMAML_RESTRICT dst) {
  for (int j = 0; j < 8; ++j)
    for (int l = 0; l < 8; ++l) dst[j * 8 + l] = src[l][j];
}

// Packs row i of every lane: rows[l][i] (d features) into P.
template <class T>
FASTMAML_INLINE inline void pack_lanes(const T* const* const* rows, index_t nrows, index_t d, T* FASTMAML_RESTRICT P) {
  for (index_t i = 0; i < nrows; ++i) {
    const T* src[8];
    for (int l = 0; l < 8; ++l) src[l] = rows[l][i];
    T* dst = P + i * d * 8;
    index_t q = 0;
    for (; q + 8 <= d; q += 8) {
      const T* s8[8];
      for (int l = 0; l < 8; ++l) s8[l] = src[l] + q;
      transpose8(s8, dst + q * 8);
    }
    for (; q < d; ++q)
      for (int l = 0; l < 8; ++l) dst[q * 8 + l] = src[l][q];
  }
}

// tot += the float64 values of 8 lanes (a chunk's partial sums). By
// reference, not by value: a 64-byte vector returned from a function built
// for the baseline ISA would change the ABI (GCC's -Wpsabi).
FASTMAML_INLINE inline void add_d8(vd8& tot, const vf8& v) {
#if FASTMAML_VECTOR_EXT
  tot += __builtin_convertvector(v, vd8);
#else
  for (int l = 0; l < 8; ++l) tot[l] += static_cast<double>(v[l]);
#endif
}
FASTMAML_INLINE inline void add_d8(vd8& tot, const vd8& v) { tot += v; }

// G[(i * n + k) * 8 + l] = <row i, row k> of lane l, both triangles, in TA x TB
// register tiles of lane vectors (tail tiles repeat the last row). Each entry
// is the same feature-ordered sum whatever the tile shape, so the shape may
// follow the register file (lanes_gram): the bits do not depend on it.
template <class T, int TA, int TB>
FASTMAML_INLINE inline void lanes_gram_tiles(const T* P, index_t n, index_t d, double* FASTMAML_RESTRICT G) {
  using V = typename Lane8<T>::V;
  for (index_t i0 = 0; i0 < n; i0 += TA) {
    const T* A[TA];
    for (int a = 0; a < TA; ++a) A[a] = P + std::min(i0 + a, n - 1) * d * 8;
    for (index_t k0 = 0; k0 < std::min(n, i0 + TA); k0 += TB) {
      const T* B[TB];
      for (int b = 0; b < TB; ++b) B[b] = P + std::min(k0 + b, n - 1) * d * 8;
      vd8 tot[TA][TB] = {};
      for (index_t q0 = 0; q0 < d; q0 += Lane8<T>::kChunk) {
        const index_t q1 = std::min(d, q0 + Lane8<T>::kChunk);
        V acc[TA][TB];
        for (int a = 0; a < TA; ++a)
          for (int b = 0; b < TB; ++b) acc[a][b] = V{};
        for (index_t q = q0; q < q1; ++q) {
          V bv[TB];
          for (int b = 0; b < TB; ++b) bv[b] = vload<V>(B[b] + q * 8);
          for (int a = 0; a < TA; ++a) {
            const V av = vload<V>(A[a] + q * 8);
            for (int b = 0; b < TB; ++b) acc[a][b] += av * bv[b];
          }
        }
        for (int a = 0; a < TA; ++a)
          for (int b = 0; b < TB; ++b) add_d8(tot[a][b], acc[a][b]);
      }
      for (int a = 0; a < TA && i0 + a < n; ++a)
        for (int b = 0; b < TB && k0 + b < n; ++b) {
          const index_t i = i0 + a, k = k0 + b;
          if (k > i) continue;  // the tiles across the diagonal: one triangle, mirrored
          vstore(G + (i * n + k) * 8, tot[a][b]);
          if (k != i) vstore(G + (k * n + i) * 8, tot[a][b]);
        }
    }
  }
}
// 4 x 4 tiles (16 accumulators) where the CPU has 32 vector registers
// (AVX-512: the x86-64-v4 clone runs), else 4 x 2: with 16 registers (AVX2)
// the 4 x 4 tile spilled accumulators to the stack in its inner loop. W3
// float32, 1 thread, on a Zen 3 EPYC (C++ harness, three interleaved rounds):
// 8.28-8.59 ms with 4 x 4, 7.75-8.05 ms with 4 x 2.
template <class T>
FASTMAML_INLINE inline void lanes_gram(const T* P, index_t n, index_t d, double* FASTMAML_RESTRICT G) {
  if (has_32_vector_registers())
    lanes_gram_tiles<T, 4, 4>(P, n, d, G);
  else
    lanes_gram_tiles<T, 4, 2>(P, n, d, G);
}

// z[i * 8 + l] = <row i of lane l, v_l> (+ vb[l] if vb): v lane-major
// (v[q * 8 + l]) or, with shared, one vector for every lane (v[q]). R rows
// a pass (R = 8 while more than 4 are left, else 4): R independent chains.
template <class T, int R>
FASTMAML_INLINE inline void lanes_dot_block(const T* P, index_t i0, index_t n, index_t d, const T* v, bool shared,
                                            double* z) {
  using V = typename Lane8<T>::V;
  const T* A[R];
  for (int a = 0; a < R; ++a) A[a] = P + std::min(i0 + a, n - 1) * d * 8;
  vd8 tot[R] = {};
  for (index_t q0 = 0; q0 < d; q0 += Lane8<T>::kChunk) {
    const index_t q1 = std::min(d, q0 + Lane8<T>::kChunk);
    V acc[R];
    for (int a = 0; a < R; ++a) acc[a] = V{};
    for (index_t q = q0; q < q1; ++q) {
      const V vv = shared ? splat<V>(v[q]) : vload<V>(v + q * 8);
      for (int a = 0; a < R; ++a) acc[a] += vload<V>(A[a] + q * 8) * vv;
    }
    for (int a = 0; a < R; ++a) add_d8(tot[a], acc[a]);
  }
  for (int a = 0; a < R && i0 + a < n; ++a) vstore(z + (i0 + a) * 8, tot[a]);
}
template <class T>
FASTMAML_INLINE inline void lanes_xv(const T* P, index_t n, index_t d, const T* v, bool shared, double* z) {
  for (index_t i0 = 0; i0 < n; i0 += 8) {
    if (n - i0 > 4)
      lanes_dot_block<T, 8>(P, i0, n, d, v, shared, z);
    else
      lanes_dot_block<T, 4>(P, i0, n, d, v, shared, z);
  }
}

// out[q * 8 + l] = base_l[q] * c0 + sum_i cf[i * 8 + l] P[i][q][l] for q < d,
// in T, rows in order: per lane the operations of xtr_body. base is
// lane-major (base[q * 8 + l]) or, with shared, one vector (base[q]); c0 is
// applied as T(c0) * base, as xtr_body does. Without base the sum starts
// from zero (the X^T r of fused_rows_body, per lane the same operations).
template <class T>
FASTMAML_INLINE inline void lanes_xtr(const T* P, index_t n, index_t d, const T* cf, double c0, const T* base,
                                      bool shared, T* FASTMAML_RESTRICT out) {
  using V = typename Lane8<T>::V;
  const T c0t = static_cast<T>(c0);
  index_t q0 = 0;
  for (; q0 + 8 <= d; q0 += 8) {
    V acc[8];
    for (int j = 0; j < 8; ++j)
      acc[j] = !base   ? V{}
               : shared ? splat<V>(static_cast<T>(c0t * base[q0 + j]))
                        : c0t * vload<V>(base + (q0 + j) * 8);
    for (index_t i = 0; i < n; ++i) {
      const V c = vload<V>(cf + i * 8);
      const T* x = P + (i * d + q0) * 8;
      for (int j = 0; j < 8; ++j) acc[j] += c * vload<V>(x + j * 8);
    }
    for (int j = 0; j < 8; ++j) vstore(out + (q0 + j) * 8, acc[j]);
  }
  for (; q0 < d; ++q0) {
    V acc = !base ? V{} : shared ? splat<V>(static_cast<T>(c0t * base[q0])) : c0t * vload<V>(base + q0 * 8);
    for (index_t i = 0; i < n; ++i) acc += vload<V>(cf + i * 8) * vload<V>(P + (i * d + q0) * 8);
    vstore(out + q0 * 8, acc);
  }
}

FASTMAML_CLONES inline double fused_rows(const float* const* rows, index_t n, index_t d, const float* v, double vb,
                                         int mode, const std::int32_t* y, double scale, double* coef, double* curv,
                                         float* out, double* hinge = nullptr) {
  return fused_rows_body(rows, n, d, v, vb, mode, y, scale, coef, curv, out, hinge);
}
FASTMAML_CLONES inline double fused_rows(const double* const* rows, index_t n, index_t d, const double* v, double vb,
                                         int mode, const std::int32_t* y, double scale, double* coef, double* curv,
                                         double* out, double* hinge = nullptr) {
  return fused_rows_body(rows, n, d, v, vb, mode, y, scale, coef, curv, out, hinge);
}

// out (n) = G in (n), G symmetric n x n, in double: column form
// out += G[:, k] in[k] (rows of G are its columns), vectorised over the
// output with no horizontal sums; k in order, so each out[i] is the same
// fixed-order sum for any n.
// out = G in for n >= 64 (G outgrows L1 there and the recursion streams it
// from L2 every step), reading only G's lower block triangle: 32-column
// strips S_b, rows k >= 32 b. A row segment G[k][S_b] is loaded once and used
// twice: out[S_b] += in[k] G[k][S_b] (8 vector chains, k in order) and, below
// the diagonal block, out[k] += <G[k][S_b], in[S_b]> (G symmetric: the
// entries G[S_b][k] the strip would otherwise read above the diagonal).
// Columns past the last full strip: out[k] (k there) = the row sums. Each
// out[i] is a fixed-order sum: its strip's chain, then the dot products of
// the strips before it in order.
FASTMAML_INLINE inline void gram_mul_sym_body(const double* G, index_t n, const double* in,
                                              double* FASTMAML_RESTRICT out) {
  const index_t nb = n / 32, tail = nb * 32;
  for (index_t k = 0; k < n; ++k) out[k] = 0.0;  // the dot-product parts
  for (index_t b = 0; b < nb; ++b) {
    const index_t i0 = 32 * b;
    vd4 x[8];
    for (int q = 0; q < 8; ++q) x[q] = vload<vd4>(in + i0 + 4 * q);
    vd4 a[8] = {};
    for (index_t k = i0; k < i0 + 32; ++k) {  // the diagonal block: the strip's own chains only
      const double c = in[k];
      const double* g = G + k * n + i0;
      for (int q = 0; q < 8; ++q) a[q] += c * vload<vd4>(g + 4 * q);
    }
    for (index_t k = i0 + 32; k < n; ++k) {
      const double c = in[k];
      const double* g = G + k * n + i0;
      vd4 s0{}, s1{};
      for (int q = 0; q < 8; q += 2) {
        const vd4 g0 = vload<vd4>(g + 4 * q), g1 = vload<vd4>(g + 4 * q + 4);
        a[q] += c * g0;
        a[q + 1] += c * g1;
        s0 += g0 * x[q];
        s1 += g1 * x[q + 1];
      }
      const vd4 s = s0 + s1;
      out[k] += (s[0] + s[2]) + (s[1] + s[3]);
    }
    for (int q = 0; q < 8; ++q) {
      const vd4 prior = vload<vd4>(out + i0 + 4 * q);
      vstore(out + i0 + 4 * q, a[q] + prior);
    }
  }
  for (index_t k = tail; k < n; ++k) {  // the last columns: row k of G against in, in order
    double s = 0.0;
    for (index_t i = tail; i < n; ++i) s += G[k * n + i] * in[i];
    out[k] += s;
  }
}

FASTMAML_INLINE inline void gram_mul_body(const double* G, index_t n, const double* in, double* FASTMAML_RESTRICT out) {
  if (n >= 64) {
    gram_mul_sym_body(G, n, in, out);
    return;
  }
  // 32 outputs held in registers across all k (8 independent FMA chains; no
  // store-to-load chain through out), then 16, then 4 at a time, then single
  // outputs: each out[i] is the same k-ordered sum in every variant.
  index_t i0 = 0;
  for (; i0 + 32 <= n; i0 += 32) {
    vd4 a[8] = {};
    for (index_t k = 0; k < n; ++k) {
      const double c = in[k];
      const double* g = G + k * n + i0;
      for (int q = 0; q < 8; ++q) a[q] += c * vload<vd4>(g + 4 * q);
    }
    for (int q = 0; q < 8; ++q) vstore(out + i0 + 4 * q, a[q]);
  }
  for (; i0 + 16 <= n; i0 += 16) {
    vd4 a0{}, a1{}, a2{}, a3{};
    for (index_t k = 0; k < n; ++k) {
      const double c = in[k];
      const double* g = G + k * n + i0;
      a0 += c * vload<vd4>(g);
      a1 += c * vload<vd4>(g + 4);
      a2 += c * vload<vd4>(g + 8);
      a3 += c * vload<vd4>(g + 12);
    }
    vstore(out + i0, a0);
    vstore(out + i0 + 4, a1);
    vstore(out + i0 + 8, a2);
    vstore(out + i0 + 12, a3);
  }
  for (; i0 + 4 <= n; i0 += 4) {
    vd4 a0{};
    for (index_t k = 0; k < n; ++k) a0 += in[k] * vload<vd4>(G + k * n + i0);
    vstore(out + i0, a0);
  }
  for (; i0 < n; ++i0) {
    vd4 a0{};  // lane 0 only: the same operation as one lane above
    for (index_t k = 0; k < n; ++k) a0[0] += in[k] * G[k * n + i0];
    out[i0] = a0[0];
  }
}

FASTMAML_CLONES inline void gram_mul(const double* G, index_t n, const double* in, double* out) {
  gram_mul_body(G, n, in, out);
}

FASTMAML_CLONES inline void gram(const float* const* rows, index_t n, index_t d, double* G) { gram_body(rows, n, d, G); }
FASTMAML_CLONES inline void gram(const double* const* rows, index_t n, index_t d, double* G) { gram_body(rows, n, d, G); }
FASTMAML_CLONES inline void xv(const float* const* rows, index_t n, index_t d, const float* v, double* z) {
  xv_body(rows, n, d, v, z);
}
FASTMAML_CLONES inline void xv(const double* const* rows, index_t n, index_t d, const double* v, double* z) {
  xv_body(rows, n, d, v, z);
}
FASTMAML_CLONES inline void combine(index_t n, index_t d, index_t L, const float* cf, const float* const* V,
                                    float* out) {
  combine_body(n, d, L, cf, V, out);
}
FASTMAML_CLONES inline void combine(index_t n, index_t d, index_t L, const double* cf, const double* const* V,
                                    double* out) {
  combine_body(n, d, L, cf, V, out);
}
FASTMAML_CLONES inline void xtr(const float* const* rows, index_t n, index_t d, const double* coef, double c0,
                                const float* base, float* out) {
  xtr_body(rows, n, d, coef, c0, base, out);
}
FASTMAML_CLONES inline void xtr(const double* const* rows, index_t n, index_t d, const double* coef, double c0,
                                const double* base, double* out) {
  xtr_body(rows, n, d, coef, c0, base, out);
}

}  // namespace tile
}  // namespace fastmaml

#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic pop
#endif
