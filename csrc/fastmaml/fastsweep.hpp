// The binary meta-gradient with one step size per step (MAML or
// first-order MAML; scalar or per-step inner_lr; any L2): the common case,
// on the register-tiled kernels of tile.hpp and the vectorised link of
// vmath.hpp. Same mathematics as sweep.hpp (MetaWorker) and span.hpp
// (GramMetaWorker), which keep every other case (softmax, per-parameter
// inner_lr, preconditioner, Reptile), and the same per-task slot layout
// [loss, grad (D), hyper (lr.size()), grad_l2]; meta.hpp dispatches.
//   FastPlainWorker  2 fused passes over the support rows per step (forward:
//                    logits + X^T r; reverse: X u + X^T (s X u)/n).
//                    With TaskExtras (extended.hpp dispatches) also per-task
//                    step sizes and L2 strengths and the feature gradients.
//   FastGramWorker   the sweep in the span of the support rows: the Gram
//                    matrix once (4 x 4 register tiles), then O(n^2) a step.
//   LockstepGram     the same sweep for kLanes tiny tasks at once.
// Each per-task sweep is one function compiled per ISA (FASTMAML_CLONES) with
// the kernel bodies force-inlined into it: the dispatch happens once per
// task, not once per row, and the bodies never compile for the baseline only.
#pragma once

#include <cmath>
#include <vector>

#include "parallel.hpp"
#include "sweep.hpp"
#include "tile.hpp"
#include "vmath.hpp"

namespace fastmaml {

// <g, w> over d entries in float64 (<gbar_w, theta_w> of the Gram paths): entry q goes to chain q % 8, the chains
// are summed in a fixed tree. Every operation is written out (no
// reassociation left to the compiler), so the bits never depend on
// alignment, the ISA clone or the instantiation (see feature_step).
template <class T>
FASTMAML_INLINE inline double blocked_dot(const T* FASTMAML_RESTRICT g, const T* FASTMAML_RESTRICT w, index_t d) {
  double c[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  index_t q = 0;
  for (; q + 8 <= d; q += 8)
    for (int l = 0; l < 8; ++l) c[l] += static_cast<double>(g[q + l]) * static_cast<double>(w[q + l]);
  for (int l = 0; q < d; ++q, ++l) c[l] += static_cast<double>(g[q]) * static_cast<double>(w[q]);
  return ((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]));
}

// Query side of task t at phi (D): returns the mean loss and writes the
// gradient X~^T (p - y) / m into grad (D).
template <class T>
FASTMAML_INLINE inline double query_pass(const TaskSet<T>& ts, index_t t, const T* phi, std::vector<const T*>& rows,
                  std::vector<double>& z, std::vector<double>& r, std::vector<double>& tails, T* grad) {
  const index_t d = ts.d;
  const index_t m = ts.query.gather(t, d, rows);
  const std::int32_t* y = ts.query.y + ts.query.begin(t);
  r.resize(static_cast<size_t>(m));
  tails.resize(static_cast<size_t>(m));
  (void)z;
  const double inv_m = 1.0 / static_cast<double>(m);
  double hinge = 0.0;
  const double rb = tile::fused_rows_body(rows.data(), m, d, phi, static_cast<double>(phi[d]), 2, y, inv_m, r.data(),
                                          tails.data(), grad, &hinge);
  grad[d] = static_cast<T>(rb);
  const double loss = (hinge + vmath::sum_log1p(tails.data(), m)) * inv_m;
  return loss;
}

template <class T>
struct FastGramWorker {
  const TaskSet<T>* ts;
  const T* theta;
  const T* alpha;  // (K, D) table; alpha[j * D] is step j's size
  index_t K;
  LrLayout lr;
  double lam;
  Mode mode;
  std::vector<const T*> rows, qrows, pfrows, pftmp;
  std::vector<double> G, z0w, U, Z, R, curv, Cc, KC, a, work, V, Gam, XG, H, colR, qz, qr, tails;
  std::vector<double> neg;
  std::vector<T> wvec, gbar;
  // Feature gradients (grad_features with shared hyperparameters only;
  // extended.hpp dispatches): ext.grad_support_X / grad_query_X set.
  TaskExtras<T> ext{};
  bool extended = false;  // run sweep<true>: form the feature gradients (ext)
  std::vector<double> fcg, fct, fN;
  std::vector<T> fcf;
  std::vector<const T*> fvecs;

  ErrorCode operator()(index_t t, double* slot, index_t* step);
  // The whole per-task sweep is compiled once per ISA (gram_task below), so
  // every kernel and the n-space loops inline into one dispatched function.
  // Feat = false is the shared call; Feat = true adds the feature gradients
  // in a second instantiation, so the shared call's code is what it was.
  template <bool Feat>
  FASTMAML_INLINE ErrorCode sweep(index_t t, double* slot, index_t* step) {
    const index_t d = ts->d, D = d + 1;
    const auto& sup = ts->support;
    const index_t n = sup.gather(t, d, rows);
    const std::int32_t* y = sup.y + sup.begin(t);
    G.resize(static_cast<size_t>(n * n));
    if (ts->kernel && sup.idx) {
      // One triangle of the kernel, mirrored: G is symmetric whatever the
      // kernel's rounding, so the n-space products (which read one triangle
      // from n = 64 on) see the G every other n would.
      const index_t* idx = sup.idx + sup.begin(t);
      for (index_t i = 0; i < n; ++i) {
        const T* krow = ts->kernel + idx[i] * ts->kernel_rows;
        for (index_t k = 0; k <= i; ++k) G[i * n + k] = G[k * n + i] = static_cast<double>(krow[idx[k]]);
      }
      z0w.resize(static_cast<size_t>(n));
      tile::xv_body(rows.data(), n, d, theta, z0w.data());
    } else {
      // The query rows are first read by the query pass; their lines are
      // prefetched into L2 while the tiles (compute-bound) run, and then, as
      // far as the cap per tile allows, the next task's support rows (the
      // next task's first tiles otherwise wait on memory: W2, n = m = 100,
      // d = 784, 160 MB of tasks, float32, on a Zen 4 EPYC, C++ harness,
      // interleaved rounds: 1 thread 39.3-40.0 -> 36.7-37.3 ms, 2 threads
      // 19.8-20.1 -> 19.0-19.1 ms; with the lines spread inside the tiles
      // (gram_tiles), 2 threads, medians of 7 rounds on a busier host:
      // 26.5 -> 22.7 ms). Where that task belongs to another thread the
      // lines are only wasted; no result depends on them.
      const index_t m = ts->query.gather(t, d, qrows);
      pfrows.assign(qrows.begin(), qrows.begin() + m);
      if (t + 1 < ts->n_tasks) {
        sup.gather(t + 1, d, pftmp);
        pfrows.insert(pfrows.end(), pftmp.begin(), pftmp.end());
      }
      tile::RowPrefetch<T> pf;
      pf.rows = pfrows.data();
      pf.nrows = static_cast<index_t>(pfrows.size());
      pf.first_rows = m;
      pf.row_bytes = d * static_cast<index_t>(sizeof(T));
      // X theta from each row tile's rows while they are in L1.
      z0w.resize(static_cast<size_t>(n));
      tile::gram_body(rows.data(), n, d, G.data(), &pf, theta, z0w.data());
    }
    const double inv_n = 1.0 / static_cast<double>(n);
    U = z0w;
    double B = static_cast<double>(theta[d]);
    const index_t Kc = std::max<index_t>(K, 1);
    R.resize(static_cast<size_t>(Kc * n));
    curv.resize(static_cast<size_t>(Kc * n));
    // Row 0 is zero; the loop writes rows 1..K before anything reads them.
    Cc.resize(static_cast<size_t>((K + 1) * n));
    KC.resize(static_cast<size_t>((K + 1) * n));
    std::fill(Cc.begin(), Cc.begin() + n, 0.0);
    std::fill(KC.begin(), KC.begin() + n, 0.0);
    a.assign(static_cast<size_t>(K + 1), 1.0);
    colR.resize(static_cast<size_t>(Kc));
    Z.resize(static_cast<size_t>(n));
    tails.resize(static_cast<size_t>(n));
    work.resize(static_cast<size_t>(n));
    for (index_t j = 0; j < K; ++j) {
      const double al = static_cast<double>(alpha[j * D]);
      const double rho = 1.0 - al * lam;
      double* Rj = R.data() + j * n;
      for (index_t i = 0; i < n; ++i) Z[i] = U[i] + B;
      vmath::binary_rows_body(Z.data(), y, n, inv_n, Rj, curv.data() + j * n, tails.data());
      double col = 0.0;
      for (index_t i = 0; i < n; ++i) col += Rj[i];
      colR[j] = col;
      tile::gram_mul_body(G.data(), n, Rj, work.data());
      const double* Ccj = Cc.data() + j * n;
      const double* KCj = KC.data() + j * n;
      double* Ccn = Cc.data() + (j + 1) * n;
      double* KCn = KC.data() + (j + 1) * n;
      double fin = 0.0;  // a sum propagates any inf / NaN
      for (index_t i = 0; i < n; ++i) {
        U[i] = rho * U[i] - al * work[i];
        Ccn[i] = rho * Ccj[i] + al * Rj[i];
        KCn[i] = rho * KCj[i] + al * work[i];
        fin += U[i] * 0.0;
      }
      B -= al * col;
      a[j + 1] = rho * a[j];
      if (!(fin == 0.0 && std::isfinite(B))) {
        *step = j;
        return ErrorCode::diverged;
      }
    }
    // phi_K explicitly (one pass): W_K = a_K W_0 - X^T Cc_K, then the query side.
    wvec.resize(static_cast<size_t>(D));
    neg.resize(static_cast<size_t>(n));
    for (index_t i = 0; i < n; ++i) neg[i] = -Cc[K * n + i];
    tile::xtr_body(rows.data(), n, d, neg.data(), a[K], theta, wvec.data());
    wvec[d] = static_cast<T>(B);
    if (!tile::finite_body(wvec.data(), D)) {
      *step = K - 1;
      return ErrorCode::diverged;
    }
    gbar.resize(static_cast<size_t>(D));
    const double loss = query_pass(*ts, t, wvec.data(), rows, qz, qr, tails, gbar.data());
    if (!std::isfinite(loss)) {
      *step = K;
      return ErrorCode::nonfinite_query;
    }
    slot[0] = loss;
    if (Feat) {
      // Query row i: (1/T) (p_i - y_i)/m w_K, rank one (rows holds the query rows).
      const index_t m = ts->query.size(t);
      fcf.resize(static_cast<size_t>(m));
      for (index_t i = 0; i < m; ++i) fcf[i] = static_cast<T>(qr[i] * ext.inv_T);
      const T* wk = wvec.data();
      T* gq = ext.grad_query_X + ts->query.begin(t) * d;
      tile::combine_body(m, d, 1, fcf.data(), &wk, gq);
      if (!tile::finite_body(gq, m * d)) {
        *step = -1;
        return ErrorCode::nonfinite_grad;
      }
      fcg.assign(static_cast<size_t>(n), 0.0);
      fct.assign(static_cast<size_t>(n), 0.0);
      fN.assign(static_cast<size_t>(n * n), 0.0);
    }
    double* hyper = slot + 1 + D;
    std::fill(hyper, hyper + lr.size(), 0.0);
    double grad_l2 = 0.0;
    // Reverse sweep in n-space: gbar_w = beta gK_w - X^T Gam, gbar_b = gb.
    sup.gather(t, d, rows);
    V.resize(static_cast<size_t>(n));
    tile::xv_body(rows.data(), n, d, gbar.data(), V.data());  // X gK_w
    // Eight chains in a fixed order, not an omp simd reduction: that one is
    // peeled for theta's alignment, so its bits would depend on where theta
    // sits (and as one scalar chain it was a visible share of W1's time).
    const double gk_w0 = blocked_dot(gbar.data(), theta, d);
    double beta = 1.0;
    Gam.assign(static_cast<size_t>(n), 0.0);
    double gb = static_cast<double>(gbar[d]);
    XG.resize(static_cast<size_t>(n));
    H.resize(static_cast<size_t>(n));
    for (index_t j = K - 1; j >= 0; --j) {
      const double al = static_cast<double>(alpha[j * D]);
      const double rho = 1.0 - al * lam;
      const double* Rj = R.data() + j * n;
      const double* Ccj = Cc.data() + j * n;
      const double* KCj = KC.data() + j * n;
      tile::gram_mul_body(G.data(), n, Gam.data(), work.data());
      double xg_r = 0.0, v_c = 0.0, g_z = 0.0, g_kc = 0.0;
      if constexpr (Feat) {
        reverse_sums(n, beta, Rj, Ccj, KCj, V.data(), work.data(), Gam.data(), z0w.data(), XG.data(), xg_r, v_c, g_z,
                     g_kc);
      } else {
        for (index_t q = 0; q < n; ++q) {
          XG[q] = beta * V[q] - work[q];
          xg_r += XG[q] * Rj[q];
          v_c += V[q] * Ccj[q];
          g_z += Gam[q] * z0w[q];
          g_kc += Gam[q] * KCj[q];
        }
      }
      const double gb_col = gb * colR[j];
      const double gw_wj = beta * a[j] * gk_w0 - beta * v_c - a[j] * g_z + g_kc;  // <gbar_w, W_j>
      hyper[lr.ks > 1 ? j : 0] -= xg_r + lam * gw_wj + gb_col;
      grad_l2 -= al * gw_wj;
      if (Feat)
        feature_step(n, al, a[j], beta, gb, Rj, curv.data() + j * n, Ccj, inv_n, XG.data(), Gam.data(), fcg.data(),
                     fct.data(), fN.data());
      if (mode == Mode::maml) {
        const double* cj = curv.data() + j * n;
        double hs = 0.0;
        if constexpr (Feat) {
          hs = reverse_gam(n, rho, al, gb, inv_n, cj, XG.data(), H.data(), Gam.data());
        } else {
          for (index_t i = 0; i < n; ++i) {
            H[i] = cj[i] * (XG[i] + gb);
            hs += H[i];
          }
          for (index_t q = 0; q < n; ++q) Gam[q] = rho * Gam[q] + al * H[q] * inv_n;
        }
        gb -= al * hs * inv_n;
        beta *= rho;
      }
    }
    // dtheta = [beta gK_w - X^T Gam ; gb]  (one pass)
    for (index_t i = 0; i < n; ++i) neg[i] = -Gam[i];
    tile::xtr_body(rows.data(), n, d, neg.data(), beta, gbar.data(), wvec.data());
    for (index_t q = 0; q < d; ++q) slot[1 + q] = static_cast<double>(wvec[q]);
    slot[1 + d] = gb;
    slot[1 + D + lr.size()] = grad_l2;
    if (!tile::finite_body(slot, 1 + D + lr.size() + 1)) {
      *step = -1;
      return ErrorCode::nonfinite_grad;
    }
    if (Feat) return finish_features(t, n, step);
    return ErrorCode::ok;
  }

  // Step j's share of the support rows' feature gradients, in coefficient
  // form (docs/design.md, "Feature gradients"). Support row i receives
  //   (p_ji - y_i)/n u_{j,w} + c_ji w_j,   c_ji = s_ji (x~_i . u_j)/n,
  // and on this path u_{j,w} = alpha_j (beta gK_w - X^T Gam) and
  // w_j = a_j theta_w - X^T Cc_j (Gam, beta: gbar_{j+1}'s coefficients, read
  // before this step's update), so the sum over steps is
  //   fcg_i gK_w + fct_i theta_w + sum_k fN_ik x_k
  // with O(n^2) coefficients kept in float64: one (n x (n + 2))((n + 2) x d)
  // product at the end of the task instead of forming u_j and w_j in d-space.
  // XG (= X gbar_{j+1,w}) is this step's, from the reverse loop.
  //
  // Every loop of the feature instantiation (this, reverse_sums, reverse_gam,
  // blocked_dot) reads and writes through restrict-qualified pointers and
  // keeps its sums scalar and in order: with the workers' vectors possibly
  // adjacent on the heap, GCC otherwise versions these loops for aliasing /
  // alignment, and the vector and scalar versions round differently, so the
  // bits depended on the heap layout and on theta's alignment.
  static FASTMAML_INLINE void feature_step(index_t n, double al, double aj, double beta, double gb,
                                           const double* FASTMAML_RESTRICT Rj, const double* FASTMAML_RESTRICT cj,
                                           const double* FASTMAML_RESTRICT Ccj, double inv_n,
                                           const double* FASTMAML_RESTRICT xg, const double* FASTMAML_RESTRICT gam,
                                           double* FASTMAML_RESTRICT cg, double* FASTMAML_RESTRICT ct,
                                           double* FASTMAML_RESTRICT N) {
    for (index_t i = 0; i < n; ++i) {
      const double ru = al * Rj[i];                        // (p - y)/n alpha_j
      const double c = al * cj[i] * (xg[i] + gb) * inv_n;  // s (x~ . u_j)/n
      cg[i] += ru * beta;
      ct[i] += c * aj;
      for (index_t k = 0; k < n; ++k) N[i * n + k] -= ru * gam[k] + c * Ccj[k];
    }
  }


  // The reverse step's XG and its four n-space sums (sweep's loop, restrict-
  // qualified, sums in order).
  static FASTMAML_INLINE void reverse_sums(index_t n, double beta, const double* FASTMAML_RESTRICT Rj,
                                           const double* FASTMAML_RESTRICT Ccj, const double* FASTMAML_RESTRICT KCj,
                                           const double* FASTMAML_RESTRICT v, const double* FASTMAML_RESTRICT wk,
                                           const double* FASTMAML_RESTRICT gam, const double* FASTMAML_RESTRICT z0,
                                           double* FASTMAML_RESTRICT xg, double& xg_r, double& v_c, double& g_z,
                                           double& g_kc) {
    for (index_t q = 0; q < n; ++q) xg[q] = beta * v[q] - wk[q];
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    for (index_t q = 0; q < n; ++q) {
      s0 += xg[q] * Rj[q];
      s1 += v[q] * Ccj[q];
      s2 += gam[q] * z0[q];
      s3 += gam[q] * KCj[q];
    }
    xg_r = s0;
    v_c = s1;
    g_z = s2;
    g_kc = s3;
  }

  // H = curv_j (XG + gb), Gam <- rho Gam + al H / n; returns sum(H) in order.
  static FASTMAML_INLINE double reverse_gam(index_t n, double rho, double al, double gb, double inv_n,
                                            const double* FASTMAML_RESTRICT cj, const double* FASTMAML_RESTRICT xg,
                                            double* FASTMAML_RESTRICT h, double* FASTMAML_RESTRICT gam) {
    for (index_t i = 0; i < n; ++i) h[i] = cj[i] * (xg[i] + gb);
    double hs = 0.0;
    for (index_t i = 0; i < n; ++i) hs += h[i];
    for (index_t q = 0; q < n; ++q) gam[q] = rho * gam[q] + al * h[q] * inv_n;
    return hs;
  }

  // The support rows -(1/T) [fcg gK_w + fct theta_w + fN X] as one register-
  // tiled product (rows holds the support rows, gbar gK, wvec is free).
  FASTMAML_INLINE ErrorCode finish_features(index_t t, index_t n, index_t* step) {
    const index_t d = ts->d, L = n + 2;
    fcf.resize(static_cast<size_t>(L * n));
    fvecs.resize(static_cast<size_t>(L));
    const double neg_T = -ext.inv_T;
    for (index_t k = 0; k < n; ++k) {
      T* ck = fcf.data() + k * n;  // vector k (support row k) for every output row i
      for (index_t i = 0; i < n; ++i) ck[i] = static_cast<T>(neg_T * fN[i * n + k]);
      fvecs[k] = rows[k];
    }
    for (index_t i = 0; i < n; ++i) {
      fcf[n * n + i] = static_cast<T>(neg_T * fcg[i]);
      fcf[(n + 1) * n + i] = static_cast<T>(neg_T * fct[i]);
    }
    fvecs[n] = gbar.data();
    fvecs[n + 1] = theta;
    T* gs = ext.grad_support_X + ts->support.begin(t) * d;
    tile::combine_body(n, d, L, fcf.data(), fvecs.data(), gs);
    if (!tile::finite_body(gs, n * d)) {
      *step = -1;
      return ErrorCode::nonfinite_grad;
    }
    return ErrorCode::ok;
  }
};

template <class T>
struct FastPlainWorker {
  const TaskSet<T>* ts;
  const T* theta;
  const T* alpha;
  index_t K;
  LrLayout lr;
  double lam;
  Mode mode;
  // Per-task step tables and L2 strengths, feature gradients (features.hpp;
  // extended.hpp dispatches). Left empty, the sweep is the shared call's.
  TaskExtras<T> ext{};
  std::vector<const T*> rows;
  std::vector<T> phi_path, g_path, gbar, u, hu, cf, upath;
  std::vector<double> curv, coef, crev, qz, qr, tails;
  std::vector<const T*> vecs;

  bool extended = false;  // ext holds something: run sweep<true>

  ErrorCode operator()(index_t t, double* slot, index_t* step);
  // Ext = false is the shared call, Ext = true adds what ext asks for. Two
  // instantiations, not a runtime flag in one body: the shared call's code
  // (and with it the rounding of its vectorised reductions) stays exactly
  // what it is without the extras.
  template <bool Ext>
  FASTMAML_INLINE ErrorCode sweep(index_t t, double* slot, index_t* step) {
    const index_t d = ts->d, D = d + 1;
    const auto& sup = ts->support;
    const index_t n = sup.gather(t, d, rows);
    const std::int32_t* y = sup.y + sup.begin(t);
    const double inv_n = 1.0 / static_cast<double>(n);
    const index_t Kc = std::max<index_t>(K, 1);
    const T* alpha_t = Ext ? alpha + t * ext.alpha_stride : alpha;
    const double lam_t = Ext && ext.lam ? ext.lam[t] : lam;
    const bool feat = Ext && ext.features();
    phi_path.resize(static_cast<size_t>((K + 1) * D));
    g_path.resize(static_cast<size_t>(Kc * D));
    curv.resize(static_cast<size_t>(Kc * n));
    // With the extras, every step's residuals (p - y) / n and Hessian-row
    // coefficients s (x~ . u) / n are kept for the feature gradients.
    coef.resize(static_cast<size_t>(Ext ? Kc * n : n));
    if (Ext) crev.resize(static_cast<size_t>(Kc * n));
    std::copy(theta, theta + D, phi_path.begin());
    for (index_t j = 0; j < K; ++j) {
      const T* phi = phi_path.data() + j * D;
      T* next = phi_path.data() + (j + 1) * D;
      T* g = g_path.data() + j * D;
      g[d] = static_cast<T>(tile::fused_rows_body(rows.data(), n, d, phi, static_cast<double>(phi[d]), 0, y, inv_n,
                                                  coef.data() + (Ext ? j * n : 0), curv.data() + j * n, g, nullptr));
      if (lam_t != 0.0) axpy(g, phi, d, lam_t);
      const T al = alpha_t[j * D];
      for (index_t k = 0; k < D; ++k) next[k] = phi[k] - al * g[k];
      if (!tile::finite_body(next, D)) {
        *step = j;
        return ErrorCode::diverged;
      }
    }
    gbar.resize(static_cast<size_t>(D));
    const T* phiK = phi_path.data() + K * D;
    const double loss = query_pass(*ts, t, phiK, rows, qz, qr, tails, gbar.data());
    if (!std::isfinite(loss)) {
      *step = K;
      return ErrorCode::nonfinite_query;
    }
    slot[0] = loss;
    sup.gather(t, d, rows);
    double* hyper = slot + 1 + D;
    std::fill(hyper, hyper + lr.size(), 0.0);
    double grad_l2 = 0.0;
    u.resize(static_cast<size_t>(D));
    hu.resize(static_cast<size_t>(D));
    // u_j = alpha_j gbar_{j+1} of every step, for the feature gradients.
    if (feat) upath.resize(static_cast<size_t>(Kc * D));
    for (index_t j = K - 1; j >= 0; --j) {
      const T* g = g_path.data() + j * D;
      const T* phi = phi_path.data() + j * D;
      const T al = alpha_t[j * D];
      double gg = 0.0, wu = 0.0;
      T* up = u.data();
      const T* gb = gbar.data();
#pragma omp simd reduction(+ : gg)
      for (index_t k = 0; k < D; ++k) {
        up[k] = al * gb[k];
        gg += static_cast<double>(gb[k]) * static_cast<double>(g[k]);
      }
#pragma omp simd reduction(+ : wu)
      for (index_t k = 0; k < d; ++k) wu += static_cast<double>(up[k]) * static_cast<double>(phi[k]);
      hyper[lr.ks > 1 ? j : 0] -= gg;
      grad_l2 -= wu;
      if (feat) std::copy(up, up + D, upath.data() + j * D);
      if (mode == Mode::maml) {
        hu[d] = static_cast<T>(tile::fused_rows_body(rows.data(), n, d, u.data(), static_cast<double>(u[d]), 1, y,
                                                     inv_n, Ext ? crev.data() + j * n : coef.data(),
                                                     curv.data() + j * n, hu.data(), nullptr));
        if (lam_t != 0.0) axpy(hu.data(), u.data(), d, lam_t);
        for (index_t k = 0; k < D; ++k) gbar[k] -= hu[k];
      }
    }
    if (feat && mode != Mode::maml) {
      // First order: no HVP, but the feature gradients still need X~ u_j
      // (the same products and operations as the fused pass forms).
      qz.resize(static_cast<size_t>(n));
      for (index_t j = 0; j < K; ++j) {
        const T* uj = upath.data() + j * D;
        tile::xv_body(rows.data(), n, d, uj, qz.data());
        const double* cv = curv.data() + j * n;
        double* cj = crev.data() + j * n;
        for (index_t i = 0; i < n; ++i) cj[i] = cv[i] * (qz[i] + static_cast<double>(uj[d])) * inv_n;
      }
    }
    for (index_t p = 0; p < D; ++p) slot[1 + p] = static_cast<double>(gbar[p]);
    slot[1 + D + lr.size()] = grad_l2;
    if (!tile::finite_body(slot, 1 + D + lr.size() + 1)) {
      *step = -1;
      return ErrorCode::nonfinite_grad;
    }
    if (Ext) return finish_extras(t, slot, n, step);
    return ErrorCode::ok;
  }

  // Task t's own hypergradients and feature gradients, scaled by the 1/T of
  // the mean, into their per-task outputs (the slot keeps its sums), as
  // MetaWorker::finish_extras does. Binary support row i:
  //   -(1/T) sum_j [ (p_ji - y_i)/n u_{j,w} + s_ji (x~_i . u_j)/n w_j ]
  // is one product (n x 2K)(2K x d) of the recorded coefficients and
  // vectors; query row i: (1/T) (p_i - y_i)/m w_K, rank one.
  FASTMAML_INLINE ErrorCode finish_extras(index_t t, const double* slot, index_t n, index_t* step) {
    const index_t d = ts->d, D = d + 1, H = lr.size();
    if (ext.grad_alpha)
      for (index_t k = 0; k < H; ++k) ext.grad_alpha[t * H + k] = static_cast<T>(slot[1 + D + k] * ext.inv_T);
    if (ext.lam) ext.grad_lam[t] = static_cast<T>(slot[1 + D + H] * ext.inv_T);
    if (!ext.features()) return ErrorCode::ok;
    const auto& sup = ts->support;
    const auto& qry = ts->query;
    const index_t L = 2 * K;
    cf.resize(static_cast<size_t>(std::max<index_t>(L * n, qry.size(t))));
    vecs.resize(static_cast<size_t>(std::max<index_t>(L, 1)));
    const double neg = -ext.inv_T;
    for (index_t j = 0; j < K; ++j) {
      const double* r = coef.data() + j * n;
      const double* c = crev.data() + j * n;
      T* cr = cf.data() + (2 * j) * n;
      T* cc = cf.data() + (2 * j + 1) * n;
      for (index_t i = 0; i < n; ++i) {
        cr[i] = static_cast<T>(neg * r[i]);
        cc[i] = static_cast<T>(neg * c[i]);
      }
      vecs[2 * j] = upath.data() + j * D;
      vecs[2 * j + 1] = phi_path.data() + j * D;
    }
    T* gs = ext.grad_support_X + sup.begin(t) * d;
    tile::combine_body(n, d, L, cf.data(), vecs.data(), gs);
    const index_t m = qry.size(t);
    for (index_t i = 0; i < m; ++i) cf[i] = static_cast<T>(qr[i] * ext.inv_T);
    vecs[0] = phi_path.data() + K * D;
    T* gq = ext.grad_query_X + qry.begin(t) * d;
    tile::combine_body(m, d, 1, cf.data(), vecs.data(), gq);
    if (!tile::finite_body(gs, n * d) || !tile::finite_body(gq, m * d)) {
      *step = -1;
      return ErrorCode::nonfinite_grad;
    }
    return ErrorCode::ok;
  }
};

FASTMAML_CLONES inline ErrorCode gram_task(FastGramWorker<float>& w, index_t t, double* slot, index_t* step) {
  return w.template sweep<false>(t, slot, step);
}
FASTMAML_CLONES inline ErrorCode gram_task(FastGramWorker<double>& w, index_t t, double* slot, index_t* step) {
  return w.template sweep<false>(t, slot, step);
}
FASTMAML_CLONES inline ErrorCode gram_task_features(FastGramWorker<float>& w, index_t t, double* slot,
                                                    index_t* step) {
  return w.template sweep<true>(t, slot, step);
}
FASTMAML_CLONES inline ErrorCode gram_task_features(FastGramWorker<double>& w, index_t t, double* slot,
                                                    index_t* step) {
  return w.template sweep<true>(t, slot, step);
}
FASTMAML_CLONES inline ErrorCode plain_task(FastPlainWorker<float>& w, index_t t, double* slot, index_t* step) {
  return w.template sweep<false>(t, slot, step);
}
FASTMAML_CLONES inline ErrorCode plain_task(FastPlainWorker<double>& w, index_t t, double* slot, index_t* step) {
  return w.template sweep<false>(t, slot, step);
}
FASTMAML_CLONES inline ErrorCode plain_task_extras(FastPlainWorker<float>& w, index_t t, double* slot,
                                                   index_t* step) {
  return w.template sweep<true>(t, slot, step);
}
FASTMAML_CLONES inline ErrorCode plain_task_extras(FastPlainWorker<double>& w, index_t t, double* slot,
                                                   index_t* step) {
  return w.template sweep<true>(t, slot, step);
}
template <class T>
ErrorCode FastGramWorker<T>::operator()(index_t t, double* slot, index_t* step) {
  return extended ? gram_task_features(*this, t, slot, step) : gram_task(*this, t, slot, step);
}
template <class T>
ErrorCode FastPlainWorker<T>::operator()(index_t t, double* slot, index_t* step) {
  return extended ? plain_task_extras(*this, t, slot, step) : plain_task(*this, t, slot, step);
}

// Lock-step groups (tiny tasks, W3: n = 10, d = 64). The per-task products
// over d (Gram, X v, X^T r, the query side) run per task with the tile
// kernels; everything in n-space (the K-step forward recursion, the link,
// the reverse sweep) runs on kLanes tasks at once, lane-major (entry i of
// lane l at i * kLanes + l), so SIMD lanes are full where a task alone has
// only n = 10 numbers. Every operation is elementwise over lanes, so a
// task's result is the same in any lane and any group, alone or not (unused
// lanes repeat lane 0 and are discarded). alpha and lam are shared by all
// tasks, so rho, a_j and beta are scalars.
constexpr index_t kLanes = 8;

// Whether a lock-step group runs its passes over d on rows packed
// lane-major (tile.hpp): tiny rows, where the per-task tile kernels spend
// more on horizontal sums and loop overhead than on products (W3: n = m =
// 10, d = 64). Shape only: a task of this shape always takes this path, in
// any lane, group or thread, so its bits depend on nothing else. The bounds
// keep the packed rows of a group (8 (n + m) d values) within 64 K values of
// per-thread scratch, and d where the horizontal sums dominate.
inline bool lanes_packed(index_t n, index_t m, index_t d) {
  return d <= 128 && (n + m) * d <= 8192;
}


// Whether a lock-step group prefetches the next group's rows
// (prefetch_next_group). A hint only: it never changes a bit, so the choice
// may read the CPU. Measured on W3 (n = m = 10, d = 64): on an AMD EPYC
// (Zen 4) 1 thread 5.8-6.1 -> 5.2-5.4 ms with it; on an Intel Xeon (two
// 512-bit FMA units) 4.3-4.4 -> 4.6 ms with it (1 thread) and 2.24 -> 2.32-
// 2.38 ms (2 threads): its L2 streamer already brings the rows, and the
// prefetch loop only adds instructions. Off on Intel, on elsewhere.
inline bool next_group_prefetch_pays() {
#if !FASTMAML_PORTABLE_FALLBACKS && (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__x86_64__) || defined(__i386__))
  static const bool pays = [] {
    __builtin_cpu_init();
    return !__builtin_cpu_is("intel");
  }();
  return pays;
#else
  return true;
#endif
}

template <class T>
struct LockstepGram {
  const TaskSet<T>* ts;
  const T* theta;
  const T* alpha;
  index_t K;
  LrLayout lr;
  double lam;
  Mode mode;
  std::vector<const T*> rows;
  std::vector<double> G1, G, z0w, U, B, R, curv, tails, Cc, KC, a, work, V, Gam, XG, H, colR, gkw0, yv, neg, qz, qr,
      qt, qe, qs, hyper, gl2, gb, beta_l;
  std::vector<std::int32_t> ylab, yq;
  std::vector<T> wvec, gK;
  // the packed path (lanes_packed): lane-major rows, coefficients, w_K, gK, dtheta
  std::vector<T> Ps, Pq, lcf, lwk, lgk, ldt;
  std::vector<const T*> lrows;
  const T* const* lrowp[kLanes] = {};
  std::vector<const T*> pf_rows, pf_tmp;
  tile::RowPrefetch<T> npf;  // per_step 0 (nothing) unless prefetch_next_group set it
  std::vector<index_t> bad_step;
  std::vector<int> bad_code;

  // Runs tasks t0 .. t0 + g - 1 (same n and m); writes their slots.
  FASTMAML_INLINE void run(index_t t0, index_t g, double* slots, index_t slot_len) {
    constexpr index_t L = kLanes;
    const index_t d = ts->d, D = d + 1;
    const auto& sup = ts->support;
    const index_t n = sup.size(t0);
    const index_t nL = n * L;
    const index_t Kc = std::max<index_t>(K, 1);
    G.resize(static_cast<size_t>(n * nL));
    z0w.resize(static_cast<size_t>(nL));
    ylab.resize(static_cast<size_t>(nL));
    bad_step.assign(L, -1);
    bad_code.assign(L, 0);
    const index_t m = ts->query.size(t0);
    const bool packed = lanes_packed(n, m, d);
    npf = tile::RowPrefetch<T>{};
    if (packed) {
      // Phase 1, lanes: pack the 8 tasks' support and query rows lane-major,
      // then the Gram matrices and X theta of all lanes at once.
      pack_side(sup, t0, g, n, Ps);
      pack_side(ts->query, t0, g, m, Pq);
      prefetch_next_group(t0 + L);
      tile::lanes_gram(Ps.data(), n, d, G.data());
      tile::lanes_xv(Ps.data(), n, d, theta, true, z0w.data());
      for (index_t l = 0; l < L; ++l) {
        const std::int32_t* y = sup.y + sup.begin(t0 + (l < g ? l : 0));
        for (index_t i = 0; i < n; ++i) ylab[i * L + l] = y[i];
      }
    }
    // Phase 1, per task: Gram matrix and X theta (FastGramWorker's kernel).
    for (index_t l = 0; l < L && !packed; ++l) {
      const index_t t = t0 + (l < g ? l : 0);
      sup.gather(t, d, rows);
      const std::int32_t* y = sup.y + sup.begin(t);
      G1.resize(static_cast<size_t>(n * n));
      qz.resize(static_cast<size_t>(n));
      tile::gram_body(rows.data(), n, d, G1.data(), static_cast<tile::RowPrefetch<T>*>(nullptr), theta, qz.data());
      for (index_t i = 0; i < n; ++i) {
        for (index_t k = 0; k < n; ++k) G[(i * n + k) * L + l] = G1[i * n + k];
        z0w[i * L + l] = qz[i];
        ylab[i * L + l] = y[i];
      }
    }
    const double inv_n = 1.0 / static_cast<double>(n);
    // Phase 2, lanes: the forward recursion.
    U = z0w;
    B.assign(L, static_cast<double>(theta[d]));
    R.resize(static_cast<size_t>(Kc * nL));
    curv.resize(static_cast<size_t>(Kc * nL));
    tails.resize(static_cast<size_t>(nL));
    Cc.resize(static_cast<size_t>((K + 1) * nL));  // row 0 zero, rows 1..K written below
    KC.resize(static_cast<size_t>((K + 1) * nL));
    std::fill(Cc.begin(), Cc.begin() + nL, 0.0);
    std::fill(KC.begin(), KC.begin() + nL, 0.0);
    a.assign(static_cast<size_t>(K + 1), 1.0);
    colR.resize(static_cast<size_t>(Kc * L));
    work.resize(static_cast<size_t>(nL));
    std::vector<double>& Z = XG;
    Z.resize(static_cast<size_t>(nL));
    for (index_t j = 0; j < K; ++j) {
      const double al = static_cast<double>(alpha[j * D]);
      const double rho = 1.0 - al * lam;
      double* Rj = R.data() + j * nL;
      for (index_t i = 0; i < n; ++i)
#pragma omp simd
        for (index_t l = 0; l < L; ++l) Z[i * L + l] = U[i * L + l] + B[l];
      vmath::binary_rows_body(Z.data(), ylab.data(), nL, inv_n, Rj, curv.data() + j * nL, tails.data());
      double* col = colR.data() + j * L;
      for (index_t l = 0; l < L; ++l) col[l] = 0.0;
      for (index_t i = 0; i < n; ++i)
#pragma omp simd
        for (index_t l = 0; l < L; ++l) col[l] += Rj[i * L + l];
      npf.step();
      lanes_gram_mul(n, Rj, work.data());
      const double* Ccj = Cc.data() + j * nL;
      const double* KCj = KC.data() + j * nL;
      double* Ccn = Cc.data() + (j + 1) * nL;
      double* KCn = KC.data() + (j + 1) * nL;
#pragma omp simd
      for (index_t q = 0; q < nL; ++q) {
        U[q] = rho * U[q] - al * work[q];
        Ccn[q] = rho * Ccj[q] + al * Rj[q];
        KCn[q] = rho * KCj[q] + al * work[q];
      }
      for (index_t l = 0; l < L; ++l) B[l] -= al * col[l];
      a[j + 1] = rho * a[j];
      double fins[L];  // per lane, x * 0 summed: 0 for finite x, NaN otherwise
#pragma omp simd
      for (index_t l = 0; l < L; ++l) fins[l] = B[l] * 0.0;
      for (index_t i = 0; i < n; ++i)
#pragma omp simd
        for (index_t l = 0; l < L; ++l) fins[l] += U[i * L + l] * 0.0;
      for (index_t l = 0; l < L; ++l) {
        if (bad_code[l]) continue;
        const double fin = fins[l];
        if (!(fin == 0.0)) {
          bad_code[l] = static_cast<int>(ErrorCode::diverged);
          bad_step[l] = j;
        }
      }
    }
    // Phase 3, per task: phi_K, the query side, X gK and <gK_w, W0>.
    V.resize(static_cast<size_t>(nL));
    gkw0.assign(L, 0.0);
    gK.resize(static_cast<size_t>(L * D));
    wvec.resize(static_cast<size_t>(D));
    neg.resize(static_cast<size_t>(n));
    gb.resize(L);
    if (packed) packed_query(t0, g, n, m, slots, slot_len);
    for (index_t l = 0; l < L && !packed; ++l) {
      if (l >= g) {  // unused lane: a copy of lane 0
        for (index_t i = 0; i < n; ++i) V[i * L + l] = V[i * L];
        gkw0[l] = gkw0[0];
        gb[l] = gb[0];
        continue;
      }
      const index_t t = t0 + l;
      double* slot = slots + l * slot_len;
      if (bad_code[l]) continue;
      sup.gather(t, d, rows);
      for (index_t i = 0; i < n; ++i) neg[i] = -Cc[K * nL + i * L + l];
      tile::xtr_body(rows.data(), n, d, neg.data(), a[K], theta, wvec.data());
      wvec[d] = static_cast<T>(B[l]);
      if (!tile::finite_body(wvec.data(), D)) {
        bad_code[l] = static_cast<int>(ErrorCode::diverged);
        bad_step[l] = K - 1;
        continue;
      }
      T* gk = gK.data() + l * D;
      const double loss = query_pass(*ts, t, wvec.data(), rows, qz, qr, qt, gk);
      if (!std::isfinite(loss)) {
        bad_code[l] = static_cast<int>(ErrorCode::nonfinite_query);
        bad_step[l] = K;
        continue;
      }
      slot[0] = loss;
      sup.gather(t, d, rows);
      qz.resize(static_cast<size_t>(n));
      tile::xv_body(rows.data(), n, d, gk, qz.data());
      for (index_t i = 0; i < n; ++i) V[i * L + l] = qz[i];
      gkw0[l] = blocked_dot(gk, theta, d);  // the same sum as FastGramWorker's
      gb[l] = static_cast<double>(gk[d]);
    }
    // Phase 4, lanes: the reverse sweep in n-space.
    const index_t Hn = lr.size();
    hyper.assign(static_cast<size_t>(Hn * L), 0.0);
    gl2.assign(L, 0.0);
    Gam.assign(static_cast<size_t>(nL), 0.0);
    XG.resize(static_cast<size_t>(nL));
    H.resize(static_cast<size_t>(nL));
    double beta = 1.0;
    double xg_r[L], v_c[L], g_z[L], g_kc[L], hs[L], fin5[L];
    for (index_t j = K - 1; j >= 0; --j) {
      const double al = static_cast<double>(alpha[j * D]);
      const double rho = 1.0 - al * lam;
      const double* Rj = R.data() + j * nL;
      const double* Ccj = Cc.data() + j * nL;
      const double* KCj = KC.data() + j * nL;
      npf.step();
      lanes_gram_mul(n, Gam.data(), work.data());
      for (index_t l = 0; l < L; ++l) xg_r[l] = v_c[l] = g_z[l] = g_kc[l] = hs[l] = 0.0;
      for (index_t i = 0; i < n; ++i) {
#pragma omp simd
        for (index_t l = 0; l < L; ++l) {
          const index_t q = i * L + l;
          XG[q] = beta * V[q] - work[q];
          xg_r[l] += XG[q] * Rj[q];
          v_c[l] += V[q] * Ccj[q];
          g_z[l] += Gam[q] * z0w[q];
          g_kc[l] += Gam[q] * KCj[q];
        }
      }
      const index_t hj = lr.ks > 1 ? j : 0;
#pragma omp simd
      for (index_t l = 0; l < L; ++l) {
        const double gb_col = gb[l] * colR[j * L + l];
        const double gw_wj = beta * a[j] * gkw0[l] - beta * v_c[l] - a[j] * g_z[l] + g_kc[l];
        hyper[hj * L + l] -= xg_r[l] + lam * gw_wj + gb_col;
        gl2[l] -= al * gw_wj;
      }
      if (mode == Mode::maml) {
        const double* cj = curv.data() + j * nL;
        for (index_t i = 0; i < n; ++i) {
#pragma omp simd
          for (index_t l = 0; l < L; ++l) {
            const index_t q = i * L + l;
            H[q] = cj[q] * (XG[q] + gb[l]);
            hs[l] += H[q];
          }
        }
#pragma omp simd
        for (index_t q = 0; q < nL; ++q) Gam[q] = rho * Gam[q] + al * H[q] * inv_n;
        for (index_t l = 0; l < L; ++l) gb[l] -= al * hs[l] * inv_n;
        beta *= rho;
      }
    }
    // Phase 5: dtheta = [beta gK_w - X^T Gam ; gb].
    if (packed) {
      lcf.resize(static_cast<size_t>(nL));
      for (index_t q = 0; q < nL; ++q) lcf[q] = static_cast<T>(-Gam[q]);
      ldt.resize(static_cast<size_t>(d * L));
      tile::lanes_xtr(Ps.data(), n, d, lcf.data(), beta, lgk.data(), false, ldt.data());
      // the slot's finite check, per lane over the lane-major dtheta
#pragma omp simd
      for (index_t l = 0; l < L; ++l) fin5[l] = gb[l] * 0.0 + gl2[l] * 0.0;
      for (index_t h = 0; h < lr.size(); ++h)
#pragma omp simd
        for (index_t l = 0; l < L; ++l) fin5[l] += hyper[h * L + l] * 0.0;
      for (index_t q = 0; q < d; ++q)
#pragma omp simd
        for (index_t l = 0; l < L; ++l) fin5[l] += static_cast<double>(ldt[q * L + l]) * 0.0;
    }
    for (index_t l = 0; l < g; ++l) {
      if (bad_code[l]) continue;
      const index_t t = t0 + l;
      double* slot = slots + l * slot_len;
      if (packed) {
        for (index_t q = 0; q < d; ++q) slot[1 + q] = static_cast<double>(ldt[q * L + l]);
      } else {
        sup.gather(t, d, rows);
        for (index_t i = 0; i < n; ++i) neg[i] = -Gam[i * L + l];
        tile::xtr_body(rows.data(), n, d, neg.data(), beta, gK.data() + l * D, wvec.data());
        for (index_t q = 0; q < d; ++q) slot[1 + q] = static_cast<double>(wvec[q]);
      }
      slot[1 + d] = gb[l];
      for (index_t h = 0; h < Hn; ++h) slot[1 + D + h] = hyper[h * L + l];
      slot[1 + D + Hn] = gl2[l];
      if (packed ? !(fin5[l] == 0.0) : !tile::finite_body(slot, 1 + D + Hn + 1)) {
        bad_code[l] = static_cast<int>(ErrorCode::nonfinite_grad);
        bad_step[l] = -1;
      }
    }
  }

  // The next group's rows (tasks t1 .. t1 + kLanes - 1), prefetched into L2
  // over this group's forward and reverse steps (npf.step), which read no
  // task data: the packing that reads them first otherwise waits on memory.
  FASTMAML_INLINE void prefetch_next_group(index_t t1) {
    const index_t d = ts->d;
    pf_rows.clear();
    npf = tile::RowPrefetch<T>{};
    if (!next_group_prefetch_pays()) return;
    for (index_t t = t1; t < std::min(ts->n_tasks, t1 + kLanes) && K > 0; ++t)
      for (const SideView<T>* side : {&ts->support, &ts->query}) {
        side->gather(t, d, pf_tmp);
        pf_rows.insert(pf_rows.end(), pf_tmp.begin(), pf_tmp.end());
      }
    if (pf_rows.empty()) return;
    npf.rows = pf_rows.data();
    npf.nrows = static_cast<index_t>(pf_rows.size());
    npf.row_bytes = d * static_cast<index_t>(sizeof(T));
    npf.per_step = (npf.nrows * ((npf.row_bytes + 63) / 64) + 2 * K - 1) / (2 * K);
  }

  // Packs side's rows of tasks t0 .. t0 + g - 1 (unused lanes: task t0's)
  // lane-major into P (tile::pack_lanes).
  FASTMAML_INLINE void pack_side(const SideView<T>& side, index_t t0, index_t g, index_t nrows, std::vector<T>& P) {
    constexpr index_t L = kLanes;
    const index_t d = ts->d;
    lrows.resize(static_cast<size_t>(L * nrows));
    for (index_t l = 0; l < L; ++l) {
      side.gather(t0 + (l < g ? l : 0), d, rows);
      std::copy(rows.begin(), rows.end(), lrows.begin() + l * nrows);
      lrowp[l] = lrows.data() + l * nrows;
    }
    P.resize(static_cast<size_t>(nrows * d * L));
    tile::pack_lanes(lrowp, nrows, d, P.data());
  }

  // Phase 3 on the packed rows: phi_K of every lane, the query side (loss,
  // gK), X gK and <gK_w, theta_w>, with per lane the operations of the
  // per-task path's xtr_body / fused_rows_body (mode 2) except that sums
  // over features run in order (tile.hpp, lane-major kernels).
  FASTMAML_INLINE void packed_query(index_t t0, index_t g, index_t n, index_t m, double* slots, index_t slot_len) {
    constexpr index_t L = kLanes;
    const index_t d = ts->d, nL = n * L, mL = m * L;
    lcf.resize(static_cast<size_t>(std::max(nL, mL)));
    for (index_t q = 0; q < nL; ++q) lcf[q] = static_cast<T>(-Cc[K * nL + q]);
    lwk.resize(static_cast<size_t>(d * L));
    tile::lanes_xtr(Ps.data(), n, d, lcf.data(), a[K], theta, true, lwk.data());
    // finite check of W_K per lane (x * 0 is 0 for finite x, NaN otherwise)
    double fin[L];
    for (index_t l = 0; l < L; ++l) fin[l] = static_cast<double>(static_cast<T>(B[l])) * 0.0;
    for (index_t q = 0; q < d; ++q)
#pragma omp simd
      for (index_t l = 0; l < L; ++l) fin[l] += static_cast<double>(lwk[q * L + l]) * 0.0;
    // query logits z = Xq w_K + b (b as the per-task path's phi[d], a T)
    qz.resize(static_cast<size_t>(mL));
    tile::lanes_xv(Pq.data(), m, d, lwk.data(), false, qz.data());
    qr.resize(static_cast<size_t>(mL));
    qt.resize(static_cast<size_t>(mL));
    qe.resize(static_cast<size_t>(mL));
    qs.resize(static_cast<size_t>(mL));
    yq.resize(static_cast<size_t>(mL));
    const double inv_m = 1.0 / static_cast<double>(m);
    double hinge[L], bias[L], vb[L];
    for (index_t l = 0; l < L; ++l) {
      const std::int32_t* y = ts->query.y + ts->query.begin(t0 + (l < g ? l : 0));
      for (index_t i = 0; i < m; ++i) yq[i * L + l] = y[i];
      vb[l] = static_cast<double>(static_cast<T>(B[l]));
    }
    // fused_rows_body's mode 2 for every lane at once: the logits, then the
    // link over all m * L entries in one vectorised pass (binary_rows_body:
    // per entry the same operations as the row-by-row form), then per lane
    // the in-order sums over rows.
    for (index_t i = 0; i < m; ++i)
#pragma omp simd
      for (index_t l = 0; l < L; ++l) qz[i * L + l] += vb[l];
    vmath::binary_rows_body(qz.data(), yq.data(), mL, inv_m, qr.data(), qs.data(), qe.data());
    for (index_t l = 0; l < L; ++l) {
      double h_sum = 0.0, r_sum = 0.0;
      for (index_t i = 0; i < m; ++i) {
        const double z = qz[i * L + l];
        const double h = yq[i * L + l] == 1 ? -z : z;
        h_sum += h > 0.0 ? h : 0.0;
        r_sum += qr[i * L + l];
        qt[l * m + i] = qe[i * L + l];
      }
      hinge[l] = h_sum;
      bias[l] = r_sum;
    }
    for (index_t q = 0; q < mL; ++q) lcf[q] = static_cast<T>(qr[q]);
    lgk.resize(static_cast<size_t>(d * L));
    tile::lanes_xtr(Pq.data(), m, d, lcf.data(), 0.0, static_cast<const T*>(nullptr), false, lgk.data());
    // X gK (V), <gK_w, theta_w> in float64, features in order, and gb
    tile::lanes_xv(Ps.data(), n, d, lgk.data(), false, V.data());
    double s0[L];
    for (index_t l = 0; l < L; ++l) s0[l] = 0.0;
    for (index_t q = 0; q < d; ++q) {
      const double th = static_cast<double>(theta[q]);
#pragma omp simd
      for (index_t l = 0; l < L; ++l) s0[l] += static_cast<double>(lgk[q * L + l]) * th;
    }
    for (index_t l = 0; l < L; ++l) {
      gkw0[l] = s0[l];
      gb[l] = static_cast<double>(static_cast<T>(bias[l]));
    }
    for (index_t l = 0; l < g; ++l) {
      if (bad_code[l]) continue;
      if (!(fin[l] == 0.0)) {
        bad_code[l] = static_cast<int>(ErrorCode::diverged);
        bad_step[l] = K - 1;
        continue;
      }
      const double loss = (hinge[l] + vmath::sum_log1p(qt.data() + l * m, m)) * inv_m;
      if (!std::isfinite(loss)) {
        bad_code[l] = static_cast<int>(ErrorCode::nonfinite_query);
        bad_step[l] = K;
        continue;
      }
      slots[l * slot_len] = loss;
    }
  }

  // out = G in, per lane, k in order (the same sum as gram_mul_body).
  FASTMAML_INLINE void lanes_gram_mul(index_t n, const double* in, double* FASTMAML_RESTRICT out) const {
    constexpr index_t L = kLanes;
    // Four output rows at once: four independent FMA chains per lane (one
    // row alone waits on each FMA's latency); each out[i] is the same
    // k-ordered sum either way.
    index_t i = 0;
    for (; i + 8 <= n; i += 8) {  // eight rows: one load of in[k] feeds 8 FMAs
      double acc[8][L] = {};
      for (index_t k = 0; k < n; ++k) {
        const double* ink = in + k * L;
        for (int r = 0; r < 8; ++r) {
          const double* g = G.data() + ((i + r) * n + k) * L;
#pragma omp simd
          for (index_t l = 0; l < L; ++l) acc[r][l] += g[l] * ink[l];
        }
      }
      for (int r = 0; r < 8; ++r)
        for (index_t l = 0; l < L; ++l) out[(i + r) * L + l] = acc[r][l];
    }
    for (; i + 4 <= n; i += 4) {
      double a0[L] = {}, a1[L] = {}, a2[L] = {}, a3[L] = {};
      for (index_t k = 0; k < n; ++k) {
        const double* ink = in + k * L;
        const double* g0 = G.data() + (i * n + k) * L;
        const double* g1 = g0 + n * L;
        const double* g2 = g1 + n * L;
        const double* g3 = g2 + n * L;
#pragma omp simd
        for (index_t l = 0; l < L; ++l) {
          a0[l] += g0[l] * ink[l];
          a1[l] += g1[l] * ink[l];
          a2[l] += g2[l] * ink[l];
          a3[l] += g3[l] * ink[l];
        }
      }
      for (index_t l = 0; l < L; ++l) {
        out[i * L + l] = a0[l];
        out[(i + 1) * L + l] = a1[l];
        out[(i + 2) * L + l] = a2[l];
        out[(i + 3) * L + l] = a3[l];
      }
    }
    for (; i < n; ++i) {
      double acc[L] = {};
      for (index_t k = 0; k < n; ++k) {
        const double* gik = G.data() + (i * n + k) * L;
        const double* ink = in + k * L;
#pragma omp simd
        for (index_t l = 0; l < L; ++l) acc[l] += gik[l] * ink[l];
      }
      for (index_t l = 0; l < L; ++l) out[i * L + l] = acc[l];
    }
  }
};

FASTMAML_CLONES inline void lockstep_group(LockstepGram<float>& w, index_t t0, index_t g, double* slots,
                                           index_t slot_len) {
  w.run(t0, g, slots, slot_len);
}
FASTMAML_CLONES inline void lockstep_group(LockstepGram<double>& w, index_t t0, index_t g, double* slots,
                                           index_t slot_len) {
  w.run(t0, g, slots, slot_len);
}

// Whether a task runs its Gram sweep in a lock-step group: tiny tasks whose
// n-space work (K n^2 per step set) outweighs the per-task passes over d, so
// that filling SIMD lanes across tasks pays (W3: n = 10, d = 64, K = 5).
// Reads the task's own shape only, so a task's result never depends on its
// neighbours, the shard it lands in or the thread count. A dataset kernel
// matrix gives the Gram matrix without a pass over the rows; those tasks run
// alone.
inline bool lockstep_applies(index_t n, index_t d, index_t K, bool kernel) {
  return !kernel && n <= 32 && 2.0 * static_cast<double>(K) * n >= static_cast<double>(d);
}

// The Gram path's group worker (run_groups): a lock-step group of up to
// kLanes tasks, or one task alone.
template <class T>
struct GramGroupWorker {
  FastGramWorker<T> one;
  LockstepGram<T> lanes;
  bool kernel = false;
  int force_lockstep = -1;  // tests only: 0 never, 1 always, -1 the shape rule

  GramGroupWorker(const TaskSet<T>& ts, const T* theta, const T* alpha, index_t K, LrLayout lr, double lam,
                  Mode mode) {
    one.ts = lanes.ts = &ts;
    one.theta = lanes.theta = theta;
    one.alpha = lanes.alpha = alpha;
    one.K = lanes.K = K;
    one.lr = lanes.lr = lr;
    one.lam = lanes.lam = lam;
    one.mode = lanes.mode = mode;
    kernel = ts.kernel != nullptr && ts.support.idx != nullptr;
  }
  bool in_lanes(index_t t) const {
    if (force_lockstep >= 0) return force_lockstep == 1 && !kernel;
    return lockstep_applies(one.ts->support.size(t), one.ts->d, one.K, kernel);
  }
  // End of the group starting at t: consecutive lock-step tasks of the same
  // support and query sizes, at most kLanes, never crossing a reduction block.
  index_t group_end(index_t t) const {
    const auto& ts = *one.ts;
    if (!in_lanes(t)) return t + 1;
    const index_t block_end = std::min(ts.n_tasks, (t / kReduceBlock + 1) * kReduceBlock);
    index_t e = t + 1;
    while (e < block_end && e - t < kLanes && ts.support.size(e) == ts.support.size(t) &&
           ts.query.size(e) == ts.query.size(t) && in_lanes(e))
      ++e;
    return e;
  }
  void operator()(index_t t0, index_t g, double* slots, index_t slot_len, TaskStatus* status) {
    if (in_lanes(t0)) {
      lockstep_group(lanes, t0, g, slots, slot_len);
      for (index_t l = 0; l < g; ++l)
        if (lanes.bad_code[static_cast<size_t>(l)]) {
          status[l].code = static_cast<ErrorCode>(lanes.bad_code[static_cast<size_t>(l)]);
          status[l].task = t0 + l;
          status[l].step = lanes.bad_step[static_cast<size_t>(l)];
        }
      return;
    }
    each_task(one, t0, g, slots, slot_len, status);
  }
};

}  // namespace fastmaml
