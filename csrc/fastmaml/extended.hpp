// The meta-gradient with per-task hyperparameters and/or feature gradients
// (docs/design.md section 1, "Per-task hyperparameters" and "Feature
// gradients"). These calls always run the plain sweep (sweep.hpp) with its
// TaskExtras (features.hpp): the Gram path's reverse sweep lives in the span
// of the support rows and never forms what the feature gradients need, and a
// per-task table would give every task its own Gram recursion. The choice is
// therefore not a cost-model decision and is made here, once.
#pragma once

#include <vector>

#include "meta.hpp"

namespace fastmaml {

// Meta-loss and gradients like meta_value_and_grad (meta.hpp), plus ext's
// per-task outputs. `alpha` is one (K x P) step table per task when
// ext.alpha_stride = K * P, with the per-task gradients in ext.grad_alpha
// (n_tasks x lr.size(); then `hyper` may be null), or one shared table when
// the stride is 0. `grad_l2` receives the sum over tasks of the per-task L2 gradients.
template <class T, class Link>
TaskStatus meta_value_and_grad_extended(const TaskSet<T>& ts, Link link, const T* theta, const T* alpha, index_t K,
                                        LrLayout lr, double lam, Mode mode, TaskExtras<T> ext, int n_threads,
                                        double* loss, T* grad, T* hyper, double* grad_l2) {
  Model<T, Link> model(&ts, link);
  const index_t H = lr.size();
  ext.inv_T = 1.0 / static_cast<double>(ts.n_tasks);
  std::vector<T> hyper_sum;
  if (!hyper) {
    hyper_sum.resize(static_cast<size_t>(H));
    hyper = hyper_sum.data();
  }
  const double rows = rows_per_task(ts.support, ts.n_tasks);
  const double qrows = rows_per_task(ts.query, ts.n_tasks);
  // Work estimate: sizes the thread team only, never a result. The feature
  // pass reads each support row twice more per step.
  const double sweeps = 4.0 * K + 2.0 + (ext.features() ? 2.0 * K + 1.0 : 0.0);
  const double work = sweeps * (rows + qrows) * static_cast<double>(model.P);
  const Preconditioner<T> none;
  auto make = [&]() { return MetaWorker<T, Link>{model, theta, alpha, none, K, lr, lam, mode, {}, ext, {}}; };
  // As meta.hpp does: a non-finite feature shows up as a divergence; name the array instead.
  return name_nonfinite_input(
      ts, K, meta_value_and_grad_with(ts, model, H, mode, n_threads, work, make, loss, grad, hyper, grad_l2, nullptr));
}

}  // namespace fastmaml
