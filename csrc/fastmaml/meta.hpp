// The one entry point of a meta-gradient: which exact path computes a call
// (the plain sweep or the span-of-rows sweep: fastsweep.hpp for the binary
// one-step-size case, sweep.hpp / span.hpp for everything else), the
// shape-only cost model behind that choice with its applicability check, and
// the dispatcher that runs the chosen path over the batch and combines the
// per-task results (parallel.hpp). The choice is exported to Python
// (`_core.choose_sweep`), so that anyone who needs the decision (the Dask
// driver, say) uses this rule and no copy of it.
//
// The choice reads shapes only, never the thread count (docs/design.md,
// "Reduction order" and section 3): both paths compute the same quantity,
// and agree to rounding.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "logistic.hpp"
#include "parallel.hpp"
#include "fastsweep.hpp"
#include "span.hpp"
#include "sweep.hpp"

namespace fastmaml {

enum class Sweep : int { automatic = 0, plain = 1, gram = 2 };

// Cost of one task's meta-gradient, support side (the query side is the
// same for both paths). Softmax (C > 1, sweep.hpp / span.hpp): multiply-add
// counts. Binary (C == 1, fastsweep.hpp), in the units of a fused
// matrix-vector pass: the plain sweep makes 2K passes over X (n d each); the
// Gram matrix runs in 4 x 4 register tiles at about four times the speed of
// a pass per multiply-add (n^2 d / 2 / 4), the Gram sweep makes 4 passes
// over X and K n^2 in n-space. Calibrated on float32, one thread, n = 8-200,
// d = 64-784, K = 1-20 (docs/design.md): W1 (n = 20, K = 5) and W2 (n = 100,
// K = 10) take the Gram sweep, n = 150 with K = 10 the plain one.
inline double plain_cost(index_t n, index_t d, index_t C, index_t K) {
  if (C == 1) return 2.0 * static_cast<double>(K) * n * d;
  return 4.0 * static_cast<double>(K) * n * d * C;
}
inline double gram_cost(index_t n, index_t d, index_t C, index_t K, bool have_kernel = false) {
  const double nn = static_cast<double>(n) * n;
  if (C == 1) return (have_kernel ? 0.0 : 0.5 * nn * d / 4.0) + 4.0 * n * d + static_cast<double>(K) * nn;
  const double gram = have_kernel ? nn : 0.5 * nn * d;
  return gram + 4.0 * n * d * C + 4.0 * K * nn * C;
}

// Feature gradients (binary, extended.hpp) add to each path the product that
// forms the support rows' gradients at the end of a task: (n x 2K)(2K x d)
// on the plain sweep (plus, first order, the K passes X u_j its missing HVP
// pass would have formed), (n x (n + 2))((n + 2) x d) on the Gram path.
inline double plain_feature_cost(index_t n, index_t d, index_t K, bool first_order) {
  return (2.0 + (first_order ? 1.0 : 0.0)) * static_cast<double>(K) * n * d;
}
inline double gram_feature_cost(index_t n, index_t d) { return (static_cast<double>(n) + 2.0) * n * d; }

// The cost model alone: whether the span sweep is cheaper for tasks of n
// support rows (where it applies).
inline bool gram_is_cheaper(index_t n, index_t d, index_t C, index_t K, bool have_kernel, bool features = false,
                            bool first_order = false) {
  if (features)
    return gram_cost(n, d, C, K, have_kernel) + gram_feature_cost(n, d) <
           plain_cost(n, d, C, K) + plain_feature_cost(n, d, K, first_order);
  return gram_cost(n, d, C, K, have_kernel) < plain_cost(n, d, C, K);
}

// Everything the choice of path reads: shapes and the kind of inner step.
struct CallShape {
  double support_rows_per_task = 0.0;  // mean over the batch (ptr[T] / T)
  index_t d = 0, C = 1, K = 0;
  bool kernel = false;  // an index-form batch with the dataset's kernel matrix
  bool preconditioned = false;
  LrLayout lr{};
  Mode mode = Mode::maml;
  bool features = false;  // binary feature gradients with shared hyperparameters (extended.hpp)
};

template <class T>
CallShape call_shape(const TaskSet<T>& ts, index_t C, index_t K, bool preconditioned, LrLayout lr, Mode mode) {
  CallShape s;
  s.support_rows_per_task = rows_per_task(ts.support, ts.n_tasks);
  s.d = ts.d;
  s.C = C;
  s.K = K;
  s.kernel = ts.kernel != nullptr && ts.support.idx != nullptr;
  s.preconditioned = preconditioned;
  s.lr = lr;
  s.mode = mode;
  return s;
}

// Whether the span-of-rows sweep computes this case exactly: one step size
// per step (scalar or per-step inner_lr), no preconditioner, MAML or
// first-order MAML, at least one step.
// With feature gradients: binary only (fastsweep.hpp's FastGramWorker forms them).
inline bool gram_applies(const CallShape& s) {
  return !s.preconditioned && s.lr.pr == 1 && s.lr.pc == 1 && s.mode != Mode::reptile && s.K > 0 &&
         !(s.features && s.C != 1);
}

// The path a call takes: plain or gram, never automatic. A requested "gram"
// that does not apply yields plain (the Python layer turns that into an
// error naming `sweep`); "automatic" compares the costs at the ceiling of the
// mean support size.
inline Sweep choose_sweep(const CallShape& s, Sweep requested) {
  if (requested == Sweep::plain || !gram_applies(s)) return Sweep::plain;
  if (requested == Sweep::gram) return Sweep::gram;
  const index_t n = static_cast<index_t>(std::ceil(s.support_rows_per_task));
  return gram_is_cheaper(n, s.d, s.C, s.K, s.kernel, s.features, s.mode == Mode::first_order) ? Sweep::gram
                                                                                              : Sweep::plain;
}

// Meta-loss and gradients for a meta-batch. Outputs are means over tasks:
// loss, grad (P), hyper (step-size gradient in layout lr, or d/dlog_scale
// then d/dU), grad_l2. In Reptile mode grad = mean(theta - phi_K) and the
// hypergradients are zero.
// Length of one task's result slot: [loss, grad (P), hyper (H), grad_l2].
inline index_t meta_slot_len(index_t P, index_t H, Mode mode) {
  return mode == Mode::reptile ? 1 + P : 1 + P + H + 1;
}

// The batch means from the block-ordered sum of the task slots.
template <class T>
void finish_meta(const std::vector<double>& total, index_t n_tasks, index_t P, index_t H, Mode mode, double* loss,
                 T* grad, T* hyper, double* grad_l2) {
  const double inv_T = 1.0 / static_cast<double>(n_tasks);
  *loss = total[0] * inv_T;
  for (index_t p = 0; p < P; ++p) grad[p] = static_cast<T>(total[1 + p] * inv_T);
  if (mode == Mode::reptile) {
    std::fill(hyper, hyper + H, T(0));
    *grad_l2 = 0.0;
  } else {
    for (index_t k = 0; k < H; ++k) hyper[k] = static_cast<T>(total[1 + P + k] * inv_T);
    *grad_l2 = total[1 + P + H] * inv_T;
  }
}

template <class T, class Link, class MakeWorker>
TaskStatus meta_value_and_grad_with(const TaskSet<T>& ts, const Model<T, Link>& model, index_t H, Mode mode,
                                    int n_threads, double work, MakeWorker&& make, double* loss, T* grad,
                                    T* hyper, double* grad_l2, double* blocks_out) {
  const index_t slot_len = meta_slot_len(model.P, H, mode);
  std::vector<double> total(static_cast<size_t>(slot_len));
  TaskStatus st = run_tasks(ts.n_tasks, slot_len, n_threads, make, total.data(), work, blocks_out);
  if (st.ok()) finish_meta(total, ts.n_tasks, model.P, H, mode, loss, grad, hyper, grad_l2);
  return st;
}

// Whether the binary fast sweeps of fastsweep.hpp compute this case: binary
// link, one step size per step, no preconditioner, MAML or first-order MAML.
template <class Link>
inline bool fast_applies(const CallShape& s) {
  return std::is_same<Link, BinaryLink>::value && !s.preconditioned && s.lr.pr == 1 && s.lr.pc == 1 &&
         s.mode != Mode::reptile;
}

// Features are not checked before a call (that would be one more pass over
// every value): a NaN or infinite feature makes the logits, residuals or
// gradients of its task non-finite (NaN * 0 is NaN, inf * 0 is NaN), which the
// sweeps report as a divergence. Only then are the features read again, to
// tell bad input (a ValueError naming the array) from a too-large inner_lr.
// With no inner step the support rows are never read, so they are checked
// here.
template <class T>
TaskStatus name_nonfinite_input(const TaskSet<T>& ts, index_t K, TaskStatus st) {
  const bool nonfinite = st.code == ErrorCode::diverged || st.code == ErrorCode::nonfinite_query ||
                         st.code == ErrorCode::nonfinite_grad;
  if (!nonfinite && !(st.ok() && K == 0)) return st;
  std::vector<const T*> rows;
  const SideView<T>* sides[2] = {&ts.support, &ts.query};
  const char* names[2] = {"support_X", "query_X"};
  for (int s = 0; s < (nonfinite ? 2 : 1); ++s) {
    for (index_t t = 0; t < ts.n_tasks; ++t) {
      const index_t n = sides[s]->gather(t, ts.d, rows);
      for (index_t i = 0; i < n; ++i) {
        if (!all_finite(rows[static_cast<size_t>(i)], ts.d)) {
          TaskStatus bad;
          bad.code = ErrorCode::nonfinite_input;
          bad.task = t;
          bad.message = sides[s]->idx ? "X" : names[s];
          return bad;
        }
      }
    }
  }
  return st;
}

// The path chosen by choose_sweep, run over the batch.
template <class T, class Link>
TaskStatus meta_sweep(const TaskSet<T>& ts, Link link, const T* theta, const T* alpha, const Preconditioner<T>& pre,
                      index_t K, LrLayout lr, double lam, Mode mode, int n_threads, double* loss, T* grad, T* hyper,
                      double* grad_l2, Sweep sweep, double* blocks_out) {
  Model<T, Link> model(&ts, link);
  const index_t H = pre.active() ? model.D * (1 + pre.rank) : lr.size();
  const double rows = rows_per_task(ts.support, ts.n_tasks);
  const double qrows = rows_per_task(ts.query, ts.n_tasks);
  const CallShape shape = call_shape(ts, model.C, K, pre.active(), lr, mode);
  const bool gram = choose_sweep(shape, sweep) == Sweep::gram;
  const bool fast = fast_applies<Link>(shape);
  // Work estimates size the thread team only, never a result.
  const double work = gram ? gram_cost(static_cast<index_t>(std::ceil(rows)), ts.d, model.C, K, shape.kernel) +
                                 2.0 * qrows * model.P
                           : (4.0 * K + 2.0) * (rows + qrows) * static_cast<double>(model.P);
  if (fast && gram) {
    const index_t slot_len = meta_slot_len(model.P, H, mode);
    std::vector<double> total(static_cast<size_t>(slot_len));
    GramGroupWorker<T> proto(ts, theta, alpha, K, lr, lam, mode);
    auto make = [&]() { return proto; };
    auto end = [&](index_t t) { return proto.group_end(t); };
    TaskStatus st = run_groups(ts.n_tasks, slot_len, n_threads, end, make, total.data(), work, blocks_out);
    if (st.ok()) finish_meta(total, ts.n_tasks, model.P, H, mode, loss, grad, hyper, grad_l2);
    return st;
  }
  if (fast) {
    auto make = [&]() {
      FastPlainWorker<T> w;
      w.ts = &ts, w.theta = theta, w.alpha = alpha, w.K = K, w.lr = lr, w.lam = lam, w.mode = mode;
      return w;
    };
    return meta_value_and_grad_with(ts, model, H, mode, n_threads, work, make, loss, grad, hyper, grad_l2,
                                    blocks_out);
  }
  if (gram) {
    auto make = [&]() { return GramMetaWorker<T, Link>(model, theta, alpha, K, lr, lam, mode); };
    return meta_value_and_grad_with(ts, model, H, mode, n_threads, work, make, loss, grad, hyper, grad_l2,
                                    blocks_out);
  }
  auto make = [&]() { return MetaWorker<T, Link>{model, theta, alpha, pre, K, lr, lam, mode, {}}; };
  return meta_value_and_grad_with(ts, model, H, mode, n_threads, work, make, loss, grad, hyper, grad_l2,
                                  blocks_out);
}

// The dispatcher: chooses the path (choose_sweep), runs it, and names
// non-finite input.
template <class T, class Link>
TaskStatus meta_value_and_grad(const TaskSet<T>& ts, Link link, const T* theta, const T* alpha,
                               const Preconditioner<T>& pre, index_t K, LrLayout lr, double lam, Mode mode,
                               int n_threads, double* loss, T* grad, T* hyper, double* grad_l2,
                               Sweep sweep = Sweep::automatic, double* blocks_out = nullptr) {
  return name_nonfinite_input(ts, K,
                              meta_sweep(ts, link, theta, alpha, pre, K, lr, lam, mode, n_threads, loss, grad,
                                         hyper, grad_l2, sweep, blocks_out));
}

}  // namespace fastmaml
