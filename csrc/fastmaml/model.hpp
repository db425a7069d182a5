// Logistic regression (binary or multinomial): the K-step inner loop, the
// exact MAML reverse sweep with hypergradients of the step sizes (or of a
// learned preconditioner) and of the L2 strength, Reptile, and the batched
// loss / gradient / Hessian-vector-product primitives.
//
// Mathematics: DESIGN.md section 1. Parameters are (d+1) x C row-major with
// the bias in the last row (C = 1 for the binary model, whose link is the
// sigmoid). X~ = [X, 1].
//   support loss  l_s(phi) = mean_i loss_row(z_i) + lam/2 ||W||^2   (not the bias row)
//   g   = X~^T R / n + lam [W; 0]
//   H V = X~^T hvp_rows(X~ V) / n + lam [V_w; 0]
// The forward pass keeps per step only the link curvature of the support
// rows (n x C numbers) plus phi_j and g_j, which the hypergradients need.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "batch.hpp"
#include "kernels.hpp"
#include "links.hpp"
#include "tasks.hpp"

namespace fastmaml {

// How inner_lr varies over (step, parameter row, class column): each extent
// is either the full size or 1. The Python side broadcasts inner_lr to a full
// (K, D, C) table; the gradient is reduced over the extents that are 1.
struct LrLayout {
  index_t ks = 1, pr = 1, pc = 1;
  index_t size() const { return ks * pr * pc; }
};

// P = diag(exp(log_scale)) + U U^T acting on the (d+1) axis of every column.
template <class T>
struct Preconditioner {
  const T* log_scale = nullptr;  // D
  const T* U = nullptr;          // D x rank
  index_t rank = 0;
  bool active() const { return log_scale != nullptr; }
};

enum class Mode : int { maml = 0, first_order = 1, reptile = 2 };

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

template <class T>
double rows_per_task(const SideView<T>& side, index_t n_tasks) {
  return static_cast<double>(side.ptr[n_tasks]) / static_cast<double>(n_tasks);
}

// Meta-loss and gradients for a meta-batch. Outputs are means over tasks:
// loss, grad (P), hyper (step-size gradient in layout lr, or d/dlog_scale
// then d/dU), grad_l2. In Reptile mode grad = mean(theta - phi_K) and the
// hypergradients are zero.
// Length of one task's result slot: [loss, grad (P), hyper (H), grad_l2].
inline index_t meta_slot_len(index_t P, index_t H, Mode mode) {
  return mode == Mode::reptile ? 1 + P : 1 + P + H + 1;
}

template <class T, class Link, class MakeWorker>
TaskStatus meta_value_and_grad_with(const TaskSet<T>& ts, const Model<T, Link>& model, index_t H, Mode mode,
                                    int n_threads, double work, MakeWorker&& make, double* loss, T* grad,
                                    T* hyper, double* grad_l2, double* blocks_out) {
  const index_t slot_len = meta_slot_len(model.P, H, mode);
  std::vector<double> total(static_cast<size_t>(slot_len));
  TaskStatus st = run_tasks(ts.n_tasks, slot_len, n_threads, make, total.data(), work, blocks_out);
  if (!st.ok()) return st;
  const double inv_T = 1.0 / static_cast<double>(ts.n_tasks);
  *loss = total[0] * inv_T;
  for (index_t p = 0; p < model.P; ++p) grad[p] = static_cast<T>(total[1 + p] * inv_T);
  if (mode == Mode::reptile) {
    std::fill(hyper, hyper + H, T(0));
    *grad_l2 = 0.0;
  } else {
    for (index_t k = 0; k < H; ++k) hyper[k] = static_cast<T>(total[1 + model.P + k] * inv_T);
    *grad_l2 = total[1 + model.P + H] * inv_T;
  }
  return st;
}

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
