// The meta-gradient with per-task hyperparameters and/or feature gradients
// (docs/design.md section 1, "Per-task hyperparameters" and "Feature
// gradients"). Per-task hyperparameters run a plain sweep, never the Gram
// path (a per-task table would give every task its own Gram recursion).
// Binary calls with one step size per step (scalar or per-step inner_lr,
// shared or per task) run the fast binary plain sweep (fastsweep.hpp,
// FastPlainWorker with its TaskExtras); everything else (softmax,
// per-parameter inner_lr) runs sweep.hpp's MetaWorker with features.hpp.
// Binary feature gradients with shared hyperparameters may instead run the
// Gram path (FastGramWorker forms them in coefficient form), chosen as
// meta.hpp chooses (choose_sweep with CallShape::features: shapes only).
// The choice reads shapes and options only and is made here, once
// (extended_runs_fast, extended_sweep).
#pragma once

#include <cmath>
#include <vector>

#include "meta.hpp"

namespace fastmaml {

// Whether a call with per-task hyperparameters or feature gradients runs the
// fast binary plain sweep: the cases fastsweep.hpp computes (binary link,
// one step size per step, MAML or first order). Exported to Python
// (`_core.extended_path`) for the tests.
inline bool extended_runs_fast(const CallShape& s) {
  return s.C == 1 && !s.preconditioned && s.lr.pr == 1 && s.lr.pc == 1 && s.mode != Mode::reptile;
}

// The path of an extended call: gram only for binary feature gradients with
// the shared step sizes and L2 (FastGramWorker), where the binary fast sweep
// applies and choose_sweep picks it, by the feature-aware cost model for
// `automatic`; plain otherwise.
template <class T>
Sweep extended_sweep(const TaskSet<T>& ts, CallShape s, const TaskExtras<T>& ext, Sweep requested) {
  if (!ext.features() || ext.alpha_stride != 0 || ext.lam != nullptr || ts.kernel != nullptr) return Sweep::plain;
  if (!extended_runs_fast(s)) return Sweep::plain;
  s.features = true;
  return choose_sweep(s, requested);
}

// Meta-loss and gradients like meta_value_and_grad (meta.hpp), plus ext's
// per-task outputs. `alpha` is one (K x P) step table per task when
// ext.alpha_stride = K * P, with the per-task gradients in ext.grad_alpha
// (n_tasks x lr.size(); then `hyper` may be null), or one shared table when
// the stride is 0. `grad_l2` receives the sum over tasks of the per-task L2 gradients.
// `generic` (tests only) runs the generic plain sweep where the fast one applies.
// `sweep`: the path of a call with feature gradients and shared
// hyperparameters (automatic: the cost model; gram where it does not apply
// gives plain, as choose_sweep does); every other call runs a plain sweep.
template <class T, class Link>
TaskStatus meta_value_and_grad_extended(const TaskSet<T>& ts, Link link, const T* theta, const T* alpha, index_t K,
                                        LrLayout lr, double lam, Mode mode, TaskExtras<T> ext, int n_threads,
                                        double* loss, T* grad, T* hyper, double* grad_l2, bool generic = false,
                                        Sweep sweep = Sweep::plain) {
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
  const CallShape shape = call_shape(ts, model.C, K, false, lr, mode);
  if (!generic && fast_applies<Link>(shape) && extended_sweep(ts, shape, ext, sweep) == Sweep::gram) {
    const double gwork = gram_cost(static_cast<index_t>(std::ceil(rows)), ts.d, 1, K) +
                         gram_feature_cost(static_cast<index_t>(std::ceil(rows)), ts.d) +
                         3.0 * qrows * model.P;
    auto make = [&]() {
      FastGramWorker<T> w;
      w.ts = &ts, w.theta = theta, w.alpha = alpha, w.K = K, w.lr = lr, w.lam = lam, w.mode = mode, w.ext = ext;
      w.extended = true;
      return w;
    };
    return name_nonfinite_input(ts, K,
                                meta_value_and_grad_with(ts, model, H, mode, n_threads, gwork, make, loss, grad,
                                                         hyper, grad_l2, nullptr));
  }
  if (!generic && fast_applies<Link>(shape) && extended_runs_fast(shape)) {
    auto make = [&]() {
      FastPlainWorker<T> w;
      w.ts = &ts, w.theta = theta, w.alpha = alpha, w.K = K, w.lr = lr, w.lam = lam, w.mode = mode, w.ext = ext;
      w.extended = true;
      return w;
    };
    return name_nonfinite_input(ts, K,
                                meta_value_and_grad_with(ts, model, H, mode, n_threads, work, make, loss, grad,
                                                         hyper, grad_l2, nullptr));
  }
  const Preconditioner<T> none;
  auto make = [&]() { return MetaWorker<T, Link>{model, theta, alpha, none, K, lr, lam, mode, {}, ext, {}}; };
  // As meta.hpp does: a non-finite feature shows up as a divergence; name the array instead.
  return name_nonfinite_input(
      ts, K, meta_value_and_grad_with(ts, model, H, mode, n_threads, work, make, loss, grad, hyper, grad_l2, nullptr));
}

}  // namespace fastmaml
