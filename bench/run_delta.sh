#!/usr/bin/env bash
# End-to-end delta benchmark, every figure from this one run on the same
# disks: a 4 GiB volume of mixed content (half compressible, half random),
# 1% of its 64 KiB chunks (655) rewritten at random, moved by
#   - tandem: snapshot + tandem-delta create | tandem-delta apply into a
#     second pool (the update), and the same as one command (create
#     --snapshot | apply); create alone; the same delta file applied to
#     a pool and to a raw image; the same change in a 64 GiB sparse volume;
#     the full 4 GiB baseline (twice, beside each pass of the floors);
#   - btrfs send -p | btrfs receive between two btrfs file systems;
#   - rsync --inplace --no-whole-file through an rsync daemon on 127.0.0.1;
# against the floors measured on the same disks: fio reading the 655 chunks'
# worth of 64 KiB blocks at random and writing them (io_uring, O_DIRECT,
# depth 32), fio reading 4 GiB and writing 4 GiB at once (both floors measured
# before and after the tandem runs; the best pass counts), xxhsum -b, zstd -b1.
# The update is the best of 3 rounds of each form (btrfs's too), the baseline
# of its 2.
# And create's scaling with cores (N workers on N cores) on compressible text
# in memory (--threads 1,2,16: the core counts).
# Caches are dropped before every timed step (cold data), then the programs
# the steps run (tandem's, btrfs's, rsync's) read back (bench/lib.sh: drop);
# one more round of the update runs with the programs cold too.
#
# Usage (root: loop devices, mounts, drop_caches):
#   bench/run_delta.sh [--build DIR] [--threads 1,2[,16]] [--out DIR]
#   bench/run_delta.sh --source-device /dev/nvme0n1 \
#     --destination-device /dev/nvme1n1 --destroy-data     # real devices
# With devices the pools, btrfs file systems, fio and rsync all run on them
# (everything on them is lost); without, on files under $TMPDIR. Writes
# bench/results/run_delta.md (the table) and run_delta.json (one object per
# case).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
threads=1,2
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case $1 in
    --threads) threads=$2; shift 2 ;;
    *) die "unknown option $1 (see the top of $0)" ;;
  esac
done
for tool in mkfs.btrfs:btrfs-progs rsync:rsync fio:fio xxhsum:xxhash zstd:zstd; do
  command -v "${tool%%:*}" >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool##*:}" >/dev/null
done
warm btrfs rsync  # the peers' programs, as tandem's (bench/lib.sh)

mounts=() loops=() daemon=""
cleanup() {
  [[ -n $daemon ]] && kill "$daemon" 2>/dev/null || true
  for m in "${mounts[@]+"${mounts[@]}"}"; do umount "$m" 2>/dev/null || true; done
  for l in "${loops[@]+"${loops[@]}"}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -rf "$work"
  [[ -d /dev/shm/tandem-$bench_name-$$ ]] && rm -rf "/dev/shm/tandem-$bench_name-$$"
  return 0
}
trap cleanup EXIT
peak() { awk '/Maximum resident/ { printf "%.0f", $NF / 1024 }' "$1"; }  # MiB
faults() { awk '/Minor .*page faults/ { printf "%d", $NF }' "$1"; }  # first touches

size=4G chunks=65536 changed=655
a=$(new_pool source a 24G)
$P fill-pool "$a" v $size
# Floors, fio on the same disks: measured twice, before the tandem runs (the
# destination pool does not exist yet: on a device fio writes where it will
# be) and after them, so a disk that drifts during the run shows in both;
# the table takes the best pass. Reads come from the source pool's data (the
# volume's blocks), writes go to the destination device or a new file.
if ((devices)); then rsrc=$src_dev wdst=$dst_dev; else rsrc=$a wdst=$work/fio.out; fi
fio_job() {  # fio_job NAME FILE RW BS DEPTH IO_SIZE [FIO_OPTION...] -> seconds
  local extra=("${@:7}")
  [[ $2 == "$work"/fio.out ]] && extra+=(--fallocate=none)
  fio --name="$1" --filename="$2" --rw="$3" --bs="$4" --iodepth="$5" --io_size="$6" \
    --ioengine=io_uring --direct=1 --offset=64M --size=4G "${extra[@]}" \
    --output-format=terse --terse-version=3 |
    awk -F';' -v rw="$3" '{ ms = (rw ~ /read/) ? $9 : $50; printf "%.3f", ms / 1000 }'
}
fio_read=() fio_write=() fio_write_sync=() fio_floor=() fio_both=()
floors() {
  local r w ws s
  drop
  r=$(fio_job r "$rsrc" randread 64k 32 $((changed * 64))k)
  rm -f "$work/fio.out"
  w=$(fio_job w "$wdst" randwrite 64k 32 $((changed * 64))k)
  rm -f "$work/fio.out"
  # The same writes made durable (an fsync at the end, in fio's time), as
  # a commit must: in a file, the file system's allocations for them too.
  # Not part of the floor (the issue's floor is the writes alone).
  ws=$(fio_job w "$wdst" randwrite 64k 32 $((changed * 64))k --end_fsync=1)
  rm -f "$work/fio.out"
  fio_read+=("$r") fio_write+=("$w") fio_write_sync+=("$ws")
  fio_floor+=("$(awk -v a="$r" -v b="$w" 'BEGIN { printf "%.3f", a + b }')")
  drop
  s=$(now)
  fio_job r "$rsrc" read 1M 8 4G >/dev/null &
  fio_job w "$wdst" write 1M 8 4G >/dev/null
  wait
  fio_both+=("$(elapsed "$s")")
  rm -f "$work/fio.out"
  echo "fio 1% read ${r} s + write ${w} s (${ws} s with its fsync); 4 GiB read + write at once ${fio_both[-1]} s"
}
best() { printf '%s\n' "$@" | sort -g | head -1; }
list() { local IFS=,; echo "[$*]"; }  # a JSON array of the figures

# The full baseline into a new pool: run twice, each beside a pass of the
# floors (the disk drifts within minutes), the best counting as fio's does.
t_fulls=()
full_baseline() {
  local c s
  c=$(new_pool destination c 24G)
  drop
  s=$(now)
  /usr/bin/time -v -o "$work/fcreate.time" $D create --pool "$a" v@base 2>/dev/null |
    /usr/bin/time -v -o "$work/fapply.time" $D apply - --pool "$c" v 2>/dev/null
  t_fulls+=("$(elapsed "$s")")
  [[ $($T digest --pool "$a" v@base) == $($T digest --pool "$c" v@base) ]] ||
    die "full baseline: digests differ"
  ((devices)) || rm -f "$c"
  echo "full create | apply ${t_fulls[-1]} s"
}

echo "## floors, first pass: fio on the same disks, and the full 4 GiB baseline"
floors
full_baseline

echo "## tandem: the 1% update (best of 3 rounds of each form)"
b=$(new_pool destination b 24G)
$D create --pool "$a" v@base 2>/dev/null | $D apply - --pool "$b" v 2>/dev/null
# Each round changes 1% anew and moves it twice: a snapshot with the tandem
# CLI then create | apply, and the same as one command (create takes the
# snapshot itself).
prev=base t_incs=() t_ones=()
for round in 1 2 3; do
  $P change-pool "$a" v $changed $chunks $((2 * round + 5)) >/dev/null
  drop
  s=$(now)
  $T snapshot create --pool "$a" "v@new$round" >/dev/null
  /usr/bin/time -v -o "$work/create.time" $D create --pool "$a" "v@new$round" --base "$prev" 2>/dev/null |
    /usr/bin/time -v -o "$work/apply.time" $D apply - --pool "$b" v 2>/dev/null
  t_incs+=("$(elapsed "$s")")
  [[ $($T digest --pool "$a" "v@new$round") == $($T digest --pool "$b" "v@new$round") ]] ||
    die "tandem: digests differ"
  $P change-pool "$a" v $changed $chunks $((2 * round + 6)) >/dev/null
  drop
  s=$(now)
  $D create --pool "$a" "v@one$round" --base "new$round" --snapshot 2>/dev/null |
    $D apply - --pool "$b" v 2>/dev/null
  t_ones+=("$(elapsed "$s")")
  [[ $($T digest --pool "$a" "v@one$round") == $($T digest --pool "$b" "v@one$round") ]] ||
    die "tandem: digests differ"
  prev=one$round
done
# Once more with the programs cold too (loaded from disk inside the timing,
# as every timed step was before run N): what a first run on a host costs.
$P change-pool "$a" v $changed $chunks 31 >/dev/null
drop_all
s=$(now)
$T snapshot create --pool "$a" v@cold >/dev/null
$D create --pool "$a" v@cold --base "$prev" 2>/dev/null | $D apply - --pool "$b" v 2>/dev/null
t_cold=$(elapsed "$s")
[[ $($T digest --pool "$a" v@cold) == $($T digest --pool "$b" v@cold) ]] ||
  die "tandem: digests differ"
prev=cold
record update_1pct_programs_cold "$t_cold" changed_chunks $changed
t_inc=$(best "${t_incs[@]}") t_one=$(best "${t_ones[@]}")
record update_1pct "$t_inc" changed_chunks $changed rounds "$(list "${t_incs[@]}")" \
  create_peak_rss_mib "$(peak "$work/create.time")" apply_peak_rss_mib "$(peak "$work/apply.time")" \
  create_page_faults "$(faults "$work/create.time")" apply_page_faults "$(faults "$work/apply.time")"
record update_1pct_one_command "$t_one" changed_chunks $changed rounds "$(list "${t_ones[@]}")"
drop
s=$(now)
$D create --pool "$a" v@new1 --base base -o "$work/inc.tdd" 2>/dev/null
t_create=$(elapsed "$s")
stream=$(stat -c %s "$work/inc.tdd")
record create_1pct "$t_create" stream_bytes "$stream"
echo "update ${t_incs[*]} s (one command ${t_ones[*]} s); create alone ${t_create} s; stream $((stream / 1024)) KiB"

echo "## tandem: the same change in a 64 GiB sparse volume (4 GiB written)"
$P fill-pool "$a" w 64G 4G
$D create --pool "$a" w@base 2>/dev/null | $D apply - --pool "$b" w 2>/dev/null
# Three rounds, the two volumes in turn, each changed anew: medians.
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
declare -A t_scale from=([v]=$prev [w]=base)
scale_v=() scale_w=()
for round in 1 2 3; do
  for name in v w; do
    $P change-pool "$a" "$name" $changed $chunks $((20 + round)) >/dev/null
    drop
    s=$(now)
    $T snapshot create --pool "$a" "$name@s$round" >/dev/null
    $D create --pool "$a" "$name@s$round" --base "${from[$name]}" 2>/dev/null |
      $D apply - --pool "$b" "$name" 2>/dev/null
    t=$(elapsed "$s")
    from[$name]=s$round
    if [[ $name == v ]]; then scale_v+=("$t"); else scale_w+=("$t"); fi
    record "update_1pct_$([[ $name == v ]] && echo 4g || echo 64g)_volume" "$t" round "$round"
  done
done
t_scale[v]=$(median "${scale_v[@]}") t_scale[w]=$(median "${scale_w[@]}")
echo "update 4 GiB volume ${scale_v[*]} s; 64 GiB volume ${scale_w[*]} s"

echo "## tandem: one delta file applied to a pool and to a raw image"
# Both hold v@s3; the delta takes them to v@next2.
$P change-pool "$a" v $changed $chunks 9 >/dev/null
$T snapshot create --pool "$a" v@next2 >/dev/null
$D create --pool "$a" v@next2 --base s3 -o "$work/inc2.tdd" 2>/dev/null
if ((devices)); then image=$dst_dev; else image=$work/image.raw; fi
$D create --pool "$a" v@s3 -o "$work/full-next.tdd" 2>/dev/null
drop
cat "$work/inc2.tdd" >/dev/null
s=$(now)
$D apply "$work/inc2.tdd" --pool "$b" v 2>/dev/null
t_apply_pool=$(elapsed "$s")
# The pool is done with: a device takes the image now.
$D apply "$work/full-next.tdd" --image "$image" --state "$work/image.state" 2>/dev/null
rm -f "$work/full-next.tdd"
drop
cat "$work/inc2.tdd" >/dev/null
s=$(now)
$D apply "$work/inc2.tdd" --image "$image" --state "$work/image.state" 2>"$work/image.err"
t_apply_image=$(elapsed "$s")
grep -q "applied" "$work/image.err" || die "image apply: $(cat "$work/image.err")"
record apply_delta_file_to_pool "$t_apply_pool"
record apply_delta_file_to_image "$t_apply_image" image "$image"
echo "apply to a pool ${t_apply_pool} s; to an image ${t_apply_image} s"

echo "## the full 4 GiB baseline again, and the floors, second pass"
full_baseline
floors
t_full=$(best "${t_fulls[@]}")
record full_4g "$t_full" runs "$(list "${t_fulls[@]}")" \
  create_peak_rss_mib "$(peak "$work/fcreate.time")" \
  apply_peak_rss_mib "$(peak "$work/fapply.time")"
floor=$(best "${fio_floor[@]}") t_fio_both=$(best "${fio_both[@]}")
record fio_randread_1pct "$(best "${fio_read[@]}")" bytes $((changed * 65536)) passes "$(list "${fio_read[@]}")"
record fio_randwrite_1pct "$(best "${fio_write[@]}")" bytes $((changed * 65536)) passes "$(list "${fio_write[@]}")" \
  with_fsync_seconds "$(best "${fio_write_sync[@]}")" passes_with_fsync "$(list "${fio_write_sync[@]}")"
# What starting each program costs (warm, mean of 20; /bin/true for the
# process itself): the update starts three, the one command two.
start_ms() {
  local s i
  s=$(now)
  for i in {1..20}; do "$@" >/dev/null 2>&1; done
  awk -v a="$s" -v b="$(now)" 'BEGIN { printf "%.1f", (b - a) * 1000 / 20 }'
}
start_true=$(start_ms /bin/true) start_t=$(start_ms "$T" --version) start_d=$(start_ms "$D" --version)
record program_start_ms "$start_t" program tandem true_ms "$start_true"
record program_start_ms "$start_d" program tandem-delta true_ms "$start_true"
record fio_read_and_write_4g_at_once "$t_fio_both" passes "$(list "${fio_both[@]}")"
xxh=$(xxhsum -b 2>&1 | tr '\r' '\n' | grep -E '#XXH128 ' | tail -1 | sed 's/.*(\(.*\)).*/\1/')
$T read --pool "$a" v@base --length 256M >"$work/sample"
zstd_b=$(zstd -b1 -T1 "$work/sample" 2>&1 | tr '\r' '\n' | grep -E 'MB/s.*MB/s' | tail -1 | sed 's/.*(x/(x/')
rm -f "$work/sample"

echo "## create's CPU work with workers (compressible text, in memory)"
shm=/dev/shm/tandem-$bench_name-$$
mkdir -p "$shm"
$T pool create "$shm/m.pool" --size 3G >/dev/null
$P fill-pool "$shm/m.pool" v 1G 1G words
$D create --pool "$shm/m.pool" v@base >/dev/null 2>&1  # warm
declare -A t_workers
for n in ${threads//,/ }; do
  ((n <= $(nproc))) || { echo "skipping $n cores: this machine has $(nproc)"; continue; }
  best=""
  for _ in 1 2 3; do
    s=$(now)
    # N workers on N cores: the caller, reader and writer threads share them.
    taskset -c "0-$((n - 1))" $D create --pool "$shm/m.pool" v@base --threads "$n" 2>/dev/null >/dev/null
    t=$(elapsed "$s")
    best=$(awk -v a="$t" -v b="${best:-1e9}" 'BEGIN { print (a < b) ? a : b }')
  done
  t_workers[$n]=$best
  record create_full_1g_text_in_memory "$best" cores "$n" workers "$n"
done
rm -rf "$shm"
echo "create in memory: $(for n in "${!t_workers[@]}"; do printf '%s cores %s s; ' "$n" "${t_workers[$n]}"; done)"

echo "## btrfs send -p | receive"
if ((devices)); then
  bdevs=("$src_dev" "$dst_dev")
else
  bdevs=()
  for side in A B; do
    truncate -s 24G "$work/btrfs$side.img"
    loop=$(losetup --find --show "$work/btrfs$side.img")
    loops+=("$loop")
    bdevs+=("$loop")
  done
fi
i=0
for side in A B; do
  mkfs.btrfs -f -q "${bdevs[i]}" >/dev/null 2>&1
  mkdir -p "$work/$side"
  mount "${bdevs[i]}" "$work/$side"
  mounts+=("$work/$side")
  i=$((i + 1))
done
btrfs -q subvolume create "$work/A/sv"
$P fill-file "$work/A/sv/vol.img" $size
btrfs -q subvolume snapshot -r "$work/A/sv" "$work/A/base"
btrfs -q send "$work/A/base" | btrfs -q receive "$work/B"
# Best of 3 rounds, as tandem's update, each changing 1% anew.
# btrfs receive returns with its data in the page cache; tandem's apply
# returns once its commit is durable. The same guarantee costs a sync.
parent=base t_btrfss=() t_btrfs_syncs=()
for round in 1 2 3; do
  $P change-file "$work/A/sv/vol.img" $changed $chunks $((6 + round)) >/dev/null
  drop
  s=$(now)
  btrfs -q subvolume snapshot -r "$work/A/sv" "$work/A/new$round"
  btrfs -q send -p "$work/A/$parent" "$work/A/new$round" | btrfs -q receive "$work/B"
  t_btrfss+=("$(elapsed "$s")")
  sync -f "$work/B"
  t_btrfs_syncs+=("$(elapsed "$s")")
  cmp "$work/A/new$round/vol.img" "$work/B/new$round/vol.img" || die "btrfs: copies differ"
  parent=new$round
done
t_btrfs=$(best "${t_btrfss[@]}") t_btrfs_sync=$(best "${t_btrfs_syncs[@]}")
mkdir "$work/B/full"
drop
s=$(now)
btrfs -q send "$work/A/base" | btrfs -q receive "$work/B/full"
t_btrfs_full=$(elapsed "$s")
sync -f "$work/B"
t_btrfs_full_sync=$(elapsed "$s")
record btrfs_update_1pct "$t_btrfs" with_sync_seconds "$t_btrfs_sync" \
  rounds "$(list "${t_btrfss[@]}")" rounds_with_sync "$(list "${t_btrfs_syncs[@]}")"
record btrfs_full_4g "$t_btrfs_full" with_sync_seconds "$t_btrfs_full_sync"
echo "incremental ${t_btrfs} s (${t_btrfs_sync} s with sync); full ${t_btrfs_full} s (${t_btrfs_full_sync} s with sync)"

echo "## rsync --inplace --no-whole-file --ignore-times via an rsync daemon on 127.0.0.1"
# On the btrfs of each side (devices) or in the work folder (files).
if ((devices)); then rsrc_dir=$work/A rdst_dir=$work/B; else
  for m in "${mounts[@]}"; do umount "$m"; done
  for l in "${loops[@]}"; do losetup -d "$l"; done
  mounts=() loops=()
  rm -f "$work"/btrfs*.img
  rsrc_dir=$work/rs/src rdst_dir=$work/rs/dst
fi
mkdir -p "$rsrc_dir/rsync" "$rdst_dir/rsync"
$P fill-file "$rsrc_dir/rsync/vol.img" $size
cp "$rsrc_dir/rsync/vol.img" "$rdst_dir/rsync/vol.img"
$P change-file "$rsrc_dir/rsync/vol.img" $changed $chunks 7 >/dev/null
port=$((20000 + RANDOM % 20000))
cat >"$work/rsyncd.conf" <<EOF
address = 127.0.0.1
port = $port
use chroot = false
[bench]
path = $rdst_dir/rsync
read only = false
uid = root
gid = root
EOF
rsync --daemon --no-detach --config="$work/rsyncd.conf" &
daemon=$!
sleep 1
drop
s=$(now)
rsync --inplace --no-whole-file --ignore-times "$rsrc_dir/rsync/vol.img" "rsync://127.0.0.1:$port/bench/vol.img"
t_rsync=$(elapsed "$s")
cmp "$rsrc_dir/rsync/vol.img" "$rdst_dir/rsync/vol.img" || die "rsync: copies differ"
kill "$daemon"
daemon=""
record rsync_update_1pct "$t_rsync"
echo "incremental ${t_rsync} s"

row "| case | seconds | ratio | goal |"
row "|---|---|---|---|"
row "| tandem update: snapshot + create \\| apply (best of 3) | $t_inc | $(ratio "$t_inc" "$floor") of the floor | <= 1.7 |"
row "| the same, one command: create --snapshot \\| apply (best of 3) | $t_one | $(ratio "$t_one" "$floor") of the floor | |"
row "| floor: fio reads the 655 chunks + writes them (64 KiB, depth 32; best of the passes before and after: ${fio_floor[*]}) | $floor | | |"
row "| the same with the programs cold too (one round, as before run N) | $t_cold | $(ratio "$t_cold" "$floor") of the floor | |"
row "| fio's writes of the floor made durable (--end_fsync=1; best of ${fio_write_sync[*]}), against its writes alone (best of ${fio_write[*]}) | $(best "${fio_write_sync[@]}") | $(ratio "$(best "${fio_write_sync[@]}")" "$(best "${fio_write[@]}")")x the writes alone | |"
row "| a program's start, warm (mean of 20): tandem / tandem-delta / /bin/true, ms | $start_t / $start_d / $start_true | | |"
row "| btrfs snapshot + send -p \\| receive (data not yet durable; best of ${t_btrfss[*]}) | $t_btrfs | $(ratio "$t_btrfs" "$t_inc")x tandem ($(ratio "$t_btrfs" "$t_one")x the one command) | >= 3 |"
row "| btrfs, + sync (durable, like tandem; best of ${t_btrfs_syncs[*]}) | $t_btrfs_sync | $(ratio "$t_btrfs_sync" "$t_inc")x tandem ($(ratio "$t_btrfs_sync" "$t_one")x the one command) | |"
row "| rsync daemon, --inplace --no-whole-file | $t_rsync | $(ratio "$t_rsync" "$t_inc")x tandem | |"
row "| tandem create alone | $t_create | | |"
row "| update, 64 GiB sparse volume / 4 GiB volume (same change, medians of 3) | ${t_scale[w]} / ${t_scale[v]} | $(ratio "${t_scale[w]}" "${t_scale[v]}") | <= 1.2 |"
row "| the delta file applied to a raw image / to a pool | $t_apply_image / $t_apply_pool | $(ratio "$t_apply_image" "$t_apply_pool") | <= 1.5 |"
row "| tandem full 4 GiB create \\| apply (best of ${t_fulls[*]}) | $t_full | $(ratio "$t_full" "$t_fio_both") of the disk | <= 1.1 |"
row "| disk: fio reads 4 GiB and writes 4 GiB at once (1 MiB, depth 8; best of ${fio_both[*]}) | $t_fio_both | | |"
row "| btrfs full 4 GiB send \\| receive (+ sync) | $t_btrfs_full ($t_btrfs_full_sync) | $(ratio "$t_btrfs_full_sync" "$t_full")x tandem (with sync) | |"
first=${threads%%,*}
for n in ${threads//,/ }; do
  [[ -n ${t_workers[$n]:-} ]] || continue
  row "| create, 1 GiB of text in memory, $n cores and workers (best of 3) | ${t_workers[$n]} | $(ratio "${t_workers[$first]}" "${t_workers[$n]}")x on $first | 1 -> 2: >= 1.8 |"
done
row "| peak RSS: update create / apply; full create / apply (MiB) | $(peak "$work/create.time") / $(peak "$work/apply.time"); $(peak "$work/fcreate.time") / $(peak "$work/fapply.time") | | |"
row "| page faults of the update's create / apply (its last round) | $(faults "$work/create.time") / $(faults "$work/apply.time") | | |"
row ""
row "xxhsum -b (XXH128): $xxh; zstd -b1 -T1 on 256 MiB of the volume: $zstd_b"
finish
