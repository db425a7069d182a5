// The C++ core's meta-gradient timed without Python: the figures of
// docs/design.md "The fast kernels" that say "C++" come from this program.
// Binary link, MAML, float32, scalar inner_lr 0.1, uniform [0, 1) features,
// dense (T, n, d) tasks; prints the median time per call and per task.
//
//   F="-O3 -fno-math-errno --param=vect-max-version-for-alias-checks=0"
//   F="$F --param=vect-max-version-for-alignment-checks=0 --param=vect-max-peeling-for-alignment=0"
//   g++ -std=c++17 -fopenmp $F -Icsrc benchmarks/core_microbench.cpp -o /tmp/core_microbench
//   (the flags of the module's own build, CMakeLists.txt)
//   /tmp/core_microbench T n m d K threads [calls] [sweep: 0 auto, 1 plain, 2 gram]
//   /tmp/core_microbench 4096 10 10 64 5 2       # W3, 2 threads
//   /tmp/core_microbench 4 20 30 784 5 1 20000   # W1's shape, data hot in L2
//
// Check the load first (uptime) and compare builds in interleaved rounds:
// this machine's speed drifts by several percent within minutes.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "fastmaml/meta.hpp"

using fastmaml::index_t;

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s T n m d K threads [calls] [sweep: 0 auto, 1 plain, 2 gram]\n", argv[0]);
    return 2;
  }
  const index_t T = std::atol(argv[1]), n = std::atol(argv[2]), m = std::atol(argv[3]), d = std::atol(argv[4]),
                K = std::atol(argv[5]);
  const int threads = std::atoi(argv[6]);
  const int calls = argc > 7 ? std::atoi(argv[7]) : 2000;
  const int sweep = argc > 8 ? std::atoi(argv[8]) : 0;
  if (T < 1 || n < 1 || m < 1 || d < 1 || K < 0 || threads < 1 || calls < 1 || sweep < 0 || sweep > 2) {
    std::fprintf(stderr, "expected T, n, m, d, threads, calls >= 1, K >= 0 and sweep in {0, 1, 2}\n");
    return 2;
  }
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> Xs(static_cast<size_t>(T * n * d)), Xq(static_cast<size_t>(T * m * d));
  std::vector<float> theta(static_cast<size_t>(d + 1)), alpha(static_cast<size_t>(K * (d + 1)), 0.1f);
  for (auto& x : Xs) x = u(rng);
  for (auto& x : Xq) x = u(rng);
  for (auto& x : theta) x = 0.01f * (u(rng) - 0.5f);
  std::vector<std::int32_t> ys(static_cast<size_t>(T * n)), yq(static_cast<size_t>(T * m));
  for (auto& y : ys) y = static_cast<std::int32_t>(rng() & 1u);
  for (auto& y : yq) y = static_cast<std::int32_t>(rng() & 1u);
  std::vector<index_t> sptr(static_cast<size_t>(T + 1)), qptr(static_cast<size_t>(T + 1));
  for (index_t t = 0; t <= T; ++t) sptr[static_cast<size_t>(t)] = t * n, qptr[static_cast<size_t>(t)] = t * m;
  fastmaml::TaskSet<float> ts;
  ts.n_tasks = T;
  ts.d = d;
  ts.support = {Xs.data(), nullptr, sptr.data(), ys.data()};
  ts.query = {Xq.data(), nullptr, qptr.data(), yq.data()};
  const fastmaml::Preconditioner<float> pre;
  const fastmaml::LrLayout lr;
  const fastmaml::Sweep which =
      sweep == 0 ? fastmaml::Sweep::automatic : sweep == 1 ? fastmaml::Sweep::plain : fastmaml::Sweep::gram;
  double loss = 0.0, grad_l2 = 0.0;
  std::vector<float> grad(static_cast<size_t>(d + 1)), hyper(1);
  std::vector<double> times;
  times.reserve(static_cast<size_t>(calls));
  for (int c = 0; c < calls; ++c) {
    const auto a = std::chrono::steady_clock::now();
    const auto st = fastmaml::meta_value_and_grad(ts, fastmaml::BinaryLink{}, theta.data(), alpha.data(), pre, K, lr,
                                                  0.0, fastmaml::Mode::maml, threads, &loss, grad.data(),
                                                  hyper.data(), &grad_l2, which);
    const auto b = std::chrono::steady_clock::now();
    if (!st.ok()) {
      std::fprintf(stderr, "the core reported an error (code %d, task %ld)\n", static_cast<int>(st.code),
                   static_cast<long>(st.task));
      return 1;
    }
    times.push_back(std::chrono::duration<double>(b - a).count());
  }
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];
  std::printf("T=%ld n=%ld m=%ld d=%ld K=%ld threads=%d: median %.2f us a call, %.3f us a task (loss %.6f)\n",
              static_cast<long>(T), static_cast<long>(n), static_cast<long>(m), static_cast<long>(d),
              static_cast<long>(K), threads, med * 1e6, med * 1e6 / static_cast<double>(T), loss);
  return 0;
}
