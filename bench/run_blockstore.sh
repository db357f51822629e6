#!/usr/bin/env bash
# Block store benchmarks, all in one run on one disk ($TMPDIR, default /tmp):
# the machine, fio's io_uring O_DIRECT baseline on a file of the same size,
# blockstore_bench (median of 5 repetitions) and the memory runs.
# Usage: bench/run_blockstore.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
command -v fio >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }
tmp=${TMPDIR:-/tmp}

echo "## machine"
echo "nproc: $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
echo "disk under $tmp: $(df -h "$tmp" | awk 'NR==2 {print $1, $2}')"
echo

echo "## fio, 1 MiB sequential, io_uring, O_DIRECT, queue depth 1, 1 GiB file"
f=$tmp/tandem-fio.img
for rw in write read; do
  fio --name=$rw --filename="$f" --size=1G --bs=1M --rw=$rw --ioengine=io_uring \
    --direct=1 --iodepth=1 --end_fsync=1 --output-format=terse --terse-version=3 |
    awk -F';' -v rw=$rw '{ bw = (rw == "read") ? $7 : $48; printf "fio %s: %.0f MiB/s\n", rw, bw / 1024 }'
done
rm -f "$f"
echo

echo "## blockstore_bench (median of 5)"
"$build"/bench/blockstore_bench --benchmark_filter=-BM_Concurrent --benchmark_repetitions=5 \
  --benchmark_report_aggregates_only=true --benchmark_counters_tabular=true 2>/dev/null |
  grep -E '^(Benchmark|BM_.*_median)'
echo

echo "## memory"
bench/memory.sh "$build"
