#!/usr/bin/env bash
# End-to-end delta benchmark, every figure from this one run on one disk:
# a 4 GiB volume of mixed content (half compressible, half random), 1% of its
# 64 KiB chunks rewritten at random, moved by
#   - tandem: snapshot + tandem-delta create | tandem-delta apply (a pipe, into
#     a second pool), and create alone;
#   - btrfs send -p | btrfs receive between two loop-mounted btrfs;
#   - rsync --inplace --no-whole-file through an rsync daemon on 127.0.0.1;
# then the full 4 GiB delta, the limits (fio, xxhsum -b, zstd -b1) and the
# scaling of create for the same change on a 1 GiB and a 16 GiB volume.
# Caches are dropped before every timed step (cold cache).
# Usage (root; loop devices and mounts): bench/run_delta.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(realpath "${1:-build}")
T=$build/tools/tandem
D=$build/tools/tandem-delta
P=$build/bench/prep
for tool in mkfs.btrfs:btrfs-progs rsync:rsync fio:fio xxhsum:xxhash zstd:zstd; do
  command -v "${tool%%:*}" >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool##*:}" >/dev/null
done

work=$(mktemp -d "${TMPDIR:-/tmp}/tandem-delta-bench-XXXXXX")
mounts=() loops=() daemon=""
cleanup() {
  [[ -n $daemon ]] && kill "$daemon" 2>/dev/null || true
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Cold data: drop the page cache, then load each tool's binary again, so what
# is timed is moving data, not loading programs.
drop() {
  sync
  echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  "$T" --help >/dev/null
  "$D" --help >/dev/null
  btrfs --version >/dev/null
  rsync --version >/dev/null
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'; }

size=4G chunks=65536 changed=655
echo "## machine"
echo "nproc $(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs);" \
  "disk $(df -h "$work" | awk 'NR==2 {print $1}')"

echo "## tandem"
$T pool create "$work/a.img" --size 12G >/dev/null
$T pool create "$work/b.img" --size 12G >/dev/null
$P fill-pool "$work/a.img" v $size
$D create --pool "$work/a.img" v@base 2>/dev/null | $D apply - --pool "$work/b.img" v 2>/dev/null
$P change-pool "$work/a.img" v $changed $chunks 7 >/dev/null
drop
s=$(now)
$T snapshot create --pool "$work/a.img" v@new >/dev/null
$D create --pool "$work/a.img" v@new --base base 2>/dev/null |
  $D apply - --pool "$work/b.img" v 2>/dev/null
t_inc=$(elapsed "$s")
[[ $($T digest --pool "$work/a.img" v@new) == $($T digest --pool "$work/b.img" v@new) ]] ||
  { echo "tandem: digests differ"; exit 1; }
drop
s=$(now)
bytes=$($D create --pool "$work/a.img" v@new --base base 2>/dev/null | wc -c)
t_create=$(elapsed "$s")
echo "incremental snapshot+create|apply: ${t_inc} s; create alone: ${t_create} s; stream $((bytes / 1024)) KiB"
drop
$T pool create "$work/c.img" --size 12G >/dev/null
s=$(now)
$D create --pool "$work/a.img" v@base 2>/dev/null | $D apply - --pool "$work/c.img" v 2>/dev/null
t_full=$(elapsed "$s")
echo "full 4 GiB create|apply: ${t_full} s"
rm -f "$work/b.img" "$work/c.img"

echo "## btrfs send -p | receive"
for side in A B; do
  truncate -s 12G "$work/btrfs$side.img"
  loop=$(losetup --find --show "$work/btrfs$side.img")
  loops+=("$loop")
  mkfs.btrfs -q "$loop" >/dev/null 2>&1
  mkdir -p "$work/$side"
  mount "$loop" "$work/$side"
  mounts+=("$work/$side")
done
btrfs -q subvolume create "$work/A/sv"
$P fill-file "$work/A/sv/vol.img" $size
btrfs -q subvolume snapshot -r "$work/A/sv" "$work/A/base"
btrfs -q send "$work/A/base" | btrfs -q receive "$work/B"
$P change-file "$work/A/sv/vol.img" $changed $chunks 7 >/dev/null
drop
s=$(now)
btrfs -q subvolume snapshot -r "$work/A/sv" "$work/A/new"
btrfs -q send -p "$work/A/base" "$work/A/new" | btrfs -q receive "$work/B"
t_btrfs=$(elapsed "$s")
# btrfs receive returns with its data in the page cache; tandem's apply
# returns once its commit is durable. The same guarantee costs a sync.
sync -f "$work/B"
t_btrfs_sync=$(elapsed "$s")
cmp "$work/A/new/vol.img" "$work/B/new/vol.img" || { echo "btrfs: copies differ"; exit 1; }
mkdir "$work/B/full"
drop
s=$(now)
btrfs -q send "$work/A/base" | btrfs -q receive "$work/B/full"
t_btrfs_full=$(elapsed "$s")
sync -f "$work/B"
t_btrfs_full_sync=$(elapsed "$s")
echo "incremental: ${t_btrfs} s (${t_btrfs_sync} s with sync); full: ${t_btrfs_full} s (${t_btrfs_full_sync} s with sync)"
for m in "${mounts[@]}"; do umount "$m"; done
for l in "${loops[@]}"; do losetup -d "$l"; done
mounts=() loops=()
rm -f "$work"/btrfs*.img

echo "## rsync --inplace --no-whole-file --ignore-times via rsync daemon on 127.0.0.1"
mkdir -p "$work/rs/src" "$work/rs/dst"
$P fill-file "$work/rs/src/vol.img" $size
cp "$work/rs/src/vol.img" "$work/rs/dst/vol.img"
$P change-file "$work/rs/src/vol.img" $changed $chunks 7 >/dev/null
port=$((20000 + RANDOM % 20000))
cat >"$work/rsyncd.conf" <<EOF
address = 127.0.0.1
port = $port
use chroot = false
[bench]
path = $work/rs/dst
read only = false
uid = root
gid = root
EOF
rsync --daemon --no-detach --config="$work/rsyncd.conf" &
daemon=$!
sleep 1
drop
s=$(now)
rsync --inplace --no-whole-file --ignore-times "$work/rs/src/vol.img" "rsync://127.0.0.1:$port/bench/vol.img"
t_rsync=$(elapsed "$s")
cmp "$work/rs/src/vol.img" "$work/rs/dst/vol.img" || { echo "rsync: copies differ"; exit 1; }
kill "$daemon"
daemon=""
echo "incremental: ${t_rsync} s"

echo "## limits"
drop
fio_read=$(fio --name=read --filename="$work/rs/src/vol.img" --rw=read --bs=1M \
  --ioengine=io_uring --direct=1 --iodepth=8 --output-format=terse --terse-version=3 |
  awk -F';' '{ printf "%.0f", $7 / 1024 }')
echo "fio sequential read (1 MiB, QD8, O_DIRECT): ${fio_read} MiB/s"
echo "xxhsum -b (XXH128): $(xxhsum -b 2>&1 | tr '\r' '\n' | grep -E '#XXH128 ' | tail -1 |
  sed 's/.*(\(.*\)).*/\1/')"
head -c 256M "$work/rs/src/vol.img" >"$work/sample"
echo "zstd -b1 -T1 on 256 MiB of the volume: $(zstd -b1 -T1 "$work/sample" 2>&1 |
  tr '\r' '\n' | grep -E 'MB/s.*MB/s' | tail -1 | sed 's/.*(x/(x/')"
rm -rf "$work/rs" "$work/sample"

echo "## scaling: the same 164-chunk change in a 1 GiB and a 16 GiB volume"
$T pool create "$work/s.img" --size 24G >/dev/null
for gib in 1 16; do
  $P fill-pool "$work/s.img" "v$gib" ${gib}G
  $P change-pool "$work/s.img" "v$gib" 164 16384 9 >/dev/null
  $T snapshot create --pool "$work/s.img" "v$gib@new" >/dev/null
done
for gib in 1 16; do
  drop
  s=$(now)
  $D create --pool "$work/s.img" "v$gib@new" --base base 2>/dev/null >/dev/null
  eval "t_scale$gib=$(elapsed "$s")"
done
echo "create: 1 GiB ${t_scale1} s, 16 GiB ${t_scale16} s"

echo "## summary"
echo "| run | seconds | tandem is faster by |"
echo "|---|---|---|"
echo "| tandem snapshot + create \\| apply | $t_inc | |"
echo "| tandem create alone | $t_create | |"
echo "| btrfs snapshot + send -p \\| receive (data not yet durable) | $t_btrfs | $(ratio "$t_btrfs" "$t_inc")x |"
echo "| btrfs snapshot + send -p \\| receive + sync (durable, like tandem) | $t_btrfs_sync | $(ratio "$t_btrfs_sync" "$t_inc")x |"
echo "| rsync daemon, --inplace --no-whole-file | $t_rsync | $(ratio "$t_rsync" "$t_inc")x |"
echo "| tandem full 4 GiB create \\| apply | $t_full | |"
echo "| btrfs full 4 GiB send \\| receive (not yet durable) | $t_btrfs_full | $(ratio "$t_btrfs_full" "$t_full")x |"
echo "| btrfs full 4 GiB send \\| receive + sync | $t_btrfs_full_sync | $(ratio "$t_btrfs_full_sync" "$t_full")x |"
echo "| create, 16 GiB / 1 GiB volume (same change) | $(ratio "$t_scale16" "$t_scale1")x | |"
