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

#include "kernels.hpp"

namespace fastmaml {

struct BinaryLink {
  static constexpr bool kBinary = true;
  index_t cols() const { return 1; }
  // Writes r (1) and curv (1); returns the row loss.
  double row(const double* z, std::int32_t y, double* r, double* curv) const {
    const double p = sigmoid(z[0]);
    const double yy = static_cast<double>(y);
    r[0] = p - yy;
    if (curv) curv[0] = p * (1.0 - p);
    return softplus(z[0]) - yy * z[0];
  }
  void hvp_row(const double* curv, const double* u, double* out) const { out[0] = curv[0] * u[0]; }
  bool predicts(const double* z, std::int32_t y) const { return (z[0] > 0.0) == (y == 1); }
};

struct SoftmaxLink {
  static constexpr bool kBinary = false;
  index_t C = 2;
  index_t cols() const { return C; }
  double row(const double* z, std::int32_t y, double* r, double* curv) const {
    double zmax = z[0];
    for (index_t c = 1; c < C; ++c) zmax = std::max(zmax, z[c]);
    double sum = 0.0;
    for (index_t c = 0; c < C; ++c) {
      r[c] = std::exp(z[c] - zmax);  // in (0, 1]: no overflow for any logit
      sum += r[c];
    }
    const double inv = 1.0 / sum;
    for (index_t c = 0; c < C; ++c) {
      const double p = r[c] * inv;
      if (curv) curv[c] = p;
      r[c] = p - (c == y ? 1.0 : 0.0);
    }
    return zmax + std::log(sum) - z[y];
  }
  void hvp_row(const double* p, const double* u, double* out) const {
    double pu = 0.0;
    for (index_t c = 0; c < C; ++c) pu += p[c] * u[c];
    for (index_t c = 0; c < C; ++c) out[c] = p[c] * (u[c] - pu);
  }
  bool predicts(const double* z, std::int32_t y) const {
    index_t best = 0;
    for (index_t c = 1; c < C; ++c)
      if (z[c] > z[best]) best = c;
    return best == y;
  }
};

// z[c] = phi[d, c] + sum_k x[k] phi[k, c]  (phi is (d+1) x C, row-major),
// accumulated in double.
template <class T>
inline void row_logits(const T* __restrict x, const T* __restrict phi, index_t d, index_t C, double* z) {
  if (C == 1) {
    z[0] = dot_bias(x, phi, d, static_cast<double>(phi[d]));
    return;
  }
  for (index_t c = 0; c < C; ++c) z[c] = static_cast<double>(phi[d * C + c]);
  for (index_t k = 0; k < d; ++k) {
    const double xk = static_cast<double>(x[k]);
    const T* row = phi + k * C;
    for (index_t c = 0; c < C; ++c) z[c] += xk * static_cast<double>(row[c]);
  }
}

// out[(d+1) x C] = sum_i x~_i coef_i^T over the rows (coef is n x C).
template <class T>
inline void xt_times_mat(const T* const* rows, const double* coef, index_t n, index_t d, index_t C,
                         T* __restrict out) {
  if (C == 1) {
    xt_times(rows, coef, n, d, out);
    return;
  }
  std::fill(out, out + (d + 1) * C, T(0));
  for (index_t i = 0; i < n; ++i) {
    const T* x = rows[i];
    const double* ci = coef + i * C;
    for (index_t k = 0; k < d; ++k) {
      const double xk = static_cast<double>(x[k]);
      T* o = out + k * C;
      for (index_t c = 0; c < C; ++c) o[c] += static_cast<T>(xk * ci[c]);
    }
    T* o = out + d * C;
    for (index_t c = 0; c < C; ++c) o[c] += static_cast<T>(ci[c]);
  }
}

}  // namespace fastmaml
