#!/usr/bin/env bash
# Builds and runs the default test suite (all but the "soak" and "fault" labels).
#   scripts/test.sh                      # the suite CI runs
#   scripts/test.sh --sanitize address,undefined   # in build-address,undefined/
#   scripts/test.sh --sanitize thread
#   scripts/test.sh --soak               # only the long randomized runs
#   scripts/test.sh --fault              # only the long fault runs (kill -9 x30)
# The default run starts with 30-second libFuzzer runs of the delta reader,
# the peer protocol and NBD sessions under ASan and UBSan (scripts/fuzz.sh;
# clang is installed for it), then clang's -Wthread-safety over every source file
# (scripts/thread_safety.sh). The daemon tests check metrics with promtool (Debian's
# prometheus package) and read them with curl: both are installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
sanitize="" labels=(-LE "soak|fault")
while (($#)); do
  case "$1" in
    --sanitize) sanitize=$2; shift 2 ;;
    --soak) labels=(-L soak); shift ;;
    --fault) labels=(-L fault); shift ;;
    *) echo "test.sh: unknown argument '$1' (see the comment at the top)" >&2; exit 2 ;;
  esac
done
export EXTRA_PACKAGES="prometheus curl"
if [[ -n $sanitize ]]; then
  export BUILD_DIR="build-${sanitize//,/-}"
  scripts/setup.sh -DTANDEM_SANITIZE="$sanitize" -DTANDEM_BUILD_BENCH=OFF
else
  export BUILD_DIR=build
  scripts/setup.sh
fi
if [[ -z $sanitize && ${labels[0]} == -LE ]]; then
  echo "fuzz: the delta reader, the peer protocol and NBD sessions, 30 s each under ASan/UBSan"
  scripts/fuzz.sh 30
  scripts/thread_safety.sh "$BUILD_DIR"
fi
cd "$BUILD_DIR"
ctest --output-on-failure -j"$(nproc)" "${labels[@]}"
