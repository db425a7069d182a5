// Link functions: binary (sigmoid, one column) and multinomial (softmax, C
// columns). Each row of a set contributes, given its logits z (C numbers)
// and label y:
//   loss_row      softplus(z) - y z            |  logsumexp(z) - z_y
//   residual r    p - y                         |  p - onehot(y)
//   curvature     s = p (1 - p)  (1 number)     |  p (C numbers)
//   hvp_row(u)    s u                           |  p * u - p (p . u)
// so that the support Hessian-vector product is X~^T (hvp_row(X~ v)) / n.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.hpp"

namespace fastmaml {

struct BinaryLink {
  index_t cols() const { return 1; }
  // Writes r (1) and curv (1); returns the row loss. Written without
  // cancellation: for a confidently right row (y = 1, z = 40) p - y is
  // -sigmoid(-z), not 1 - 1, and the loss is softplus(-z), not
  // softplus(z) - z, so tiny residuals and losses keep their digits.
  double row(const double* z, std::int32_t y, double* r, double* curv, bool want_loss = true) const {
    // One exp per row: e = exp(-|z|) gives both sigmoid(z) and sigmoid(-z).
    const double e = std::exp(-std::fabs(z[0]));
    const double big = 1.0 / (1.0 + e), small = e * big;  // sigmoid(|z|), sigmoid(-|z|)
    const double pz = z[0] >= 0.0 ? big : small;            // sigmoid(z)
    const double pm = z[0] >= 0.0 ? small : big;            // sigmoid(-z)
    r[0] = y == 1 ? -pm : pz;
    if (curv) curv[0] = big * small;
    if (!want_loss) return 0.0;
    // softplus(+-z) = max(+-z, 0) + log1p(exp(-|z|))
    const double tail = std::log1p(e);
    return y == 1 ? std::max(-z[0], 0.0) + tail : std::max(z[0], 0.0) + tail;
  }
  void hvp_row(const double* curv, const double* u, double* out) const { out[0] = curv[0] * u[0]; }
};

struct SoftmaxLink {
  index_t C = 2;
  index_t cols() const { return C; }
  double row(const double* z, std::int32_t y, double* r, double* curv, bool want_loss = true) const {
    index_t top = 0;
    for (index_t c = 1; c < C; ++c)
      if (z[c] > z[top]) top = c;
    const double zmax = z[top];
    double rest = 0.0;  // sum of exp(z_c - zmax) over c != top, each in (0, 1]
    for (index_t c = 0; c < C; ++c) {
      r[c] = c == top ? 1.0 : std::exp(z[c] - zmax);
      if (c != top) rest += r[c];
    }
    const double inv = 1.0 / (1.0 + rest);
    double others_of_y = 0.0;  // sum of p_c over c != y, summed without 1 - p_y
    for (index_t c = 0; c < C; ++c) {
      const double p = r[c] * inv;
      if (curv) curv[c] = p;
      r[c] = p;
      if (c != y) others_of_y += p;
    }
    r[y] = -others_of_y;
    if (!want_loss) return 0.0;
    // logsumexp(z) - z_y = (zmax - z_y) + log1p(rest)
    return (zmax - z[y]) + std::log1p(rest);
  }
  void hvp_row(const double* p, const double* u, double* out) const {
    double pu = 0.0;
    for (index_t c = 0; c < C; ++c) pu += p[c] * u[c];
    for (index_t c = 0; c < C; ++c) out[c] = p[c] * (u[c] - pu);
  }
};

// Multinomial passes run class-major: the (d+1) x C parameters are
// transposed once per pass into C contiguous columns, so each logit is one
// SIMD dot product and each gradient column one SIMD axpy (a row-major inner
// loop over 2-10 classes does not vectorise).
template <class T>
struct ClassMajor {
  std::vector<T> cols;  // C x d
  std::vector<T> acc;   // C x d
  std::vector<double> bias;

  void load(const T* phi, index_t d, index_t C) {
    cols.resize(static_cast<size_t>(C * d));
    for (index_t k = 0; k < d; ++k)
      for (index_t c = 0; c < C; ++c) cols[c * d + k] = phi[k * C + c];
  }
  // z[c] = <x, phi[:, c]> (+ the bias row when phi is given)
  void logits(const T* x, const T* phi, index_t d, index_t C, double* z) const {
    for (index_t c = 0; c < C; ++c)
      z[c] = dot_kernel(x, cols.data() + c * d, d) + (phi ? static_cast<double>(phi[d * C + c]) : 0.0);
  }
  void zero(index_t d, index_t C) {
    acc.assign(static_cast<size_t>(C * d), T(0));
    bias.assign(static_cast<size_t>(C), 0.0);
  }
  void add(const T* x, const double* ci, index_t d, index_t C) {
    for (index_t c = 0; c < C; ++c) {
      axpy_kernel(acc.data() + c * d, x, d, ci[c]);
      bias[c] += ci[c];
    }
  }
  void store(T* out, index_t d, index_t C) const {
    for (index_t k = 0; k < d; ++k)
      for (index_t c = 0; c < C; ++c) out[k * C + c] = acc[c * d + k];
    for (index_t c = 0; c < C; ++c) out[d * C + c] = static_cast<T>(bias[c]);
  }
};

}  // namespace fastmaml
