#!/usr/bin/env bash
# The block store with many requests in flight, against fio on the same pool
# file at the same queue depth, in one run on one disk ($TMPDIR, default
# /tmp): random 64 KiB reads and writes from 1, 4 and 16 threads (one
# request each), sequential 1 MiB reads and writes 8 in flight, and a 4 KiB
# read's latency while 1 GiB is written and committed beside it.
# Usage: bench/run_concurrency.sh [BUILD_DIR]
# Prints the machine, a Markdown table (store / fio as ratios) and the
# latency figures.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
command -v fio >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }
tmp=${TMPDIR:-/tmp}
pool=$tmp/tandem-bench-pool.img
trap 'rm -f "$pool" "$pool.csv" "$pool.lat.csv" "$pool.rss"' EXIT

echo "## machine"
echo "nproc: $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
echo "disk under $tmp: $(df -h "$tmp" | awk 'NR==2 {print $1, $2}')"
echo

# The store first; it leaves its pool file behind (a 1 GiB volume written
# at the start of the data area) for fio to run on the very same blocks.
# Reads and writes in two runs: the store's writes move the volume's chunks
# and punch the runs they free, and fio must read blocks that hold data.
fio_run() {  # RW BS JOBS DEPTH -> "iops bw_bytes"
  fio --name=twin --filename="$pool" --offset="$offset" --size=1G \
    --rw="$1" --bs="$2" --numjobs="$3" --iodepth="$4" --thread \
    --group_reporting --ioengine=io_uring --direct=1 --time_based \
    --runtime=3 --output-format=terse --terse-version=3 |
    awk -F';' -v rw="$1" '{ if (rw ~ /read/) print $8, $7 * 1024; else print $49, $48 * 1024 }'
}
# items_per_second (IOPS) or bytes_per_second of one benchmark line.
store() {  # NAME-PATTERN COLUMN(6 bytes/s, 7 items/s)
  grep "$1" "$pool.csv" | head -1 | awk -F, -v c="$2" '{ print $c }'
}
rows=()
for w in 0 1; do
  TMPDIR=$tmp TANDEM_BENCH_KEEP_POOL=1 "$build"/bench/blockstore_bench \
    --benchmark_filter="BM_Concurrent(Random64K|Sequential1M)/write:$w" \
    --benchmark_format=csv >"$pool.csv" 2>/dev/null
  offset=$(grep -m1 -o 'data_offset=[0-9]*' "$pool.csv" | cut -d= -f2)
  rw=$([[ $w == 0 ]] && echo randread || echo randwrite)
  for t in 1 4 16; do
    s=$(store "BM_ConcurrentRandom64K/write:$w/.*threads:$t\"" 7)
    read -r f _ < <(fio_run "$rw" 64k "$t" 1)
    goal=$([[ $w == 0 && $t == 16 ]] && echo ">= 0.80" || echo "")
    rows+=("$(awk -v c="random 64 KiB $rw" -v t="$t" -v s="$s" -v f="$f" -v g="$goal" \
      'BEGIN { printf "| %s | %d threads | %.0f IOPS | %.0f IOPS | %.2f | %s |", c, t, s, f, s / f, g }')")
  done
  rw=$([[ $w == 0 ]] && echo read || echo write)
  s=$(store "BM_ConcurrentSequential1M/write:$w/" 6)
  read -r _ f < <(fio_run "$rw" 1M 1 8)
  rows+=("$(awk -v c="sequential 1 MiB $rw" -v s="$s" -v f="$f" \
    'BEGIN { printf "| %s | 8 | %.0f MiB/s | %.0f MiB/s | %.2f | >= 0.90 |", c, s / 1048576, f / 1048576, s / f }')")
  grep -E '^"BM_Concurrent' "$pool.csv" |
    awk -F, '{ gsub(/"/, "", $1); print $1 ": " $NF }' >>"$pool.rss"
  rm -f "$pool"
done

echo "## requests in flight: the store against fio on the same pool file"
echo
echo "| case | in flight | store | fio | store / fio | goal |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "## a 4 KiB read's latency while 1 GiB is written and committed beside it"
echo
TMPDIR=$tmp "$build"/bench/blockstore_bench \
  --benchmark_filter=BM_ConcurrentReadLatency --benchmark_format=csv \
  >"$pool.lat.csv" 2>/dev/null
paste -d= <(grep -m1 '^name' "$pool.lat.csv" | tr -d '"' | tr ',' '\n') \
  <(grep -m1 '^"BM' "$pool.lat.csv" | tr ',' '\n') |
  grep -E '^(idle|busy|p99)_' | sed 's/^/- /'
echo
echo "## memory: the process's resident set after each case (MiB)"
echo
sed 's/^/- /' "$pool.rss"
