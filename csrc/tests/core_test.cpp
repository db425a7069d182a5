// Stand-alone test of the C++ core (no Python): exercises every path on
// random data and checks it against central finite differences of the
// meta-loss and against each other. Built and run under AddressSanitizer and
// UndefinedBehaviorSanitizer in CI (.ci/run):
//   g++ -std=c++17 -O1 -g -fopenmp -fsanitize=address,undefined -Icsrc csrc/tests/core_test.cpp
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "fastmaml/gram.hpp"
#include "fastmaml/imaml.hpp"
#include "fastmaml/model.hpp"

using namespace fastmaml;

static int failures = 0;

static void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

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
  std::vector<double> res(static_cast<size_t>(T)), cres(static_cast<size_t>(T));
  std::vector<std::int32_t> it(static_cast<size_t>(T)), cit(static_cast<size_t>(T));
  std::vector<std::uint8_t> ok(static_cast<size_t>(T)), cok(static_cast<size_t>(T));
  ImamlReport rep{res.data(), it.data(), ok.data(), cres.data(), cit.data(), cok.data()};
  st = imaml_value_and_grad<double>(ts, link, theta.data(), ImamlSettings{1.0, lam, 1e-10, 50, 1e-10, 200}, rep, 2,
                                    &loss, gr.data());
  bool conv = true;
  for (index_t t = 0; t < T; ++t) conv = conv && ok[t] && cok[t];
  check(st.ok() && conv, std::string(name) + ": iMAML solves converge");
  std::vector<double> path(static_cast<size_t>(T * (K + 1) * P));
  st = adapt<double>(ts, link, theta.data(), false, alpha.data(), none, K, lam, true, 2, path.data());
  check(st.ok(), std::string(name) + ": adapt with path");
  std::vector<double> params(static_cast<size_t>(T * P), 0.1), lo(static_cast<size_t>(T)), out(static_cast<size_t>(T * P));
  st = loss_grad_hvp<double>(ts, link, params.data(), lam, params.data(), 2, lo.data(), out.data());
  check(st.ok(), std::string(name) + ": Hessian-vector products");
  // Divergence is reported, never returned as NaN.
  std::vector<double> huge(static_cast<size_t>(K * P), 1e300);
  st = meta_value_and_grad<double>(ts, link, theta.data(), huge.data(), none, K, lr, 1e6, Mode::maml, 2, &loss,
                                   gr.data(), hy.data(), &gl);
  check(!st.ok(), std::string(name) + ": divergence is reported");
}

int main() {
  run_case(BinaryLink{}, 1, "binary");
  SoftmaxLink soft;
  soft.C = 3;
  run_case(soft, 3, "softmax C=3");
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
