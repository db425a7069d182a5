// The exact MAML sweep in the span of the support rows (docs/design.md section 3).
//
// With one step size per step (scalar or per-step inner_lr; any L2) every
// inner iterate stays in span{theta, support rows}:
//   W_j = a_j W_0 - X^T Cc_j,   b_j = bias row,   a_{j+1} = (1 - alpha_j lam) a_j
// so the support logits evolve through the n x n Gram matrix Kmat = X X^T:
//   U_{j+1} = (1 - alpha_j lam) U_j - alpha_j Kmat R_j,   U_j = X W_j
// and the reverse sweep likewise keeps gbar_w = beta_j gK_w - X^T Gamma_j.
// A meta-gradient then touches the support rows four times plus the Gram
// matrix (n^2 d / 2) instead of 4K times; per step the cost is O(n^2 C).
// The result is the same quantity as the plain sweep (tests prove agreement
// to rounding), chosen by a cost model of shapes only.
// Which path a call takes (and whether this one applies) is decided in
// meta.hpp.
#pragma once

#include <cmath>
#include <vector>

#include "sweep.hpp"

namespace fastmaml {

template <class T, class Link>
struct GramMetaWorker {
  Model<T, Link> model;
  const T* theta;
  const T* alpha;  // (K, P) table; only alpha[j * P] is read (one size per step)
  index_t K;
  LrLayout lr;
  double lam;
  Mode mode;
  Scratch<T> sc{};
  std::vector<double> gram, U, B, Z, R, curv, Cc, KC, a, work, V, Gam, XG, Q, H, gb, z0w, colR;
  std::vector<T> wvec, gk;

  GramMetaWorker(const Model<T, Link>& m, const T* th, const T* al, index_t k, LrLayout l, double lm, Mode md)
      : model(m), theta(th), alpha(al), K(k), lr(l), lam(lm), mode(md) {}

  // out (n x C) = Kmat in (n x C)
  void kmul(index_t n, index_t C, const double* in, double* out) const {
    for (index_t i = 0; i < n; ++i) {
      const double* gi = gram.data() + i * n;
      for (index_t c = 0; c < C; ++c) {
        double acc = 0.0;
        for (index_t k = 0; k < n; ++k) acc += gi[k] * in[k * C + c];
        out[i * C + c] = acc;
      }
    }
  }

  // out (n x C) = X V (V is d x C, the weight rows of a parameter matrix)
  void xmul(index_t n, const T* v, double* out) {
    const index_t d = model.d, C = model.C;
    for (index_t i = 0; i < n; ++i) {
      if (C == 1) {
        out[i] = dot_kernel(sc.rows[i], v, d);
      } else {
        if (i == 0) sc.cm.load(v, d, C);
        sc.cm.logits(sc.rows[i], nullptr, d, C, out + i * C);
      }
    }
  }

  // wout (d x C rows of a D x C matrix) = base_scale * base - X^T coef   (coef n x C)
  void xtmul_into(index_t n, const double* coef, double base_scale, const T* base, T* wout) {
    const index_t d = model.d, C = model.C;
    sc.coef.assign(coef, coef + n * C);
    for (index_t q = 0; q < n * C; ++q) sc.coef[q] = -sc.coef[q];
    // writes D x C (the bias row is overwritten by the caller)
    if (C == 1) {
      xt_times(sc.rows.data(), sc.coef.data(), n, d, wout);
    } else {
      sc.cm.zero(d, C);
      for (index_t i = 0; i < n; ++i) sc.cm.add(sc.rows[i], sc.coef.data() + i * C, d, C);
      sc.cm.store(wout, d, C);
    }
    for (index_t q = 0; q < d * C; ++q)
      wout[q] = static_cast<T>(static_cast<double>(wout[q]) + base_scale * static_cast<double>(base[q]));
  }

  ErrorCode operator()(index_t t, double* slot, index_t* step) {
    const index_t d = model.d, C = model.C, P = model.P;
    const auto& sup = model.ts->support;
    const index_t n = sup.gather(t, d, sc.rows);
    const std::int32_t* y = sup.y + sup.begin(t);
    const index_t nC = n * C;
    // Gram matrix of the support rows (weights only; the bias is tracked apart).
    gram.resize(static_cast<size_t>(n * n));
    const auto* ts = model.ts;
    if (ts->kernel && sup.idx) {
      const index_t* idx = sup.idx + sup.begin(t);
      for (index_t i = 0; i < n; ++i) {
        const T* krow = ts->kernel + idx[i] * ts->kernel_rows;
        for (index_t k = 0; k < n; ++k) gram[i * n + k] = static_cast<double>(krow[idx[k]]);
      }
    } else {
      // Lower triangle, four columns at a time (dot4 shares the loads of row i).
      double four[4];
      for (index_t i = 0; i < n; ++i) {
        index_t k = 0;
        for (; k + 3 <= i; k += 4) {
          dot4_kernel(sc.rows[k], sc.rows[k + 1], sc.rows[k + 2], sc.rows[k + 3], sc.rows[i], d, four);
          for (index_t r = 0; r < 4; ++r) {
            gram[i * n + k + r] = four[r];
            gram[(k + r) * n + i] = four[r];
          }
        }
        for (; k <= i; ++k) {
          const double g = dot_kernel(sc.rows[i], sc.rows[k], d);
          gram[i * n + k] = g;
          gram[k * n + i] = g;
        }
      }
    }
    const double inv_n = 1.0 / static_cast<double>(n);
    z0w.resize(static_cast<size_t>(nC));
    xmul(n, theta, z0w.data());
    U = z0w;
    B.assign(theta + d * C, theta + P);
    R.resize(static_cast<size_t>(std::max<index_t>(K, 1) * nC));
    curv.resize(static_cast<size_t>(std::max<index_t>(K, 1) * nC));
    Cc.assign(static_cast<size_t>((K + 1) * nC), 0.0);
    KC.assign(static_cast<size_t>((K + 1) * nC), 0.0);
    a.assign(static_cast<size_t>(K + 1), 1.0);
    colR.resize(static_cast<size_t>(std::max<index_t>(K, 1) * C));
    Z.resize(static_cast<size_t>(C));
    work.resize(static_cast<size_t>(nC));
    for (index_t j = 0; j < K; ++j) {
      const double al = static_cast<double>(alpha[j * P]);
      const double rho = 1.0 - al * lam;
      double* Rj = R.data() + j * nC;
      double* cj = curv.data() + j * nC;
      double* col = colR.data() + j * C;
      std::fill(col, col + C, 0.0);
      for (index_t i = 0; i < n; ++i) {
        for (index_t c = 0; c < C; ++c) Z[c] = U[i * C + c] + B[c];
        model.link.row(Z.data(), y[i], Rj + i * C, cj + i * C, /*want_loss=*/false);
        for (index_t c = 0; c < C; ++c) {
          Rj[i * C + c] *= inv_n;
          col[c] += Rj[i * C + c];
        }
      }
      kmul(n, C, Rj, work.data());
      const double* Ccj = Cc.data() + j * nC;
      const double* KCj = KC.data() + j * nC;
      double* Ccn = Cc.data() + (j + 1) * nC;
      double* KCn = KC.data() + (j + 1) * nC;
      bool finite = true;
      for (index_t q = 0; q < nC; ++q) {
        U[q] = rho * U[q] - al * work[q];
        Ccn[q] = rho * Ccj[q] + al * Rj[q];
        KCn[q] = rho * KCj[q] + al * work[q];
        finite = finite && std::isfinite(U[q]);
      }
      for (index_t c = 0; c < C; ++c) {
        B[c] -= al * col[c];
        finite = finite && std::isfinite(B[c]);
      }
      a[j + 1] = rho * a[j];
      if (!finite) {
        *step = j;
        return ErrorCode::diverged;
      }
    }
    // phi_K explicitly (one pass), then the query side as in the plain sweep.
    wvec.resize(static_cast<size_t>(P));
    xtmul_into(n, Cc.data() + K * nC, a[K], theta, wvec.data());
    for (index_t c = 0; c < C; ++c) wvec[d * C + c] = static_cast<T>(B[c]);
    if (!all_finite(wvec.data(), P)) {
      *step = K - 1;
      return ErrorCode::diverged;
    }
    sc.gbar.resize(static_cast<size_t>(P));
    const double loss = model.set_pass(model.ts->query, t, wvec.data(), sc, sc.gbar.data(), nullptr);
    if (!std::isfinite(loss)) {
      *step = K;
      return ErrorCode::nonfinite_query;
    }
    slot[0] = loss;
    double* hyper = slot + 1 + P;
    std::fill(hyper, hyper + lr.size(), 0.0);
    double grad_l2 = 0.0;
    // Reverse sweep in n-space. gbar_w = beta gK_w - X^T Gam, gbar_b = gb.
    sup.gather(t, d, sc.rows);
    V.resize(static_cast<size_t>(nC));
    xmul(n, sc.gbar.data(), V.data());  // X gK_w
    double gk_w0 = 0.0;                  // <gK_w, W0>
    for (index_t q = 0; q < d * C; ++q) gk_w0 += static_cast<double>(sc.gbar[q]) * static_cast<double>(theta[q]);
    double beta = 1.0;
    Gam.assign(static_cast<size_t>(nC), 0.0);
    gb.assign(sc.gbar.begin() + d * C, sc.gbar.begin() + P);
    XG.resize(static_cast<size_t>(nC));
    Q.resize(static_cast<size_t>(nC));
    H.resize(static_cast<size_t>(nC));
    for (index_t j = K - 1; j >= 0; --j) {
      const double al = static_cast<double>(alpha[j * P]);
      const double rho = 1.0 - al * lam;
      const double* Rj = R.data() + j * nC;
      const double* Ccj = Cc.data() + j * nC;
      const double* KCj = KC.data() + j * nC;
      const double* col = colR.data() + j * C;
      kmul(n, C, Gam.data(), work.data());
      double xg_r = 0.0, v_c = 0.0, g_z = 0.0, g_kc = 0.0, gb_col = 0.0;
      for (index_t q = 0; q < nC; ++q) {
        XG[q] = beta * V[q] - work[q];
        xg_r += XG[q] * Rj[q];
        v_c += V[q] * Ccj[q];
        g_z += Gam[q] * z0w[q];
        g_kc += Gam[q] * KCj[q];
      }
      for (index_t c = 0; c < C; ++c) gb_col += gb[c] * col[c];
      const double gw_wj = beta * a[j] * gk_w0 - beta * v_c - a[j] * g_z + g_kc;  // <gbar_w, W_j>
      hyper[lr.ks > 1 ? j : 0] -= xg_r + lam * gw_wj + gb_col;
      grad_l2 -= al * gw_wj;
      if (mode == Mode::maml) {
        const double* cj = curv.data() + j * nC;
        for (index_t i = 0; i < n; ++i) {
          for (index_t c = 0; c < C; ++c) Q[i * C + c] = XG[i * C + c] + gb[c];
          model.link.hvp_row(cj + i * C, Q.data() + i * C, H.data() + i * C);
        }
        for (index_t q = 0; q < nC; ++q) Gam[q] = rho * Gam[q] + al * H[q] * inv_n;
        for (index_t c = 0; c < C; ++c) {
          double s = 0.0;
          for (index_t i = 0; i < n; ++i) s += H[i * C + c];
          gb[c] -= al * s * inv_n;
        }
        beta *= rho;
      }
    }
    // dtheta = [beta gK_w - X^T Gam ; gb]  (one pass)
    gk.assign(sc.gbar.begin(), sc.gbar.end());
    xtmul_into(n, Gam.data(), beta, gk.data(), wvec.data());
    for (index_t q = 0; q < d * C; ++q) slot[1 + q] = static_cast<double>(wvec[q]);
    for (index_t c = 0; c < C; ++c) slot[1 + d * C + c] = gb[c];
    slot[1 + P + lr.size()] = grad_l2;
    if (!all_finite(slot, 1 + P + lr.size() + 1)) {
      *step = -1;
      return ErrorCode::nonfinite_grad;
    }
    return ErrorCode::ok;
  }
};

}  // namespace fastmaml
