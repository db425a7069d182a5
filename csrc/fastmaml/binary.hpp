// Binary logistic regression: loss, gradient, Hessian-vector product, the
// K-step inner loop and the exact (second-order) MAML reverse sweep.
//
// Mathematics: DESIGN.md section 1. theta = [w (d), b], X~ = [X, 1].
//   support loss  l_s(phi) = mean softplus(z) - y z + lam/2 ||w||^2
//   g   = X~^T (p - y)/n + lam [w; 0]
//   H v = X~^T (s * X~ v)/n + lam [v_w; 0],  s = p (1 - p)
// The forward pass keeps per step only s_j (n numbers) plus phi_j and g_j,
// which the hypergradients of alpha and lam need; no autodiff graph.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "batch.hpp"
#include "kernels.hpp"
#include "tasks.hpp"

namespace fastmaml {

// How inner_lr varies: over steps (ks == K) or not (ks == 1), over
// parameters (ps == D) or not (ps == 1). The Python side broadcasts inner_lr
// to a full (K, D) table and maps the (ks, ps) gradient back to its shape.
struct LrLayout {
  index_t ks = 1;
  index_t ps = 1;
};

template <class T>
struct BinaryScratch {
  std::vector<const T*> rows;
  std::vector<double> coef;
  std::vector<T> phi_path;  // (K+1) x D
  std::vector<T> g_path;    // K x D
  std::vector<double> s_path;  // K x n
  std::vector<T> gbar, u, hu;
};

// Forward inner loop for task t. On return phi_path holds phi_0..phi_K (or
// only the slots written when keep_path is false: phi_K is always at index
// K when keep_path, else at index 0 and 1 alternate). Returns ok or the
// diverging step.
template <class T>
ErrorCode binary_forward(const TaskSet<T>& ts, index_t t, const T* theta,
                         const T* alpha, index_t K, double lam,
                         BinaryScratch<T>& sc, bool record, index_t* bad_step) {
  const index_t d = ts.d, D = d + 1;
  const index_t n = ts.support.gather(t, d, sc.rows);
  const std::int32_t* y = ts.support.y + ts.support.begin(t);
  sc.phi_path.resize(static_cast<size_t>((K + 1) * D));
  sc.g_path.resize(static_cast<size_t>(std::max<index_t>(K, 1) * D));
  sc.s_path.resize(static_cast<size_t>(std::max<index_t>(K, 1) * n));
  sc.coef.resize(static_cast<size_t>(n));
  std::copy(theta, theta + D, sc.phi_path.begin());
  const double inv_n = 1.0 / static_cast<double>(n);
  for (index_t j = 0; j < K; ++j) {
    const T* phi = sc.phi_path.data() + j * D;
    T* g = sc.g_path.data() + (record ? j * D : 0);
    double* s = sc.s_path.data() + (record ? j * n : 0);
    for (index_t i = 0; i < n; ++i) {
      const double z = dot_bias(sc.rows[i], phi, d, static_cast<double>(phi[d]));
      const double p = sigmoid(z);
      sc.coef[i] = (p - static_cast<double>(y[i])) * inv_n;
      s[i] = p * (1.0 - p);
    }
    xt_times(sc.rows.data(), sc.coef.data(), n, d, g);
    if (lam != 0.0) axpy(g, phi, d, lam);
    T* next = sc.phi_path.data() + (j + 1) * D;
    const T* a = alpha + j * D;
    for (index_t k = 0; k < D; ++k) next[k] = phi[k] - a[k] * g[k];
    if (!all_finite(next, D)) {
      *bad_step = j;
      return ErrorCode::diverged;
    }
  }
  return ErrorCode::ok;
}

// Query loss at phi and, in grad (length D), its gradient.
template <class T>
double binary_query(const TaskSet<T>& ts, index_t t, const T* phi,
                    BinaryScratch<T>& sc, T* grad) {
  const index_t d = ts.d;
  const index_t m = ts.query.gather(t, d, sc.rows);
  const std::int32_t* y = ts.query.y + ts.query.begin(t);
  sc.coef.resize(static_cast<size_t>(m));
  const double inv_m = 1.0 / static_cast<double>(m);
  double loss = 0.0;
  for (index_t i = 0; i < m; ++i) {
    const double z = dot_bias(sc.rows[i], phi, d, static_cast<double>(phi[d]));
    const double yi = static_cast<double>(y[i]);
    loss += softplus(z) - yi * z;
    sc.coef[i] = (sigmoid(z) - yi) * inv_m;
  }
  if (grad) xt_times(sc.rows.data(), sc.coef.data(), m, d, grad);
  return loss * inv_m;
}

// Result slot layout for one task: [loss, grad (D), grad_lr (ks*ps), grad_l2]
template <class T>
struct BinaryMetaWorker {
  const TaskSet<T>* ts;
  const T* theta;
  const T* alpha;  // (K, D)
  index_t K;
  LrLayout lr;
  double lam;
  bool first_order;
  BinaryScratch<T> sc;

  ErrorCode operator()(index_t t, double* slot, index_t* step) {
    const index_t d = ts->d, D = d + 1;
    ErrorCode code = binary_forward(*ts, t, theta, alpha, K, lam, sc, true, step);
    if (code != ErrorCode::ok) return code;
    sc.gbar.resize(static_cast<size_t>(D));
    sc.u.resize(static_cast<size_t>(D));
    sc.hu.resize(static_cast<size_t>(D));
    const T* phi_K = sc.phi_path.data() + K * D;
    const double loss = binary_query(*ts, t, phi_K, sc, sc.gbar.data());
    if (!std::isfinite(loss)) {
      *step = K;
      return ErrorCode::nonfinite_query;
    }
    double* grad_lr = slot + 1 + D;
    std::fill(grad_lr, grad_lr + lr.ks * lr.ps, 0.0);
    double grad_l2 = 0.0;
    // Reverse sweep. gbar is the unscaled task gradient; the 1/T of the
    // meta-loss is applied once to the reduced total.
    if (K > 0) {
      const index_t n = ts->support.gather(t, d, sc.rows);
      const double inv_n = 1.0 / static_cast<double>(n);
      sc.coef.resize(static_cast<size_t>(n));
      for (index_t j = K - 1; j >= 0; --j) {
        const T* a = alpha + j * D;
        const T* g = sc.g_path.data() + j * D;
        const T* phi = sc.phi_path.data() + j * D;
        double* glr = grad_lr + (lr.ks > 1 ? j * lr.ps : 0);
        double wu = 0.0;
        for (index_t k = 0; k < D; ++k) {
          sc.u[k] = a[k] * sc.gbar[k];
          const double ga = -static_cast<double>(sc.gbar[k]) * static_cast<double>(g[k]);
          glr[lr.ps > 1 ? k : 0] += ga;
        }
        for (index_t k = 0; k < d; ++k) wu += static_cast<double>(sc.u[k]) * static_cast<double>(phi[k]);
        grad_l2 -= wu;
        if (!first_order) {
          const double* s = sc.s_path.data() + j * n;
          for (index_t i = 0; i < n; ++i) {
            sc.coef[i] = s[i] * inv_n *
                         dot_bias(sc.rows[i], sc.u.data(), d, static_cast<double>(sc.u[d]));
          }
          xt_times(sc.rows.data(), sc.coef.data(), n, d, sc.hu.data());
          if (lam != 0.0) axpy(sc.hu.data(), sc.u.data(), d, lam);
          for (index_t k = 0; k < D; ++k) sc.gbar[k] -= sc.hu[k];
        }
      }
    }
    slot[0] = loss;
    for (index_t k = 0; k < D; ++k) slot[1 + k] = static_cast<double>(sc.gbar[k]);
    slot[1 + D + lr.ks * lr.ps] = grad_l2;
    return ErrorCode::ok;
  }
};

// Exact MAML meta-loss and gradients for a meta-batch (binary).
// Outputs: loss (mean over tasks), grad (D), grad_lr (ks*ps), grad_l2.
template <class T>
TaskStatus binary_meta_value_and_grad(const TaskSet<T>& ts, const T* theta,
                                      const T* alpha, index_t K, LrLayout lr,
                                      double lam, bool first_order, int n_threads,
                                      double* loss, T* grad, T* grad_lr,
                                      double* grad_l2) {
  const index_t D = ts.d + 1;
  const index_t slot_len = 1 + D + lr.ks * lr.ps + 1;
  std::vector<double> total(static_cast<size_t>(slot_len));
  auto make = [&]() {
    return BinaryMetaWorker<T>{&ts, theta, alpha, K, lr, lam, first_order, {}};
  };
  const double rows = static_cast<double>(ts.support.ptr[ts.n_tasks] + ts.query.ptr[ts.n_tasks]) / ts.n_tasks;
  const double work = (4.0 * K + 2.0) * rows * static_cast<double>(D);
  TaskStatus st = run_tasks(ts.n_tasks, slot_len, n_threads, make, total.data(), work);
  if (!st.ok()) return st;
  const double inv_T = 1.0 / static_cast<double>(ts.n_tasks);
  *loss = total[0] * inv_T;
  for (index_t k = 0; k < D; ++k) grad[k] = static_cast<T>(total[1 + k] * inv_T);
  for (index_t k = 0; k < lr.ks * lr.ps; ++k) grad_lr[k] = static_cast<T>(total[1 + D + k] * inv_T);
  *grad_l2 = total[1 + D + lr.ks * lr.ps] * inv_T;
  return st;
}

// The K-step inner loop for every task; writes phi_K (T x D) or, with
// keep_path, phi_0..phi_K (T x (K+1) x D). params holds one theta (shared)
// or one per task (per_task_theta).
template <class T>
TaskStatus binary_adapt(const TaskSet<T>& ts, const T* theta, bool per_task_theta,
                        const T* alpha, index_t K, double lam, bool keep_path,
                        int n_threads, T* out) {
  const index_t D = ts.d + 1;
  struct Worker {
    const TaskSet<T>* ts;
    const T* theta;
    bool per_task;
    const T* alpha;
    index_t K;
    double lam;
    bool keep_path;
    T* out;
    BinaryScratch<T> sc;
    ErrorCode operator()(index_t t, double*, index_t* step) {
      const index_t D = ts->d + 1;
      const T* th = theta + (per_task ? t * D : 0);
      ErrorCode code = binary_forward(*ts, t, th, alpha, K, lam, sc, false, step);
      if (code != ErrorCode::ok) return code;
      if (keep_path) {
        std::copy(sc.phi_path.begin(), sc.phi_path.begin() + (K + 1) * D, out + t * (K + 1) * D);
      } else {
        std::copy(sc.phi_path.begin() + K * D, sc.phi_path.begin() + (K + 1) * D, out + t * D);
      }
      return ErrorCode::ok;
    }
  };
  (void)D;
  auto make = [&]() { return Worker{&ts, theta, per_task_theta, alpha, K, lam, keep_path, out, {}}; };
  const double work = 2.0 * (K + 1) * static_cast<double>(ts.support.ptr[ts.n_tasks]) / ts.n_tasks * D;
  return run_tasks(ts.n_tasks, 0, n_threads, make, nullptr, work);
}

// Batched primitives on the support side of `ts`, one parameter vector per
// task (params: T x D): loss (T), gradient (T x D), and, when v is given,
// the Hessian-vector product H v (T x D) instead of the gradient.
template <class T>
TaskStatus binary_loss_grad_hvp(const TaskSet<T>& ts, const T* params, double lam,
                                const T* v, int n_threads, T* loss_out, T* out) {
  struct Worker {
    const TaskSet<T>* ts;
    const T* params;
    double lam;
    const T* v;
    T* loss_out;
    T* out;
    std::vector<const T*> rows;
    std::vector<double> coef;
    ErrorCode operator()(index_t t, double*, index_t*) {
      const index_t d = ts->d, D = d + 1;
      const index_t n = ts->support.gather(t, d, rows);
      const std::int32_t* y = ts->support.y + ts->support.begin(t);
      const T* phi = params + t * D;
      const T* vt = v ? v + t * D : nullptr;
      coef.resize(static_cast<size_t>(n));
      const double inv_n = 1.0 / static_cast<double>(n);
      double loss = 0.0;
      for (index_t i = 0; i < n; ++i) {
        const double z = dot_bias(rows[i], phi, d, static_cast<double>(phi[d]));
        const double yi = static_cast<double>(y[i]);
        const double p = sigmoid(z);
        loss += softplus(z) - yi * z;
        coef[i] = vt ? p * (1.0 - p) * inv_n * dot_bias(rows[i], vt, d, static_cast<double>(vt[d]))
                     : (p - yi) * inv_n;
      }
      T* o = out + t * D;
      xt_times(rows.data(), coef.data(), n, d, o);
      double penalty = 0.0;
      for (index_t k = 0; k < d; ++k) penalty += static_cast<double>(phi[k]) * static_cast<double>(phi[k]);
      if (lam != 0.0) axpy(o, vt ? vt : phi, d, lam);
      if (loss_out) loss_out[t] = static_cast<T>(loss * inv_n + 0.5 * lam * penalty);
      return ErrorCode::ok;
    }
  };
  auto make = [&]() { return Worker{&ts, params, lam, v, loss_out, out, {}, {}}; };
  const double work = 4.0 * static_cast<double>(ts.support.ptr[ts.n_tasks]) / ts.n_tasks * (ts.d + 1);
  return run_tasks(ts.n_tasks, 0, n_threads, make, nullptr, work);
}

}  // namespace fastmaml
