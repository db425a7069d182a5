// The plain sweep: the inner loop over the features every step, forward
// for `adapt` (phi_K or the whole path) and forward + exact reverse sweep for
// the meta-gradient (MAML, first-order MAML, Reptile; step-size or
// preconditioner hypergradients and the L2 hypergradient). Applies to every
// case; docs/design.md section 1 has the formulas.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "logistic.hpp"

namespace fastmaml {

// How inner_lr varies over (step, parameter row, class column): each extent
// is either the full size or 1. The Python side broadcasts inner_lr to a full
// (K, D, C) table; the gradient is reduced over the extents that are 1.
struct LrLayout {
  index_t ks = 1, pr = 1, pc = 1;
  index_t size() const { return ks * pr * pc; }
};

enum class Mode : int { maml = 0, first_order = 1, reptile = 2 };

// Slot layout for one task: [loss, grad (P), hyper (H), grad_l2]
// where hyper is the step-size gradient (layout.size()) or, with a
// preconditioner, d/dlog_scale (D) followed by d/dU (D x rank).
template <class T, class Link>
struct MetaWorker {
  Model<T, Link> model;
  const T* theta;
  const T* alpha;
  Preconditioner<T> pre;
  index_t K;
  LrLayout lr;
  double lam;
  Mode mode;
  Scratch<T> sc;

  index_t hyper_size() const { return pre.active() ? model.D * (1 + pre.rank) : lr.size(); }

  ErrorCode operator()(index_t t, double* slot, index_t* step) {
    const index_t P = model.P, D = model.D, C = model.C, d = model.d;
    const bool record = mode != Mode::reptile;
    model.prepare(pre, sc);
    ErrorCode code = model.forward(t, theta, alpha, pre, K, lam, sc, record, step, nullptr);
    if (code != ErrorCode::ok) return code;
    sc.gbar.resize(static_cast<size_t>(P));
    sc.u.resize(static_cast<size_t>(P));
    sc.hu.resize(static_cast<size_t>(P));
    const T* phi_K = model.final_phi(sc, K, record);
    const double loss = model.set_pass(model.ts->query, t, phi_K, sc, sc.gbar.data(), nullptr);
    if (!std::isfinite(loss)) {
      *step = K;
      return ErrorCode::nonfinite_query;
    }
    slot[0] = loss;
    if (mode == Mode::reptile) {
      for (index_t k = 0; k < P; ++k) slot[1 + k] = static_cast<double>(theta[k]) - static_cast<double>(phi_K[k]);
      return ErrorCode::ok;
    }
    double* hyper = slot + 1 + P;
    std::fill(hyper, hyper + hyper_size(), 0.0);
    double grad_l2 = 0.0;
    const index_t n = model.ts->support.size(t);
    const index_t r = pre.rank;
    for (index_t j = K - 1; j >= 0; --j) {
      const T* g = sc.g_path.data() + j * P;
      const T* phi = sc.phi_path.data() + j * P;
      if (pre.active()) {
        model.apply_precond(pre, sc.gbar.data(), sc.u.data(), sc);
        // d/ds_k = -exp(s_k) sum_c gbar[k,c] g[k,c]
        for (index_t k = 0; k < D; ++k) {
          double acc = 0.0;
          for (index_t c = 0; c < C; ++c)
            acc += static_cast<double>(sc.gbar[k * C + c]) * static_cast<double>(g[k * C + c]);
          hyper[k] -= sc.scale[k] * acc;
        }
        // d/dU = (M + M^T) U with M = -sum_c gbar_c g_c^T:
        //      = -sum_c [gbar_c (g_c^T U) + g_c (gbar_c^T U)]
        sc.proj.assign(static_cast<size_t>(r * C), 0.0);   // g^T U    (r x C)
        sc.proj2.assign(static_cast<size_t>(r * C), 0.0);  // gbar^T U (r x C)
        for (index_t k = 0; k < D; ++k)
          for (index_t q = 0; q < r; ++q) {
            const double uk = static_cast<double>(pre.U[k * r + q]);
            for (index_t c = 0; c < C; ++c) {
              sc.proj[q * C + c] += uk * static_cast<double>(g[k * C + c]);
              sc.proj2[q * C + c] += uk * static_cast<double>(sc.gbar[k * C + c]);
            }
          }
        double* dU = hyper + D;
        for (index_t k = 0; k < D; ++k)
          for (index_t q = 0; q < r; ++q) {
            double acc = 0.0;
            for (index_t c = 0; c < C; ++c)
              acc += static_cast<double>(sc.gbar[k * C + c]) * sc.proj[q * C + c] +
                     static_cast<double>(g[k * C + c]) * sc.proj2[q * C + c];
            dU[k * r + q] -= acc;
          }
      } else {
        const T* a = alpha + j * P;
        double* glr = hyper + (lr.ks > 1 ? j * lr.pr * lr.pc : 0);
        for (index_t k = 0; k < D; ++k) {
          for (index_t c = 0; c < C; ++c) {
            const index_t p = k * C + c;
            sc.u[p] = a[p] * sc.gbar[p];
            glr[(lr.pr > 1 ? k * lr.pc : 0) + (lr.pc > 1 ? c : 0)] -=
                static_cast<double>(sc.gbar[p]) * static_cast<double>(g[p]);
          }
        }
      }
      double wu = 0.0;
      for (index_t p = 0; p < d * C; ++p) wu += static_cast<double>(sc.u[p]) * static_cast<double>(phi[p]);
      grad_l2 -= wu;
      if (mode == Mode::maml) {
        model.hvp(t, sc.curv_path.data() + j * n * C, sc.u.data(), lam, sc, sc.hu.data());
        for (index_t p = 0; p < P; ++p) sc.gbar[p] -= sc.hu[p];
      }
    }
    for (index_t p = 0; p < P; ++p) slot[1 + p] = static_cast<double>(sc.gbar[p]);
    slot[1 + P + hyper_size()] = grad_l2;
    // A forward pass that stays finite can still overflow on the way back
    // (huge step sizes): never hand back inf or NaN.
    if (!all_finite(slot, 1 + P + hyper_size() + 1)) {
      *step = -1;
      return ErrorCode::nonfinite_grad;
    }
    return ErrorCode::ok;
  }
};

// The K-step inner loop for every task; writes phi_K (T x P) or, with
// keep_path, phi_0..phi_K (T x (K+1) x P). theta is shared or per task.
template <class T, class Link>
TaskStatus adapt(const TaskSet<T>& ts, Link link, const T* theta, bool per_task_theta, const T* alpha,
                 const Preconditioner<T>& pre, index_t K, double lam, bool keep_path, int n_threads, T* out) {
  Model<T, Link> model(&ts, link);
  struct Worker {
    Model<T, Link> model;
    const T* theta;
    bool per_task;
    const T* alpha;
    Preconditioner<T> pre;
    index_t K;
    double lam;
    bool keep_path;
    T* out;
    Scratch<T> sc;
    ErrorCode operator()(index_t t, double*, index_t* step) {
      const index_t P = model.P;
      model.prepare(pre, sc);
      const T* th = theta + (per_task ? t * P : 0);
      T* path = keep_path ? out + t * (K + 1) * P : nullptr;
      ErrorCode code = model.forward(t, th, alpha, pre, K, lam, sc, false, step, path);
      if (code != ErrorCode::ok) return code;
      if (!keep_path) {
        const T* phi = model.final_phi(sc, K, false);
        std::copy(phi, phi + P, out + t * P);
      }
      return ErrorCode::ok;
    }
  };
  auto make = [&]() { return Worker{model, theta, per_task_theta, alpha, pre, K, lam, keep_path, out, {}}; };
  const double work = 2.0 * (K + 1) * rows_per_task(ts.support, ts.n_tasks) * model.P;
  return run_tasks(ts.n_tasks, 0, n_threads, make, nullptr, work);
}

}  // namespace fastmaml
