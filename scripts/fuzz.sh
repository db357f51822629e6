#!/usr/bin/env bash
# Builds the libFuzzer targets with clang, ASan and UBSan (in build-fuzz/),
# the code under test instrumented for coverage too, and runs each for
# SECONDS (default 45) on its committed corpus plus a scratch one:
#   delta_reader_fuzz    delta streams (re-sealing mutator), reader and applies
#   peer_protocol_fuzz   what a peer sends a daemon after TLS: HELLO, frames,
#                        requests, streams, credits
#   nbd_fuzz             what an NBD client sends tandemd: options, requests
# Prints each one's final coverage; exits non-zero on any finding (the
# crashing input is left in build-fuzz/ and should join the corpus).
#   scripts/fuzz.sh          # the bounded run scripts/test.sh does (30 s each)
#   scripts/fuzz.sh 1800     # a long run by hand
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-45}
EXTRA_PACKAGES="clang libclang-rt-14-dev" BUILD_DIR=build-fuzz CC=clang CXX=clang++ \
  scripts/setup.sh -DTANDEM_FUZZ=ON \
  -DTANDEM_SANITIZE=address,undefined -DTANDEM_BUILD_TESTS=OFF \
  -DTANDEM_BUILD_BENCH=OFF -DTANDEM_BUILD_TOOLS=OFF >/dev/null
cd build-fuzz
run() {
  local name=$1 corpus=$2
  shift 2
  mkdir -p "corpus-$name"
  local log="fuzz-$name.log"
  if ! "./tests/fuzz/$name" -max_total_time="$seconds" -rss_limit_mb=1024 \
      -timeout=10 -print_final_stats=1 "$@" "corpus-$name" "$corpus" >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz: $name found a problem (input saved in build-fuzz/)" >&2
    return 1
  fi
  # The last status line: "#runs DONE cov: <edges> ft: <features> corp: ..."
  echo "fuzz: $name: $(grep -E '#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 | sed 's/^#//' | tr -s '[:space:]' ' ')"
  grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' "$log" | sed 's/^/  /'
}
run delta_reader_fuzz ../tests/fuzz/corpus -max_len=1100000
run peer_protocol_fuzz ../tests/fuzz/peer_corpus -max_len=65536 \
  -dict=../tests/fuzz/peer.dict
run nbd_fuzz ../tests/fuzz/nbd_corpus -max_len=65536 -dict=../tests/fuzz/nbd.dict
