// What the plain sweep computes beyond shared hyperparameters
// (docs/design.md section 1, "Per-task hyperparameters" and "Feature
// gradients"): per-task step-size tables and L2 strengths with their
// per-task hypergradients, and the exact derivative of the meta-loss with
// respect to every support and query feature value, per occurrence of a row.
//
// With task t's adjoint written without the 1/T of the mean and
// u_j = alpha_j (*) gbar_{j+1}, both links share one form per row:
//   support row i, step j:  -(1/n) [ U_{j,w} r_ji + W_j q_ji ],
//       r_ji = link residual (p - y), q_ji = hvp_row(curv_ji, U_j^T x~_i)
//   query row i:             (1/m) W_K r_i
// (binary: U_{j,w} = u_{j,w}, q_ji = s_ji (x~_i . u_j)). The rows are summed
// over steps in float64 and scaled by 1/T once, at the end of the task.
#pragma once

#include <algorithm>
#include <vector>

#include "logistic.hpp"

namespace fastmaml {

// The per-task extras of one call. Every pointer may be null (then the
// shared value of the plain call applies); outputs are written per task (task
// t owns its rows), never summed across tasks, so they need no reduction and
// do not depend on the thread count.
template <class T>
struct TaskExtras {
  index_t alpha_stride = 0;     // elements between tasks' (K x P) step tables; 0: one shared table
  const double* lam = nullptr;  // (n_tasks) L2 strengths
  T* grad_alpha = nullptr;      // (n_tasks x H) per-task step-size gradients (per-task tables)
  T* grad_lam = nullptr;        // (n_tasks) per-task L2 gradients, when lam != nullptr
  T* grad_support_X = nullptr;  // (support.ptr[n_tasks] x d), per occurrence of a support row
  T* grad_query_X = nullptr;    // (query.ptr[n_tasks] x d), per occurrence of a query row
  double inv_T = 1.0;           // 1 / n_tasks: the mean over tasks
  bool features() const { return grad_support_X != nullptr; }
};

// Per-worker buffers of the feature gradients.
template <class T>
struct FeatureScratch {
  std::vector<double> acc;  // n x d: the current task's support rows, summed over steps
  std::vector<double> row;  // d: one query row
  std::vector<double> z, v, r, curv, q;
  ClassMajor<T> wcols, ucols;  // W_j and U_j by class (multinomial only)
};

// Start of task t: no support row has received anything yet.
template <class T, class Link>
void begin_feature_task(const Model<T, Link>& model, index_t t, FeatureScratch<T>& fx) {
  const size_t C = static_cast<size_t>(model.C);
  fx.acc.assign(static_cast<size_t>(model.ts->support.size(t) * model.d), 0.0);
  fx.row.resize(static_cast<size_t>(model.d));
  fx.z.resize(C);
  fx.v.resize(C);
  fx.r.resize(C);
  fx.curv.resize(C);
  fx.q.resize(C);
}

// One row's logits <x~, phi_c> for every class c.
template <class T, class Link>
inline void row_logits(const Model<T, Link>& model, const T* x, const T* phi, ClassMajor<T>& cols, double* z) {
  if (model.C == 1) {
    z[0] = dot_bias(x, phi, model.d, static_cast<double>(phi[model.d]));
  } else {
    cols.logits(x, phi, model.d, model.C, z);
  }
}

// acc[0:d] += sum_c a[c] A[:, c] + b[c] B[:, c], for (d+1) x C parameter
// matrices A and B (their weight rows), read class-major for C > 1.
template <class T>
inline void add_weight_columns(double* acc, index_t d, index_t C, const T* A, const ClassMajor<T>& Acols,
                               const double* a, const T* B, const ClassMajor<T>& Bcols, const double* b) {
  for (index_t c = 0; c < C; ++c) {
    const T* ac = C == 1 ? A : Acols.cols.data() + c * d;
    const T* bc = C == 1 ? B : Bcols.cols.data() + c * d;
    const double ca = a[c], cb = b[c];
#pragma omp simd
    for (index_t k = 0; k < d; ++k) acc[k] += ca * static_cast<double>(ac[k]) + cb * static_cast<double>(bc[k]);
  }
}

// Step j of task t: fx.acc (n x d) += U_{j,w} r_ji + W_j q_ji for every
// support row (the -1/n and 1/T are applied at the end of the task).
template <class T, class Link>
void add_support_feature_step(const Model<T, Link>& model, index_t t, const T* phi, const T* u, Scratch<T>& sc,
                              FeatureScratch<T>& fx) {
  const index_t d = model.d, C = model.C;
  const SideView<T>& side = model.ts->support;
  const index_t n = side.gather(t, d, sc.rows);
  const std::int32_t* y = side.y + side.begin(t);
  if (C > 1) {
    fx.wcols.load(phi, d, C);
    fx.ucols.load(u, d, C);
  }
  for (index_t i = 0; i < n; ++i) {
    const T* x = sc.rows[i];
    row_logits(model, x, phi, fx.wcols, fx.z.data());
    row_logits(model, x, u, fx.ucols, fx.v.data());
    model.link.row(fx.z.data(), y[i], fx.r.data(), fx.curv.data(), /*want_loss=*/false);
    model.link.hvp_row(fx.curv.data(), fx.v.data(), fx.q.data());
    add_weight_columns(fx.acc.data() + i * d, d, C, u, fx.ucols, fx.r.data(), phi, fx.wcols, fx.q.data());
  }
}

// The end of task t's reverse sweep: its support rows -(1/T)(1/n) fx.acc and
// its query rows (1/T)(1/m) W_K r_i, into the per-occurrence outputs.
template <class T, class Link>
void write_feature_grads(const Model<T, Link>& model, index_t t, const T* phi_K, const TaskExtras<T>& ext,
                         Scratch<T>& sc, FeatureScratch<T>& fx) {
  const index_t d = model.d, C = model.C;
  const SideView<T>& s = model.ts->support;
  const index_t n = s.size(t);
  const double scale_s = ext.inv_T / static_cast<double>(n);
  T* out = ext.grad_support_X + s.begin(t) * d;
  for (index_t k = 0; k < n * d; ++k) out[k] = static_cast<T>(0.0 - fx.acc[k] * scale_s);

  const SideView<T>& q = model.ts->query;
  const index_t m = q.gather(t, d, sc.rows);
  const std::int32_t* y = q.y + q.begin(t);
  const double scale_q = ext.inv_T / static_cast<double>(m);
  if (C > 1) fx.wcols.load(phi_K, d, C);
  std::fill(fx.q.begin(), fx.q.end(), 0.0);  // the query rows have no curvature term
  T* outq = ext.grad_query_X + q.begin(t) * d;
  for (index_t i = 0; i < m; ++i) {
    row_logits(model, sc.rows[i], phi_K, fx.wcols, fx.z.data());
    model.link.row(fx.z.data(), y[i], fx.r.data(), nullptr, /*want_loss=*/false);
    std::fill(fx.row.begin(), fx.row.end(), 0.0);
    add_weight_columns(fx.row.data(), d, C, phi_K, fx.wcols, fx.r.data(), phi_K, fx.wcols, fx.q.data());
    for (index_t k = 0; k < d; ++k) outq[i * d + k] = static_cast<T>(fx.row[k] * scale_q);
  }
}

}  // namespace fastmaml
