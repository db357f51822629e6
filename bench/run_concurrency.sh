#!/usr/bin/env bash
# The block store with many requests in flight, against fio on the same pool
# file at the same queue depth, in one run on one disk ($TMPDIR, default
# /tmp): random 64 KiB reads and writes from 1, 4 and 16 threads (one
# request each), sequential 1 MiB reads and writes 8 in flight, and a 4 KiB
# read's latency while 1 GiB is written and committed beside it.
# Usage: bench/run_concurrency.sh [BUILD_DIR] [ROUNDS]
# Prints the machine, a Markdown table (store / fio as ratios) and the
# latency figures. Each row is the median of ROUNDS (default 3) rounds of
# store-then-fio, each ratio taken within its round: the shared machines
# these run on vary by a third from one minute to the next.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
rounds=${2:-3}
command -v fio >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }
tmp=${TMPDIR:-/tmp}
pool=$tmp/tandem-bench-pool.img
trap 'rm -f "$pool" "$pool.csv" "$pool.lat.csv" "$pool.rss" "$pool.rounds"' EXIT

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
# One round: the store's cases, then fio's on the same blocks; appends
# "KEY store fio" lines to $pool.rounds.
one_round() {
  : >"$pool.rss"
  for w in 0 1; do
    TMPDIR=$tmp TANDEM_BENCH_KEEP_POOL=1 "$build"/bench/blockstore_bench \
      --benchmark_filter="BM_Concurrent(Random64K|Sequential1M)/write:$w" \
      --benchmark_format=csv >"$pool.csv" 2>/dev/null
    offset=$(grep -m1 -o 'data_offset=[0-9]*' "$pool.csv" | cut -d= -f2)
    rw=$([[ $w == 0 ]] && echo randread || echo randwrite)
    for t in 1 4 16; do
      s=$(store "BM_ConcurrentRandom64K/write:$w/.*threads:$t\"" 7)
      read -r f _ < <(fio_run "$rw" 64k "$t" 1)
      echo "$w-random-$t $s $f" >>"$pool.rounds"
    done
    rw=$([[ $w == 0 ]] && echo read || echo write)
    s=$(store "BM_ConcurrentSequential1M/write:$w/" 6)
    read -r _ f < <(fio_run "$rw" 1M 1 8)
    echo "$w-sequential-8 $s $f" >>"$pool.rounds"
    grep -E '^"BM_Concurrent' "$pool.csv" |
      awk -F, '{ gsub(/"/, "", $1); print $1 ": " $NF }' >>"$pool.rss"
    rm -f "$pool"
  done
}
rm -f "$pool.rounds"
for ((r = 1; r <= rounds; r++)); do one_round; done
# The row of KEY: median store, median fio, median of the rounds' ratios.
median_row() {  # KEY LABEL IN_FLIGHT UNIT DIVISOR GOAL
  awk -v k="$1" -v label="$2" -v n="$3" -v unit="$4" -v div="$5" -v goal="$6" '
    function median(a, m,   i, j, t) {
      for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++)
        if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
    }
    $1 == k { ++m; s[m] = $2 / div; f[m] = $3 / div; q[m] = $2 / $3
              ratios = ratios (m > 1 ? " " : "") sprintf("%.2f", $2 / $3) }
    END { printf "| %s | %s | %.0f %s | %.0f %s | %.2f (%s) | %s |\n",
                 label, n, median(s, m), unit, median(f, m), unit, median(q, m),
                 ratios, goal }' "$pool.rounds"
}

echo "## requests in flight: the store against fio on the same pool file"
echo
echo "Medians of $rounds rounds; the ratios of each round in brackets."
echo
echo "| case | in flight | store | fio | store / fio | goal |"
echo "|---|---|---|---|---|---|"
for w in 0 1; do
  rw=$([[ $w == 0 ]] && echo read || echo write)
  for t in 1 4 16; do
    median_row "$w-random-$t" "random 64 KiB $rw" "$t threads" IOPS 1 \
      "$([[ $w == 0 && $t == 16 ]] && echo '>= 0.80')"
  done
  median_row "$w-sequential-8" "sequential 1 MiB $rw" 8 MiB/s 1048576 ">= 0.90"
done
echo
echo "## a 4 KiB read's latency while 1 GiB is written and committed beside it"
echo
echo "| round | idle p50 | idle p99 | busy p50 | busy p99 | p99 ratio (goal <= 3) |"
echo "|---|---|---|---|---|---|"
for ((r = 1; r <= rounds; r++)); do
  TMPDIR=$tmp "$build"/bench/blockstore_bench \
    --benchmark_filter=BM_ConcurrentReadLatency --benchmark_format=csv \
    >"$pool.lat.csv" 2>/dev/null
  paste -d= <(grep -m1 '^name' "$pool.lat.csv" | tr -d '"' | tr ',' '\n') \
    <(grep -m1 '^"BM' "$pool.lat.csv" | tr ',' '\n') |
    awk -F= -v r="$r" '{ v[$1] = $2 }
      END { printf "| %d | %.0f us | %.0f us | %.0f us | %.0f us | %.2f |\n", r,
              v["idle_p50_us"], v["idle_p99_us"], v["busy_p50_us"],
              v["busy_p99_us"], v["p99_ratio"] }'
done
echo
echo "## memory: the process's resident set after each case (MiB, last round)"
echo
sed 's/^/- /' "$pool.rss"
