#!/usr/bin/env bash
# What the relationship layer costs on top of a bare delta, in one run on the
# same disks: two identical 4 GiB volumes of mixed content (bench/prep) in
# the source pool, each rewritten 1% at random with the same seed in every
# round, then moved into the destination pool
#   - by `tandem relationship update` (v1: replication snapshot, delta
#     through an in-process pipe, atomic apply, records in both pools,
#     pruning of the previous replication snapshot), and
#   - by `tandem snapshot create` + `tandem-delta create | tandem-delta apply`
#     (v2, two processes and a pipe: issue 3's path).
# Caches are dropped before every timed step (cold cache). One table row per
# round, bytes on the wire for both, and peak RSS of the update.
# Usage (root, for drop_caches):
#   bench/run_relationship.sh [--build DIR] [--rounds N] [--out DIR]
#     [--source-device DEV --destination-device DEV --destroy-data]
# Writes bench/results/run_relationship.md and .json (one object per round).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
rounds=5
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    *) die "unknown option $1 (see the top of $0)" ;;
  esac
done
trap 'rm -rf "$work"' EXIT

a=$(new_pool source a 24G)
b=$(new_pool destination b 24G)
$P fill-pool "$a" v1 4G
$P fill-pool "$a" v2 4G
$T relationship create --source "$a:v1" --destination "$b:v1" >/dev/null
$T relationship initialize "$a:v1" >/dev/null
$D create --pool "$a" v2@base 2>/dev/null | $D apply - --pool "$b" v2 2>/dev/null
prev=base
rels=() plains=()

row "1% of 64 KiB chunks rewritten per round (655 chunks, 41 MiB)"
row ""
row "| round | relationship update, s | snapshot + create \\| apply, s | overhead | update on the wire | delta stream | update peak RSS |"
row "|---|---|---|---|---|---|---|"
for round in $(seq 1 "$rounds"); do
  $P change-pool "$a" v1 655 65536 $((100 + round)) >/dev/null
  $P change-pool "$a" v2 655 65536 $((100 + round)) >/dev/null
  drop
  s=$(now)
  rss=$( { /usr/bin/time -f '%M' "$T" relationship update "$a:v1" >/dev/null; } 2>&1 | tail -1)
  t_rel=$(elapsed "$s")
  drop
  s=$(now)
  $T snapshot create --pool "$a" "v2@r$round" >/dev/null
  summary=$($D create --pool "$a" "v2@r$round" --base "$prev" 2>/dev/null |
    $D apply - --pool "$b" v2 2>&1)
  t_plain=$(elapsed "$s")
  rels+=("$t_rel") plains+=("$t_plain")
  prev=r$round
  wire=$($T status "$a:v1" --json | awk -F': ' '/"last_transfer_bytes"/ {gsub(",", "", $2); print $2}')
  stream=$(grep -o '[0-9.]* [KMG]*i*B stream' <<<"$summary" | cut -d' ' -f1-2)
  [[ $($T digest --pool "$a" v1) == $($T digest --pool "$b" v1) ]] || die "relationship: digests differ"
  [[ $($T digest --pool "$a" "v2@r$round") == $($T digest --pool "$b" v2) ]] || die "delta: digests differ"
  record relationship_update_1pct "$t_rel" round "$round" wire_bytes "$wire" peak_rss_kib "$rss"
  record snapshot_create_apply_1pct "$t_plain" round "$round"
  row "$(awk -v r="$round" -v a="$t_rel" -v b="$t_plain" -v w="$wire" -v st="$stream" -v m="$rss" \
    'BEGIN { printf "| %d | %.3f | %.3f | %+.0f%% | %.2f MiB | %s | %d MiB |",
             r, a, b, (a / b - 1) * 100, w / 1048576, st, m / 1024 }')"
done
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
m_rel=$(median "${rels[@]}") m_plain=$(median "${plains[@]}")
row "$(awk -v a="$m_rel" -v b="$m_plain" -v n="$rounds" \
  'BEGIN { printf "| median of %d | %.3f | %.3f | %+.0f%% | | | |", n, a, b, (a / b - 1) * 100 }')"
finish
