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

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>

#include "fastmaml/imaml.hpp"
#include "fastmaml/kernels.hpp"
#include "fastmaml/meta.hpp"
#include "fastmaml/parallel.hpp"
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
fastmaml::TaskSet<T> make_taskset(index_t C, const Side& s, const Side* q, const py::object& kernel) {
  const index_t n_tasks = n_tasks_of(s);
  const index_t d = feature_count(s.X);
  if (n_tasks < 1) value_error("tasks: expected at least one task, got 0");
  fastmaml::TaskSet<T> ts;
  ts.n_tasks = n_tasks;
  ts.d = d;
  ts.support = make_side<T>(s.X, s.idx, s.ptr, s.y, n_tasks, d, "support");
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
    ts.query = make_side<T>(q->X, q->idx, q->ptr, q->y, n_tasks, d, "query");
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
  auto ts = make_taskset<T>(C, s, &q, kernel);
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

template <class T>
py::array adapt_impl(const py::array& theta, const Side& s, index_t C, index_t K, double l2, bool keep_path,
                     int n_threads, const py::object& alpha, const py::object& log_scale, const py::object& U) {
  auto ts = make_taskset<T>(C, s, nullptr, py::none());
  const index_t D = ts.d + 1, P = D * C, n_tasks = ts.n_tasks;
  const T* th = checked<T>(theta, "theta");
  if (theta.size() != P) value_error("theta: expected " + std::to_string(P) + " values");
  auto pre = make_precond<T>(log_scale, U, D);
  const T* al = step_table<T>(alpha, pre, K, P);
  py::array_t<T> out = keep_path ? py::array_t<T>({n_tasks, K + 1, P}) : py::array_t<T>({n_tasks, P});
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
  auto ts = make_taskset<T>(C, s, nullptr, py::none());
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
  auto ts = make_taskset<T>(C, s, &q, py::none());
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
  using fastmaml::Mode;
  using fastmaml::Sweep;
  using Layout = std::tuple<index_t, index_t, index_t>;
  m.doc() = "fastmaml compiled core (private; use the fastmaml package)";
  py::register_exception<DivergenceError>(m, "DivergenceError", PyExc_FloatingPointError);

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
         py::object U, py::object kernel, bool block_sums) {
        const auto lr = lr_layout_of(lr_layout);
        if (is_f32(support.X))
          return meta_impl<float>(theta, support, query, n_classes, inner_steps, l2, mode, sweep, n_threads,
                                  inner_lr, lr, log_scale, U, kernel, block_sums);
        return meta_impl<double>(theta, support, query, n_classes, inner_steps, l2, mode, sweep, n_threads,
                                 inner_lr, lr, log_scale, U, kernel, block_sums);
      },
      py::arg("theta"), py::arg("support"), py::arg("query"), py::kw_only(), py::arg("n_classes"),
      py::arg("inner_steps"), py::arg("l2"), py::arg("mode"), py::arg("sweep"), py::arg("n_threads"),
      py::arg("inner_lr") = py::none(), py::arg("lr_layout") = Layout{1, 1, 1}, py::arg("log_scale") = py::none(),
      py::arg("U") = py::none(), py::arg("kernel") = py::none(), py::arg("block_sums") = false);

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
         Layout lr_layout, bool preconditioned, Mode mode, bool kernel, Sweep requested) {
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
        return fastmaml::choose_sweep(shape, requested);
      },
      py::arg("support_rows"), py::arg("n_tasks"), py::arg("n_features"), py::arg("n_classes"),
      py::arg("inner_steps"), py::kw_only(), py::arg("lr_layout") = Layout{1, 1, 1},
      py::arg("preconditioned") = false, py::arg("mode") = Mode::maml, py::arg("kernel") = false,
      py::arg("requested") = Sweep::automatic,
      "The path (Sweep.plain or Sweep.gram) the core takes for a call of these shapes: the same rule as the "
      "dispatcher. A requested gram that does not apply gives plain.");

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
