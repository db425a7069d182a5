// The fast sweeps' checks on the benchmark workloads, and their benchmark
// against the generic sweeps. Stand-alone, no Python:
//   g++ -std=c++17 -O3 -fopenmp -Wall -Wextra -Icsrc csrc/tests/tile_test.cpp -o /tmp/tile_test
//   /tmp/tile_test            checks (tile_checks.hpp), small shapes and W1-W4
//   /tmp/tile_test bench [reps]
#include <cstdlib>

#include "tile_checks.hpp"

using namespace tile_checks;

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
    const int failed = run_all(true);
    std::printf("%d failed\n", failed);
    return failed == 0 ? 0 : 1;
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
