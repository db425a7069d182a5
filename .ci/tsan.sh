#!/usr/bin/env bash
# The C++ core's test executable under ThreadSanitizer: clang++ against LLVM's
# libomp (an uninstrumented libgomp would report false races; libomp carries
# TSan annotations). Installs its Debian packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v clang++ >/dev/null || need+=(clang)
[ -e /usr/lib/llvm-14/lib/libomp.so ] || ls /usr/lib/llvm-*/lib/libomp.so >/dev/null 2>&1 || need+=(libomp-dev)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
clang++ -std=c++17 -O1 -g -fopenmp -fsanitize=thread -Wall -Wextra -Werror -Icsrc \
    csrc/tests/core_test.cpp -o "$OUT/core_test_tsan"
for threads in 2 4; do
  echo "-- TSan, OMP_NUM_THREADS=$threads"
  TSAN_OPTIONS="ignore_noninstrumented_modules=1 halt_on_error=1 exitcode=66" OMP_NUM_THREADS=$threads \
      timeout 900 "$OUT/core_test_tsan" | tail -1
done
