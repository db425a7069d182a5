// The only file that knows pybind11. The Python layer (fastmaml/functional.py)
// validates every argument once, naming it, and converts once; this file
// keeps only the checks that protect memory (dtypes, layouts, sizes, offsets,
// index bounds and labels the core reads through), with the GIL held, then
// releases the GIL, runs the core and returns NumPy arrays. Arrays are taken
// as they are (no conversion), so a C-contiguous float32 or float64 X reaches
// the core without a copy.
//
// The call path: one `Side` object per side of a meta-batch (X, idx, ptr, y),
// the mode (`Mode`) and path (`Sweep`) as enums, the rest as named
// arguments; `choose_sweep` exports the dispatcher's decision (meta.hpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>
#include <chrono>
#include <functional>
#include <optional>

#include "fastmaml/extended.hpp"
#include "fastmaml/imaml.hpp"
#include "fastmaml/kernels.hpp"
#include "fastmaml/meta.hpp"
#include "fastmaml/parallel.hpp"
#include "fastmaml/sampling.hpp"
#include "fastmaml/tasks.hpp"
#include "fastmaml/train.hpp"

#ifndef _WIN32
#include <pthread.h>
#endif

namespace py = pybind11;
using fastmaml::index_t;

namespace {

struct DivergenceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// fastmaml.ForkWarning (a RuntimeWarning), created at import.
PyObject* g_fork_warning = nullptr;

// In a child forked after the parent's OpenMP pool started, every call runs
// serially (parallel.hpp); say so once per process, with the GIL held, before
// the first call that would have used threads. Under `-W error` the warning is
// raised and the call does not run.
void warn_if_serial_after_fork(int n_threads) {
  static std::atomic<bool> warned{false};
  if (!fastmaml::serial_after_fork().load() || fastmaml::requested_threads(n_threads) <= 1) return;
  if (warned.exchange(true)) return;
  if (PyErr_WarnEx(g_fork_warning,
                   "fastmaml runs serially in this process: it was forked after fastmaml had used OpenMP "
                   "threads, and the OpenMP runtime cannot start threads again after fork(). Results are "
                   "unchanged (they do not depend on the thread count); use the 'spawn' or 'forkserver' "
                   "start method to keep threads in child processes",
                   1) < 0)
    throw py::error_already_set();
}

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }

std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  if (a.ndim() == 1) os << ",";
  os << ")";
  return os.str();
}

template <class T>
const T* checked(const py::array& a, const char* name) {
  if (!py::isinstance<py::array_t<T>>(a)) {
    type_error(std::string(name) + ": expected dtype " + py::str(py::dtype::of<T>()).cast<std::string>() +
               ", got " + py::str(a.dtype()).cast<std::string>());
  }
  if (!(a.flags() & py::array::c_style)) value_error(std::string(name) + ": expected a C-contiguous array");
  return static_cast<const T*>(a.data());
}

// Private copies of the arrays that guard memory (offsets, row indices,
// labels). The checks run on these copies with the GIL held, and the core
// reads the same copies after the GIL is released, so another Python thread
// that rewrites the caller's arrays during a call cannot make the core read
// out of bounds (it can only change values, never where they are read). The
// copies are small beside the rows they address (8 + 8 + 4 bytes per row
// against 4 or 8 per feature), and X, theta and the step table are read in
// place.
struct SideGuard {
  std::vector<index_t> ptr, idx;
  std::vector<std::int32_t> y;
};

struct TaskGuard {
  SideGuard support, query;
};

template <class I>
const I* copy_into(const py::array& a, const std::string& name, std::vector<I>& out) {
  const I* src = checked<I>(a, name.c_str());
  out.assign(src, src + a.size());
  return out.data();
}

// Builds one side of a TaskSet from (X, idx or None, ptr, y) and checks every
// invariant the core relies on, so that no input can make it read out of
// bounds.
template <class T>
fastmaml::SideView<T> make_side(const py::array& X, const py::object& idx, const py::array& ptr,
                                const py::array& y, index_t n_tasks, index_t d, const char* side,
                                SideGuard& guard) {
  const std::string s(side);
  fastmaml::SideView<T> v;
  v.base = checked<T>(X, (s + "_X").c_str());
  if (ptr.ndim() != 1 || ptr.shape(0) != n_tasks + 1)
    value_error(s + "_ptr: expected shape (" + std::to_string(n_tasks + 1) + ",), got " + shape_str(ptr));
  v.ptr = copy_into<index_t>(ptr, s + "_ptr", guard.ptr);
  v.y = copy_into<std::int32_t>(y, s + "_y", guard.y);
  const index_t total = y.size();
  if (v.ptr[0] != 0) value_error(s + "_ptr: must start at 0");
  for (index_t t = 0; t < n_tasks; ++t) {
    if (v.ptr[t + 1] <= v.ptr[t])
      value_error(s + ": task " + std::to_string(t) + " has no rows (every task needs at least one " + s +
                  " example)");
  }
  if (v.ptr[n_tasks] != total)
    value_error(s + "_ptr: last offset " + std::to_string(v.ptr[n_tasks]) + " does not match the " +
                std::to_string(total) + " labels in " + s + "_y");
  const index_t n_rows = d > 0 ? X.size() / d : 0;
  if (!idx.is_none()) {
    py::array ia = idx.cast<py::array>();
    checked<index_t>(ia, (s + "_idx").c_str());
    if (ia.size() != total)
      value_error(s + "_idx: expected " + std::to_string(total) + " indices, got " + std::to_string(ia.size()));
    v.idx = copy_into<index_t>(ia, s + "_idx", guard.idx);
    for (index_t p = 0; p < total; ++p) {
      if (v.idx[p] < 0 || v.idx[p] >= n_rows)
        value_error(s + "_idx: index " + std::to_string(v.idx[p]) + " is out of range for a dataset of " +
                    std::to_string(n_rows) + " rows");
    }
  } else if (n_rows < total) {
    value_error(s + "_X: holds " + std::to_string(n_rows) + " rows, but " + std::to_string(total) +
                " are addressed");
  }
  return v;
}

template <class T>
void check_labels(const fastmaml::SideView<T>& v, index_t total, index_t C, const char* side) {
  const std::int32_t hi = C == 1 ? 1 : static_cast<std::int32_t>(C - 1);
  for (index_t p = 0; p < total; ++p) {
    if (v.y[p] < 0 || v.y[p] > hi) {
      if (C == 1)
        value_error(std::string(side) + "_y: binary labels must be 0 or 1, got " + std::to_string(v.y[p]));
      value_error(std::string(side) + "_y: labels must lie in [0, " + std::to_string(C) + ") for " +
                  std::to_string(C) + " classes (theta has " + std::to_string(C) + " columns), got " +
                  std::to_string(v.y[p]));
    }
  }
}

void raise_status(const fastmaml::TaskStatus& st) {
  using fastmaml::ErrorCode;
  switch (st.code) {
    case ErrorCode::ok:
      return;
    case ErrorCode::diverged:
      throw DivergenceError("inner loop diverged: parameters became non-finite at inner step " +
                            std::to_string(st.step) + " of task " + std::to_string(st.task) +
                            "; inner_lr is too large for this data (keep inner_lr * largest Hessian "
                            "eigenvalue below 2)");
    case ErrorCode::nonfinite_query:
      throw DivergenceError("query loss is not finite for task " + std::to_string(st.task) +
                            " after " + std::to_string(st.step) + " inner steps; inner_lr is too large");
    case ErrorCode::nonfinite_grad:
      throw DivergenceError("the meta-gradient of task " + std::to_string(st.task) +
                            " overflowed in the reverse sweep (non-finite values); inner_lr or l2 is too "
                            "large for this data");
    case ErrorCode::nonfinite_input:
      value_error(st.message + ": contains NaN or infinity");
    case ErrorCode::no_memory:
      throw std::bad_alloc();
    default:
      throw std::runtime_error("fastmaml internal error in task " + std::to_string(st.task) + ": " +
                               st.message);
  }
}

index_t feature_count(const py::array& X) {
  if (X.ndim() < 2) value_error("X: expected at least 2 dimensions, got shape " + shape_str(X));
  return X.shape(X.ndim() - 1);
}

// One side (support or query) of every task of a meta-batch, as the Python
// layer hands it over: rows X, optional row indices idx (None: dense), task
// offsets ptr (n_tasks + 1) and labels y. fastmaml.Tasks builds one per side.
struct Side {
  py::array X;
  py::object idx;
  py::array ptr;
  py::array y;
};

index_t n_tasks_of(const Side& s) {
  if (s.ptr.ndim() != 1 || s.ptr.size() < 1) value_error("ptr: expected shape (n_tasks + 1,), got " + shape_str(s.ptr));
  return s.ptr.size() - 1;
}

template <class T>
fastmaml::TaskSet<T> make_taskset(index_t C, const Side& s, const Side* q, const py::object& kernel,
                                   TaskGuard& guard) {
  const index_t n_tasks = n_tasks_of(s);
  const index_t d = feature_count(s.X);
  if (n_tasks < 1) value_error("tasks: expected at least one task, got 0");
  fastmaml::TaskSet<T> ts;
  ts.n_tasks = n_tasks;
  ts.d = d;
  ts.support = make_side<T>(s.X, s.idx, s.ptr, s.y, n_tasks, d, "support", guard.support);
  check_labels(ts.support, s.y.size(), C, "support");
  if (!kernel.is_none()) {
    py::array k = kernel.cast<py::array>();
    const index_t rows = d > 0 ? s.X.size() / d : 0;
    if (k.ndim() != 2 || k.shape(0) != rows || k.shape(1) != rows)
      value_error("kernel: expected shape (" + std::to_string(rows) + ", " + std::to_string(rows) +
                  ") = (n_samples, n_samples) of the dataset, got " + shape_str(k));
    ts.kernel = checked<T>(k, "kernel");
    ts.kernel_rows = rows;
  }
  if (q) {
    if (feature_count(q->X) != d) value_error("query_X: feature count differs from support_X");
    if (n_tasks_of(*q) != n_tasks)
      value_error("query: expected " + std::to_string(n_tasks) + " tasks like the support sets, got " +
                  std::to_string(n_tasks_of(*q)));
    ts.query = make_side<T>(q->X, q->idx, q->ptr, q->y, n_tasks, d, "query", guard.query);
    check_labels(ts.query, q->y.size(), C, "query");
  }
  return ts;
}

template <class T>
fastmaml::Preconditioner<T> make_precond(const py::object& log_scale, const py::object& U, index_t D) {
  fastmaml::Preconditioner<T> pre;
  if (log_scale.is_none()) return pre;
  py::array s = log_scale.cast<py::array>();
  py::array u = U.cast<py::array>();
  pre.log_scale = checked<T>(s, "log_scale");
  pre.U = checked<T>(u, "U");
  if (s.size() != D) value_error("log_scale: expected " + std::to_string(D) + " values");
  if (u.ndim() != 2 || u.shape(0) != D) value_error("U: expected shape (" + std::to_string(D) + ", rank)");
  pre.rank = u.shape(1);
  return pre;
}

// The (K, P) step-size table, or nullptr when a preconditioner replaces it.
template <class T>
const T* step_table(const py::object& alpha, const fastmaml::Preconditioner<T>& pre, index_t K, index_t P) {
  if (pre.active()) return nullptr;
  py::array a = alpha.cast<py::array>();
  const T* al = checked<T>(a, "inner_lr");
  if (a.size() != K * P) value_error("inner_lr: expected a broadcast table of K*(d+1)*C values");
  return al;
}

// Runs `body` with the right scalar type and link.
template <class T, class F>
auto with_link(index_t C, F&& body) {
  if (C == 1) return body(fastmaml::BinaryLink{});
  fastmaml::SoftmaxLink link;
  link.C = C;
  return body(link);
}

fastmaml::LrLayout lr_layout_of(const std::tuple<index_t, index_t, index_t>& t) {
  return fastmaml::LrLayout{std::get<0>(t), std::get<1>(t), std::get<2>(t)};
}

template <class T>
py::tuple meta_impl(const py::array& theta, const Side& s, const Side& q, index_t C, index_t K, double l2,
                    fastmaml::Mode mode, fastmaml::Sweep sweep, int n_threads, const py::object& alpha,
                    fastmaml::LrLayout lr, const py::object& log_scale, const py::object& U,
                    const py::object& kernel, bool want_blocks) {
  TaskGuard guard;
  auto ts = make_taskset<T>(C, s, &q, kernel, guard);
  const index_t d = ts.d, D = d + 1, P = D * C, n_tasks = ts.n_tasks;
  const T* th = checked<T>(theta, "theta");
  if (theta.size() != P) value_error("theta: expected " + std::to_string(P) + " values");
  auto pre = make_precond<T>(log_scale, U, D);
  const T* al = step_table<T>(alpha, pre, K, P);
  if (al && !((lr.ks == 1 || lr.ks == K) && (lr.pr == 1 || lr.pr == D) && (lr.pc == 1 || lr.pc == C)))
    value_error("lr_layout: each extent must be 1 or the full (inner_steps, n_features + 1, n_classes) size");
  const index_t H = pre.active() ? D * (1 + pre.rank) : lr.size();
  py::array_t<T> grad(P);
  py::array_t<T> hyper(H);
  const index_t n_blocks = (n_tasks + fastmaml::kReduceBlock - 1) / fastmaml::kReduceBlock;
  const index_t slot_len = fastmaml::meta_slot_len(P, H, mode);
  py::array_t<double> blocks = want_blocks ? py::array_t<double>({n_blocks, slot_len}) : py::array_t<double>(0);
  double loss = 0.0, grad_l2 = 0.0;
  warn_if_serial_after_fork(n_threads);
  fastmaml::TaskStatus st;
  {
    py::gil_scoped_release release;
    st = with_link<T>(C, [&](auto link) {
      return fastmaml::meta_value_and_grad<T>(ts, link, th, al, pre, K, lr, l2, mode, n_threads, &loss,
                                              grad.mutable_data(), hyper.mutable_data(), &grad_l2, sweep,
                                              want_blocks ? blocks.mutable_data() : nullptr);
    });
  }
  raise_status(st);
  if (want_blocks) return py::make_tuple(loss, grad, hyper, grad_l2, blocks);
  return py::make_tuple(loss, grad, hyper, grad_l2);
}

// A meta-gradient with per-task hyperparameters (task_lr: inner_lr is one
// (K, P) table per task; l2_per_task: float64 (n_tasks,)) and/or feature
// gradients: a plain sweep (extended.hpp; `generic`, tests only, keeps the
// generic one where the fast binary sweep applies), or, for feature gradients
// with shared hyperparameters, the path `sweep` asks for (extended_sweep). Returns (loss, grad,
// grad_inner_lr: (n_tasks, H) or (H,), grad_l2: (n_tasks,) or float,
// grad_support_X: (support rows, d) or None, grad_query_X likewise).
template <class T>
py::tuple meta_ext_impl(const py::array& theta, const Side& s, const Side& q, index_t C, index_t K, double l2,
                        fastmaml::Mode mode, int n_threads, const py::object& alpha, fastmaml::LrLayout lr,
                        bool task_lr, const py::object& l2_per_task, bool grad_features, bool generic,
                        fastmaml::Sweep sweep) {
  TaskGuard guard;
  auto ts = make_taskset<T>(C, s, &q, py::none(), guard);
  const index_t d = ts.d, D = d + 1, P = D * C, n_tasks = ts.n_tasks;
  const T* th = checked<T>(theta, "theta");
  if (theta.size() != P) value_error("theta: expected " + std::to_string(P) + " values");
  if (mode == fastmaml::Mode::reptile) value_error("mode: Reptile has no per-task hyperparameters or feature gradients");
  if (!((lr.ks == 1 || lr.ks == K) && (lr.pr == 1 || lr.pr == D) && (lr.pc == 1 || lr.pc == C)))
    value_error("lr_layout: each extent must be 1 or the full (inner_steps, n_features + 1, n_classes) size");
  if (alpha.is_none()) value_error("inner_lr: required with per-task hyperparameters or feature gradients");
  py::array a = alpha.cast<py::array>();
  const T* al = checked<T>(a, "inner_lr");
  const index_t tables = task_lr ? n_tasks : 1;
  if (a.size() != tables * K * P)
    value_error("inner_lr: expected a broadcast table of " + std::string(task_lr ? "n_tasks*" : "") +
                "K*(d+1)*C values");
  const index_t H = lr.size();
  fastmaml::TaskExtras<T> ext;
  ext.alpha_stride = task_lr ? K * P : 0;
  py::array_t<T> grad(P);
  py::array_t<T> hyper = task_lr ? py::array_t<T>({n_tasks, H}) : py::array_t<T>(H);
  if (task_lr) ext.grad_alpha = hyper.mutable_data();
  py::array_t<T> grad_lam(l2_per_task.is_none() ? 0 : n_tasks);
  if (!l2_per_task.is_none()) {
    py::array lam = l2_per_task.cast<py::array>();
    ext.lam = checked<double>(lam, "l2");
    if (lam.size() != n_tasks)
      value_error("l2: expected " + std::to_string(n_tasks) + " values (one per task), got " +
                  std::to_string(lam.size()));
    ext.grad_lam = grad_lam.mutable_data();
  }
  const index_t s_rows = ts.support.ptr[n_tasks], q_rows = ts.query.ptr[n_tasks];
  py::array_t<T> gsx = grad_features ? py::array_t<T>({s_rows, d}) : py::array_t<T>(0);
  py::array_t<T> gqx = grad_features ? py::array_t<T>({q_rows, d}) : py::array_t<T>(0);
  if (grad_features) {
    ext.grad_support_X = gsx.mutable_data();
    ext.grad_query_X = gqx.mutable_data();
  }
  double loss = 0.0, grad_l2 = 0.0;
  warn_if_serial_after_fork(n_threads);
  fastmaml::TaskStatus st;
  {
    py::gil_scoped_release release;
    st = with_link<T>(C, [&](auto link) {
      return fastmaml::meta_value_and_grad_extended<T>(ts, link, th, al, K, lr, l2, mode, ext, n_threads, &loss,
                                                       grad.mutable_data(), task_lr ? nullptr : hyper.mutable_data(),
                                                       &grad_l2, generic, sweep);
    });
  }
  raise_status(st);
  py::object gl2 = l2_per_task.is_none() ? py::object(py::float_(grad_l2)) : py::object(grad_lam);
  py::object none = py::none();
  return py::make_tuple(loss, grad, hyper, gl2, grad_features ? py::object(gsx) : none,
                        grad_features ? py::object(gqx) : none);
}

template <class T>
py::array adapt_impl(const py::array& theta, const Side& s, index_t C, index_t K, double l2, bool keep_path,
                     int n_threads, const py::object& alpha, const py::object& log_scale, const py::object& U) {
  TaskGuard guard;
  auto ts = make_taskset<T>(C, s, nullptr, py::none(), guard);
  const index_t D = ts.d + 1, P = D * C, n_tasks = ts.n_tasks;
  const T* th = checked<T>(theta, "theta");
  if (theta.size() != P) value_error("theta: expected " + std::to_string(P) + " values");
  auto pre = make_precond<T>(log_scale, U, D);
  const T* al = step_table<T>(alpha, pre, K, P);
  py::array_t<T> out = keep_path ? py::array_t<T>({n_tasks, K + 1, P}) : py::array_t<T>({n_tasks, P});
  warn_if_serial_after_fork(n_threads);
  fastmaml::TaskStatus st;
  {
    py::gil_scoped_release release;
    st = with_link<T>(C, [&](auto link) {
      return fastmaml::adapt<T>(ts, link, th, false, al, pre, K, l2, keep_path, n_threads, out.mutable_data());
    });
  }
  raise_status(st);
  return out;
}

template <class T>
py::tuple loss_grad_hvp_impl(const py::array& params, const Side& s, index_t C, double l2, int n_threads,
                             const py::object& v) {
  TaskGuard guard;
  auto ts = make_taskset<T>(C, s, nullptr, py::none(), guard);
  const index_t P = (ts.d + 1) * C, n_tasks = ts.n_tasks;
  const T* p = checked<T>(params, "params");
  if (params.size() != n_tasks * P) value_error("params: expected one parameter vector per task");
  const T* vp = nullptr;
  if (!v.is_none()) {
    py::array va = v.cast<py::array>();
    vp = checked<T>(va, "v");
    if (va.size() != n_tasks * P) value_error("v: expected one vector per task");
  }
  py::array_t<T> loss(n_tasks);
  py::array_t<T> out({n_tasks, P});
  warn_if_serial_after_fork(n_threads);
  fastmaml::TaskStatus st;
  {
    py::gil_scoped_release release;
    st = with_link<T>(C, [&](auto link) {
      return fastmaml::loss_grad_hvp<T>(ts, link, p, l2, vp, n_threads, loss.mutable_data(), out.mutable_data());
    });
  }
  raise_status(st);
  return py::make_tuple(loss, out);
}

template <class T>
py::tuple imaml_impl(const py::array& theta, const Side& s, const Side& q, index_t C,
                     const fastmaml::ImamlSettings& cfg, int n_threads) {
  TaskGuard guard;
  auto ts = make_taskset<T>(C, s, &q, py::none(), guard);
  const index_t P = (ts.d + 1) * C, n_tasks = ts.n_tasks;
  const T* th = checked<T>(theta, "theta");
  if (theta.size() != P) value_error("theta: expected " + std::to_string(P) + " values");
  py::array_t<T> grad(P);
  py::array_t<double> inner_res(n_tasks), cg_res(n_tasks);
  py::array_t<std::int32_t> inner_it(n_tasks), cg_it(n_tasks);
  py::array_t<std::uint8_t> inner_ok(n_tasks), cg_ok(n_tasks);
  fastmaml::ImamlReport rep{inner_res.mutable_data(), inner_it.mutable_data(), inner_ok.mutable_data(),
                            cg_res.mutable_data(),    cg_it.mutable_data(),    cg_ok.mutable_data()};
  double loss = 0.0;
  warn_if_serial_after_fork(n_threads);
  fastmaml::TaskStatus st;
  {
    py::gil_scoped_release release;
    st = with_link<T>(C, [&](auto link) {
      return fastmaml::imaml_value_and_grad<T>(ts, link, th, cfg, rep, n_threads, &loss, grad.mutable_data());
    });
  }
  raise_status(st);
  py::dict report;
  report["inner_residual"] = inner_res;
  report["inner_iterations"] = inner_it;
  report["inner_converged"] = inner_ok;
  report["cg_residual"] = cg_res;
  report["cg_iterations"] = cg_it;
  report["cg_converged"] = cg_ok;
  return py::make_tuple(loss, grad, report);
}

bool is_f32(const py::array& X) { return py::isinstance<py::array_t<float>>(X); }

// ------------------------------------------------------------ training loop
// `train_block`: a block of MAML.fit iterations in one call (train.hpp).
// Python hands over its parameter arrays (float64, updated in place), the
// optimizer state and one source of meta-batches; the block runs with the GIL
// released and takes it back only every ~10 ms to run pending signal
// handlers and ask `should_stop` (Ctrl-C).

double* f64_array(const py::dict& d, const char* key, index_t size, const char* what) {
  if (!d.contains(key)) return nullptr;
  py::array a = d[key].cast<py::array>();
  const std::string name = std::string(what) + "[" + key + "]";
  if (!py::isinstance<py::array_t<double>>(a)) type_error(name + ": expected a float64 array");
  if (!(a.flags() & py::array::c_style) || !a.writeable())
    value_error(name + ": expected a writeable C-contiguous array");
  if (a.size() != size)
    value_error(name + ": expected " + std::to_string(size) + " values, got " + std::to_string(a.size()));
  return static_cast<double*>(a.mutable_data());
}

fastmaml::OptimizerConfig optimizer_config(const py::tuple& o) {
  if (o.size() != 7) value_error("optimizer: expected (adam, lr, beta1, beta2, eps, cosine, total_steps)");
  fastmaml::OptimizerConfig c;
  c.adam = o[0].cast<bool>();
  c.lr = o[1].cast<double>();
  c.beta1 = o[2].cast<double>();
  c.beta2 = o[3].cast<double>();
  c.eps = o[4].cast<double>();
  c.cosine = o[5].cast<bool>();
  c.total_steps = std::max<index_t>(1, o[6].cast<index_t>());
  return c;
}

// The stop test of a block: cheap between iterations (a clock read); every
// 10 ms it takes the GIL, runs pending signal handlers (fit's SIGINT handler
// sets a flag) and calls should_stop. An exception there ends the block and
// is re-raised after the finished iterations are handed back.
struct StopCheck {
  py::object should_stop;
  std::optional<py::error_already_set> error;
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
  bool operator()() {
    const auto now = std::chrono::steady_clock::now();
    if (now - last < std::chrono::milliseconds(10)) return false;
    last = now;
    py::gil_scoped_acquire acquire;
    try {
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      return !should_stop.is_none() && should_stop().cast<bool>();
    } catch (py::error_already_set& e) {
      error.emplace(std::move(e));
      return true;
    }
  }
};

// Copies of a sampler's index arrays: once the GIL is released another
// Python thread could rewrite the originals, so the draws read (and the
// checks below cover) these copies.
struct OwnedIndex {
  std::vector<index_t> a, b, c, d, e, f;
  std::vector<std::int32_t> y;
};

template <class V>
const V* own(const py::array& arr, const char* name, std::vector<V>& out) {
  const V* p = checked<V>(arr, name);
  out.assign(p, p + arr.size());
  return out.data();
}

template <class T>
fastmaml::EpisodeDraw<T> episode_source(const py::tuple& e, index_t batch, index_t C, OwnedIndex& owned) {
  // (X, flat, start, counts, n_way, k_shot, n_query, random_labels, kernel)
  if (e.size() != 9) value_error("episode: expected 9 fields");
  fastmaml::EpisodeDraw<T> s;
  py::array X = e[0].cast<py::array>(), flat = e[1].cast<py::array>(), start = e[2].cast<py::array>(),
            counts = e[3].cast<py::array>();
  s.X = checked<T>(X, "X");
  s.d = feature_count(X);
  s.flat = own<index_t>(flat, "flat", owned.a);
  s.start = own<index_t>(start, "start", owned.b);
  s.counts = own<index_t>(counts, "counts", owned.c);
  s.n_classes = counts.size();
  s.n_way = e[4].cast<index_t>();
  s.k_shot = e[5].cast<index_t>();
  s.n_query = e[6].cast<index_t>();
  s.random_labels = e[7].cast<bool>();
  const index_t rows = s.d > 0 ? X.size() / s.d : 0;
  if (start.size() != s.n_classes) value_error("episode: start and counts differ in length");
  if (s.n_way < 2 || s.n_way > s.n_classes || s.k_shot < 1 || s.n_query < 1 || batch < 1)
    value_error("episode: bad n_way, k_shot, n_query or batch size");
  if ((C == 1 && s.n_way != 2) || (C > 1 && s.n_way != C))
    value_error("episode: n_way does not match the model's classes");
  for (index_t c = 0; c < s.n_classes; ++c)
    if (s.counts[c] < s.k_shot + s.n_query || s.start[c] < 0 || s.start[c] + s.counts[c] > flat.size())
      value_error("episode: class " + std::to_string(c) + " has too few rows or bad offsets");
  for (index_t i = 0; i < flat.size(); ++i)
    if (s.flat[i] < 0 || s.flat[i] >= rows) value_error("episode: row index out of range");
  if (!e[8].is_none()) {
    py::array k = e[8].cast<py::array>();
    if (k.ndim() != 2 || k.shape(0) != rows || k.shape(1) != rows) value_error("kernel: expected (n_samples, n_samples)");
    s.kernel = checked<T>(k, "kernel");
    s.kernel_rows = rows;
  }
  return s;
}

template <class T>
fastmaml::GroupedDraw<T> grouped_source(const py::tuple& gtuple, index_t batch, index_t C, OwnedIndex& owned) {
  // (X, y, order, start, sizes, support_sizes, query_sizes)
  if (gtuple.size() != 7) value_error("grouped: expected 7 fields");
  fastmaml::GroupedDraw<T> s;
  py::array X = gtuple[0].cast<py::array>(), y = gtuple[1].cast<py::array>(), order = gtuple[2].cast<py::array>(),
            start = gtuple[3].cast<py::array>(), sizes = gtuple[4].cast<py::array>(),
            ns = gtuple[5].cast<py::array>(), nq = gtuple[6].cast<py::array>();
  s.X = checked<T>(X, "X");
  s.d = feature_count(X);
  s.y = own<std::int32_t>(y, "y", owned.y);
  s.order = own<index_t>(order, "order", owned.a);
  s.start = own<index_t>(start, "start", owned.b);
  s.sizes = own<index_t>(sizes, "sizes", owned.c);
  s.support_sizes = own<index_t>(ns, "support_sizes", owned.d);
  s.query_sizes = own<index_t>(nq, "query_sizes", owned.e);
  s.n_groups = sizes.size();
  const index_t rows = s.d > 0 ? X.size() / s.d : 0;
  if (y.size() != rows || order.size() != rows || start.size() != s.n_groups || ns.size() != s.n_groups ||
      nq.size() != s.n_groups)
    value_error("grouped: inconsistent array sizes");
  if (batch < 1 || batch > s.n_groups) value_error("grouped: batch size must lie in [1, n_groups]");
  const std::int32_t hi = C == 1 ? 1 : static_cast<std::int32_t>(C - 1);
  for (index_t g = 0; g < s.n_groups; ++g) {
    if (s.start[g] < 0 || s.start[g] + s.sizes[g] > rows || s.support_sizes[g] < 1 || s.query_sizes[g] < 1 ||
        s.support_sizes[g] + s.query_sizes[g] > s.sizes[g])
      value_error("grouped: group " + std::to_string(g) + " has bad offsets or sizes");
    for (index_t j = 0; j < s.sizes[g]; ++j) {
      const index_t r = s.order[s.start[g] + j];
      if (r < 0 || r >= rows) value_error("grouped: row index out of range");
      if (s.y[r] < 0 || s.y[r] > hi)
        value_error("y: labels must lie in [0, " + std::to_string(hi + 1) + ") for this model, got " +
                    std::to_string(s.y[r]));
    }
  }
  return s;
}

// The parameter views of a training step: `base` holds the shapes and
// settings, the arrays come from the dicts (moments only when `moments_too`
// and the optimizer is Adam).
fastmaml::TrainParams train_params(const py::dict& params, const py::dict& m, const py::dict& v,
                                   const fastmaml::TrainParams& base, const py::array& fixed_lr, bool adam) {
  fastmaml::TrainParams p = base;
  const index_t P = p.P(), D = p.D;
  p.theta = f64_array(params, "theta", P, "params");
  if (!p.theta) value_error("params: needs 'theta'");
  auto moments = [&](const char* key, index_t size, double*& mm, double*& vv) {
    if (!adam) return;
    mm = f64_array(m, key, size, "m");
    vv = f64_array(v, key, size, "v");
    if (!mm || !vv) value_error(std::string("m, v: Adam needs moments for '") + key + "'");
  };
  if (p.learn_init) moments("theta", P, p.theta_m, p.theta_v);
  if (params.contains("log_scale")) {
    p.step = fastmaml::StepKind::preconditioner;
    py::array U = params["U"].cast<py::array>();
    if (U.ndim() != 2 || U.shape(0) != D) value_error("params[U]: expected shape (n_features + 1, rank)");
    p.rank = U.shape(1);
    p.log_scale = f64_array(params, "log_scale", D, "params");
    p.U = f64_array(params, "U", D * p.rank, "params");
    moments("log_scale", D, p.log_scale_m, p.log_scale_v);
    moments("U", D * p.rank, p.U_m, p.U_v);
  } else if (params.contains("log_inner_lr")) {
    p.step = fastmaml::StepKind::learned;
    p.log_lr = f64_array(params, "log_inner_lr", p.lr_size(), "params");
    moments("log_inner_lr", p.lr_size(), p.log_lr_m, p.log_lr_v);
  } else {
    p.step = fastmaml::StepKind::fixed;
    p.fixed_lr = checked<double>(fixed_lr, "fixed_lr");
    if (fixed_lr.size() != p.lr_size()) value_error("fixed_lr: size does not match lr_extent");
  }
  for (index_t e = 0; e < 3; ++e) {
    const index_t full = e == 0 ? p.K : (e == 1 ? D : p.C);
    if (p.lr_extent[e] != 1 && p.lr_extent[e] != full) value_error("lr_extent: each extent must be 1 or full");
  }
  if (params.contains("log_l2")) {
    p.log_l2 = f64_array(params, "log_l2", 1, "params");
    moments("log_l2", 1, p.log_l2_m, p.log_l2_v);
  }
  return p;
}

// Shapes and settings of a training step, from the arguments every training
// binding takes.
fastmaml::TrainParams train_base(const py::dict& params, std::tuple<index_t, index_t, index_t> lr_extent, double l2,
                                 bool learn_init, index_t n_classes, index_t inner_steps, fastmaml::Mode mode) {
  if (!params.contains("theta")) value_error("params: needs 'theta'");
  py::array theta = params["theta"].cast<py::array>();
  if (n_classes < 1) value_error("n_classes: expected >= 1");
  if (theta.ndim() < 1 || theta.size() % n_classes != 0)
    value_error("params[theta]: expected (n_features + 1,) or (n_features + 1, n_classes)");
  fastmaml::TrainParams p;
  p.C = n_classes;
  p.D = theta.size() / n_classes;
  p.K = inner_steps;
  p.mode = mode;
  p.learn_init = learn_init;
  p.l2 = l2;
  p.lr_extent[0] = std::get<0>(lr_extent);
  p.lr_extent[1] = std::get<1>(lr_extent);
  p.lr_extent[2] = std::get<2>(lr_extent);
  if (inner_steps < 0) value_error("inner_steps: expected >= 0");
  return p;
}

template <class T>
index_t train_impl(const py::dict& params, const py::dict& m, const py::dict& v, const fastmaml::TrainParams& base,
                   const py::array& fixed_lr, const fastmaml::OptimizerConfig& opt, index_t t0, index_t n_iter,
                   py::array& records, py::array& progress, int n_threads, index_t batch_size,
                   const std::optional<Side>& support, const std::optional<Side>& query, const py::object& kernel,
                   const py::object& episode, const py::object& grouped, const py::object& bitgen,
                   const py::object& should_stop, py::array& last_draw) {
  fastmaml::TrainParams p = train_params(params, m, v, base, fixed_lr, opt.adam);
  const index_t D = p.D;
  double* rec = const_cast<double*>(checked<double>(records, "records"));
  if (records.size() < n_iter * fastmaml::kRecordFields) value_error("records: too small for n_iterations");
  index_t* prog = const_cast<index_t*>(checked<index_t>(progress, "progress"));
  if (progress.size() != 2) value_error("progress: expected 2 values");

  fastmaml::BitGen* gen = nullptr;
  if (!bitgen.is_none()) {
    gen = static_cast<fastmaml::BitGen*>(PyCapsule_GetPointer(bitgen.ptr(), "BitGenerator"));
    if (!gen) throw py::error_already_set();
  }
  warn_if_serial_after_fork(n_threads);
  StopCheck stop{should_stop, std::nullopt};
  std::function<bool()> stop_fn = [&stop]() { return stop(); };
  fastmaml::MetaStep<T> step(p, opt);
  index_t t = t0;
  fastmaml::LoopResult res;
  auto run = [&](auto& source, index_t B) {
    py::gil_scoped_release release;
    res = with_link<T>(p.C, [&](auto link) {
      return fastmaml::train_loop<T>(step, source, gen, B, link, n_threads, n_iter, t, stop_fn, rec);
    });
  };
  index_t* last = last_draw.size() ? const_cast<index_t*>(checked<index_t>(last_draw, "last_draw")) : nullptr;
  if (!episode.is_none()) {
    if (!gen) value_error("bit_generator: an episode source needs the sampler's bit generator");
    OwnedIndex owned;
    auto src = episode_source<T>(episode.cast<py::tuple>(), batch_size, p.C, owned);
    run(src, batch_size);
    if (last && res.done > 0 && last_draw.size() == static_cast<py::ssize_t>(src.ci.size()))
      std::copy(src.ci.begin(), src.ci.end(), last);
  } else if (!grouped.is_none()) {
    if (!gen) value_error("bit_generator: a grouped source needs the sampler's bit generator");
    OwnedIndex owned;
    auto src = grouped_source<T>(grouped.cast<py::tuple>(), batch_size, p.C, owned);
    run(src, batch_size);
    if (last && res.done > 0 && last_draw.size() == static_cast<py::ssize_t>(src.gi.size()))
      std::copy(src.gi.begin(), src.gi.end(), last);
  } else {
    if (!support || !query) value_error("support, query: a fixed batch needs both sides");
    fastmaml::FixedBatch<T> src;
    // the block reads the indices, offsets and labels many times: from the guard's checked copies
    TaskGuard guard;
    src.tasks = make_taskset<T>(p.C, *support, &*query, kernel, guard);
    if (src.tasks.d + 1 != D) value_error("theta: expected " + std::to_string(src.tasks.d + 1) + " rows");
    run(src, src.tasks.n_tasks);
  }
  prog[0] = res.done;
  prog[1] = t;
  if (stop.error) throw *stop.error;
  raise_status(res.status);
  return res.done;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  using fastmaml::Mode;
  using fastmaml::Sweep;
  using Layout = std::tuple<index_t, index_t, index_t>;
  m.doc() = "fastmaml compiled core (private; use the fastmaml package)";
  py::register_exception<DivergenceError>(m, "DivergenceError", PyExc_FloatingPointError);
  g_fork_warning = PyErr_NewExceptionWithDoc(
      "fastmaml.ForkWarning",
      "Warned once in a process forked after fastmaml used OpenMP threads: calls there run serially, with "
      "bitwise the same results.",
      PyExc_RuntimeWarning, nullptr);
  if (!g_fork_warning) throw py::error_already_set();
  m.attr("ForkWarning") = py::handle(g_fork_warning);  // our own reference keeps it alive for good
#ifndef _WIN32
  pthread_atfork(nullptr, nullptr, [] { fastmaml::note_fork_child(); });
#endif

  // Plain `type` as metaclass: the classes behave like ordinary Python
  // classes (and their .pyi stub says so, checked by mypy.stubtest).
  const auto plain_type = py::metaclass(reinterpret_cast<PyObject*>(&PyType_Type));
  py::enum_<Mode>(m, "Mode", plain_type, "What the reverse sweep computes: exact MAML, first-order MAML or Reptile.")
      .value("maml", Mode::maml)
      .value("first_order", Mode::first_order)
      .value("reptile", Mode::reptile);
  py::enum_<Sweep>(m, "Sweep", plain_type, "Which exact path computes a meta-gradient (auto: the cost model decides).")
      .value("auto", Sweep::automatic)
      .value("plain", Sweep::plain)
      .value("gram", Sweep::gram);

  py::class_<Side>(m, "Side", plain_type, "One side (support or query) of a meta-batch: rows, indices, offsets, labels.")
      .def(py::init<py::array, py::object, py::array, py::array>(), py::arg("X"), py::arg("idx"), py::arg("ptr"),
           py::arg("y"))
      .def_readonly("X", &Side::X)
      .def_readonly("idx", &Side::idx)
      .def_readonly("ptr", &Side::ptr)
      .def_readonly("y", &Side::y);

  m.def(
      "meta_value_and_grad",
      [](py::array theta, const Side& support, const Side& query, index_t n_classes, index_t inner_steps, double l2,
         Mode mode, Sweep sweep, int n_threads, py::object inner_lr, Layout lr_layout, py::object log_scale,
         py::object U, py::object kernel, bool block_sums, bool task_lr, py::object l2_per_task,
         bool grad_features, bool ext_generic) {
        const auto lr = lr_layout_of(lr_layout);
        if (task_lr || !l2_per_task.is_none() || grad_features) {
          if (!log_scale.is_none() || !kernel.is_none() || block_sums ||
              (sweep == Sweep::gram && (task_lr || !l2_per_task.is_none())))
            value_error("per-task hyperparameters and feature gradients run with inner_lr: not with a "
                        "preconditioner, a kernel or block sums; per-task hyperparameters not with sweep=gram");
          if (is_f32(support.X))
            return meta_ext_impl<float>(theta, support, query, n_classes, inner_steps, l2, mode, n_threads,
                                        inner_lr, lr, task_lr, l2_per_task, grad_features, ext_generic, sweep);
          return meta_ext_impl<double>(theta, support, query, n_classes, inner_steps, l2, mode, n_threads,
                                       inner_lr, lr, task_lr, l2_per_task, grad_features, ext_generic, sweep);
        }
        if (is_f32(support.X))
          return meta_impl<float>(theta, support, query, n_classes, inner_steps, l2, mode, sweep, n_threads,
                                  inner_lr, lr, log_scale, U, kernel, block_sums);
        return meta_impl<double>(theta, support, query, n_classes, inner_steps, l2, mode, sweep, n_threads,
                                 inner_lr, lr, log_scale, U, kernel, block_sums);
      },
      py::arg("theta"), py::arg("support"), py::arg("query"), py::kw_only(), py::arg("n_classes"),
      py::arg("inner_steps"), py::arg("l2"), py::arg("mode"), py::arg("sweep"), py::arg("n_threads"),
      py::arg("inner_lr") = py::none(), py::arg("lr_layout") = Layout{1, 1, 1}, py::arg("log_scale") = py::none(),
      py::arg("U") = py::none(), py::arg("kernel") = py::none(), py::arg("block_sums") = false,
      py::arg("task_lr") = false, py::arg("l2_per_task") = py::none(), py::arg("grad_features") = false,
      py::arg("ext_generic") = false);

  m.def(
      "adapt",
      [](py::array theta, const Side& support, index_t n_classes, index_t inner_steps, double l2, bool keep_path,
         int n_threads, py::object inner_lr, py::object log_scale, py::object U) {
        if (is_f32(support.X))
          return adapt_impl<float>(theta, support, n_classes, inner_steps, l2, keep_path, n_threads, inner_lr,
                                   log_scale, U);
        return adapt_impl<double>(theta, support, n_classes, inner_steps, l2, keep_path, n_threads, inner_lr,
                                  log_scale, U);
      },
      py::arg("theta"), py::arg("support"), py::kw_only(), py::arg("n_classes"), py::arg("inner_steps"),
      py::arg("l2"), py::arg("keep_path"), py::arg("n_threads"), py::arg("inner_lr") = py::none(),
      py::arg("log_scale") = py::none(), py::arg("U") = py::none());

  m.def(
      "loss_grad_hvp",
      [](py::array params, const Side& support, index_t n_classes, double l2, int n_threads, py::object v) {
        if (is_f32(support.X)) return loss_grad_hvp_impl<float>(params, support, n_classes, l2, n_threads, v);
        return loss_grad_hvp_impl<double>(params, support, n_classes, l2, n_threads, v);
      },
      py::arg("params"), py::arg("support"), py::kw_only(), py::arg("n_classes"), py::arg("l2"),
      py::arg("n_threads"), py::arg("v") = py::none());

  m.def(
      "imaml_value_and_grad",
      [](py::array theta, const Side& support, const Side& query, index_t n_classes, double mu, double l2,
         double tol, index_t max_iter, double cg_tol, index_t cg_max_iter, int n_threads) {
        const fastmaml::ImamlSettings cfg{mu, l2, tol, max_iter, cg_tol, cg_max_iter};
        if (is_f32(support.X)) return imaml_impl<float>(theta, support, query, n_classes, cfg, n_threads);
        return imaml_impl<double>(theta, support, query, n_classes, cfg, n_threads);
      },
      py::arg("theta"), py::arg("support"), py::arg("query"), py::kw_only(), py::arg("n_classes"), py::arg("mu"),
      py::arg("l2"), py::arg("tol"), py::arg("max_iter"), py::arg("cg_tol"), py::arg("cg_max_iter"),
      py::arg("n_threads"));

  m.def(
      "choose_sweep",
      [](index_t support_rows, index_t n_tasks, index_t n_features, index_t n_classes, index_t inner_steps,
         Layout lr_layout, bool preconditioned, Mode mode, bool kernel, Sweep requested, bool features) {
        if (n_tasks < 1) value_error("n_tasks: expected at least 1, got " + std::to_string(n_tasks));
        fastmaml::CallShape shape;
        shape.support_rows_per_task = static_cast<double>(support_rows) / static_cast<double>(n_tasks);
        shape.d = n_features;
        shape.C = n_classes;
        shape.K = inner_steps;
        shape.kernel = kernel;
        shape.preconditioned = preconditioned;
        shape.lr = lr_layout_of(lr_layout);
        shape.mode = mode;
        shape.features = features;
        return fastmaml::choose_sweep(shape, requested);
      },
      py::arg("support_rows"), py::arg("n_tasks"), py::arg("n_features"), py::arg("n_classes"),
      py::arg("inner_steps"), py::kw_only(), py::arg("lr_layout") = Layout{1, 1, 1},
      py::arg("preconditioned") = false, py::arg("mode") = Mode::maml, py::arg("kernel") = false,
      py::arg("requested") = Sweep::automatic, py::arg("features") = false,
      "The path (Sweep.plain or Sweep.gram) the core takes for a call of these shapes: the same rule as the "
      "dispatcher. A requested gram that does not apply gives plain. features: a call with feature gradients "
      "and shared hyperparameters (binary only on the Gram path).");

  m.def(
      "extended_path",
      [](index_t n_classes, index_t inner_steps, Layout lr_layout, Mode mode) {
        fastmaml::CallShape shape;
        shape.C = n_classes;
        shape.K = inner_steps;
        shape.lr = lr_layout_of(lr_layout);
        shape.mode = mode;
        return std::string(fastmaml::extended_runs_fast(shape) ? "fast" : "generic");
      },
      py::arg("n_classes"), py::arg("inner_steps"), py::arg("lr_layout") = Layout{1, 1, 1},
      py::arg("mode") = Mode::maml,
      "Which plain sweep runs a call with per-task hyperparameters or feature gradients: 'fast' (the binary "
      "fast sweep) or 'generic'.");

  m.def(
      "uses_gram",
      [](index_t n, index_t d, index_t C, index_t K, bool kernel) {
        return fastmaml::gram_is_cheaper(n, d, C, K, kernel);
      },
      py::arg("n"), py::arg("d"), py::arg("n_classes"), py::arg("inner_steps"), py::arg("kernel") = false,
      "The cost model alone (no applicability check): whether the Gram sweep is cheaper for n support rows.");

  m.def(
      "sample_without_replacement",
      [](py::object capsule, py::array counts, index_t m) {
        // The caller holds the bit generator's lock; the GIL stays held (a
        // meta-batch takes microseconds).
        void* ptr = PyCapsule_GetPointer(capsule.ptr(), "BitGenerator");
        if (!ptr) throw py::error_already_set();
        const index_t* c = checked<index_t>(counts, "counts");
        const index_t R = counts.size();
        if (m < 0) value_error("m: expected m >= 0");
        for (index_t r = 0; r < R; ++r)
          if (c[r] < m) value_error("counts: every population must hold at least m items");
        py::array_t<index_t> out({R, m});
        fastmaml::sample_without_replacement(static_cast<fastmaml::BitGen*>(ptr), c, R, m, out.mutable_data());
        return out;
      },
      py::arg("bit_generator_capsule"), py::arg("counts"), py::arg("m"));


  m.def(
      "train_block",
      [](py::dict params, py::dict m_, py::dict v_, py::array fixed_lr, Layout lr_extent, double l2, bool learn_init,
         index_t n_classes, index_t inner_steps, Mode mode, py::tuple optimizer, index_t t, index_t n_iterations,
         py::array records, py::array progress, int n_threads, index_t batch_size, std::optional<Side> support,
         std::optional<Side> query, py::object kernel, py::object episode, py::object grouped,
         py::object bit_generator, py::object should_stop, py::array last_draw) {
        if (mode == Mode::reptile) value_error("mode: the training loop runs MAML and first-order MAML");
        if (n_iterations < 0) value_error("n_iterations: expected >= 0");
        const auto p = train_base(params, lr_extent, l2, learn_init, n_classes, inner_steps, mode);
        const auto opt = optimizer_config(optimizer);
        py::array X;
        if (!episode.is_none()) X = episode.cast<py::tuple>()[0].cast<py::array>();
        else if (!grouped.is_none()) X = grouped.cast<py::tuple>()[0].cast<py::array>();
        else if (support) X = support->X;
        else value_error("train_block: give a fixed batch (support, query), an episode or a grouped source");
        if (is_f32(X))
          return train_impl<float>(params, m_, v_, p, fixed_lr, opt, t, n_iterations, records, progress, n_threads,
                                   batch_size, support, query, kernel, episode, grouped, bit_generator, should_stop,
                                   last_draw);
        return train_impl<double>(params, m_, v_, p, fixed_lr, opt, t, n_iterations, records, progress, n_threads,
                                  batch_size, support, query, kernel, episode, grouped, bit_generator, should_stop,
                                  last_draw);
      },
      py::arg("params"), py::arg("m"), py::arg("v"), py::kw_only(), py::arg("fixed_lr"), py::arg("lr_extent"),
      py::arg("l2"), py::arg("learn_init"), py::arg("n_classes"), py::arg("inner_steps"), py::arg("mode"),
      py::arg("optimizer"), py::arg("t"), py::arg("n_iterations"), py::arg("records"), py::arg("progress"),
      py::arg("n_threads"), py::arg("batch_size") = 0, py::arg("support") = py::none(),
      py::arg("query") = py::none(), py::arg("kernel") = py::none(), py::arg("episode") = py::none(),
      py::arg("grouped") = py::none(), py::arg("bit_generator") = py::none(), py::arg("should_stop") = py::none(),
      py::arg("last_draw") = py::array_t<index_t>(0),
      "Run up to n_iterations MAML / first-order MAML meta-iterations (draw, meta-gradient, optimizer step) "
      "with the GIL released, updating params and the Adam moments m, v in place; records (n_iterations, 5) "
      "gets loss, meta_lr, inner_lr_mean, l2, seconds per iteration and progress (2,) the iterations done and "
      "the optimizer's step count. Returns the iterations done.");

  m.def(
      "step_sizes",
      [](py::dict params, py::array fixed_lr, Layout lr_extent, double l2, index_t n_classes, index_t inner_steps) {
        const auto base = train_base(params, lr_extent, l2, true, n_classes, inner_steps, Mode::maml);
        auto p = train_params(params, py::dict(), py::dict(), base, fixed_lr, false);
        if (p.step == fastmaml::StepKind::preconditioner) value_error("params: the preconditioner has no step-size table");
        fastmaml::MetaStep<double> step(p, fastmaml::OptimizerConfig{});
        const double lam = step.prepare();
        const auto& lr = step.step_sizes();
        py::array_t<double> out(static_cast<py::ssize_t>(lr.size()));
        std::copy(lr.begin(), lr.end(), out.mutable_data());
        return py::make_tuple(out, lam);
      },
      py::arg("params"), py::kw_only(), py::arg("fixed_lr"), py::arg("lr_extent"), py::arg("l2"),
      py::arg("n_classes"), py::arg("inner_steps"),
      "The training step's inner step sizes (flat, in the order of the extents) and l2, from the parameters: "
      "what train_block hands the core, for a task source that computes the meta-gradient itself.");

  m.def(
      "apply_step",
      [](py::dict params, py::dict m_, py::dict v_, py::array fixed_lr, Layout lr_extent, double l2, bool learn_init,
         index_t n_classes, index_t inner_steps, py::tuple optimizer, index_t t, double loss, py::array grad,
         py::array hyper, double grad_l2) {
        const auto opt = optimizer_config(optimizer);
        const auto base = train_base(params, lr_extent, l2, learn_init, n_classes, inner_steps, Mode::maml);
        auto p = train_params(params, m_, v_, base, fixed_lr, opt.adam);
        const double* g = checked<double>(grad, "grad");
        const double* h = checked<double>(hyper, "hyper");
        const index_t H = p.step == fastmaml::StepKind::preconditioner ? p.D * (1 + p.rank) : p.lr_size();
        if (grad.size() != p.P()) value_error("grad: expected " + std::to_string(p.P()) + " values");
        if (hyper.size() != H) value_error("hyper: expected " + std::to_string(H) + " values");
        fastmaml::MetaStep<double> step(p, opt);
        step.prepare();
        fastmaml::StepRecord rec;
        step.apply(loss, g, h, grad_l2, t, &rec);
        return py::make_tuple(t, rec.loss, rec.meta_lr, rec.inner_lr_mean, rec.l2);
      },
      py::arg("params"), py::arg("m"), py::arg("v"), py::kw_only(), py::arg("fixed_lr"), py::arg("lr_extent"),
      py::arg("l2"), py::arg("learn_init"), py::arg("n_classes"), py::arg("inner_steps"), py::arg("optimizer"),
      py::arg("t"), py::arg("loss"), py::arg("grad"), py::arg("hyper"), py::arg("grad_l2"),
      "train_block's step from a meta-gradient computed elsewhere (float64 images of the compute dtype): chain "
      "rule to the log parameters and optimizer step in place. Returns (t, loss, meta_lr, inner_lr_mean, l2).");

  m.def(
      "optimizer_step",
      [](py::list values, py::list grads, py::list ms, py::list vs, py::tuple optimizer, index_t t) {
        const auto opt = optimizer_config(optimizer);
        const size_t n = values.size();
        if (grads.size() != n || (opt.adam && (ms.size() != n || vs.size() != n)))
          value_error("optimizer_step: values, grads, m and v differ in length");
        std::vector<fastmaml::ParamBlock> blocks(n);
        auto f64 = [](const py::handle& h, const char* name, index_t size) {
          py::array a = py::reinterpret_borrow<py::array>(h);
          if (!py::isinstance<py::array_t<double>>(a)) type_error(std::string(name) + ": expected float64 arrays");
          if (!(a.flags() & py::array::c_style) || !a.writeable())
            value_error(std::string(name) + ": expected writeable C-contiguous arrays");
          if (size >= 0 && a.size() != size) value_error(std::string(name) + ": sizes differ from the values");
          return static_cast<double*>(a.mutable_data());
        };
        for (size_t i = 0; i < n; ++i) {
          const index_t size = values[i].cast<py::array>().size();
          blocks[i].value = f64(values[i], "values", -1);
          blocks[i].size = size;
          blocks[i].grad = f64(grads[i], "grads", size);
          if (opt.adam) {
            blocks[i].m = f64(ms[i], "m", size);
            blocks[i].v = f64(vs[i], "v", size);
          }
        }
        fastmaml::optimizer_step(opt, t, blocks.data(), static_cast<index_t>(n));
        return t;
      },
      py::arg("values"), py::arg("grads"), py::arg("m"), py::arg("v"), py::arg("optimizer"), py::arg("t"),
      "One meta-optimizer step (Adam or SGD, the training loop's own) on float64 arrays updated in place; "
      "returns the new step count.");

  m.def(
      "scheduled_lr",
      [](py::tuple optimizer, index_t t) { return fastmaml::scheduled_lr(optimizer_config(optimizer), t); },
      py::arg("optimizer"), py::arg("t"), "The meta step size after t steps (the cosine schedule, if any).");

  m.def(
      "all_finite",
      [](const py::object& obj) -> py::object {
        if (!py::isinstance<py::array>(obj)) return py::none();
        const auto a = py::reinterpret_borrow<py::array>(obj);
        // A C-contiguous float32/float64 array's finite check in one pass
        // with no temporary (np.isfinite(a).all() costs a few microseconds of
        // dispatch even on theta's 785 values); None for any other array, which
        // the caller checks with NumPy.
        if (!(a.flags() & py::array::c_style)) return py::none();
        const auto addr = reinterpret_cast<std::uintptr_t>(a.data());
        if (py::isinstance<py::array_t<float>>(a) && addr % alignof(float) == 0)
          return py::bool_(fastmaml::all_finite(static_cast<const float*>(a.data()), a.size()));
        if (py::isinstance<py::array_t<double>>(a) && addr % alignof(double) == 0)
          return py::bool_(fastmaml::all_finite(static_cast<const double*>(a.data()), a.size()));
        return py::none();  // also a misaligned view (read through NumPy, never a misaligned pointer)
      },
      py::arg("a"), "True when every value of a C-contiguous float32/float64 array is finite; None for anything else.");
  m.def("openmp_enabled", &fastmaml::built_with_openmp);
  m.def("multiversioned", []() { return FASTMAML_MULTIVERSIONED == 1; });
  m.def("portable_fallbacks", []() { return FASTMAML_PORTABLE_FALLBACKS == 1; });
  m.def("simd_level", []() -> std::string {
#if FASTMAML_MULTIVERSIONED
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return "x86-64-v4 (AVX-512)";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "x86-64-v3 (AVX2+FMA)";
    return "x86-64 baseline (SSE2)";
#else
    return "baseline (no run-time dispatch in this build)";
#endif
  });
  m.attr("build_type") =
#ifdef NDEBUG
      "release";
#else
      "debug";
#endif
  m.attr("compiler") =
#if defined(__clang__)
      "clang " __clang_version__;
#elif defined(__GNUC__)
      "gcc " __VERSION__;
#elif defined(_MSC_VER)
      "msvc";
#else
      "unknown";
#endif
  m.def("max_threads", []() { return fastmaml::resolve_threads(0); });
  m.attr("reduce_block") = fastmaml::kReduceBlock;
#ifdef FASTMAML_VERSION
  m.attr("__version__") = FASTMAML_VERSION;
#endif
}
