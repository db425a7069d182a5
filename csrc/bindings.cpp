// The only file that knows pybind11. It checks dtypes, layouts, shapes,
// index bounds and labels with the GIL held, releases the GIL, runs the core
// and returns NumPy arrays. Arrays are taken as they are (no conversion): the
// Python layer (fastmaml/_api.py) converts once, so a C-contiguous float32 or
// float64 X reaches the core without a copy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "fastmaml/batch.hpp"
#include "fastmaml/gram.hpp"
#include "fastmaml/imaml.hpp"
#include "fastmaml/model.hpp"
#include "fastmaml/sampling.hpp"
#include "fastmaml/tasks.hpp"

namespace py = pybind11;
using fastmaml::index_t;

namespace {

struct DivergenceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

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

// Builds one side of a TaskSet from (X, idx or None, ptr, y) and checks every
// invariant the core relies on, so that no input can make it read out of
// bounds.
template <class T>
fastmaml::SideView<T> make_side(const py::array& X, const py::object& idx, const py::array& ptr,
                                const py::array& y, index_t n_tasks, index_t d, const char* side) {
  const std::string s(side);
  fastmaml::SideView<T> v;
  v.base = checked<T>(X, (s + "_X").c_str());
  v.ptr = checked<index_t>(ptr, (s + "_ptr").c_str());
  v.y = checked<std::int32_t>(y, (s + "_y").c_str());
  if (ptr.ndim() != 1 || ptr.shape(0) != n_tasks + 1)
    value_error(s + "_ptr: expected shape (" + std::to_string(n_tasks + 1) + ",), got " + shape_str(ptr));
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
    v.idx = checked<index_t>(ia, (s + "_idx").c_str());
    if (ia.size() != total)
      value_error(s + "_idx: expected " + std::to_string(total) + " indices, got " + std::to_string(ia.size()));
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
    case ErrorCode::no_memory:
      throw std::bad_alloc();
    default:
      throw std::runtime_error("fastmaml internal error in task " + std::to_string(st.task) + ": " +
                               st.message);
  }
}

struct Sides {
  py::array X;
  py::object idx;
  py::array ptr;
  py::array y;
  py::object kernel = py::none();
};

template <class T>
fastmaml::TaskSet<T> make_taskset(index_t n_tasks, index_t d, index_t C, const Sides& s, const Sides* q) {
  if (n_tasks < 1) value_error("tasks: expected at least one task, got 0");
  fastmaml::TaskSet<T> ts;
  ts.n_tasks = n_tasks;
  ts.d = d;
  ts.support = make_side<T>(s.X, s.idx, s.ptr, s.y, n_tasks, d, "support");
  check_labels(ts.support, s.y.size(), C, "support");
  if (!s.kernel.is_none()) {
    py::array k = s.kernel.cast<py::array>();
    const index_t rows = d > 0 ? s.X.size() / d : 0;
    if (k.ndim() != 2 || k.shape(0) != rows || k.shape(1) != rows)
      value_error("kernel: expected shape (" + std::to_string(rows) + ", " + std::to_string(rows) +
                  ") = (n_samples, n_samples) of the dataset, got " + shape_str(k));
    ts.kernel = checked<T>(k, "kernel");
    ts.kernel_rows = rows;
  }
  if (q) {
    if (q->ptr.size() - 1 != n_tasks)
      value_error("query: expected " + std::to_string(n_tasks) + " tasks like the support sets, got " +
                  std::to_string(q->ptr.size() - 1));
    ts.query = make_side<T>(q->X, q->idx, q->ptr, q->y, n_tasks, d, "query");
    check_labels(ts.query, q->y.size(), C, "query");
  }
  return ts;
}

index_t feature_count(const py::array& X) {
  if (X.ndim() < 2) value_error("X: expected at least 2 dimensions, got shape " + shape_str(X));
  return X.shape(X.ndim() - 1);
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

template <class T>
py::tuple meta_impl(py::array theta, py::object alpha, index_t ks, index_t pr, index_t pc, py::object log_scale,
                    py::object U, index_t K, double l2, int mode, int n_threads, index_t C, const Sides& s,
                    const Sides& q, int sweep, bool want_blocks) {
  const index_t d = feature_count(s.X), D = d + 1, P = D * C;
  if (feature_count(q.X) != d) value_error("query_X: feature count differs from support_X");
  const index_t n_tasks = s.ptr.size() - 1;
  const T* th = checked<T>(theta, "theta");
  if (theta.size() != P) value_error("theta: expected " + std::to_string(P) + " values");
  auto pre = make_precond<T>(log_scale, U, D);
  const T* al = step_table<T>(alpha, pre, K, P);
  if (al && !((ks == 1 || ks == K) && (pr == 1 || pr == D) && (pc == 1 || pc == C))) value_error("inner_lr: bad layout");
  auto ts = make_taskset<T>(n_tasks, d, C, s, &q);
  fastmaml::LrLayout lr{ks, pr, pc};
  const index_t H = pre.active() ? D * (1 + pre.rank) : lr.size();
  if (sweep == 2 && !fastmaml::gram_applies(pre.active(), lr, static_cast<fastmaml::Mode>(mode), K))
    value_error("sweep: 'gram' needs one step size per step (scalar or per-step inner_lr), no preconditioner, "
                "MAML or first-order MAML, and inner_steps >= 1");
  py::array_t<T> grad(P);
  py::array_t<T> hyper(H);
  const index_t n_blocks = (n_tasks + fastmaml::kReduceBlock - 1) / fastmaml::kReduceBlock;
  const index_t slot_len = fastmaml::meta_slot_len(P, H, static_cast<fastmaml::Mode>(mode));
  py::array_t<double> blocks = want_blocks ? py::array_t<double>({n_blocks, slot_len}) : py::array_t<double>(0);
  double loss = 0.0, grad_l2 = 0.0;
  fastmaml::TaskStatus st;
  {
    py::gil_scoped_release release;
    st = with_link<T>(C, [&](auto link) {
      return fastmaml::meta_value_and_grad<T>(ts, link, th, al, pre, K, lr, l2, static_cast<fastmaml::Mode>(mode),
                                              n_threads, &loss, grad.mutable_data(), hyper.mutable_data(),
                                              &grad_l2, static_cast<fastmaml::Sweep>(sweep),
                                              want_blocks ? blocks.mutable_data() : nullptr);
    });
  }
  raise_status(st);
  if (want_blocks) return py::make_tuple(loss, grad, hyper, grad_l2, blocks);
  return py::make_tuple(loss, grad, hyper, grad_l2);
}

template <class T>
py::array adapt_impl(py::array theta, bool per_task, py::object alpha, py::object log_scale, py::object U,
                     index_t K, double l2, bool keep_path, int n_threads, index_t C, const Sides& s) {
  const index_t d = feature_count(s.X), D = d + 1, P = D * C;
  const index_t n_tasks = s.ptr.size() - 1;
  const T* th = checked<T>(theta, "theta");
  if (theta.size() != (per_task ? n_tasks * P : P)) value_error("theta: wrong number of values");
  auto pre = make_precond<T>(log_scale, U, D);
  const T* al = step_table<T>(alpha, pre, K, P);
  auto ts = make_taskset<T>(n_tasks, d, C, s, nullptr);
  py::array_t<T> out = keep_path ? py::array_t<T>({n_tasks, K + 1, P}) : py::array_t<T>({n_tasks, P});
  fastmaml::TaskStatus st;
  {
    py::gil_scoped_release release;
    st = with_link<T>(C, [&](auto link) {
      return fastmaml::adapt<T>(ts, link, th, per_task, al, pre, K, l2, keep_path, n_threads, out.mutable_data());
    });
  }
  raise_status(st);
  return out;
}

template <class T>
py::tuple loss_grad_hvp_impl(py::array params, py::object v, double l2, int n_threads, index_t C, const Sides& s) {
  const index_t d = feature_count(s.X), P = (d + 1) * C;
  const index_t n_tasks = s.ptr.size() - 1;
  const T* p = checked<T>(params, "params");
  if (params.size() != n_tasks * P) value_error("params: expected one parameter vector per task");
  const T* vp = nullptr;
  if (!v.is_none()) {
    py::array va = v.cast<py::array>();
    vp = checked<T>(va, "v");
    if (va.size() != n_tasks * P) value_error("v: expected one vector per task");
  }
  auto ts = make_taskset<T>(n_tasks, d, C, s, nullptr);
  py::array_t<T> loss(n_tasks);
  py::array_t<T> out({n_tasks, P});
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
py::tuple imaml_impl(py::array theta, double mu, double l2, double tol, index_t max_iter, double cg_tol,
                     index_t cg_max_iter, int n_threads, index_t C, const Sides& s, const Sides& q) {
  const index_t d = feature_count(s.X), P = (d + 1) * C;
  if (feature_count(q.X) != d) value_error("query_X: feature count differs from support_X");
  const index_t n_tasks = s.ptr.size() - 1;
  const T* th = checked<T>(theta, "theta");
  if (theta.size() != P) value_error("theta: expected " + std::to_string(P) + " values");
  auto ts = make_taskset<T>(n_tasks, d, C, s, &q);
  py::array_t<T> grad(P);
  py::array_t<double> inner_res(n_tasks), cg_res(n_tasks);
  py::array_t<std::int32_t> inner_it(n_tasks), cg_it(n_tasks);
  py::array_t<std::uint8_t> inner_ok(n_tasks), cg_ok(n_tasks);
  fastmaml::ImamlSettings cfg{mu, l2, tol, max_iter, cg_tol, cg_max_iter};
  fastmaml::ImamlReport rep{inner_res.mutable_data(), inner_it.mutable_data(), inner_ok.mutable_data(),
                            cg_res.mutable_data(),    cg_it.mutable_data(),    cg_ok.mutable_data()};
  double loss = 0.0;
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

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastmaml compiled core (private; use the fastmaml package)";
  py::register_exception<DivergenceError>(m, "DivergenceError", PyExc_FloatingPointError);

  m.def(
      "meta_value_and_grad",
      [](py::array theta, py::object alpha, index_t ks, index_t pr, index_t pc, py::object log_scale, py::object U,
         index_t K, double l2, int mode, int n_threads, index_t C, py::array sX, py::object sidx, py::array sptr,
         py::array sy, py::array qX, py::object qidx, py::array qptr, py::array qy, int sweep, bool blocks,
         py::object kernel) {
        Sides s{sX, sidx, sptr, sy, kernel}, q{qX, qidx, qptr, qy};
        if (is_f32(sX))
          return meta_impl<float>(theta, alpha, ks, pr, pc, log_scale, U, K, l2, mode, n_threads, C, s, q, sweep, blocks);
        return meta_impl<double>(theta, alpha, ks, pr, pc, log_scale, U, K, l2, mode, n_threads, C, s, q, sweep, blocks);
      },
      py::arg("theta"), py::arg("inner_lr"), py::arg("lr_steps"), py::arg("lr_rows"), py::arg("lr_cols"),
      py::arg("log_scale"), py::arg("U"), py::arg("inner_steps"), py::arg("l2"), py::arg("mode"),
      py::arg("n_threads"), py::arg("n_classes"), py::arg("support_X"), py::arg("support_idx"),
      py::arg("support_ptr"), py::arg("support_y"), py::arg("query_X"), py::arg("query_idx"), py::arg("query_ptr"),
      py::arg("query_y"), py::arg("sweep") = 0, py::arg("block_sums") = false, py::arg("kernel") = py::none());

  m.def(
      "adapt",
      [](py::array theta, bool per_task, py::object alpha, py::object log_scale, py::object U, index_t K, double l2,
         bool keep_path, int n_threads, index_t C, py::array sX, py::object sidx, py::array sptr, py::array sy) {
        Sides s{sX, sidx, sptr, sy};
        if (is_f32(sX)) return adapt_impl<float>(theta, per_task, alpha, log_scale, U, K, l2, keep_path, n_threads, C, s);
        return adapt_impl<double>(theta, per_task, alpha, log_scale, U, K, l2, keep_path, n_threads, C, s);
      },
      py::arg("theta"), py::arg("per_task_theta"), py::arg("inner_lr"), py::arg("log_scale"), py::arg("U"),
      py::arg("inner_steps"), py::arg("l2"), py::arg("keep_path"), py::arg("n_threads"), py::arg("n_classes"),
      py::arg("X"), py::arg("idx"), py::arg("ptr"), py::arg("y"));

  m.def(
      "loss_grad_hvp",
      [](py::array params, py::object v, double l2, int n_threads, index_t C, py::array sX, py::object sidx,
         py::array sptr, py::array sy) {
        Sides s{sX, sidx, sptr, sy};
        if (is_f32(sX)) return loss_grad_hvp_impl<float>(params, v, l2, n_threads, C, s);
        return loss_grad_hvp_impl<double>(params, v, l2, n_threads, C, s);
      },
      py::arg("params"), py::arg("v"), py::arg("l2"), py::arg("n_threads"), py::arg("n_classes"), py::arg("X"),
      py::arg("idx"), py::arg("ptr"), py::arg("y"));

  m.def(
      "imaml_value_and_grad",
      [](py::array theta, double mu, double l2, double tol, index_t max_iter, double cg_tol, index_t cg_max_iter,
         int n_threads, index_t C, py::array sX, py::object sidx, py::array sptr, py::array sy, py::array qX,
         py::object qidx, py::array qptr, py::array qy) {
        Sides s{sX, sidx, sptr, sy}, q{qX, qidx, qptr, qy};
        if (is_f32(sX)) return imaml_impl<float>(theta, mu, l2, tol, max_iter, cg_tol, cg_max_iter, n_threads, C, s, q);
        return imaml_impl<double>(theta, mu, l2, tol, max_iter, cg_tol, cg_max_iter, n_threads, C, s, q);
      },
      py::arg("theta"), py::arg("mu"), py::arg("l2"), py::arg("tol"), py::arg("max_iter"), py::arg("cg_tol"),
      py::arg("cg_max_iter"), py::arg("n_threads"), py::arg("n_classes"), py::arg("support_X"),
      py::arg("support_idx"), py::arg("support_ptr"), py::arg("support_y"), py::arg("query_X"),
      py::arg("query_idx"), py::arg("query_ptr"), py::arg("query_y"));

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

  m.def("openmp_enabled", &fastmaml::built_with_openmp);
  m.def("multiversioned", []() { return FASTMAML_MULTIVERSIONED == 1; });
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
  m.def(
      "uses_gram",
      [](index_t n, index_t d, index_t C, index_t K, bool kernel) {
        return fastmaml::gram_cost(n, d, C, K, kernel) < fastmaml::plain_cost(n, d, C, K);
      },
      py::arg("n"), py::arg("d"), py::arg("n_classes"), py::arg("inner_steps"), py::arg("kernel") = false);
  m.def("max_threads", []() { return fastmaml::resolve_threads(0); });
  m.attr("reduce_block") = fastmaml::kReduceBlock;
#ifdef FASTMAML_VERSION
  m.attr("__version__") = FASTMAML_VERSION;
#endif
}
