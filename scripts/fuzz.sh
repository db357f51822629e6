#!/usr/bin/env bash
# Builds the libFuzzer targets with clang, ASan and UBSan (in build-fuzz/) and
# runs the delta reader fuzzer for SECONDS (default 45) on the committed corpus
# (tests/fuzz/corpus) plus a scratch one. Exits non-zero on any finding; the
# crashing input is left in build-fuzz/ and should be committed to the corpus.
#   scripts/fuzz.sh          # the bounded run scripts/test.sh does
#   scripts/fuzz.sh 1800     # a long run by hand
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-45}
EXTRA_PACKAGES="clang libclang-rt-14-dev" BUILD_DIR=build-fuzz CC=clang CXX=clang++ \
  scripts/setup.sh -DTANDEM_FUZZ=ON \
  -DTANDEM_SANITIZE=address,undefined -DTANDEM_BUILD_TESTS=OFF \
  -DTANDEM_BUILD_BENCH=OFF -DTANDEM_BUILD_TOOLS=OFF >/dev/null
mkdir -p build-fuzz/corpus
cd build-fuzz
./tests/fuzz/delta_reader_fuzz -max_total_time="$seconds" -rss_limit_mb=1024 \
  -timeout=10 -max_len=1100000 -print_final_stats=1 corpus ../tests/fuzz/corpus \
  2>&1 | tail -n 12
