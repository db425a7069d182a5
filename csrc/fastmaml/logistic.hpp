// The logistic-regression model (binary sigmoid or multinomial softmax):
// one fused pass over a task's rows for loss / gradient / Hessian-vector
// product, the K-step inner loop of one task (plain step sizes or a learned
// preconditioner), and the batched loss / gradient / HVP primitives.
//
// Mathematics: docs/design.md section 1. Parameters are (d+1) x C row-major
// with the bias in the last row (C = 1 for the binary model, whose link is
// the sigmoid). X~ = [X, 1].
//   support loss  l_s(phi) = mean_i loss_row(z_i) + lam/2 ||W||^2   (not the bias row)
//   g   = X~^T R / n + lam [W; 0]
//   H V = X~^T hvp_rows(X~ V) / n + lam [V_w; 0]
// The forward pass keeps per step only the link curvature of the support
// rows (n x C numbers) plus phi_j and g_j, which the hypergradients need.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.hpp"
#include "links.hpp"
#include "parallel.hpp"
#include "tasks.hpp"

namespace fastmaml {

// P = diag(exp(log_scale)) + U U^T acting on the (d+1) axis of every column.
template <class T>
struct Preconditioner {
  const T* log_scale = nullptr;  // D
  const T* U = nullptr;          // D x rank
  index_t rank = 0;
  bool active() const { return log_scale != nullptr; }
};

template <class T>
struct Scratch {
  std::vector<const T*> rows;
  std::vector<double> z, coef;
  std::vector<T> phi_path, g_path;
  std::vector<double> curv_path;
  std::vector<T> gbar, u, hu;
  std::vector<double> proj, proj2, scale;
  ClassMajor<T> cm;
};

template <class T, class Link>
struct Model {
  const TaskSet<T>* ts;
  Link link;
  index_t d, D, C, P;  // features, rows, columns, parameters

  Model(const TaskSet<T>* tasks, Link l) : ts(tasks), link(l) {
    d = ts->d;
    D = d + 1;
    C = link.cols();
    P = D * C;
  }

  // P v (v is D x C) into out; exp(log_scale) cached in sc.scale.
  void apply_precond(const Preconditioner<T>& pc, const T* v, T* out, Scratch<T>& sc) const {
    const index_t r = pc.rank;
    sc.proj.assign(static_cast<size_t>(r * C), 0.0);
    for (index_t k = 0; k < D; ++k)
      for (index_t q = 0; q < r; ++q)
        for (index_t c = 0; c < C; ++c)
          sc.proj[q * C + c] += static_cast<double>(pc.U[k * r + q]) * static_cast<double>(v[k * C + c]);
    for (index_t k = 0; k < D; ++k) {
      for (index_t c = 0; c < C; ++c) {
        double acc = sc.scale[k] * static_cast<double>(v[k * C + c]);
        for (index_t q = 0; q < r; ++q) acc += static_cast<double>(pc.U[k * r + q]) * sc.proj[q * C + c];
        out[k * C + c] = static_cast<T>(acc);
      }
    }
  }

  // exp(log_scale) of a learned preconditioner, once per task, into sc.scale.
  void prepare(const Preconditioner<T>& pre, Scratch<T>& sc) const {
    if (!pre.active()) return;
    sc.scale.resize(static_cast<size_t>(D));
    for (index_t k = 0; k < D; ++k) sc.scale[k] = std::exp(static_cast<double>(pre.log_scale[k]));
  }

  // One fused pass over the n gathered rows: the logits z = X~ w of a row,
  // then row_fn(i, z, coef_i) writes that row's coefficients (C numbers),
  // then, while the row is still in L1, out += x~_i coef_i^T (when out is
  // non-null). X is read once per pass. The binary model runs row-major (one
  // SIMD dot and axpy per row, the bias summed in double); the multinomial
  // one class-major (see ClassMajor).
  template <class RowFn>
  void fused_pass(index_t n, const T* w, Scratch<T>& sc, T* out, RowFn&& row_fn) const {
    sc.z.resize(static_cast<size_t>(C));
    sc.coef.resize(static_cast<size_t>(n * C));
    if (C > 1) {
      sc.cm.load(w, d, C);
      if (out) sc.cm.zero(d, C);
      for (index_t i = 0; i < n; ++i) {
        sc.cm.logits(sc.rows[i], w, d, C, sc.z.data());
        double* ci = sc.coef.data() + i * C;
        row_fn(i, sc.z.data(), ci);
        if (out) sc.cm.add(sc.rows[i], ci, d, C);
      }
      if (out) sc.cm.store(out, d, C);
      return;
    }
    double bias = 0.0;
    if (out) std::fill(out, out + P, T(0));
    for (index_t i = 0; i < n; ++i) {
      sc.z[0] = dot_bias(sc.rows[i], w, d, static_cast<double>(w[d]));
      double* ci = sc.coef.data() + i;
      row_fn(i, sc.z.data(), ci);
      if (out) {
        axpy(out, sc.rows[i], d, ci[0]);
        bias += ci[0];
      }
    }
    if (out) out[d] = static_cast<T>(bias);
  }

  // One pass over a set: loss (mean), gradient X~^T R / m (no penalty) into
  // grad when non-null, per-row curvature into curv when non-null.
  double set_pass(const SideView<T>& side, index_t t, const T* phi, Scratch<T>& sc, T* grad, double* curv,
                  bool want_loss = true) const {
    const index_t m = side.gather(t, d, sc.rows);
    const std::int32_t* y = side.y + side.begin(t);
    const double inv_m = 1.0 / static_cast<double>(m);
    double loss = 0.0;
    fused_pass(m, phi, sc, grad, [&](index_t i, const double* z, double* ri) {
      loss += link.row(z, y[i], ri, curv ? curv + i * C : nullptr, want_loss);
      for (index_t c = 0; c < C; ++c) ri[c] *= inv_m;
    });
    return loss * inv_m;
  }

  // H v for the support set of task t, given the curvature of its rows.
  void hvp(index_t t, const double* curv, const T* v, double lam, Scratch<T>& sc, T* out) const {
    const index_t n = ts->support.gather(t, d, sc.rows);
    const double inv_n = 1.0 / static_cast<double>(n);
    fused_pass(n, v, sc, out, [&](index_t i, const double* z, double* ci) {
      link.hvp_row(curv + i * C, z, ci);
      for (index_t c = 0; c < C; ++c) ci[c] *= inv_n;
    });
    if (lam != 0.0) axpy(out, v, d * C, lam);
  }

  // Forward inner loop from theta. When record, keeps phi_0..phi_K, g_j and
  // the curvature of every step; else only the current phi (slot 0/1).
  ErrorCode forward(index_t t, const T* theta, const T* alpha, const Preconditioner<T>& pre, index_t K,
                    double lam, Scratch<T>& sc, bool record, index_t* bad_step, T* path_out) const {
    const index_t n = ts->support.size(t);
    sc.phi_path.resize(static_cast<size_t>((record ? K + 1 : 2) * P));
    sc.g_path.resize(static_cast<size_t>((record ? std::max<index_t>(K, 1) : 1) * P));
    sc.curv_path.resize(static_cast<size_t>((record ? std::max<index_t>(K, 1) : 1) * n * C));
    std::copy(theta, theta + P, sc.phi_path.begin());
    if (path_out) std::copy(theta, theta + P, path_out);
    for (index_t j = 0; j < K; ++j) {
      T* phi = sc.phi_path.data() + (record ? j : j % 2) * P;
      T* next = sc.phi_path.data() + (record ? j + 1 : (j + 1) % 2) * P;
      T* g = sc.g_path.data() + (record ? j * P : 0);
      double* curv = sc.curv_path.data() + (record ? j * n * C : 0);
      set_pass(ts->support, t, phi, sc, g, curv, /*want_loss=*/false);
      if (lam != 0.0) axpy(g, phi, d * C, lam);
      if (pre.active()) {
        apply_precond(pre, g, next, sc);
        for (index_t k = 0; k < P; ++k) next[k] = phi[k] - next[k];
      } else {
        const T* a = alpha + j * P;
        for (index_t k = 0; k < P; ++k) next[k] = phi[k] - a[k] * g[k];
      }
      if (!all_finite(next, P)) {
        *bad_step = j;
        return ErrorCode::diverged;
      }
      if (path_out) std::copy(next, next + P, path_out + (j + 1) * P);
    }
    return ErrorCode::ok;
  }

  const T* final_phi(const Scratch<T>& sc, index_t K, bool record) const {
    return sc.phi_path.data() + (record ? K : K % 2) * P;
  }
};

// Mean support (or query) rows per task: the size the cost models read.
template <class T>
double rows_per_task(const SideView<T>& side, index_t n_tasks) {
  return static_cast<double>(side.ptr[n_tasks]) / static_cast<double>(n_tasks);
}

// Batched primitives on the support side, one parameter matrix per task
// (params: T x P): loss with penalty (T), and the gradient or, when v is
// given, the Hessian-vector product H v (T x P).
template <class T, class Link>
TaskStatus loss_grad_hvp(const TaskSet<T>& ts, Link link, const T* params, double lam, const T* v,
                         int n_threads, T* loss_out, T* out) {
  Model<T, Link> model(&ts, link);
  struct Worker {
    Model<T, Link> model;
    const T* params;
    double lam;
    const T* v;
    T* loss_out;
    T* out;
    Scratch<T> sc;
    ErrorCode operator()(index_t t, double*, index_t*) {
      const index_t P = model.P, d = model.d, C = model.C;
      const T* phi = params + t * P;
      T* o = out + t * P;
      const index_t n = model.ts->support.size(t);
      sc.curv_path.resize(static_cast<size_t>(n * C));
      const double loss = model.set_pass(model.ts->support, t, phi, sc, v ? nullptr : o, sc.curv_path.data());
      if (v) {
        model.hvp(t, sc.curv_path.data(), v + t * P, lam, sc, o);
      } else if (lam != 0.0) {
        axpy(o, phi, d * C, lam);
      }
      double penalty = 0.0;
      for (index_t p = 0; p < d * C; ++p) penalty += static_cast<double>(phi[p]) * static_cast<double>(phi[p]);
      loss_out[t] = static_cast<T>(loss + 0.5 * lam * penalty);
      return ErrorCode::ok;
    }
  };
  auto make = [&]() { return Worker{model, params, lam, v, loss_out, out, {}}; };
  const double work = 4.0 * rows_per_task(ts.support, ts.n_tasks) * model.P;
  return run_tasks(ts.n_tasks, 0, n_threads, make, nullptr, work);
}

}  // namespace fastmaml
