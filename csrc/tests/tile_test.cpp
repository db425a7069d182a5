// Prototype check + benchmark of the tiled kernels (issue 13) against the
// existing core as the oracle. Stand-alone, no Python:
//   g++ -std=c++17 -O3 -fopenmp -Wall -Wextra -Icsrc csrc/tests/tile_test.cpp -o /tmp/tile_test
//   /tmp/tile_test [bench]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fastmaml/fastsweep.hpp"

using namespace fastmaml;

static int failures = 0;
static void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}
template <class A, class B>
static double rel_err(const std::vector<A>& a, const std::vector<B>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return den > 0 ? num / den : num;
}

struct Work {
  const char* name;
  index_t T, n, m, d, K;
};

template <class S>
struct Batch {
  index_t T, n, m, d;
  std::vector<S> Xs, Xq;
  std::vector<std::int32_t> ys, yq;
  std::vector<index_t> sptr, qptr;
  TaskSet<S> ts;
  Batch(index_t T_, index_t n_, index_t m_, index_t d_, unsigned seed) : T(T_), n(n_), m(m_), d(d_) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    Xs.resize(static_cast<size_t>(T * n * d));
    Xq.resize(static_cast<size_t>(T * m * d));
    // MNIST-like: ~80% zeros, the rest in (0, 1]
    for (auto& x : Xs) x = static_cast<S>(u(rng) < 0.8 ? 0.0 : u(rng));
    for (auto& x : Xq) x = static_cast<S>(u(rng) < 0.8 ? 0.0 : u(rng));
    for (index_t i = 0; i < T * n; ++i) ys.push_back(static_cast<std::int32_t>(rng() % 2));
    for (index_t i = 0; i < T * m; ++i) yq.push_back(static_cast<std::int32_t>(rng() % 2));
    for (index_t t = 0; t <= T; ++t) {
      sptr.push_back(t * n);
      qptr.push_back(t * m);
    }
    ts.n_tasks = T;
    ts.d = d;
    ts.support = {Xs.data(), nullptr, sptr.data(), ys.data()};
    ts.query = {Xq.data(), nullptr, qptr.data(), yq.data()};
  }
  template <class U>
  explicit Batch(const Batch<U>& o) : T(o.T), n(o.n), m(o.m), d(o.d), ys(o.ys), yq(o.yq), sptr(o.sptr), qptr(o.qptr) {
    Xs.assign(o.Xs.begin(), o.Xs.end());
    Xq.assign(o.Xq.begin(), o.Xq.end());
    ts.n_tasks = T;
    ts.d = d;
    ts.support = {Xs.data(), nullptr, sptr.data(), ys.data()};
    ts.query = {Xq.data(), nullptr, qptr.data(), yq.data()};
  }
};

struct Result {
  double loss = 0, gl2 = 0;
  std::vector<double> grad, hyper;
  bool ok = false;
  std::vector<double> all() const {
    std::vector<double> v{loss, gl2};
    v.insert(v.end(), grad.begin(), grad.end());
    v.insert(v.end(), hyper.begin(), hyper.end());
    return v;
  }
};

// which: 0 = existing core (oracle), 1 = new kernels
template <class T>
static Result run(const Batch<T>& b, int which, Sweep sweep, const std::vector<double>& theta64, double lr0,
                  bool per_step, index_t K, double lam, Mode mode, int threads) {
  const index_t D = b.d + 1;
  std::vector<T> theta(theta64.begin(), theta64.end());
  std::vector<T> alpha(static_cast<size_t>(K * D));
  for (index_t j = 0; j < K; ++j)
    for (index_t p = 0; p < D; ++p) alpha[j * D + p] = static_cast<T>(per_step ? lr0 * (1.0 + 0.1 * j) : lr0);
  LrLayout lr{per_step ? K : 1, 1, 1};
  Result r;
  std::vector<T> grad(static_cast<size_t>(D)), hyper(static_cast<size_t>(lr.size()));
  TaskStatus st;
  if (which == 0) {
    Preconditioner<T> none;
    st = meta_value_and_grad<T>(b.ts, BinaryLink{}, theta.data(), alpha.data(), none, K, lr, lam, mode, threads,
                                &r.loss, grad.data(), hyper.data(), &r.gl2, sweep);
  } else if (which == 2) {
    st = lockstep_meta_value_and_grad<T>(b.ts, theta.data(), alpha.data(), K, lr, lam, mode, threads, &r.loss,
                                         grad.data(), hyper.data(), &r.gl2);
  } else {
    st = fast_meta_value_and_grad<T>(b.ts, theta.data(), alpha.data(), K, lr, lam, mode, threads, &r.loss, grad.data(),
                                     hyper.data(), &r.gl2, sweep);
  }
  r.ok = st.ok();
  r.grad.assign(grad.begin(), grad.end());
  r.hyper.assign(hyper.begin(), hyper.end());
  return r;
}

static std::vector<double> make_theta(index_t d, double scale, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g(0.0, scale);
  std::vector<double> th(static_cast<size_t>(d + 1));
  for (auto& x : th) x = g(rng);
  return th;
}

static void test_vmath() {
  double worst = 0.0;
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<double> u(-750.0, 0.0);
  std::vector<double> xs = {0.0, -0.0, -1e-300, -1e-17, -0.34657, -0.34658, -1.0, -700.0, -708.0, -5000.0, -1e308};
  for (int i = 0; i < 200000; ++i) xs.push_back(i < 100000 ? u(rng) : u(rng) / 750.0 * 3.0);
  for (double x : xs) {
    const double a = vmath::exp_nonpos(x), b = std::exp(x);
    if (b >= 1e-300) worst = std::max(worst, std::fabs(a - b) / b);
    else if (a != 0.0 && std::fabs(a - b) > 1e-300) worst = 1.0;
  }
  check(worst < 5e-16, std::string("exp_nonpos within 5e-16 relative of std::exp on [-708, 0] (worst ") + std::to_string(worst * 1e16) + "e-16)");
  check(std::isnan(vmath::exp_nonpos(std::numeric_limits<double>::quiet_NaN())), "exp_nonpos(NaN) is NaN");
  check(vmath::exp_nonpos(-std::numeric_limits<double>::infinity()) == 0.0, "exp_nonpos(-inf) is 0");
  // link rows against links.hpp, including |z| ~ 5000
  std::vector<double> z = {0.0, 1e-8, -1e-8, 3.0, -3.0, 40.0, -40.0, 700.0, -700.0, 5000.0, -5000.0, 36.7, -745.5};
  std::vector<std::int32_t> y;
  for (size_t i = 0; i < z.size(); ++i) y.push_back(static_cast<std::int32_t>(i % 2));
  const size_t n_base = z.size();
  for (size_t i = 0; i < n_base; ++i) {
    z.push_back(z[i]);
    y.push_back(1 - y[i]);
  }
  const index_t n = static_cast<index_t>(z.size());
  std::vector<double> r(n), s(n), tails(n), r0(n), s0(n);
  const double hinge = vmath::binary_rows(z.data(), y.data(), n, 1.0, r.data(), s.data(), tails.data());
  const double loss = hinge + vmath::sum_log1p(tails.data(), n);
  double loss0 = 0.0, worst_r = 0.0;
  BinaryLink link;
  for (index_t i = 0; i < n; ++i) {
    loss0 += link.row(&z[i], y[i], &r0[i], &s0[i]);
    const double den = std::max(std::fabs(r0[i]), 1e-300);
    worst_r = std::max(worst_r, std::fabs(r[i] - r0[i]) / den);
    worst_r = std::max(worst_r, std::fabs(s[i] - s0[i]) / std::max(s0[i], 1e-300));
  }
  check(worst_r < 1e-15 && std::fabs(loss - loss0) < 1e-15 * loss0,
        "binary_rows residual / curvature / loss match links.hpp elementwise at |z| up to 5000");
  // tiny losses keep their digits (all rows confidently right)
  std::vector<double> zt = {40.0, -40.0, 60.0}, rt(3), tt(3), st(3);
  std::vector<std::int32_t> yt = {1, 0, 1};
  double l1 = vmath::binary_rows(zt.data(), yt.data(), 3, 1.0, rt.data(), st.data(), tt.data()) + vmath::sum_log1p(tt.data(), 3);
  double l0 = 0.0, rr, cc;
  for (int i = 0; i < 3; ++i) l0 += link.row(&zt[i], yt[i], &rr, &cc);
  check(std::fabs(l1 - l0) < 1e-14 * l0, "tiny losses (1e-17) keep relative accuracy");
  std::vector<double> zn = {1.0, std::numeric_limits<double>::quiet_NaN()}, rn(2), sn(2), tn(2);
  std::vector<std::int32_t> yn = {1, 0};
  double ln = vmath::binary_rows(zn.data(), yn.data(), 2, 1.0, rn.data(), sn.data(), tn.data()) + vmath::sum_log1p(tn.data(), 2);
  check(std::isnan(rn[1]) && std::isnan(sn[1]) && std::isnan(ln), "NaN logits propagate to residual, curvature, loss");
}

template <class T>
static void test_tiles() {
  // Gram / xv / xtr against plain loops on awkward sizes (tails in n and d).
  for (index_t n : {1, 3, 4, 5, 9, 20}) {
    for (index_t d : {1, 7, 8, 33, 257, 300}) {
      Batch<T> b(1, n, 1, d, static_cast<unsigned>(n * 1000 + d));
      std::vector<const T*> rows;
      b.ts.support.gather(0, d, rows);
      std::vector<double> G(n * n), z(n), coef(n);
      tile::gram(rows.data(), n, d, G.data());
      std::vector<T> v(d), out(d);
      for (index_t k = 0; k < d; ++k) v[k] = static_cast<T>(0.01 * (k % 13) - 0.05);
      tile::xv(rows.data(), n, d, v.data(), z.data());
      for (index_t i = 0; i < n; ++i) coef[i] = 0.3 - 0.07 * i;
      tile::xtr(rows.data(), n, d, coef.data(), 0.5, v.data(), out.data());
      double eg = 0, ez = 0, eo = 0, sg = 1e-300, sz = 1e-300, so = 1e-300;
      bool sym = true;
      for (index_t i = 0; i < n; ++i) {
        for (index_t k = 0; k < n; ++k) {
          long double acc = 0;
          for (index_t f = 0; f < d; ++f) acc += (long double)rows[i][f] * rows[k][f];
          eg = std::max(eg, std::fabs(G[i * n + k] - (double)acc));
          sg = std::max(sg, std::fabs((double)acc));
          sym = sym && G[i * n + k] == G[k * n + i];
        }
        long double acc = 0;
        for (index_t f = 0; f < d; ++f) acc += (long double)rows[i][f] * v[f];
        ez = std::max(ez, std::fabs(z[i] - (double)acc));
        sz = std::max(sz, std::fabs((double)acc));
      }
      for (index_t f = 0; f < d; ++f) {
        long double acc = 0.5L * v[f];
        for (index_t i = 0; i < n; ++i) acc += (long double)coef[i] * rows[i][f];
        eo = std::max(eo, std::fabs((double)out[f] - (double)acc));
        so = std::max(so, std::fabs((double)acc));
      }
      const double tol = sizeof(T) == 4 ? 1e-6 : 1e-14;
      if (!(eg / sg < tol && ez / sz < tol && eo / so < tol && sym)) {
        check(false, std::string("tiles ") + (sizeof(T) == 4 ? "f32" : "f64") + " n=" + std::to_string(n) +
                         " d=" + std::to_string(d));
        return;
      }
    }
  }
  // A Gram entry does not depend on where the pair sits in the tile grid.
  Batch<T> b(1, 11, 1, 70, 5);
  std::vector<const T*> rows;
  b.ts.support.gather(0, 70, rows);
  std::vector<double> G(121), G2(4);
  tile::gram(rows.data(), 11, 70, G.data());
  std::vector<const T*> two = {rows[10], rows[3]};
  tile::gram(two.data(), 2, 70, G2.data());
  check(G2[1] == G[10 * 11 + 3] && G2[0] == G[10 * 11 + 10], std::string("tiles ") + (sizeof(T) == 4 ? "f32" : "f64") +
                                                                   ": products agree with long double on tails; entries independent of tile position");
}

// A task's lock-step result is the same whatever group or lane it lands in
// (and alone), tails included.
template <class S>
static void test_lanes() {
  Batch<S> b(21, 7, 5, 19, 9);  // 21 tasks: groups of 8, 8, 5
  const index_t D = 20, K = 3;
  const auto th = make_theta(19, 0.3, 2);
  std::vector<S> theta(th.begin(), th.end()), alpha(static_cast<size_t>(K * D), static_cast<S>(0.3)), grad(D), hyper(1);
  double loss, gl2;
  std::vector<double> all, one;
  lockstep_meta_value_and_grad<S>(b.ts, theta.data(), alpha.data(), K, LrLayout{}, 0.1, Mode::maml, 2, &loss, grad.data(),
                                  hyper.data(), &gl2, &all);
  const index_t slot_len = 1 + D + 1 + 1;
  bool same = true;
  for (index_t t : {0, 5, 7, 8, 13, 20}) {
    TaskSet<S> ts1 = b.ts;
    ts1.n_tasks = 1;
    std::vector<index_t> sp = {b.sptr[t], b.sptr[t + 1]}, qp = {b.qptr[t], b.qptr[t + 1]};
    ts1.support.ptr = sp.data();
    ts1.query.ptr = qp.data();
    lockstep_meta_value_and_grad<S>(ts1, theta.data(), alpha.data(), K, LrLayout{}, 0.1, Mode::maml, 1, &loss,
                                    grad.data(), hyper.data(), &gl2, &one);
    for (index_t k = 0; k < slot_len; ++k) same = same && one[k] == all[t * slot_len + k];
  }
  check(same, std::string("lock-step ") + (sizeof(S) == 4 ? "f32" : "f64") +
                  ": a task alone is bitwise equal to the same task in any group / lane (tails included)");
}

static void test_workload(const Work& w) {
  Batch<double> b64(std::min<index_t>(w.T, 256), w.n, w.m, w.d, 11);
  Batch<float> b32(b64);
  struct Case {
    double lr0, scale, lam;
    bool per_step;
    Mode mode;
    const char* what;
  };
  const double lr = 0.02;
  std::vector<Case> cases = {{lr, 0.05, 0.0, false, Mode::maml, "scalar lr, l2=0"},
                             {lr, 0.05, 0.1, true, Mode::maml, "per-step lr, l2=0.1"},
                             {lr, 0.05, 0.1, false, Mode::first_order, "first-order, l2=0.1"},
                             {lr, 3.0, 0.0, false, Mode::maml, "huge logits (|z| ~ 1e3-5e3)"}};
  for (const auto& c : cases) {
    const auto theta = make_theta(w.d, c.scale, 3);
    Result ref = run(b64, 0, Sweep::plain, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 2);
    Result refg = run(b64, 0, Sweep::gram, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 2);
    Result p64 = run(b64, 1, Sweep::plain, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 2);
    Result g64 = run(b64, 1, Sweep::gram, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 2);
    Result p32 = run(b32, 1, Sweep::plain, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 2);
    Result g32 = run(b32, 1, Sweep::gram, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 1);
    Result g32b = run(b32, 1, Sweep::gram, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 2);
    Result p32b = run(b32, 1, Sweep::plain, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 1);
    Result l64 = run(b64, 2, Sweep::plain, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 2);
    Result l32 = run(b32, 2, Sweep::plain, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 1);
    Result l32b = run(b32, 2, Sweep::plain, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 2);
    auto e = [&](const Result& a) {
      double m = 0;
      m = std::max(m, rel_err(a.grad, ref.grad));
      m = std::max(m, rel_err(a.hyper, ref.hyper));
      m = std::max(m, std::fabs(a.loss - ref.loss) / std::fabs(ref.loss));
      m = std::max(m, std::fabs(a.gl2 - ref.gl2) / std::max(std::fabs(ref.gl2), 1e-300));
      return m;
    };
    char buf[400];
    std::snprintf(buf, sizeof buf,
                  "%s %s: rel err vs core plain f64: core gram %.1e | new plain f64 %.1e, gram f64 %.1e | f32 plain %.1e, gram %.1e",
                  w.name, c.what, e(refg), e(p64), e(g64), e(p32), e(g32));
    const bool l2_zero = c.lam == 0.0;
    (void)l2_zero;
    check(ref.ok && p64.ok && g64.ok && p32.ok && g32.ok && e(p64) < 1e-12 && e(g64) < 1e-10 && e(p32) < 2e-4 &&
              e(g32) < 2e-4,
          buf);
    std::snprintf(buf, sizeof buf, "%s %s: lock-step groups: f64 %.1e, f32 %.1e", w.name, c.what, e(l64), e(l32));
    check(l64.ok && l32.ok && e(l64) < 1e-10 && e(l32) < 2e-4, buf);
    check(l32.all() == l32b.all(), std::string(w.name) + " " + c.what + ": lock-step bitwise equal at 1 and 2 threads");
    check(g32.all() == g32b.all() && p32.all() == p32b.all(), std::string(w.name) + " " + c.what + ": bitwise equal at 1 and 2 threads");
  }
}

template <class F>
static double best_ms(F&& f, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return best;
}

template <class T>
static void bench(const Work& w, const Batch<T>& b, int threads, int reps) {
  const auto theta = make_theta(w.d, 0.05, 3);
  auto t_core = [&](Sweep s) { return best_ms([&] { run(b, 0, s, theta, 0.02, false, w.K, 0.0, Mode::maml, threads); }, reps); };
  auto t_new = [&](Sweep s) { return best_ms([&] { run(b, 1, s, theta, 0.02, false, w.K, 0.0, Mode::maml, threads); }, reps); };
  const double ca = t_core(Sweep::automatic), na = t_new(Sweep::automatic);
  const double np = t_new(Sweep::plain), ng = t_new(Sweep::gram);
  const double nl = best_ms([&] { run(b, 2, Sweep::plain, theta, 0.02, false, w.K, 0.0, Mode::maml, threads); }, reps);
  std::printf("%-3s %s thr=%d  core(auto) %8.3f ms | new(auto) %8.3f ms  [plain %8.3f, gram %8.3f, lock-step gram %8.3f]  speedup auto %.2fx, best %.2fx\n",
              w.name, sizeof(T) == 4 ? "f32" : "f64", threads, ca, na, np, ng, nl, ca / na, ca / std::min({na, np, ng, nl}));
  std::fflush(stdout);
}

int main(int argc, char** argv) {
  std::vector<Work> works = {{"W1", 32, 20, 30, 784, 5}, {"W2", 256, 100, 100, 784, 10},
                             {"W3", 4096, 10, 10, 64, 5}, {"W4", 32, 20, 30, 784, 50}};
  const bool do_bench = argc > 1 && std::strcmp(argv[1], "bench") == 0;
  if (argc > 3 && std::strcmp(argv[1], "one") == 0) {  // one [W1..W4] [new|core] [f32|f64] threads reps
    const Work& w = works[static_cast<size_t>(argv[2][1] - '1')];
    const int mine = std::strcmp(argv[3], "new") == 0 ? 1 : std::strcmp(argv[3], "lock") == 0 ? 2 : 0;
    const bool f32 = argc <= 4 || std::strcmp(argv[4], "f32") == 0;
    const int thr = argc > 5 ? std::atoi(argv[5]) : 1;
    const int reps = argc > 6 ? std::atoi(argv[6]) : 50;
    Batch<float> b32(w.T, w.n, w.m, w.d, 11);
    Batch<double> b64(b32);
    const auto theta = make_theta(w.d, 0.05, 3);
    const double ms = f32 ? best_ms([&] { run(b32, mine, Sweep::automatic, theta, 0.02, false, w.K, 0.0, Mode::maml, thr); }, reps)
                          : best_ms([&] { run(b64, mine, Sweep::automatic, theta, 0.02, false, w.K, 0.0, Mode::maml, thr); }, reps);
    std::printf("%s %s %s thr=%d best %.3f ms\n", w.name, argv[3], f32 ? "f32" : "f64", thr, ms);
    return 0;
  }
  if (!do_bench) {
    test_vmath();
    test_tiles<float>();
    test_tiles<double>();
    test_lanes<float>();
    test_lanes<double>();
    for (const auto& w : works) test_workload(w);
    // odd shapes: tails in n, m, d
    test_workload({"odd n7 m5 d13 K3", 70, 7, 5, 13, 3});
    test_workload({"odd n1 m1 d1 K1", 5, 1, 1, 1, 1});
    std::printf("%d failed\n", failures);
    return failures == 0 ? 0 : 1;
  }
  const int reps = argc > 2 ? std::atoi(argv[2]) : 30;
  for (const auto& w : works) {
    Batch<float> b32(w.T, w.n, w.m, w.d, 11);
    Batch<double> b64(b32);
    for (int thr : {1, 2}) {
      bench(w, b32, thr, w.T * w.n >= 20000 ? reps / 3 + 1 : reps);
      bench(w, b64, thr, w.T * w.n >= 20000 ? reps / 3 + 1 : reps);
    }
  }
  return 0;
}
