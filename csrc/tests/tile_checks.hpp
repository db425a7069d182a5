// Checks of the binary fast sweeps (fastsweep.hpp, tile.hpp, vmath.hpp)
// against the generic sweeps (sweep.hpp, span.hpp) as the oracle: the
// vectorised link at extreme arguments, the register tiles on shapes with
// tails in n and d, lock-step lane independence, and whole meta-gradients
// (MAML / first-order, scalar / per-step inner_lr, L2, huge logits) on the
// plain, Gram and lock-step paths in float64 and float32, bitwise equal at
// 1 and 2 threads. Included by core_test.cpp (small shapes, so that the
// sanitizer, TSan, clang and aarch64 runs of .ci cover them) and by
// tile_test.cpp (the benchmark workloads, and `bench`).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fastmaml/meta.hpp"

namespace tile_checks {
using namespace fastmaml;


inline int failures = 0;
inline void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}
template <class A, class B>
inline double rel_err(const std::vector<A>& a, const std::vector<B>& b) {
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

// which: 0 = generic sweeps (oracle), 1 = the dispatcher (binary fast paths), 2 / 3 = Gram
// groups with lock-step forced on / off
template <class T>
inline Result run(const Batch<T>& b, int which, Sweep sweep, const std::vector<double>& theta64, double lr0,
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
  Preconditioner<T> none;
  if (which == 0) {
    // The generic sweeps (sweep.hpp, span.hpp) as the oracle.
    Model<T, BinaryLink> model(&b.ts, BinaryLink{});
    if (sweep == Sweep::gram) {
      auto make = [&]() { return GramMetaWorker<T, BinaryLink>(model, theta.data(), alpha.data(), K, lr, lam, mode); };
      st = meta_value_and_grad_with(b.ts, model, lr.size(), mode, threads, 1e9, make, &r.loss, grad.data(),
                                    hyper.data(), &r.gl2, nullptr);
    } else {
      auto make = [&]() {
        return MetaWorker<T, BinaryLink>{model, theta.data(), alpha.data(), none, K, lr, lam, mode, {}};
      };
      st = meta_value_and_grad_with(b.ts, model, lr.size(), mode, threads, 1e9, make, &r.loss, grad.data(),
                                    hyper.data(), &r.gl2, nullptr);
    }
  } else if (which == 2 || which == 3) {
    // The Gram group driver with lock-step groups forced on (2) or off (3)
    // whatever the shape.
    GramGroupWorker<T> proto(b.ts, theta.data(), alpha.data(), K, lr, lam, mode);
    proto.force_lockstep = which == 2 ? 1 : 0;
    const index_t slot_len = meta_slot_len(D, lr.size(), mode);
    std::vector<double> total(static_cast<size_t>(slot_len));
    st = run_groups(
        b.ts.n_tasks, slot_len, threads, [&](index_t t) { return proto.group_end(t); }, [&]() { return proto; },
        total.data(), 1e9, nullptr);
    if (st.ok()) finish_meta(total, b.ts.n_tasks, D, lr.size(), mode, &r.loss, grad.data(), hyper.data(), &r.gl2);
  } else {
    st = meta_value_and_grad<T>(b.ts, BinaryLink{}, theta.data(), alpha.data(), none, K, lr, lam, mode, threads,
                                &r.loss, grad.data(), hyper.data(), &r.gl2, sweep);
  }
  r.ok = st.ok();
  r.grad.assign(grad.begin(), grad.end());
  r.hyper.assign(hyper.begin(), hyper.end());
  return r;
}

inline std::vector<double> make_theta(index_t d, double scale, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g(0.0, scale);
  std::vector<double> th(static_cast<size_t>(d + 1));
  for (auto& x : th) x = g(rng);
  return th;
}

inline void test_vmath() {
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
inline void test_tiles() {
  // Gram / xv / xtr against plain loops on awkward sizes (tails in n and d).
  // n from 12 on: xtr's row blocks (13: a single row after the blocks)
  for (index_t n : {1, 3, 4, 5, 9, 11, 12, 13, 20}) {
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

// G in (tile::gram_mul) against long double on symmetric G: the 32-column
// strips below n = 64, the lower-block-triangle form from 64 on (full strips,
// the last partial columns, n not a multiple of 32).
inline void test_gram_mul() {
  for (index_t n : {1, 5, 31, 32, 33, 63, 64, 65, 95, 96, 100, 129, 131}) {
    std::vector<double> G(static_cast<size_t>(n * n)), in(n), out(n, -7.0);
    for (index_t i = 0; i < n; ++i) {
      in[i] = 0.5 - 0.013 * static_cast<double>((i * 37) % 71);
      for (index_t k = 0; k <= i; ++k)
        G[i * n + k] = G[k * n + i] = 1.0 / (1.0 + static_cast<double>(i + k)) + 0.01 * static_cast<double>((i * k) % 5);
    }
    tile::gram_mul(G.data(), n, in.data(), out.data());
    double e = 0, sc = 1e-300;
    for (index_t i = 0; i < n; ++i) {
      long double acc = 0;
      for (index_t k = 0; k < n; ++k) acc += (long double)G[i * n + k] * in[k];
      e = std::max(e, std::fabs(out[i] - (double)acc));
      sc = std::max(sc, std::fabs((double)acc));
    }
    if (!(e / sc < 1e-14)) {
      check(false, "gram_mul n=" + std::to_string(n));
      return;
    }
  }
  check(true, "gram_mul: strips and the symmetric form agree with long double (n = 1 ... 131)");
}

// A task's lock-step result is the same whatever group or lane it lands in
// (and alone), tails included.
template <class S>
inline void test_lanes() {
  Batch<S> b(21, 7, 5, 19, 9);  // 21 tasks: groups of 8, 8, 5
  const index_t D = 20, K = 3;
  const auto th = make_theta(19, 0.3, 2);
  std::vector<S> theta(th.begin(), th.end()), alpha(static_cast<size_t>(K * D), static_cast<S>(0.3));
  const index_t slot_len = 1 + D + 1 + 1;
  // Every task of the batch through the group driver's own grouping (8, 8, 5
  // lanes here: n = 7 and K n >= d / 2 take the lock-step rule), then each
  // task alone in a group of one.
  GramGroupWorker<S> w(b.ts, theta.data(), alpha.data(), K, LrLayout{}, 0.1, Mode::maml);
  std::vector<double> all(static_cast<size_t>(21 * slot_len)), one(static_cast<size_t>(slot_len));
  std::vector<TaskStatus> st(21);
  for (index_t t0 = 0; t0 < 21;) {
    const index_t e = w.group_end(t0);
    w(t0, e - t0, all.data() + t0 * slot_len, slot_len, st.data() + t0);
    t0 = e;
  }
  bool same = w.group_end(0) == 8 && w.group_end(16) == 21;
  for (index_t t : {0, 5, 7, 8, 13, 20}) {
    w(t, 1, one.data(), slot_len, st.data());
    for (index_t k = 0; k < slot_len; ++k) same = same && one[k] == all[t * slot_len + k];
  }
  for (const auto& s1 : st) same = same && s1.ok();
  check(same, std::string("lock-step ") + (sizeof(S) == 4 ? "f32" : "f64") +
                  ": a task alone is bitwise equal to the same task in any group / lane (tails included)");
}

// The lane-major Gram matrix is the same, bit for bit, whatever the register
// tile (4 x 4 with 32 vector registers, 4 x 2 with 16: lanes_gram; 1 x 1,
// where no tile repeats a row), for every n (tails of both tile sides) and
// feature count (chunk tails), and agrees with a long double reference.
template <class S>
inline void test_lanes_gram() {
  bool same = true;
  double worst = 0.0;
  for (index_t n = 1; n <= 13; ++n)
    for (index_t d : {1, 7, 33, 64, 70}) {
      std::vector<S> P(static_cast<size_t>(n * d * 8));
      for (size_t i = 0; i < P.size(); ++i) P[i] = static_cast<S>(std::sin(0.37 * static_cast<double>(i) + 0.1 * n));
      std::vector<double> G44(static_cast<size_t>(n * n * 8), -1.0), G42(G44), G11(G44);
      tile::lanes_gram_tiles<S, 4, 4>(P.data(), n, d, G44.data());
      tile::lanes_gram_tiles<S, 4, 2>(P.data(), n, d, G42.data());
      tile::lanes_gram_tiles<S, 1, 1>(P.data(), n, d, G11.data());  // no repeated rows at all
      same = same && G44 == G42 && G44 == G11;
      for (index_t i = 0; i < n; ++i)
        for (index_t k = 0; k < n; ++k)
          for (index_t l = 0; l < 8; ++l) {
            long double r = 0.0L, a = 0.0L;
            for (index_t q = 0; q < d; ++q) {
              const long double x = P[(i * d + q) * 8 + l], y = P[(k * d + q) * 8 + l];
              r += x * y;
              a += std::fabs(static_cast<double>(x * y));
            }
            const double e = static_cast<double>(std::fabs(G42[(i * n + k) * 8 + l] - r) / (a > 0 ? a : 1.0L));
            worst = std::max(worst, e);
          }
    }
  const double tol = sizeof(S) == 4 ? 1e-5 : 1e-14;
  char buf[160];
  std::snprintf(buf, sizeof buf,
                "lanes_gram %s: 4 x 4, 4 x 2 and 1 x 1 register tiles bitwise equal, n = 1 ... 13, within %.0e of "
                "long double",
                sizeof(S) == 4 ? "f32" : "f64", tol);
  check(same && worst < tol, buf);
}

// The per-task Gram matrix (and the X v that rides with it) is the same, bit
// for bit, in 4 x 4, 4 x 2 and 5 x 5 register tiles (gram_body picks by the
// register file and n), across row tails and feature-block tails (1024 in
// float32).
template <class S>
inline void test_gram_shapes() {
  bool same = true;
  for (index_t n = 1; n <= 13; ++n)
    for (index_t d : {1, 7, 33, 300, 1100}) {
      std::vector<S> X(static_cast<size_t>(n * d)), v(static_cast<size_t>(d));
      for (size_t i = 0; i < X.size(); ++i) X[i] = static_cast<S>(std::cos(0.61 * static_cast<double>(i) + 0.2 * n));
      for (index_t q = 0; q < d; ++q) v[q] = static_cast<S>(std::sin(0.3 * static_cast<double>(q)));
      std::vector<const S*> rows(static_cast<size_t>(n));
      for (index_t i = 0; i < n; ++i) rows[i] = X.data() + i * d;
      std::vector<double> G4(static_cast<size_t>(n * n), -1.0), G2(G4), G5(G4), z4(static_cast<size_t>(n), -1.0),
          z2(z4), z5(z4);
      tile::gram_tiles<S, 4>(rows.data(), n, d, G4.data(), nullptr, v.data(), z4.data());
      tile::gram_tiles<S, 2>(rows.data(), n, d, G2.data(), nullptr, v.data(), z2.data());
      tile::gram_tiles<S, 5, 5>(rows.data(), n, d, G5.data(), nullptr, v.data(), z5.data());
      same = same && G4 == G2 && z4 == z2 && G5 == G4 && z5 == z4;
    }
  check(same, std::string("gram_body ") + (sizeof(S) == 4 ? "f32" : "f64") +
                  ": 4 x 4, 4 x 2 and 5 x 5 register tiles bitwise equal (G and X v), n = 1 ... 13, d up to 1100");
}

inline void test_workload(const Work& w) {
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
    Result s64 = run(b64, 3, Sweep::plain, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 2);
    Result s32 = run(b32, 3, Sweep::plain, theta, c.lr0, c.per_step, w.K, c.lam, c.mode, 2);
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
    std::snprintf(buf, sizeof buf, "%s %s: Gram tasks one at a time: f64 %.1e, f32 %.1e", w.name, c.what, e(s64), e(s32));
    check(s64.ok && s32.ok && e(s64) < 1e-10 && e(s32) < 2e-4, buf);
    check(l32.all() == l32b.all(), std::string(w.name) + " " + c.what + ": lock-step bitwise equal at 1 and 2 threads");
    check(g32.all() == g32b.all() && p32.all() == p32b.all(), std::string(w.name) + " " + c.what + ": bitwise equal at 1 and 2 threads");
  }
}


// Small shapes (every tail: n, m, d not multiples of the tiles; groups of
// 8 + tails; a 64-task block boundary), or the benchmark workloads too.
inline int run_all(bool full) {
  test_vmath();
  test_tiles<float>();
  test_tiles<double>();
  test_lanes<float>();
  test_lanes<double>();
  test_lanes_gram<float>();
  test_lanes_gram<double>();
  test_gram_shapes<float>();
  test_gram_shapes<double>();
  test_workload({"odd n7 m5 d13 K3", 70, 7, 5, 13, 3});
  test_workload({"odd n1 m1 d1 K1", 5, 1, 1, 1, 1});
  test_workload({"small n10 m10 d64 K5", 67, 10, 10, 64, 5});
  test_workload({"small n21 m9 d37 K2", 9, 21, 9, 37, 2});
  test_gram_mul();
  test_workload({"symmetric G n70 m9 d40 K3", 5, 70, 9, 40, 3});
  if (full) {
    for (const Work& w : {Work{"W1", 32, 20, 30, 784, 5}, Work{"W2", 256, 100, 100, 784, 10},
                          Work{"W3", 4096, 10, 10, 64, 5}, Work{"W4", 32, 20, 30, 784, 50}})
      test_workload(w);
  }
  return failures;
}

}  // namespace tile_checks
