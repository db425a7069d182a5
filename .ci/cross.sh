#!/usr/bin/env bash
# Portability of the C++ core (issue 10): builds and runs csrc/tests/core_test.cpp
#   a. with clang++, warning-free (-Wall -Wextra -Werror), with OpenMP and without
#      (the serial build);
#   b. cross-compiled for aarch64 (aarch64-linux-gnu-g++, static) and run under
#      qemu-aarch64: the non-x86 build, where the SIMD dispatch is the baseline path;
#   c. with g++ and -DFASTMAML_PORTABLE_FALLBACKS=1 (every compiler-specific
#      construct replaced by its standard C++ fallback: no unsigned __int128,
#      no __restrict, no target_clones), and checks that its digest of every
#      output's bits (the sampler's stream included) equals that of a g++ build
#      that only turns off the run-time ISA dispatch (-DFASTMAML_NO_MULTIVERSION):
#      the fallbacks change no bit. (The dispatched AVX2/AVX-512 clones sum in
#      wider SIMD lanes and differ from the baseline in rounding, by design.)
# Installs its Debian packages when missing (clang, libomp-dev, qemu-user,
# g++-aarch64-linux-gnu). Bounded: every step runs under `timeout`; about
# 2-4 minutes on 2 cores once the packages are there.
#
# Usage: .ci/cross.sh            (from anywhere; exits non-zero on any failure)
#        .ci/cross.sh --python   also d. builds the Python extension twice, with
#            the CMake option FASTMAML_PORTABLE_FALLBACKS=ON and with only the
#            dispatch off, in a fresh venv, and checks tools/snapshot.py finds every
#            output (a MAML.fit on an EpisodeSampler included) bitwise equal
#            (about 3 more minutes; needs PyPI for scikit-build-core, pybind11, numpy).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STEP_TIMEOUT="${FASTMAML_CROSS_STEP_TIMEOUT:-600}"
run() { timeout --kill-after=10 "$STEP_TIMEOUT" "$@"; }

echo "== cross 0. packages"
need=()
command -v clang++ >/dev/null || need+=(clang)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
# clang's OpenMP runtime (omp.h + libomp)
if command -v clang++ >/dev/null && ! echo '#include <omp.h>' | clang++ -fopenmp -x c++ -fsyntax-only - 2>/dev/null; then
  need+=(libomp-dev)
elif ! command -v clang++ >/dev/null; then
  need+=(libomp-dev)
fi
if ((${#need[@]})); then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  run $SUDO apt-get update -qq
  run $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

SRC=(-Icsrc csrc/tests/core_test.cpp)
WARN=(-std=c++17 -Wall -Wextra -Werror)
digest() { grep '^digest ' "$1" | awk '{print $2}'; }

echo "== cross a. clang++ $(clang++ -dumpversion): -Wall -Wextra -Werror, run"
run clang++ "${WARN[@]}" -O2 -fopenmp "${SRC[@]}" -o "$WORK/core_test_clang"
OMP_NUM_THREADS=2 run "$WORK/core_test_clang" >"$WORK/clang.out"
tail -n 3 "$WORK/clang.out"
echo "-- clang++ without OpenMP (the serial build, e.g. Apple clang without libomp)"
run clang++ "${WARN[@]}" -O2 "${SRC[@]}" -o "$WORK/core_test_serial"
run "$WORK/core_test_serial" >"$WORK/serial.out"
tail -n 2 "$WORK/serial.out"

echo "== cross b. aarch64-linux-gnu-g++ $(aarch64-linux-gnu-g++ -dumpversion) (static) under qemu-aarch64"
run aarch64-linux-gnu-g++ "${WARN[@]}" -O2 -fopenmp -static "${SRC[@]}" -o "$WORK/core_test_aarch64"
OMP_NUM_THREADS=2 run qemu-aarch64 "$WORK/core_test_aarch64" >"$WORK/aarch64.out"
grep -q '^build: multiversioned=0 ' "$WORK/aarch64.out"  # no x86 dispatch on aarch64
tail -n 3 "$WORK/aarch64.out"

echo "== cross c. g++ -DFASTMAML_PORTABLE_FALLBACKS=1: every fallback, bitwise equal to the baseline build"
run g++ "${WARN[@]}" -O2 -fopenmp -DFASTMAML_PORTABLE_FALLBACKS=1 "${SRC[@]}" -o "$WORK/core_test_fallbacks"
run g++ "${WARN[@]}" -O2 -fopenmp -DFASTMAML_NO_MULTIVERSION=1 "${SRC[@]}" -o "$WORK/core_test_baseline"
OMP_NUM_THREADS=2 run "$WORK/core_test_fallbacks" >"$WORK/fallbacks.out"
OMP_NUM_THREADS=2 run "$WORK/core_test_baseline" >"$WORK/baseline.out"
grep -q '^build: multiversioned=0 portable_fallbacks=1 int128=0$' "$WORK/fallbacks.out"
tail -n 3 "$WORK/fallbacks.out"
tail -n 3 "$WORK/baseline.out"
if [ "$(digest "$WORK/fallbacks.out")" != "$(digest "$WORK/baseline.out")" ]; then
  echo "FAIL: the portable fallbacks change results (digests differ)"
  diff "$WORK/fallbacks.out" "$WORK/baseline.out" || true
  exit 1
fi
grep '^sampler stream' "$WORK/fallbacks.out" >"$WORK/s1"
grep '^sampler stream' "$WORK/baseline.out" >"$WORK/s2"
cmp -s "$WORK/s1" "$WORK/s2"
echo "fallback digest $(digest "$WORK/fallbacks.out") == baseline digest $(digest "$WORK/baseline.out")"
if [ "$(digest "$WORK/aarch64.out")" = "$(digest "$WORK/baseline.out")" ]; then
  echo "(aarch64 under qemu gives the same bits as the x86-64 baseline build)"
else
  echo "(aarch64 digest $(digest "$WORK/aarch64.out") differs from the x86-64 baseline build: FMA contraction and libm differ by architecture; only each build's own checks are required)"
fi
if [ "${1:-}" = "--python" ]; then
  echo "== cross d. Python extension: FASTMAML_PORTABLE_FALLBACKS=ON vs dispatch off, tools/snapshot.py"
  python3 -m venv "$WORK/venv"
  # shellcheck disable=SC1091
  . "$WORK/venv/bin/activate"
  run pip install -q scikit-build-core pybind11 numpy
  run pip install -q --no-build-isolation --no-deps --target "$WORK/base" -Cbuild-dir="$WORK/build-base" \
      "-Ccmake.define.CMAKE_CXX_FLAGS=-DFASTMAML_NO_MULTIVERSION=1" .
  run pip install -q --no-build-isolation --no-deps --target "$WORK/fb" -Cbuild-dir="$WORK/build-fb" \
      -Ccmake.define.FASTMAML_PORTABLE_FALLBACKS=ON .
  (cd "$WORK" && PYTHONPATH="$WORK/fb" python -c "import fastmaml._core as c; assert c.portable_fallbacks()")
  (cd "$WORK" && PYTHONPATH="$WORK/base" run python "$ROOT/tools/snapshot.py" save "$WORK/base.npz")
  (cd "$WORK" && PYTHONPATH="$WORK/fb" run python "$ROOT/tools/snapshot.py" compare "$WORK/base.npz" | tail -n 1)
  deactivate
fi
echo "== cross passed (${ROOT})"
