// Meta-training without Python in the loop (docs/design.md section 3,
// "The training loop"): the meta-optimizer step (Adam / SGD with an optional
// cosine schedule), the transforms of the log-hyperparameters (learned
// inner_lr, preconditioner, l2) into the core's arguments and of the core's
// gradients back, the episode draws of EpisodeSampler / GroupedSampler driven
// by NumPy's bit generator, and the loop that chains them for a block of
// meta-iterations.
//
// Every MAML / first-order MAML iteration of MAML.fit runs through
// MetaStep::run below, whether the loop of this file drives it or Python hands
// over a batch of its own, and the Python loop of the other algorithms uses
// optimizer_step: both loops are one implementation, so they agree bitwise by
// construction. Plain C++ (no Python header); the one binding that calls it is
// in bindings.cpp.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

#include "meta.hpp"
#include "sampling.hpp"

namespace fastmaml {

// ---------------------------------------------------------------- optimizer

struct OptimizerConfig {
  bool adam = true;  // else plain SGD
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  bool cosine = false;  // decay lr to 0 over total_steps
  index_t total_steps = 1;
};

// The step size of the step taken when `t` steps are done.
inline double scheduled_lr(const OptimizerConfig& c, index_t t) {
  if (!c.cosine) return c.lr;
  const double pi = 3.141592653589793;
  const double frac = static_cast<double>(std::min(t, c.total_steps)) / static_cast<double>(c.total_steps);
  return c.lr * 0.5 * (1.0 + std::cos(pi * frac));
}

// One named parameter array with its gradient and (Adam) moments.
struct ParamBlock {
  double* value = nullptr;
  const double* grad = nullptr;
  double* m = nullptr;  // unused by SGD
  double* v = nullptr;
  index_t size = 0;
};

// Updates every block in place and advances t by one. The arithmetic keeps
// the order of operations of the NumPy version it replaced.
inline void optimizer_step(const OptimizerConfig& c, index_t& t, const ParamBlock* blocks, index_t n_blocks) {
  const double lr = scheduled_lr(c, t);
  t += 1;
  if (!c.adam) {
    for (index_t b = 0; b < n_blocks; ++b) {
      const ParamBlock& p = blocks[b];
      for (index_t i = 0; i < p.size; ++i) p.value[i] = p.value[i] - lr * p.grad[i];
    }
    return;
  }
  const double c1 = 1.0 - std::pow(c.beta1, static_cast<double>(t));
  const double c2 = 1.0 - std::pow(c.beta2, static_cast<double>(t));
  for (index_t b = 0; b < n_blocks; ++b) {
    const ParamBlock& p = blocks[b];
    for (index_t i = 0; i < p.size; ++i) {
      const double g = p.grad[i];
      p.m[i] = p.m[i] * c.beta1 + (1.0 - c.beta1) * g;
      p.v[i] = p.v[i] * c.beta2 + (1.0 - c.beta2) * g * g;
      const double update = lr * (p.m[i] / c1) / (std::sqrt(p.v[i] / c2) + c.eps);
      p.value[i] = p.value[i] - update;
    }
  }
}

// ------------------------------------------------ parameters and transforms

enum class StepKind : int { fixed = 0, learned = 1, preconditioner = 2 };

// Views of the estimator's float64 parameter arrays (and their Adam moments),
// updated in place. theta is (D, C) row-major (C = 1: binary). The inner step
// size is an array of extents lr_extent (each 1 or the full (K, D, C) extent,
// NumPy broadcasting): its values (fixed) or their logs (learned).
struct TrainParams {
  index_t D = 0, C = 1, K = 0;
  Mode mode = Mode::maml;
  bool learn_init = true;
  double* theta = nullptr;
  double *theta_m = nullptr, *theta_v = nullptr;
  StepKind step = StepKind::fixed;
  const double* fixed_lr = nullptr;
  double *log_lr = nullptr, *log_lr_m = nullptr, *log_lr_v = nullptr;
  index_t lr_extent[3] = {1, 1, 1};
  double *log_scale = nullptr, *log_scale_m = nullptr, *log_scale_v = nullptr;  // D
  double *U = nullptr, *U_m = nullptr, *U_v = nullptr;                          // D x rank
  index_t rank = 0;
  double l2 = 0.0;  // used when log_l2 is null
  double *log_l2 = nullptr, *log_l2_m = nullptr, *log_l2_v = nullptr;

  index_t P() const { return D * C; }
  index_t lr_size() const { return lr_extent[0] * lr_extent[1] * lr_extent[2]; }
};

// What one iteration records besides its time.
struct StepRecord {
  double loss = 0.0, meta_lr = 0.0, inner_lr_mean = 0.0, l2 = 0.0;
};

inline double current_l2(const TrainParams& p) { return p.log_l2 ? std::exp(*p.log_l2) : p.l2; }

// Mean of the inner step size as MAML.history_ reports it: the learned or
// fixed values, or the diagonal of P = diag(exp(s)) + U U^T.
inline double inner_lr_mean(const TrainParams& p) {
  double sum = 0.0;
  index_t n = 0;
  if (p.step == StepKind::preconditioner) {
    for (index_t i = 0; i < p.D; ++i) {
      double diag = std::exp(p.log_scale[i]);
      double uu = 0.0;
      for (index_t j = 0; j < p.rank; ++j) uu += p.U[i * p.rank + j] * p.U[i * p.rank + j];
      sum += diag + uu;
    }
    n = p.D;
  } else {
    n = p.lr_size();
    for (index_t i = 0; i < n; ++i) sum += p.step == StepKind::learned ? std::exp(p.log_lr[i]) : p.fixed_lr[i];
  }
  return sum / static_cast<double>(n);
}

// One meta-iteration on a given batch: transforms, meta-gradient, chain rule,
// optimizer step. Owns its scratch, so a loop allocates nothing per iteration.
template <class T>
class MetaStep {
 public:
  MetaStep(const TrainParams& params, const OptimizerConfig& opt) : p_(params), opt_(opt) {
    const index_t P = p_.P();
    theta_t_.resize(static_cast<size_t>(P));
    grad_t_.resize(static_cast<size_t>(P));
    grad_theta_.resize(static_cast<size_t>(P));
    if (p_.step == StepKind::preconditioner) {
      scale_t_.resize(static_cast<size_t>(p_.D));
      U_t_.resize(static_cast<size_t>(p_.D * p_.rank));
      hyper_t_.resize(static_cast<size_t>(p_.D * (1 + p_.rank)));
    } else {
      table_.resize(static_cast<size_t>(p_.K * P));
      lr_.resize(static_cast<size_t>(p_.lr_size()));
      hyper_t_.resize(static_cast<size_t>(p_.lr_size()));
      grad_lr_.resize(static_cast<size_t>(p_.lr_size()));
    }
    hyper_d_.resize(hyper_t_.size());
  }

  // The meta-gradient's inputs from the parameters: theta and the step
  // sizes (or preconditioner) in the compute dtype, l2 in double. step_sizes()
  // then holds the float64 step sizes (exp of the learned logs).
  double prepare() {
    const index_t P = p_.P(), D = p_.D, C = p_.C, K = p_.K;
    for (index_t i = 0; i < P; ++i) theta_t_[i] = static_cast<T>(p_.theta[i]);
    if (p_.step == StepKind::preconditioner) {
      for (index_t i = 0; i < D; ++i) scale_t_[i] = static_cast<T>(p_.log_scale[i]);
      for (index_t i = 0; i < D * p_.rank; ++i) U_t_[i] = static_cast<T>(p_.U[i]);
      return current_l2(p_);
    }
    const index_t n = p_.lr_size();
    for (index_t i = 0; i < n; ++i) lr_[i] = p_.step == StepKind::learned ? std::exp(p_.log_lr[i]) : p_.fixed_lr[i];
    // the (K, D, C) table, broadcast from the extents
    const index_t ek = p_.lr_extent[0], er = p_.lr_extent[1], ec = p_.lr_extent[2];
    for (index_t k = 0; k < K; ++k)
      for (index_t r = 0; r < D; ++r)
        for (index_t c = 0; c < C; ++c)
          table_[(k * D + r) * C + c] =
              static_cast<T>(lr_[((ek > 1 ? k : 0) * er + (er > 1 ? r : 0)) * ec + (ec > 1 ? c : 0)]);
    return current_l2(p_);
  }
  const std::vector<double>& step_sizes() const { return lr_; }

  // The chain rule from the meta-gradient (grad: P values, hyper: the
  // step-size gradient in the layout of the extents, or d/dlog_scale then
  // d/dU; all exact float64 images of the compute dtype) to the log
  // parameters, then the optimizer step. Needs prepare() first.
  void apply(double loss, const double* grad, const double* hyper, double grad_l2, index_t& t, StepRecord* rec) {
    const index_t P = p_.P(), D = p_.D;
    const double lam = current_l2(p_);
    ParamBlock blocks[5];
    index_t nb = 0;
    if (p_.learn_init) blocks[nb++] = ParamBlock{p_.theta, grad, p_.theta_m, p_.theta_v, P};
    if (p_.step == StepKind::learned) {
      // d/dlog(lr) = d/dlr * lr
      for (index_t i = 0; i < p_.lr_size(); ++i) grad_lr_[i] = hyper[i] * lr_[i];
      blocks[nb++] = ParamBlock{p_.log_lr, grad_lr_.data(), p_.log_lr_m, p_.log_lr_v, p_.lr_size()};
    } else if (p_.step == StepKind::preconditioner) {
      // the core differentiates log_scale directly
      blocks[nb++] = ParamBlock{p_.log_scale, hyper, p_.log_scale_m, p_.log_scale_v, D};
      blocks[nb++] = ParamBlock{p_.U, hyper + D, p_.U_m, p_.U_v, D * p_.rank};
    }
    double grad_log_l2 = 0.0;
    if (p_.log_l2) {
      grad_log_l2 = grad_l2 * lam;
      blocks[nb++] = ParamBlock{p_.log_l2, &grad_log_l2, p_.log_l2_m, p_.log_l2_v, 1};
    }
    optimizer_step(opt_, t, blocks, nb);
    rec->loss = loss;
    rec->meta_lr = scheduled_lr(opt_, t);
    rec->inner_lr_mean = inner_lr_mean(p_);
    rec->l2 = current_l2(p_);
  }

  // One meta-iteration on `batch`: prepare, meta-gradient, apply.
  template <class Link>
  TaskStatus run(const TaskSet<T>& batch, Link link, int n_threads, index_t& t, StepRecord* rec) {
    const double lam = prepare();
    Preconditioner<T> pre;
    LrLayout layout{p_.lr_extent[0], p_.lr_extent[1], p_.lr_extent[2]};
    const T* alpha = table_.data();
    if (p_.step == StepKind::preconditioner) {
      pre.log_scale = scale_t_.data();
      pre.U = U_t_.data();
      pre.rank = p_.rank;
      layout = LrLayout{};
      alpha = nullptr;
    }
    double loss = 0.0, grad_l2 = 0.0;
    TaskStatus st = meta_value_and_grad<T>(batch, link, theta_t_.data(), alpha, pre, p_.K, layout, lam, p_.mode,
                                           n_threads, &loss, grad_t_.data(), hyper_t_.data(), &grad_l2);
    if (!st.ok()) return st;
    for (size_t i = 0; i < grad_t_.size(); ++i) grad_theta_[i] = static_cast<double>(grad_t_[i]);
    for (size_t i = 0; i < hyper_t_.size(); ++i) hyper_d_[i] = static_cast<double>(hyper_t_[i]);
    apply(loss, grad_theta_.data(), hyper_d_.data(), grad_l2, t, rec);
    return st;
  }

 private:
  TrainParams p_;
  OptimizerConfig opt_;
  std::vector<T> theta_t_, grad_t_, table_, scale_t_, U_t_, hyper_t_;
  std::vector<double> lr_, grad_theta_, grad_lr_, hyper_d_;
};

// ------------------------------------------------------------------- draws

// The meta-batch an EpisodeSampler draws, in the order of draws of its
// Python sample(): classes per episode (sorted when labels are not random),
// then k_shot + n_query rows of each episode class.
template <class T>
struct EpisodeDraw {
  const T* X = nullptr;
  index_t d = 0;
  const index_t* flat = nullptr;    // allowed rows grouped by class
  const index_t* start = nullptr;   // per class: first position in flat
  const index_t* counts = nullptr;  // per class: rows
  index_t n_classes = 0, n_way = 2, k_shot = 1, n_query = 1;
  bool random_labels = true;
  const T* kernel = nullptr;
  index_t kernel_rows = 0;

  std::vector<index_t> ci, pos, pop, s_idx, q_idx, s_ptr, q_ptr;
  std::vector<std::int32_t> s_y, q_y;

  void draw(BitGen* g, index_t B, TaskSet<T>& ts) {
    const index_t W = n_way, k = k_shot, q = n_query, kq = k + q;
    pop.assign(static_cast<size_t>(B), n_classes);
    ci.resize(static_cast<size_t>(B * W));
    sample_without_replacement(g, pop.data(), B, W, ci.data());
    if (!random_labels)
      for (index_t t = 0; t < B; ++t) std::sort(ci.begin() + t * W, ci.begin() + (t + 1) * W);
    pop.resize(static_cast<size_t>(B * W));
    for (index_t s = 0; s < B * W; ++s) pop[s] = counts[ci[s]];
    pos.resize(static_cast<size_t>(B * W * kq));
    sample_without_replacement(g, pop.data(), B * W, kq, pos.data());
    s_idx.resize(static_cast<size_t>(B * W * k));
    q_idx.resize(static_cast<size_t>(B * W * q));
    for (index_t s = 0; s < B * W; ++s) {
      const index_t* row_pos = pos.data() + s * kq;
      const index_t base = start[ci[s]];
      for (index_t j = 0; j < k; ++j) s_idx[s * k + j] = flat[base + row_pos[j]];
      for (index_t j = 0; j < q; ++j) q_idx[s * q + j] = flat[base + row_pos[k + j]];
    }
    if (static_cast<index_t>(s_y.size()) != B * W * k) {
      s_y.resize(static_cast<size_t>(B * W * k));
      q_y.resize(static_cast<size_t>(B * W * q));
      for (index_t s = 0; s < B * W; ++s) {
        std::fill(s_y.begin() + s * k, s_y.begin() + (s + 1) * k, static_cast<std::int32_t>(s % W));
        std::fill(q_y.begin() + s * q, q_y.begin() + (s + 1) * q, static_cast<std::int32_t>(s % W));
      }
      s_ptr.resize(static_cast<size_t>(B + 1));
      q_ptr.resize(static_cast<size_t>(B + 1));
      for (index_t t = 0; t <= B; ++t) {
        s_ptr[t] = t * W * k;
        q_ptr[t] = t * W * q;
      }
    }
    ts.n_tasks = B;
    ts.d = d;
    ts.support = SideView<T>{X, s_idx.data(), s_ptr.data(), s_y.data()};
    ts.query = SideView<T>{X, q_idx.data(), q_ptr.data(), q_y.data()};
    ts.kernel = kernel;
    ts.kernel_rows = kernel_rows;
  }
};

// The meta-batch a GroupedSampler draws when meta_batch_size <= n_groups:
// groups without replacement, one uniform double per row of the drawn groups,
// rows of each group ordered by their double (stable, as numpy.lexsort), the
// first support_sizes[g] to the support set and the next query_sizes[g] to
// the query set.
template <class T>
struct GroupedDraw {
  const T* X = nullptr;
  index_t d = 0;
  const std::int32_t* y = nullptr;  // per dataset row
  const index_t* order = nullptr;   // dataset rows grouped by group
  const index_t* start = nullptr;   // per group
  const index_t* sizes = nullptr;
  const index_t* support_sizes = nullptr;
  const index_t* query_sizes = nullptr;
  index_t n_groups = 0;

  std::vector<index_t> gi, pop, perm, s_idx, q_idx, s_ptr, q_ptr;
  std::vector<double> keys;
  std::vector<std::int32_t> s_y, q_y;

  void draw(BitGen* g, index_t B, TaskSet<T>& ts) {
    pop.assign(1, n_groups);
    gi.resize(static_cast<size_t>(B));
    sample_without_replacement(g, pop.data(), 1, B, gi.data());
    index_t R = 0;
    for (index_t t = 0; t < B; ++t) R += sizes[gi[t]];
    keys.resize(static_cast<size_t>(R));
    for (index_t r = 0; r < R; ++r) keys[r] = g->next_double(g->state);
    s_idx.clear();
    q_idx.clear();
    s_ptr.assign(1, 0);
    q_ptr.assign(1, 0);
    index_t off = 0;
    for (index_t t = 0; t < B; ++t) {
      const index_t grp = gi[t], n = sizes[grp];
      perm.resize(static_cast<size_t>(n));
      std::iota(perm.begin(), perm.end(), index_t(0));
      const double* kk = keys.data() + off;
      std::stable_sort(perm.begin(), perm.end(), [kk](index_t a, index_t b) { return kk[a] < kk[b]; });
      const index_t ns = support_sizes[grp], nq = query_sizes[grp];
      for (index_t j = 0; j < ns; ++j) s_idx.push_back(order[start[grp] + perm[j]]);
      for (index_t j = ns; j < ns + nq; ++j) q_idx.push_back(order[start[grp] + perm[j]]);
      s_ptr.push_back(s_ptr.back() + ns);
      q_ptr.push_back(q_ptr.back() + nq);
      off += n;
    }
    s_y.resize(s_idx.size());
    q_y.resize(q_idx.size());
    for (size_t i = 0; i < s_idx.size(); ++i) s_y[i] = y[s_idx[i]];
    for (size_t i = 0; i < q_idx.size(); ++i) q_y[i] = y[q_idx[i]];
    ts.n_tasks = B;
    ts.d = d;
    ts.support = SideView<T>{X, s_idx.data(), s_ptr.data(), s_y.data()};
    ts.query = SideView<T>{X, q_idx.data(), q_ptr.data(), q_y.data()};
    ts.kernel = nullptr;
    ts.kernel_rows = 0;
  }
};

// A fixed meta-batch, used whole every iteration (a Tasks pool, or one batch
// Python drew).
template <class T>
struct FixedBatch {
  TaskSet<T> tasks;
  void draw(BitGen*, index_t, TaskSet<T>& ts) { ts = tasks; }
};

// -------------------------------------------------------------------- loop

// Per iteration: loss, meta_lr, inner_lr_mean, l2, seconds.
constexpr index_t kRecordFields = 5;

struct LoopResult {
  index_t done = 0;
  TaskStatus status;
};

// Runs up to n_iter meta-iterations: draw, MetaStep::run, record. Before each
// iteration but the first, `stop()` may end the block (a Ctrl-C); an error of
// the core ends it too. Every finished iteration is in place in the
// parameters and written to records (n_iter x kRecordFields).
template <class T, class Link, class Source>
LoopResult train_loop(MetaStep<T>& step, Source& source, BitGen* g, index_t batch_size, Link link, int n_threads,
                      index_t n_iter, index_t& t, const std::function<bool()>& stop, double* records) {
  LoopResult res;
  TaskSet<T> batch;
  for (index_t it = 0; it < n_iter; ++it) {
    if (it > 0 && stop && stop()) break;
    const auto t0 = std::chrono::steady_clock::now();
    source.draw(g, batch_size, batch);
    StepRecord rec;
    res.status = step.run(batch, link, n_threads, t, &rec);
    if (!res.status.ok()) break;
    double* out = records + it * kRecordFields;
    out[0] = rec.loss;
    out[1] = rec.meta_lr;
    out[2] = rec.inner_lr_mean;
    out[3] = rec.l2;
    out[4] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    res.done = it + 1;
  }
  return res;
}

}  // namespace fastmaml
