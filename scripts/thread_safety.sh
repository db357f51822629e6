#!/usr/bin/env bash
# Clang's thread-safety analysis over every source file of a build's
# compile_commands.json (default build/): each lock annotation
# (ABSL_GUARDED_BY, ABSL_EXCLUSIVE_LOCKS_REQUIRED on blockstore::Mutex) is
# checked, and any warning fails the run. Syntax only: nothing is built.
#   scripts/thread_safety.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
command -v clang++ >/dev/null ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang >/dev/null
python3 - "$build/compile_commands.json" <<'PY' | xargs -0 -n1 -P"$(nproc)" bash -c
import json, shlex, sys
for entry in json.load(open(sys.argv[1])):
    args = shlex.split(entry["command"])
    args = ["clang++"] + [a for a in args[1:] if a not in ("-c",)]
    if "-o" in args:
        i = args.index("-o")
        del args[i:i + 2]
    args += ["-fsyntax-only", "-Wthread-safety", "-Werror=thread-safety",
             "-Wno-unknown-warning-option"]
    cmd = "cd " + shlex.quote(entry["directory"]) + " && " + shlex.join(args)
    sys.stdout.write(cmd + "\0")
PY
echo "thread safety: every lock annotation holds"
