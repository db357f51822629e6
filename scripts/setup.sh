#!/usr/bin/env bash
# Installs the Debian 12 packages the build needs (only those missing), then
# configures and builds into $BUILD_DIR (default: build/). Idempotent.
# Extra arguments go to cmake, e.g. -DTANDEM_SANITIZE=address,undefined;
# EXTRA_PACKAGES names more Debian packages to install (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(g++ cmake ninja-build pkg-config liburing-dev libxxhash-dev libzstd-dev
  libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev
  nlohmann-json3-dev libssl-dev libtomlplusplus-dev libcpp-httplib-dev
  libsystemd-dev mount openssl libnbd-bin qemu-utils fuse3 e2fsprogs
  ${EXTRA_PACKAGES:-})
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

build_dir=${BUILD_DIR:-build}
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-RelWithDebInfo} \
  -DTANDEM_WERROR=ON "$@" >/dev/null
cmake --build "$build_dir" -j"$(nproc)"
