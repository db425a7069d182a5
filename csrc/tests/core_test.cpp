// Stand-alone test of the C++ core (no Python): exercises every path on
// random data and checks it against central finite differences of the
// meta-loss and against each other, checks the choice of sweep, and checks
// the portable fallbacks (128-bit multiply, sampler stream), and runs the
// checks of the binary fast sweeps (tile_checks.hpp). Built and run
// under AddressSanitizer and UndefinedBehaviorSanitizer in CI (.ci/run):
//   g++ -std=c++17 -O1 -g -fopenmp -fsanitize=address,undefined -Icsrc csrc/tests/core_test.cpp
// and by .ci/cross.sh with clang++, with an aarch64 cross-compiler under
// qemu-user, and with -DFASTMAML_PORTABLE_FALLBACKS=1. Its last line,
// "digest <hex>", hashes the bits of every output; two builds of the same
// arithmetic (e.g. with and without the fallbacks) must print the same one.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <cstdint>
#include <cstring>

#include "fastmaml/extended.hpp"
#include "fastmaml/imaml.hpp"
#include "fastmaml/meta.hpp"
#include "fastmaml/sampling.hpp"
#include "fastmaml/train.hpp"
#include "tile_checks.hpp"

using namespace fastmaml;

static int failures = 0;

static void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// FNV-1a over the bits of every output the test produces.
static std::uint64_t digest = 1469598103934665603ull;
static void absorb(const void* p, size_t bytes) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < bytes; ++i) digest = (digest ^ b[i]) * 1099511628211ull;
}
template <class V>
static void absorb(const V& v) {
  absorb(v.data(), v.size() * sizeof(v[0]));
}
static void absorb(double x) { absorb(&x, sizeof x); }

static double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(a[i] - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return den > 0 ? num / den : num;
}

struct Data {
  index_t T, n, m, d, C;
  std::vector<double> Xs, Xq;
  std::vector<index_t> sptr, qptr, sidx, qidx;
  std::vector<std::int32_t> ys, yq;
};

// Ragged index-form tasks sharing one dataset of N rows.
static Data make(index_t T, index_t d, index_t C, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  Data D{T, 0, 0, d, C, {}, {}, {0}, {0}, {}, {}, {}, {}};
  const index_t N = 40;
  D.Xs.resize(static_cast<size_t>(N * d));
  for (auto& x : D.Xs) x = u(rng);
  D.Xq = D.Xs;
  const index_t hi = C == 1 ? 2 : C;
  for (index_t t = 0; t < T; ++t) {
    const index_t n = 2 + static_cast<index_t>(rng() % 5), m = 1 + static_cast<index_t>(rng() % 6);
    for (index_t i = 0; i < n; ++i) {
      D.sidx.push_back(static_cast<index_t>(rng() % N));
      D.ys.push_back(static_cast<std::int32_t>(rng() % hi));
    }
    for (index_t i = 0; i < m; ++i) {
      D.qidx.push_back(static_cast<index_t>(rng() % N));
      D.yq.push_back(static_cast<std::int32_t>(rng() % hi));
    }
    D.sptr.push_back(D.sptr.back() + n);
    D.qptr.push_back(D.qptr.back() + m);
  }
  return D;
}

static TaskSet<double> view(const Data& D) {
  TaskSet<double> ts;
  ts.n_tasks = D.T;
  ts.d = D.d;
  ts.support = {D.Xs.data(), D.sidx.data(), D.sptr.data(), D.ys.data()};
  ts.query = {D.Xq.data(), D.qidx.data(), D.qptr.data(), D.yq.data()};
  return ts;
}

template <class Link>
static void run_case(Link link, index_t C, const char* name) {
  const index_t d = 5, K = 3, T = 70;  // more than one reduction block
  Data D = make(T, d, C, 7 + static_cast<unsigned>(C));
  auto ts = view(D);
  const index_t P = (d + 1) * C;
  std::mt19937_64 rng(3);
  std::normal_distribution<double> g(0.0, 0.3);
  std::vector<double> theta(static_cast<size_t>(P));
  for (auto& x : theta) x = g(rng);
  std::vector<double> alpha(static_cast<size_t>(K * P), 0.4);
  for (index_t j = 0; j < K; ++j)
    for (index_t p = 0; p < P; ++p) alpha[j * P + p] = 0.3 + 0.05 * j;  // per step
  const double lam = 0.2;
  Preconditioner<double> none;
  LrLayout lr{K, 1, 1};
  auto run = [&](const std::vector<double>& th, const std::vector<double>& al, double l, Sweep sweep, int threads,
                 std::vector<double>* grad, std::vector<double>* hyper, double* gl2) {
    double loss = 0.0, gl = 0.0;
    std::vector<double> gr(static_cast<size_t>(P)), hy(static_cast<size_t>(K));
    TaskStatus st = meta_value_and_grad<double>(ts, link, th.data(), al.data(), none, K, lr, l, Mode::maml, threads,
                                                &loss, gr.data(), hy.data(), &gl, sweep);
    if (!st.ok()) std::printf("status %d task %lld\n", static_cast<int>(st.code), static_cast<long long>(st.task));
    if (grad) *grad = gr;
    if (hyper) *hyper = hy;
    if (gl2) *gl2 = gl;
    return loss;
  };
  std::vector<double> gp, gg, hp, hg;
  double gl2_plain = 0, gl2_gram = 0;
  run(theta, alpha, lam, Sweep::plain, 1, &gp, &hp, &gl2_plain);
  run(theta, alpha, lam, Sweep::gram, 2, &gg, &hg, &gl2_gram);
  absorb(gp), absorb(hp), absorb(gl2_plain), absorb(gg), absorb(hg), absorb(gl2_gram);
  check(rel_err(gg, gp) < 1e-10 && rel_err(hg, hp) < 1e-10 && std::fabs(gl2_gram - gl2_plain) < 1e-10 * std::fabs(gl2_plain),
        std::string(name) + ": gram sweep equals plain sweep");
  // Finite differences of the meta-loss.
  const double h = 1e-5;
  std::vector<double> fd(static_cast<size_t>(P));
  for (index_t p = 0; p < P; ++p) {
    auto tp = theta, tm = theta;
    tp[p] += h;
    tm[p] -= h;
    fd[p] = (run(tp, alpha, lam, Sweep::plain, 2, nullptr, nullptr, nullptr) -
             run(tm, alpha, lam, Sweep::plain, 2, nullptr, nullptr, nullptr)) / (2 * h);
  }
  check(rel_err(gp, fd) < 1e-7, std::string(name) + ": d/dtheta matches finite differences");
  std::vector<double> fda(static_cast<size_t>(K));
  for (index_t j = 0; j < K; ++j) {
    auto ap = alpha, am = alpha;
    for (index_t p = 0; p < P; ++p) {
      ap[j * P + p] += h;
      am[j * P + p] -= h;
    }
    fda[j] = (run(theta, ap, lam, Sweep::plain, 1, nullptr, nullptr, nullptr) -
              run(theta, am, lam, Sweep::plain, 1, nullptr, nullptr, nullptr)) / (2 * h);
  }
  check(rel_err(hp, fda) < 1e-7, std::string(name) + ": d/dinner_lr matches finite differences");
  const double fdl = (run(theta, alpha, lam + h, Sweep::plain, 1, nullptr, nullptr, nullptr) -
                      run(theta, alpha, lam - h, Sweep::plain, 1, nullptr, nullptr, nullptr)) / (2 * h);
  check(std::fabs(gl2_plain - fdl) < 1e-7 * std::max(1.0, std::fabs(fdl)), std::string(name) + ": d/dl2 matches");
  // Thread independence, bitwise.
  std::vector<double> g1, g2;
  run(theta, alpha, lam, Sweep::plain, 1, &g1, nullptr, nullptr);
  run(theta, alpha, lam, Sweep::plain, 2, &g2, nullptr, nullptr);
  check(g1 == g2, std::string(name) + ": bitwise equal for 1 and 2 threads");
  // Preconditioner and iMAML run clean and finite; adapt and primitives too.
  std::vector<double> s(static_cast<size_t>(d + 1), std::log(0.3)), U(static_cast<size_t>((d + 1) * 2), 0.05);
  Preconditioner<double> pre{s.data(), U.data(), 2};
  std::vector<double> gr(static_cast<size_t>(P)), hy(static_cast<size_t>((d + 1) * 3));
  double loss = 0, gl = 0;
  TaskStatus st = meta_value_and_grad<double>(ts, link, theta.data(), nullptr, pre, K, LrLayout{}, lam, Mode::maml, 2,
                                              &loss, gr.data(), hy.data(), &gl);
  check(st.ok() && std::isfinite(loss), std::string(name) + ": preconditioned sweep runs");
  absorb(gr), absorb(hy), absorb(loss), absorb(gl);
  std::vector<double> res(static_cast<size_t>(T)), cres(static_cast<size_t>(T));
  std::vector<std::int32_t> it(static_cast<size_t>(T)), cit(static_cast<size_t>(T));
  std::vector<std::uint8_t> ok(static_cast<size_t>(T)), cok(static_cast<size_t>(T));
  ImamlReport rep{res.data(), it.data(), ok.data(), cres.data(), cit.data(), cok.data()};
  st = imaml_value_and_grad<double>(ts, link, theta.data(), ImamlSettings{1.0, lam, 1e-10, 50, 1e-10, 200}, rep, 2,
                                    &loss, gr.data());
  bool conv = true;
  for (index_t t = 0; t < T; ++t) conv = conv && ok[t] && cok[t];
  check(st.ok() && conv, std::string(name) + ": iMAML solves converge");
  absorb(gr), absorb(loss), absorb(res), absorb(cres);
  std::vector<double> path(static_cast<size_t>(T * (K + 1) * P));
  st = adapt<double>(ts, link, theta.data(), false, alpha.data(), none, K, lam, true, 2, path.data());
  check(st.ok(), std::string(name) + ": adapt with path");
  absorb(path);
  std::vector<double> params(static_cast<size_t>(T * P), 0.1), lo(static_cast<size_t>(T)), out(static_cast<size_t>(T * P));
  st = loss_grad_hvp<double>(ts, link, params.data(), lam, params.data(), 2, lo.data(), out.data());
  check(st.ok(), std::string(name) + ": Hessian-vector products");
  absorb(lo), absorb(out);
  // Divergence is reported, never returned as NaN.
  std::vector<double> huge(static_cast<size_t>(K * P), 1e300);
  st = meta_value_and_grad<double>(ts, link, theta.data(), huge.data(), none, K, lr, 1e6, Mode::maml, 2, &loss,
                                   gr.data(), hy.data(), &gl);
  check(!st.ok(), std::string(name) + ": divergence is reported");
}

// Per-task step sizes and L2 strengths with feature gradients (extended.hpp):
// against central finite differences of the meta-loss, against the shared
// call when every task has the same values, and bitwise across threads.
template <class Link>
static void extended_case(Link link, index_t C, const char* name) {
  // Enough tasks that the driver's work estimate hands two threads the batch.
  const index_t d = 4, K = 3, T = 640;
  Data D = make(T, d, C, 21 + static_cast<unsigned>(C));
  auto ts = view(D);
  const index_t P = (d + 1) * C;
  std::mt19937_64 rng(5);
  std::normal_distribution<double> g(0.0, 0.3);
  std::uniform_real_distribution<double> u(0.2, 0.5);
  std::vector<double> theta(static_cast<size_t>(P));
  for (auto& x : theta) x = g(rng);
  const LrLayout lr{K, 1, 1};  // per task and step
  std::vector<double> alpha(static_cast<size_t>(T * K * P)), lam(static_cast<size_t>(T));
  for (index_t t = 0; t < T; ++t) {
    for (index_t j = 0; j < K; ++j) {
      const double a = u(rng);
      for (index_t p = 0; p < P; ++p) alpha[(t * K + j) * P + p] = a;
    }
    lam[t] = u(rng) * 0.5;
  }
  const index_t S = D.sptr.back(), Q = D.qptr.back();
  struct Out {
    double loss = 0, gl2 = 0;
    std::vector<double> grad, galpha, glam, gsx, gqx;
  };
  auto run = [&](const Data& data, const std::vector<double>& al, const std::vector<double>& lm, int threads,
                 Mode mode) {
    auto tsv = view(data);
    Out o;
    o.grad.resize(static_cast<size_t>(P));
    o.galpha.resize(static_cast<size_t>(T * K));
    o.glam.resize(static_cast<size_t>(T));
    o.gsx.resize(static_cast<size_t>(S * d));
    o.gqx.resize(static_cast<size_t>(Q * d));
    TaskExtras<double> ext;
    ext.alpha_stride = K * P;
    ext.lam = lm.data();
    ext.grad_alpha = o.galpha.data();
    ext.grad_lam = o.glam.data();
    ext.grad_support_X = o.gsx.data();
    ext.grad_query_X = o.gqx.data();
    TaskStatus st = meta_value_and_grad_extended<double>(tsv, link, theta.data(), al.data(), K, lr, 0.0, mode, ext,
                                                         threads, &o.loss, o.grad.data(), nullptr, &o.gl2);
    if (!st.ok()) std::printf("status %d task %lld\n", static_cast<int>(st.code), static_cast<long long>(st.task));
    return o;
  };
  const Out base = run(D, alpha, lam, 2, Mode::maml);
  absorb(base.grad), absorb(base.galpha), absorb(base.glam), absorb(base.gsx), absorb(base.gqx), absorb(base.loss);
  const double h = 1e-5;
  auto central = [&](auto&& perturb) {
    Data dp = D, dm = D;
    auto ap = alpha, am = alpha;
    auto lp = lam, lm = lam;
    perturb(dp, ap, lp, h);
    perturb(dm, am, lm, -h);
    return (run(dp, ap, lp, 1, Mode::maml).loss - run(dm, am, lm, 1, Mode::maml).loss) / (2 * h);
  };
  std::vector<double> got, fd;
  for (index_t t : {index_t(0), index_t(33), T - 1}) {
    for (index_t j = 0; j < K; ++j) {
      got.push_back(base.galpha[t * K + j]);
      fd.push_back(central([&](Data&, std::vector<double>& a, std::vector<double>&, double e) {
        for (index_t p = 0; p < P; ++p) a[(t * K + j) * P + p] += e;
      }));
    }
    got.push_back(base.glam[t]);
    fd.push_back(central([&](Data&, std::vector<double>&, std::vector<double>& l, double e) { l[t] += e; }));
  }
  check(rel_err(got, fd) < 1e-7, std::string(name) + ": per-task d/dinner_lr and d/dl2 match finite differences");
  // A dataset row's gradient is the sum over its occurrences (support and
  // query read separate copies of the dataset here).
  got.clear(), fd.clear();
  for (index_t row : {index_t(0), index_t(17), index_t(39)}) {
    for (index_t k = 0; k < d; ++k) {
      double s = 0.0, q = 0.0;
      for (index_t p = 0; p < S; ++p) s += D.sidx[p] == row ? base.gsx[p * d + k] : 0.0;
      for (index_t p = 0; p < Q; ++p) q += D.qidx[p] == row ? base.gqx[p * d + k] : 0.0;
      got.push_back(s), got.push_back(q);
      fd.push_back(central([&](Data& x, std::vector<double>&, std::vector<double>&, double e) {
        x.Xs[row * d + k] += e;
      }));
      fd.push_back(central([&](Data& x, std::vector<double>&, std::vector<double>&, double e) {
        x.Xq[row * d + k] += e;
      }));
    }
  }
  check(rel_err(got, fd) < 1e-7, std::string(name) + ": feature gradients match finite differences");
  const Out one = run(D, alpha, lam, 1, Mode::maml);
  check(one.loss == base.loss && one.grad == base.grad && one.galpha == base.galpha && one.glam == base.glam &&
            one.gsx == base.gsx && one.gqx == base.gqx,
        std::string(name) + ": per-task outputs bitwise equal for 1 and 2 threads");
  const Out fo = run(D, alpha, lam, 2, Mode::first_order);
  check(std::isfinite(fo.loss) && fo.loss == base.loss && rel_err(fo.gsx, base.gsx) > 1e-6,
        std::string(name) + ": first-order feature gradients run and differ from MAML's");
  absorb(fo.grad), absorb(fo.gsx), absorb(fo.galpha);
  // Every task with the same values: the shared call's numbers (bit for bit where the shared call runs
  // the same plain sweep, softmax; to rounding for binary, whose shared call takes the fast sweeps).
  std::vector<double> same(alpha.size()), same_lam(static_cast<size_t>(T), 0.1);
  for (index_t t = 0; t < T; ++t)
    for (index_t k = 0; k < K * P; ++k) same[t * K * P + k] = alpha[k];
  const Out per_task = run(D, same, same_lam, 2, Mode::maml);
  std::vector<double> gr(static_cast<size_t>(P)), hy(static_cast<size_t>(K));
  double loss = 0, gl = 0;
  Preconditioner<double> none;
  meta_value_and_grad<double>(ts, link, theta.data(), alpha.data(), none, K, lr, 0.1, Mode::maml, 2, &loss, gr.data(),
                              hy.data(), &gl, Sweep::plain);
  const bool same_bits = per_task.loss == loss && per_task.grad == gr;
  const bool close = std::fabs(per_task.loss - loss) <= 1e-12 * std::fabs(loss) && rel_err(per_task.grad, gr) < 1e-12;
  check(C == 1 ? close : same_bits, std::string(name) + ": equal per-task values equal the shared call");
}

// The binary extras on the fast plain sweep (fastsweep.hpp, FastPlainWorker
// with TaskExtras) against the generic plain sweep (sweep.hpp + features.hpp)
// forced on the same call: ragged index-form tasks of 2..6 support and 1..6
// query rows, d = 13 (every tail of the 4-row and 4/8-feature tiles), per-task
// step sizes and L2 strengths, feature gradients, MAML and first order;
// bitwise across threads; and the choice itself.
static void extended_fast_case() {
  const index_t d = 13, K = 3, T = 150;
  Data D = make(T, d, 1, 77);
  auto ts = view(D);
  const index_t P = d + 1;
  std::mt19937_64 rng(9);
  std::normal_distribution<double> g(0.0, 0.3);
  std::uniform_real_distribution<double> u(0.2, 0.6);
  std::vector<double> theta(static_cast<size_t>(P));
  for (auto& x : theta) x = g(rng);
  const LrLayout lr{K, 1, 1};
  std::vector<double> alpha(static_cast<size_t>(T * K * P)), lam(static_cast<size_t>(T));
  for (index_t t = 0; t < T; ++t) {
    for (index_t j = 0; j < K; ++j) {
      const double a = u(rng);
      for (index_t p = 0; p < P; ++p) alpha[(t * K + j) * P + p] = a;
    }
    lam[t] = u(rng) * 0.3;
  }
  const index_t S = D.sptr.back(), Q = D.qptr.back();
  struct Out {
    TaskStatus st;
    double loss = 0, gl2 = 0;
    std::vector<double> grad, galpha, glam, gsx, gqx;
  };
  auto run = [&](const std::vector<double>& al, int threads, Mode mode, bool generic) {
    Out o;
    o.grad.resize(static_cast<size_t>(P));
    o.galpha.resize(static_cast<size_t>(T * K));
    o.glam.resize(static_cast<size_t>(T));
    o.gsx.resize(static_cast<size_t>(S * d));
    o.gqx.resize(static_cast<size_t>(Q * d));
    TaskExtras<double> ext;
    ext.alpha_stride = K * P;
    ext.lam = lam.data();
    ext.grad_alpha = o.galpha.data();
    ext.grad_lam = o.glam.data();
    ext.grad_support_X = o.gsx.data();
    ext.grad_query_X = o.gqx.data();
    o.st = meta_value_and_grad_extended<double>(ts, BinaryLink{}, theta.data(), al.data(), K, lr, 0.0, mode, ext,
                                                threads, &o.loss, o.grad.data(), nullptr, &o.gl2, generic);
    return o;
  };
  for (Mode mode : {Mode::maml, Mode::first_order}) {
    const std::string what = mode == Mode::maml ? "extended fast (MAML)" : "extended fast (first order)";
    const Out fast = run(alpha, 2, mode, false), slow = run(alpha, 2, mode, true);
    double worst = std::fabs(fast.loss - slow.loss) / std::fabs(slow.loss);
    for (auto pr : {std::make_pair(&fast.grad, &slow.grad), std::make_pair(&fast.galpha, &slow.galpha),
                    std::make_pair(&fast.glam, &slow.glam), std::make_pair(&fast.gsx, &slow.gsx),
                    std::make_pair(&fast.gqx, &slow.gqx)})
      worst = std::max(worst, rel_err(*pr.first, *pr.second));
    check(fast.st.ok() && slow.st.ok() && worst < 1e-12,
          what + ": equals the generic plain sweep (ragged index form, tails)");
    const Out one = run(alpha, 1, mode, false);
    check(one.loss == fast.loss && one.grad == fast.grad && one.galpha == fast.galpha && one.glam == fast.glam &&
              one.gsx == fast.gsx && one.gqx == fast.gqx,
          what + ": bitwise equal for 1 and 2 threads");
  }
  // A huge step in one task: that task's divergence, on the fast sweep.
  std::vector<double> huge = alpha;
  for (index_t k = 0; k < K * P; ++k) huge[37 * K * P + k] = 1e300;
  const Out bad = run(huge, 2, Mode::maml, false);
  check(bad.st.code == ErrorCode::diverged && bad.st.task == 37, "extended fast: divergence names its task");
  CallShape shape;
  shape.C = 1, shape.K = K, shape.lr = lr;
  const bool binary_fast = extended_runs_fast(shape);
  shape.lr = LrLayout{K, P, 1};
  const bool per_param = extended_runs_fast(shape);
  shape.lr = lr, shape.C = 3;
  const bool softmax = extended_runs_fast(shape);
  check(binary_fast && !per_param && !softmax, "extended fast: only binary one-step-size calls take it");
}

// Feature gradients on the Gram path (FastGramWorker with ext): shared step
// sizes (per step) and L2, ragged index-form tasks of 2..6 support and 1..6
// query rows, d = 13 (the 4-row and 4/8-feature tiles' tails), MAML and first
// order, against the fast plain sweep forced on the same call; bitwise across
// threads; a divergence named; and the feature-aware choice.
static void gram_features_case() {
  const index_t d = 13, K = 3, T = 150;
  Data D = make(T, d, 1, 78);
  auto ts = view(D);
  const index_t P = d + 1;
  std::mt19937_64 rng(10);
  std::normal_distribution<double> g(0.0, 0.3);
  std::vector<double> theta(static_cast<size_t>(P));
  for (auto& x : theta) x = g(rng);
  const LrLayout lr{K, 1, 1};
  std::vector<double> alpha(static_cast<size_t>(K * P));
  for (index_t j = 0; j < K; ++j)
    for (index_t p = 0; p < P; ++p) alpha[j * P + p] = 0.2 + 0.1 * static_cast<double>(j);
  const index_t S = D.sptr.back(), Q = D.qptr.back();
  struct Out {
    TaskStatus st;
    double loss = 0, gl2 = 0;
    std::vector<double> grad, hyper, gsx, gqx;
  };
  auto run = [&](const std::vector<double>& al, int threads, Mode mode, Sweep sweep) {
    Out o;
    o.grad.resize(static_cast<size_t>(P));
    o.hyper.resize(static_cast<size_t>(K));
    o.gsx.resize(static_cast<size_t>(S * d));
    o.gqx.resize(static_cast<size_t>(Q * d));
    TaskExtras<double> ext;
    ext.grad_support_X = o.gsx.data();
    ext.grad_query_X = o.gqx.data();
    o.st = meta_value_and_grad_extended<double>(ts, BinaryLink{}, theta.data(), al.data(), K, lr, 0.1, mode, ext,
                                                threads, &o.loss, o.grad.data(), o.hyper.data(), &o.gl2, false,
                                                sweep);
    return o;
  };
  for (Mode mode : {Mode::maml, Mode::first_order}) {
    const std::string what = mode == Mode::maml ? "gram features (MAML)" : "gram features (first order)";
    const Out gram = run(alpha, 2, mode, Sweep::gram), plain = run(alpha, 2, mode, Sweep::plain);
    double worst = std::fabs(gram.loss - plain.loss) / std::fabs(plain.loss);
    worst = std::max(worst, std::fabs(gram.gl2 - plain.gl2) / std::fabs(plain.gl2));
    for (auto pr : {std::make_pair(&gram.grad, &plain.grad), std::make_pair(&gram.hyper, &plain.hyper),
                    std::make_pair(&gram.gsx, &plain.gsx), std::make_pair(&gram.gqx, &plain.gqx)})
      worst = std::max(worst, rel_err(*pr.first, *pr.second));
    check(gram.st.ok() && plain.st.ok() && worst < 1e-12 && gram.gsx != plain.gsx,
          what + ": equals the plain sweep to rounding (ragged index form, tails)");
    const Out one = run(alpha, 1, mode, Sweep::gram);
    check(one.loss == gram.loss && one.grad == gram.grad && one.gsx == gram.gsx && one.gqx == gram.gqx,
          what + ": bitwise equal for 1 and 2 threads");
  }
  std::vector<double> huge(alpha.size(), 1e300);
  const Out bad = run(huge, 2, Mode::maml, Sweep::gram);
  check(bad.st.code == ErrorCode::diverged, "gram features: divergence is reported");
  CallShape shape;
  shape.d = 256, shape.C = 1, shape.K = 5, shape.lr = LrLayout{1, 1, 1};
  shape.support_rows_per_task = 10;
  shape.features = true;
  const bool head = choose_sweep(shape, Sweep::automatic) == Sweep::gram;
  shape.support_rows_per_task = 60, shape.d = 64, shape.K = 2;
  const bool wide = choose_sweep(shape, Sweep::automatic) == Sweep::plain;
  shape.support_rows_per_task = 10, shape.d = 256, shape.K = 5, shape.C = 3;
  const bool softmax = choose_sweep(shape, Sweep::gram) == Sweep::plain;
  check(head && wide && softmax, "gram features: the feature-aware choice (head shape gram, n >> K plain, "
                                 "softmax never)");
}

// The choice of sweep: the cost model, and gram only where it applies.
static void sweep_choice() {
  CallShape s;
  s.support_rows_per_task = 20.0;
  s.d = 784;
  s.K = 5;
  s.lr = LrLayout{5, 1, 1};
  check(choose_sweep(s, Sweep::automatic) == Sweep::gram, "choose_sweep: gram for few rows, many features");
  s.lr = LrLayout{1, 785, 1};  // per parameter (Meta-SGD): the span sweep does not apply
  check(!gram_applies(s) && choose_sweep(s, Sweep::automatic) == Sweep::plain &&
            choose_sweep(s, Sweep::gram) == Sweep::plain,
        "choose_sweep: never gram for a per-parameter inner_lr");
  s.lr = LrLayout{};
  s.mode = Mode::reptile;
  check(choose_sweep(s, Sweep::gram) == Sweep::plain, "choose_sweep: never gram for Reptile");
  s.mode = Mode::maml;
  s.support_rows_per_task = 200.0;
  s.d = 20;
  s.K = 1;
  check(choose_sweep(s, Sweep::automatic) == Sweep::plain && choose_sweep(s, Sweep::gram) == Sweep::gram,
        "choose_sweep: plain when cheaper, gram when asked and it applies");
}

// A deterministic stand-in for NumPy's bitgen_t (SplitMix64).
static std::uint64_t splitmix_next(void* st) {
  std::uint64_t& x = *static_cast<std::uint64_t*>(st);
  std::uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The 128-bit multiply fallback equals the native one, and the sampler's
// stream is what it is in every build (the digest covers it).
static void portable_sampling() {
  std::uint64_t state = 12345;
  bool same = true, exact = true;
  const std::uint64_t edges[] = {0, 1, 2, 0xffffffffull, 0x100000000ull, 0xffffffffffffffffull, 0x8000000000000000ull};
  auto verify = [&](std::uint64_t x, std::uint64_t n) {
    std::uint64_t lo_a = 0, lo_b = 0;
    const std::uint64_t hi_a = mul_hi_lo_portable(x, n, &lo_a);
    const std::uint64_t hi_b = mul_hi_lo(x, n, &lo_b);
    same = same && hi_a == hi_b && lo_a == lo_b;
    // Independent check without 128-bit types: low word is the wrapped product,
    // and (hi, lo) / n gives x back when n > 0.
    exact = exact && lo_a == x * n;
  };
  for (std::uint64_t a : edges)
    for (std::uint64_t b : edges) verify(a, b);
  for (int i = 0; i < 200000; ++i) {
    const std::uint64_t x = splitmix_next(&state), n = splitmix_next(&state) >> (i % 64);
    verify(x, n);
  }
  check(same && exact, std::string("mul_hi_lo: portable fallback equals the ") +
                           (FASTMAML_HAVE_INT128 ? "native 128-bit multiply" : "fallback (no native type here)"));
  std::uint64_t gstate = 42;
  BitGen g{&gstate, &splitmix_next, nullptr, nullptr, nullptr};
  std::vector<index_t> counts = {10, 3, 1000000, 7, 1ll << 40};
  const index_t m = 3;
  std::vector<index_t> out(counts.size() * m);
  sample_without_replacement(&g, counts.data(), static_cast<index_t>(counts.size()), m, out.data());
  bool distinct = true;
  for (size_t r = 0; r < counts.size(); ++r)
    for (index_t a = 0; a < m; ++a) {
      distinct = distinct && out[r * m + a] >= 0 && out[r * m + a] < counts[r];
      for (index_t b = 0; b < a; ++b) distinct = distinct && out[r * m + a] != out[r * m + b];
    }
  check(distinct, "sampler: distinct in-range draws");
  absorb(out);
  std::printf("sampler stream:");
  for (index_t v : out) std::printf(" %lld", static_cast<long long>(v));
  std::printf("\n");
}

// The training loop (train.hpp): Adam against its formulas, a block of the
// loop against the same steps taken one by one, a stop between iterations,
// and episode draws that are distinct rows of the drawn classes.
static void training_loop() {
  OptimizerConfig adam;
  adam.lr = 0.1;
  double value[2] = {1.0, -2.0}, grad[2] = {0.5, -0.25}, m[2] = {0, 0}, v[2] = {0, 0};
  ParamBlock block{value, grad, m, v, 2};
  index_t t = 0;
  optimizer_step(adam, t, &block, 1);
  // first bias-corrected Adam step: lr * sign(g) (up to eps)
  check(t == 1 && std::fabs(value[0] - 0.9) < 1e-7 && std::fabs(value[1] + 1.9) < 1e-7, "adam: first step");
  OptimizerConfig cos;
  cos.adam = false;
  cos.cosine = true;
  cos.total_steps = 4;
  cos.lr = 2.0;
  check(std::fabs(scheduled_lr(cos, 2) - 1.0) < 1e-15 && scheduled_lr(cos, 9) == 0.0, "cosine schedule");

  // dense batch: 3 tasks, 6 support and 5 query rows, d = 4
  const index_t T = 3, n = 6, q = 5, d = 4, D = d + 1, K = 2;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  std::vector<double> Xs(T * n * d), Xq(T * q * d);
  for (auto& x : Xs) x = normal(rng);
  for (auto& x : Xq) x = normal(rng);
  std::vector<std::int32_t> ys(T * n), yq(T * q);
  for (index_t i = 0; i < T * n; ++i) ys[i] = static_cast<std::int32_t>(i % 2);
  for (index_t i = 0; i < T * q; ++i) yq[i] = static_cast<std::int32_t>((i / 2) % 2);
  std::vector<index_t> ps(T + 1), pq(T + 1);
  for (index_t i = 0; i <= T; ++i) ps[i] = i * n, pq[i] = i * q;
  FixedBatch<double> src;
  src.tasks.n_tasks = T;
  src.tasks.d = d;
  src.tasks.support = SideView<double>{Xs.data(), nullptr, ps.data(), ys.data()};
  src.tasks.query = SideView<double>{Xq.data(), nullptr, pq.data(), yq.data()};
  auto params_for = [&](std::vector<double>& th, std::vector<double>& lr, std::vector<double>& mo) {
    TrainParams p;
    p.D = D;
    p.K = K;
    p.step = StepKind::learned;
    p.lr_extent[0] = K;  // per step
    p.theta = th.data();
    p.theta_m = mo.data();
    p.theta_v = mo.data() + D;
    p.log_lr = lr.data();
    p.log_lr_m = mo.data() + 2 * D;
    p.log_lr_v = mo.data() + 2 * D + K;
    return p;
  };
  std::vector<double> th_a(D, 0.0), lr_a(K, std::log(0.3)), mo_a(2 * D + 2 * K, 0.0);
  std::vector<double> th_b = th_a, lr_b = lr_a, mo_b = mo_a;
  MetaStep<double> step_a(params_for(th_a, lr_a, mo_a), adam), step_b(params_for(th_b, lr_b, mo_b), adam);
  std::vector<double> records(4 * kRecordFields);
  index_t ta = 0, tb = 0;
  LoopResult res = train_loop<double>(step_a, src, nullptr, T, BinaryLink{}, 2, 4, ta, nullptr, records.data());
  StepRecord rec;
  for (int i = 0; i < 4; ++i) step_b.run(src.tasks, BinaryLink{}, 1, tb, &rec);
  check(res.done == 4 && ta == 4 && tb == 4 && th_a == th_b && lr_a == lr_b && mo_a == mo_b &&
            records[3 * kRecordFields] == rec.loss,
        "train_loop: a block equals its steps one by one (and is thread-independent)");
  index_t calls = 0;
  std::function<bool()> stop = [&calls]() { return ++calls == 2; };
  index_t tc = 0;
  std::vector<double> th_c(D, 0.0), lr_c(K, std::log(0.3)), mo_c(2 * D + 2 * K, 0.0);
  MetaStep<double> step_c(params_for(th_c, lr_c, mo_c), adam);
  res = train_loop<double>(step_c, src, nullptr, T, BinaryLink{}, 1, 10, tc, stop, records.data());
  check(res.done == 2 && tc == 2, "train_loop: a stop ends the block between iterations");

  // episodes: 4 classes of 10 rows (class c: rows 10c .. 10c + 9)
  std::vector<double> X(40 * d, 0.0);
  std::vector<index_t> flat(40), start = {0, 10, 20, 30}, counts = {10, 10, 10, 10};
  for (index_t i = 0; i < 40; ++i) flat[i] = i;
  EpisodeDraw<double> ep;
  ep.X = X.data();
  ep.d = d;
  ep.flat = flat.data();
  ep.start = start.data();
  ep.counts = counts.data();
  ep.n_classes = 4;
  ep.n_way = 3;
  ep.k_shot = 2;
  ep.n_query = 3;
  std::uint64_t gstate = 9;
  BitGen g{&gstate, &splitmix_next, nullptr, nullptr, nullptr};
  TaskSet<double> batch;
  ep.draw(&g, 5, batch);
  bool ok = batch.n_tasks == 5 && batch.support.ptr[5] == 30 && batch.query.ptr[5] == 45;
  for (index_t t = 0; t < 5 && ok; ++t) {
    std::vector<index_t> rows;
    for (index_t p = batch.support.ptr[t]; p < batch.support.ptr[t + 1]; ++p) {
      ok = ok && batch.support.idx[p] / 10 == ep.ci[t * 3 + batch.support.y[p]];
      rows.push_back(batch.support.idx[p]);
    }
    for (index_t p = batch.query.ptr[t]; p < batch.query.ptr[t + 1]; ++p) {
      ok = ok && batch.query.idx[p] / 10 == ep.ci[t * 3 + batch.query.y[p]];
      rows.push_back(batch.query.idx[p]);
    }
    std::sort(rows.begin(), rows.end());
    ok = ok && std::adjacent_find(rows.begin(), rows.end()) == rows.end();
  }
  check(ok, "episode draws: distinct rows of each label's class");
}

int main() {
  run_case(BinaryLink{}, 1, "binary");
  SoftmaxLink soft;
  soft.C = 3;
  run_case(soft, 3, "softmax C=3");
  extended_case(BinaryLink{}, 1, "extended binary");
  extended_case(soft, 3, "extended softmax C=3");
  extended_fast_case();
  gram_features_case();
  sweep_choice();
  portable_sampling();
  training_loop();
  // The binary fast sweeps and their kernels on small shapes with every tail
  // (their results are not in the digest: the dispatched clones differ from
  // the baseline in rounding, and the Python snapshot covers the fallbacks).
  failures += tile_checks::run_all(false);
  std::printf("build: multiversioned=%d portable_fallbacks=%d int128=%d\n", FASTMAML_MULTIVERSIONED,
              FASTMAML_PORTABLE_FALLBACKS, FASTMAML_HAVE_INT128);
  std::printf("%d failed\n", failures);
  std::printf("digest %016llx\n", static_cast<unsigned long long>(digest));
  return failures == 0 ? 0 : 1;
}
