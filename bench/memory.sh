#!/usr/bin/env bash
# Peak memory (max RSS) of the tandem CLI on a 1 TiB sparse volume as the
# written amount grows: 1 GiB, then 10 GiB, streamed from a generator.
# Usage: bench/memory.sh [BUILD_DIR]   (pool file in $TMPDIR, removed after)
set -euo pipefail
build=${1:-build}
tandem=$build/tools/tandem
dir=$(mktemp -d "${TMPDIR:-/tmp}/tandem-mem-XXXXXX")
trap 'rm -rf "$dir"' EXIT
pool=$dir/pool.img
$tandem pool create "$pool" --size 24G >/dev/null
$tandem volume create --pool "$pool" big --size 1T
printf '| written | command | peak RSS |\n|---|---|---|\n'
offset=0
for gib in 1 10; do
  rss=$( { /usr/bin/time -f '%M' "$tandem" write --pool "$pool" big \
    --offset "$offset" < <(yes 'tandem memory benchmark' | head -c "${gib}G") \
    >/dev/null; } 2>&1 | tail -1)
  printf '| %s GiB | tandem write | %s MiB |\n' "$gib" $((rss / 1024))
  offset=$((offset + (gib << 30) + (100 << 30)))  # far apart: sparse tree
done
rss=$( { /usr/bin/time -f '%M' $tandem read --pool "$pool" big --length 10G \
  >/dev/null; } 2>&1 | tail -1)
printf '| 11 GiB total | tandem read (10 GiB) | %s MiB |\n' $((rss / 1024))
rss=$( { /usr/bin/time -f '%M' $tandem pool check "$pool" --data >/dev/null; } 2>&1 | tail -1)
printf '| 11 GiB total | tandem pool check --data | %s MiB |\n' $((rss / 1024))
