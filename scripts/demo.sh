#!/usr/bin/env bash
# The main job: build, then run `tandem demo` (pools in a temporary directory).
# Usage: scripts/demo.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec build/tools/tandem demo "$@"
