#!/usr/bin/env bash
# What the relationship layer costs on top of a bare delta, in one run on one
# disk: two identical 4 GiB volumes of mixed content (bench/prep), each
# rewritten 1% at random with the same seed in every round, then moved
#   - by `tandem relationship update` (a1 -> b1: replication snapshot, delta
#     through an in-process pipe, atomic apply, records in both pools,
#     pruning of the previous replication snapshot), and
#   - by `tandem snapshot create` + `tandem-delta create | tandem-delta apply`
#     (a2 -> b2, two processes and a pipe: issue 3's path).
# Caches are dropped before every timed step (cold cache). Prints one table
# row per round, bytes on the wire for both, and peak RSS of the update.
# Usage (root, for drop_caches): bench/run_relationship.sh [BUILD_DIR] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(realpath "${1:-build}")
rounds=${2:-5}
T=$build/tools/tandem
D=$build/tools/tandem-delta
P=$build/bench/prep
work=$(mktemp -d "${TMPDIR:-/tmp}/tandem-rel-bench-XXXXXX")
trap 'rm -rf "$work"' EXIT

drop() {
  sync
  echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  "$T" --help >/dev/null
  "$D" --help >/dev/null
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

echo "## machine"
echo "nproc $(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs);" \
  "disk $(df -h "$work" | awk 'NR==2 {print $1}')"
for p in a1 b1 a2 b2; do $T pool create "$work/$p.img" --size 12G >/dev/null; done
$P fill-pool "$work/a1.img" v 4G
$P fill-pool "$work/a2.img" v 4G
$T relationship create --source "$work/a1.img:v" --destination "$work/b1.img:v" >/dev/null
$T relationship initialize "$work/a1.img:v" >/dev/null
$D create --pool "$work/a2.img" v@base 2>/dev/null | $D apply - --pool "$work/b2.img" v 2>/dev/null
prev=base
rels=() plains=()

echo "## 1% of 64 KiB chunks rewritten per round (655 chunks, 41 MiB)"
echo "| round | relationship update, s | snapshot + create \| apply, s | overhead | update on the wire | delta stream | update peak RSS |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq 1 "$rounds"); do
  $P change-pool "$work/a1.img" v 655 65536 $((100 + round)) >/dev/null
  $P change-pool "$work/a2.img" v 655 65536 $((100 + round)) >/dev/null
  drop
  s=$(now)
  rss=$( { /usr/bin/time -f '%M' "$T" relationship update "$work/a1.img:v" >/dev/null; } 2>&1 | tail -1)
  t_rel=$(elapsed "$s")
  drop
  s=$(now)
  $T snapshot create --pool "$work/a2.img" "v@r$round" >/dev/null
  summary=$($D create --pool "$work/a2.img" "v@r$round" --base "$prev" 2>/dev/null |
    $D apply - --pool "$work/b2.img" v 2>&1)
  t_plain=$(elapsed "$s")
  rels+=("$t_rel") plains+=("$t_plain")
  prev=r$round
  wire=$($T status "$work/a1.img:v" --json | awk -F': ' '/"last_transfer_bytes"/ {gsub(",", "", $2); print $2}')
  stream=$(grep -o '[0-9.]* [KMG]*i*B stream' <<<"$summary" | cut -d' ' -f1-2)
  [[ $($T digest --pool "$work/a1.img" v) == $($T digest --pool "$work/b1.img" v) ]] ||
    { echo "relationship: digests differ"; exit 1; }
  [[ $($T digest --pool "$work/a2.img" "v@r$round") == $($T digest --pool "$work/b2.img" v) ]] ||
    { echo "delta: digests differ"; exit 1; }
  awk -v r="$round" -v a="$t_rel" -v b="$t_plain" -v w="$wire" -v st="$stream" -v m="$rss" \
    'BEGIN { printf "| %d | %.3f | %.3f | %+.0f%% | %.2f MiB | %s | %d MiB |\n",
             r, a, b, (a / b - 1) * 100, w / 1048576, st, m / 1024 }'
done
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
m_rel=$(median "${rels[@]}") m_plain=$(median "${plains[@]}")
awk -v a="$m_rel" -v b="$m_plain" -v n="$rounds" \
  'BEGIN { printf "| median of %d | %.3f | %.3f | %+.0f%% | | | |\n", n, a, b, (a / b - 1) * 100 }'
