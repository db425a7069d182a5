// iMAML (Rajeswaran et al. 2019): implicit meta-gradients of a proximal
// inner problem.
//   phi* = argmin_phi l_s(phi) + mu/2 ||phi - theta||^2     (l_s includes L2)
// solved by Newton-CG (Hessian-vector products, Armijo backtracking) until
// ||grad||_2 <= tol; then the meta-gradient of task t is
//   (I + H(phi*)/mu)^{-1} grad l_q(phi*)
// by conjugate gradient on Hessian-vector products. Memory per task is a few
// parameter-sized vectors plus the row curvature: independent of the number
// of solver iterations.
#pragma once

#include <cmath>
#include <vector>

#include "logistic.hpp"
#include "parallel.hpp"

namespace fastmaml {

struct ImamlSettings {
  double mu = 1.0;
  double lam = 0.0;
  double tol = 1e-10;     // on ||grad of the proximal objective||_2
  index_t max_iter = 50;  // Newton iterations
  double cg_tol = 1e-10;  // relative residual of the meta-gradient solve
  index_t cg_max_iter = 200;
};

// Per-task diagnostics written by the solver (arrays of length n_tasks).
struct ImamlReport {
  double* inner_residual;  // ||grad of proximal objective|| at phi*
  std::int32_t* inner_iterations;
  std::uint8_t* inner_converged;
  double* cg_residual;  // relative residual of (I + H/mu) x = g_q
  std::int32_t* cg_iterations;
  std::uint8_t* cg_converged;
};

template <class T>
inline double dotv(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

template <class T, class Link>
struct ImamlWorker {
  Model<T, Link> model;
  const T* theta;
  ImamlSettings cfg;
  ImamlReport rep;
  Scratch<T> sc;
  std::vector<T> phi, trial, vec_t, hv_t;
  std::vector<double> grad, p, r, z, hp, x;
  std::vector<double> curv;

  ImamlWorker(const Model<T, Link>& m, const T* th, ImamlSettings c, ImamlReport r)
      : model(m), theta(th), cfg(c), rep(r) {}

  // Proximal objective at v (double), with curvature into curv when asked.
  double objective(index_t t, const T* v, T* grad_out, double* curv_out) {
    const index_t d = model.d, C = model.C, P = model.P;
    double loss = model.set_pass(model.ts->support, t, v, sc, grad_out, curv_out);
    double w2 = 0.0, prox = 0.0;
    for (index_t q = 0; q < d * C; ++q) w2 += static_cast<double>(v[q]) * static_cast<double>(v[q]);
    for (index_t q = 0; q < P; ++q) {
      const double diff = static_cast<double>(v[q]) - static_cast<double>(theta[q]);
      prox += diff * diff;
    }
    return loss + 0.5 * cfg.lam * w2 + 0.5 * cfg.mu * prox;
  }

  // out = (H + shift I) v for the support Hessian (incl. L2) at the stored curvature.
  void op(index_t t, const std::vector<double>& v, double shift, std::vector<double>& out) {
    const index_t P = model.P;
    for (index_t q = 0; q < P; ++q) vec_t[q] = static_cast<T>(v[q]);
    model.hvp(t, curv.data(), vec_t.data(), cfg.lam, sc, hv_t.data());
    for (index_t q = 0; q < P; ++q) out[q] = static_cast<double>(hv_t[q]) + shift * v[q];
  }

  // Solve (H + shift I) x = b by CG from x = 0; returns iterations, writes the
  // final relative residual.
  index_t cg(index_t t, const std::vector<double>& b, double shift, double rel_tol, index_t max_iter,
             std::vector<double>& sol, double* rel_res) {
    const index_t P = model.P;
    sol.assign(static_cast<size_t>(P), 0.0);
    r = b;
    p = r;
    double rr = dotv<T>(r, r);
    const double bnorm = std::sqrt(rr);
    if (bnorm == 0.0) {
      *rel_res = 0.0;
      return 0;
    }
    index_t it = 0;
    for (; it < max_iter && std::sqrt(rr) > rel_tol * bnorm; ++it) {
      op(t, p, shift, hp);
      const double pap = dotv<T>(p, hp);
      if (!(pap > 0.0)) break;
      const double a = rr / pap;
      for (index_t q = 0; q < P; ++q) {
        sol[q] += a * p[q];
        r[q] -= a * hp[q];
      }
      const double rr_new = dotv<T>(r, r);
      const double beta = rr_new / rr;
      rr = rr_new;
      for (index_t q = 0; q < P; ++q) p[q] = r[q] + beta * p[q];
    }
    // true residual, not the recursive one
    op(t, sol, shift, hp);
    double res = 0.0;
    for (index_t q = 0; q < P; ++q) res += (b[q] - hp[q]) * (b[q] - hp[q]);
    *rel_res = std::sqrt(res) / bnorm;
    return it;
  }

  ErrorCode operator()(index_t t, double* slot, index_t* step) {
    const index_t P = model.P, d = model.d, C = model.C, n = model.ts->support.size(t);
    phi.assign(theta, theta + P);
    trial.resize(static_cast<size_t>(P));
    vec_t.resize(static_cast<size_t>(P));
    hv_t.resize(static_cast<size_t>(P));
    grad.resize(static_cast<size_t>(P));
    hp.resize(static_cast<size_t>(P));
    curv.resize(static_cast<size_t>(n * C));
    std::vector<T> g_t(static_cast<size_t>(P)), trial_g(static_cast<size_t>(P));
    index_t it = 0;
    double gnorm = 0.0;
    bool converged = false;
    double f = objective(t, phi.data(), g_t.data(), curv.data());
    for (;; ++it) {
      gnorm = 0.0;
      for (index_t q = 0; q < P; ++q) {
        double gq = static_cast<double>(g_t[q]) + cfg.mu * (static_cast<double>(phi[q]) - static_cast<double>(theta[q]));
        if (q < d * C) gq += cfg.lam * static_cast<double>(phi[q]);
        grad[q] = gq;
        gnorm += gq * gq;
      }
      gnorm = std::sqrt(gnorm);
      if (!std::isfinite(gnorm)) {
        *step = it;
        return ErrorCode::diverged;
      }
      if (gnorm <= cfg.tol) {
        converged = true;
        break;
      }
      if (it >= cfg.max_iter) break;
      double cg_res = 0.0;
      // inexact Newton: solve to a relative accuracy that tightens as we converge
      cg(t, grad, cfg.mu, std::min(0.5, std::sqrt(gnorm)) * 1e-2, cfg.cg_max_iter, x, &cg_res);
      double slope = 0.0;
      for (index_t q = 0; q < P; ++q) slope += grad[q] * x[q];
      double s = 1.0, f_new = f;
      bool accepted = false;
      for (int ls = 0; ls < 40; ++ls) {
        for (index_t q = 0; q < P; ++q) trial[q] = static_cast<T>(static_cast<double>(phi[q]) - s * x[q]);
        f_new = objective(t, trial.data(), ls == 0 ? trial_g.data() : nullptr, nullptr);  // needs the loss
        if (f_new <= f - 1e-4 * s * slope) {
          accepted = true;
          break;
        }
        if (ls == 0) {
          // Near the optimum objective differences drown in rounding; a full
          // Newton step that shrinks the gradient is then the right step.
          double gn = 0.0;
          for (index_t q = 0; q < P; ++q) {
            double gq = static_cast<double>(trial_g[q]) +
                        cfg.mu * (static_cast<double>(trial[q]) - static_cast<double>(theta[q]));
            if (q < d * C) gq += cfg.lam * static_cast<double>(trial[q]);
            gn += gq * gq;
          }
          if (std::sqrt(gn) < 0.5 * gnorm) {
            accepted = true;
            break;
          }
        }
        s *= 0.5;
      }
      if (!accepted) break;  // no progress possible at this precision: report as not converged
      phi = trial;
      f = objective(t, phi.data(), g_t.data(), curv.data());
    }
    rep.inner_residual[t] = gnorm;
    rep.inner_iterations[t] = static_cast<std::int32_t>(it);
    rep.inner_converged[t] = converged ? 1 : 0;
    // Query loss and gradient at phi*, then (I + H/mu)^{-1} g_q = mu (H + mu I)^{-1} g_q.
    const double loss = model.set_pass(model.ts->query, t, phi.data(), sc, g_t.data(), nullptr);
    if (!std::isfinite(loss)) {
      *step = it;
      return ErrorCode::nonfinite_query;
    }
    model.set_pass(model.ts->support, t, phi.data(), sc, nullptr, curv.data());
    std::vector<double> b(static_cast<size_t>(P));
    for (index_t q = 0; q < P; ++q) b[q] = cfg.mu * static_cast<double>(g_t[q]);
    double rel = 0.0;
    const index_t cg_it = cg(t, b, cfg.mu, cfg.cg_tol, cfg.cg_max_iter, x, &rel);
    rep.cg_residual[t] = rel;
    rep.cg_iterations[t] = static_cast<std::int32_t>(cg_it);
    rep.cg_converged[t] = rel <= cfg.cg_tol * 10.0 ? 1 : 0;
    slot[0] = loss;
    for (index_t q = 0; q < P; ++q) slot[1 + q] = x[q];
    if (!all_finite(slot, 1 + P)) {
      *step = -1;
      return ErrorCode::nonfinite_grad;
    }
    return ErrorCode::ok;
  }
};

template <class T, class Link>
TaskStatus imaml_value_and_grad(const TaskSet<T>& ts, Link link, const T* theta, ImamlSettings cfg,
                                ImamlReport rep, int n_threads, double* loss, T* grad) {
  Model<T, Link> model(&ts, link);
  const index_t slot_len = 1 + model.P;
  std::vector<double> total(static_cast<size_t>(slot_len));
  auto make = [&]() { return ImamlWorker<T, Link>(model, theta, cfg, rep); };
  const double work = 40.0 * (rows_per_task(ts.support, ts.n_tasks) + 1.0) * model.P;
  TaskStatus st = run_tasks(ts.n_tasks, slot_len, n_threads, make, total.data(), work);
  if (!st.ok()) return st;
  const double inv_T = 1.0 / static_cast<double>(ts.n_tasks);
  *loss = total[0] * inv_T;
  for (index_t p = 0; p < model.P; ++p) grad[p] = static_cast<T>(total[1 + p] * inv_T);
  return st;
}

}  // namespace fastmaml
