#!/usr/bin/env bash
# The daemon pair end to end, every figure from this one run on one disk:
# a 4 GiB volume of mixed content (bench/prep: half random, half text), its
# baseline, then updates carrying 1% of its 64 KiB chunks (655, random; three
# rounds with seeds 7, 8, 9, every tool the same; the median is the figure),
#   - through two tandemd on 127.0.0.1 (site b pulls from site a), with
#     TLS 1.3 (certificates) and with insecure_plaintext;
#   - by today's in-process `tandem relationship update` on two pool files;
#   - by btrfs send | socat | btrfs receive over 127.0.0.1 TCP, between two
#     loop-mounted btrfs (+ sync: durable, as tandem's receive is);
#   - by rsync through its daemon on 127.0.0.1;
# and what the disk allows for the baseline: fio reading 4 GiB and writing
# 4 GiB at the same time (O_DIRECT, io_uring, 1 MiB, QD8), run first and last,
# the faster counting. Caches are dropped before every timed step. Each
# daemon's peak RSS comes from /usr/bin/time.
# With TANDEM_BENCH_STRACE=1, strace -c counts each daemon's socket reads and
# writes during the baseline (they slow it: its time is then not a figure).
# Usage (root: drop_caches, loop devices, mounts):
#   bench/run_daemons.sh [--build DIR] [--out DIR]
#     [--source-device DEV --destination-device DEV --destroy-data]
# With devices, site a's pool, btrfs and rsync source live on the source
# device and site b's on the destination (everything on them is lost), and
# fio reads and writes them. Writes bench/results/run_daemons.md and .json.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
(( ${#ARGS[@]} == 0 )) || die "unknown option ${ARGS[0]} (see the top of $0)"
for tool in mkfs.btrfs:btrfs-progs rsync:rsync fio:fio socat:socat openssl:openssl \
  /usr/bin/time:time strace:strace; do
  command -v "${tool%%:*}" >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool##*:}" >/dev/null
done

pids=() mounts=() loops=()
cleanup() {
  for p in "${pids[@]}"; do
    pkill -P "$p" 2>/dev/null || true  # the daemons under /usr/bin/time
    kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  for m in "${mounts[@]+"${mounts[@]}"}"; do umount "$m" 2>/dev/null || true; done
  for l in "${loops[@]+"${loops[@]}"}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
min() { printf '%s\n' "$@" | sort -n | head -1; }
seeds=(7 8 9)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }


# A CA and a certificate per site (CN and DNS name = the site name).
cd "$work"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
  -out ca.crt -subj /CN=bench-ca -days 2 2>/dev/null
for s in a b; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $s.key \
    -out $s.csr -subj /CN=$s 2>/dev/null
  printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth,clientAuth\n' $s >$s.ext
  openssl x509 -req -in $s.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $s.crt \
    -days 2 -extfile $s.ext 2>/dev/null
done
cd - >/dev/null

# daemons MODE: configs for sites a and b (MODE tls or plain), then started
# under /usr/bin/time (peak RSS printed when they stop).
pa="" pb=""
start() {
  local s=$1
  /usr/bin/time -f "%M" -o "$work/$s.rss" "$TD" --config "$work/$s.toml" 2>"$work/$s.log" &
  pids+=($!)
  eval "pid_$s=$!"
  for _ in $(seq 200); do
    "$T" --daemon "$work/$s.sock" status --pool p >/dev/null 2>&1 && return
    sleep 0.05
  done
  echo "tandemd $s did not start:"; cat "$work/$s.log"; exit 1
}
stop() {
  local s=$1 p
  eval "p=\$pid_$s"
  # $p is /usr/bin/time, which a signal would end without its daemon.
  pkill -TERM -P "$p"
  wait "$p" || true
}
configure() {
  local mode=$1
  pa=$(port) pb=$(port)
  for s in a b; do
    local other=b me=$pa them=$pb
    [[ $s == b ]] && other=a me=$pb them=$pa
    {
      echo "site = \"$s\""
      echo "listen = \"127.0.0.1:$me\""
      echo "control = \"$s.sock\""
      if [[ $mode == tls ]]; then
        printf '[tls]\ncert = "%s.crt"\nkey = "%s.key"\nca = "ca.crt"\n' $s $s
      else
        echo "insecure_plaintext = true"
      fi
      local pool=$pa_pool
      [[ $s == b ]] && pool=$pb_pool
      printf '[pools]\np = "%s"\n[peers]\n%s = "127.0.0.1:%s"\n' "$pool" $other $them
    } >"$work/$s.toml"
  done
}

# What the disk allows for the baseline: fio reading 4 GiB (the volume's
# content, from bench/prep) and writing 4 GiB at the same time (devices: the
# source device read, the destination written).
t_disks=()
disk() {
  local in=$work/fio.in out=$work/fio.out
  if ((devices)); then
    in=$src_dev out=$dst_dev
    [[ -f $work/filled ]] || { dd if=/dev/urandom of="$src_dev" bs=16M count=256 oflag=direct status=none; touch "$work/filled"; }
  else
    [[ -f $work/fio.in ]] || $P fill-file "$work/fio.in" 4G
  fi
  drop
  local s
  s=$(now)
  fio --name=read --filename="$in" --rw=read --bs=1M --size=4G \
    --ioengine=io_uring --direct=1 --iodepth=8 \
    --name=write --filename="$out" --rw=write --bs=1M --size=4G \
    --ioengine=io_uring --direct=1 --iodepth=8 --output-format=terse >/dev/null
  t_disks+=("$(elapsed "$s")")
  echo "fio: ${t_disks[-1]} s"
  rm -f "$work/fio.out"
}
echo "## what the disk allows: fio reading 4 GiB and writing 4 GiB at once"
disk

declare -A base update updates rss_a rss_b
for mode in tls plain; do
  echo "## through two tandemd, $mode"
  pa_pool=$(new_pool source a 12G)
  pb_pool=$(new_pool destination b 12G)
  $P fill-pool "$pa_pool" v 4G
  configure $mode
  start a
  start b
  $T --daemon "$work/a.sock" relationship create --source a/p:v --destination b/p:v >/dev/null
  drop
  tracers=()
  if [[ ${TANDEM_BENCH_STRACE:-0} == 1 ]]; then
    for site in a b; do
      eval "p=\$pid_$site"
      strace -f -c -e trace=read,write,recvfrom,sendto -o "$work/$site.strace" \
        -p "$(pgrep -P "$p")" 2>/dev/null &
      tracers+=($!)
    done
    sleep 1
  fi
  s=$(now)
  $T --daemon "$work/b.sock" relationship initialize b/p:v >/dev/null
  base[$mode]=$(elapsed "$s")
  if ((${#tracers[@]})); then
    kill -INT "${tracers[@]}"
    wait "${tracers[@]}" 2>/dev/null || true
    for site in a b; do
      echo "site $site, syscalls during the baseline:"
      awk '$NF ~ /^(read|write|recvfrom|sendto)$/ { print "  " $NF, $4 }' \
        "$work/$site.strace"
    done
  fi
  # Each change: written with the daemon of site a stopped (prep opens the
  # pool file itself), the same seeds as every other tool gets.
  times=()
  for seed in "${seeds[@]}"; do
    stop a
    $P change-pool "$pa_pool" v 655 65536 "$seed" >/dev/null
    start a
    drop
    s=$(now)
    $T --daemon "$work/b.sock" relationship update b/p:v >/dev/null
    times+=("$(elapsed "$s")")
    [[ $($T --daemon "$work/a.sock" digest --pool p v) == $($T --daemon "$work/b.sock" digest --pool p v) ]] ||
      { echo "daemons: digests differ"; exit 1; }
  done
  update[$mode]=$(median "${times[@]}")
  updates[$mode]="${times[*]}"
  wire=$($T --daemon "$work/b.sock" status b/p:v --json |
    awk -F': ' '/"last_transfer_bytes"/ {gsub(",", "", $2); print $2}')
  stop a
  stop b
  rss_a[$mode]=$(($(cat "$work/a.rss") / 1024))
  rss_b[$mode]=$(($(cat "$work/b.rss") / 1024))
  echo "baseline ${base[$mode]} s, updates ${updates[$mode]} s ($((wire / 1024)) KiB on the wire);" \
    "peak RSS a ${rss_a[$mode]} MiB, b ${rss_b[$mode]} MiB"
done

echo "## in process: tandem relationship update on two pools"
pa_pool=$(new_pool source a 12G)
pb_pool=$(new_pool destination b 12G)
$P fill-pool "$pa_pool" v 4G
$T relationship create --source "$pa_pool:v" --destination "$pb_pool:v" >/dev/null
drop
s=$(now)
$T relationship initialize "$pa_pool:v" >/dev/null
t_local_base=$(elapsed "$s")
times=()
for seed in "${seeds[@]}"; do
  $P change-pool "$pa_pool" v 655 65536 "$seed" >/dev/null
  drop
  s=$(now)
  $T relationship update "$pa_pool:v" >/dev/null
  times+=("$(elapsed "$s")")
done
t_local=$(median "${times[@]}")
echo "baseline $t_local_base s, updates ${times[*]} s"
rm -f "$work"/{a,b}.pool

echo "## btrfs send | socat | btrfs receive over 127.0.0.1"
for side in A B; do
  if ((devices)); then
    loop=$src_dev
    [[ $side == B ]] && loop=$dst_dev
  else
    truncate -s 12G "$work/btrfs$side.img"
    loop=$(losetup --find --show "$work/btrfs$side.img")
    loops+=("$loop")
  fi
  mkfs.btrfs -f -q "$loop" >/dev/null 2>&1
  mkdir -p "$work/$side"
  mount "$loop" "$work/$side"
  mounts+=("$work/$side")
done
btrfs -q subvolume create "$work/A/sv"
$P fill-file "$work/A/sv/vol.img" 4G
btrfs -q subvolume snapshot -r "$work/A/sv" "$work/A/base"
over_tcp() {  # SEND ARGS...: btrfs send ARGS | socat | btrfs receive B
  local p
  p=$(port)
  socat -u TCP-LISTEN:$p,bind=127.0.0.1,reuseaddr - | btrfs -q receive "$work/B" &
  local recv=$!
  sleep 0.2
  btrfs -q send "$@" | socat -u - TCP:127.0.0.1:$p
  wait $recv
}
drop
s=$(now)
over_tcp "$work/A/base"
sync -f "$work/B"
t_btrfs_base=$(elapsed "$s")
times=() times_sync=() parent=base
for seed in "${seeds[@]}"; do
  $P change-file "$work/A/sv/vol.img" 655 65536 "$seed" >/dev/null
  drop
  s=$(now)
  btrfs -q subvolume snapshot -r "$work/A/sv" "$work/A/new$seed"
  over_tcp -p "$work/A/$parent" "$work/A/new$seed"
  times+=("$(elapsed "$s")")
  sync -f "$work/B"
  times_sync+=("$(elapsed "$s")")
  cmp "$work/A/new$seed/vol.img" "$work/B/new$seed/vol.img" || { echo "btrfs: copies differ"; exit 1; }
  parent=new$seed
done
t_btrfs=$(median "${times[@]}")
t_btrfs_sync=$(median "${times_sync[@]}")
echo "baseline $t_btrfs_base s (with sync); updates ${times[*]} s, ${times_sync[*]} s with sync"
# rsync: on the btrfs of each device, or in the work folder.
if ((devices)); then
  mkdir -p "$work/A/rs" "$work/B/rs"
else
  for m in "${mounts[@]}"; do umount "$m"; done
  for l in "${loops[@]}"; do losetup -d "$l"; done
  mounts=() loops=()
  rm -f "$work"/btrfs*.img
fi

echo "## rsync through its daemon on 127.0.0.1"
mkdir -p "$work/rs"
((devices)) && ln -s "$work/A/rs" "$work/rs/src" && ln -s "$work/B/rs" "$work/rs/dst"
mkdir -p "$work/rs/src/" "$work/rs/dst/"
$P fill-file "$work/rs/src/vol.img" 4G
rport=$(port)
cat >"$work/rsyncd.conf" <<EOF
address = 127.0.0.1
port = $rport
use chroot = false
[bench]
path = $work/rs/dst
read only = false
uid = root
gid = root
EOF
rsync --daemon --no-detach --config="$work/rsyncd.conf" &
pids+=($!)
sleep 1
drop
s=$(now)
rsync --inplace "$work/rs/src/vol.img" "rsync://127.0.0.1:$rport/bench/vol.img"
sync -f "$work/rs/dst"
t_rsync_base=$(elapsed "$s")
times=()
for seed in "${seeds[@]}"; do
  $P change-file "$work/rs/src/vol.img" 655 65536 "$seed" >/dev/null
  drop
  s=$(now)
  rsync --inplace --no-whole-file --ignore-times "$work/rs/src/vol.img" \
    "rsync://127.0.0.1:$rport/bench/vol.img"
  times+=("$(elapsed "$s")")
  cmp "$work/rs/src/vol.img" "$work/rs/dst/vol.img" || { echo "rsync: copies differ"; exit 1; }
done
t_rsync=$(median "${times[@]}")
echo "baseline $t_rsync_base s (with sync); updates ${times[*]} s"

echo "## what the disk allows, again"
disk
rm -rf "$work/rs" "$work/fio.in"
t_disk=$(min "${t_disks[@]}")

for m in tls plain; do
  record "daemons_${m}_baseline_4g" "${base[$m]}" site_a_peak_rss_mib "${rss_a[$m]}" site_b_peak_rss_mib "${rss_b[$m]}"
  record "daemons_${m}_update_1pct_median" "${update[$m]}" rounds "${updates[$m]}"
done
record in_process_baseline_4g "$t_local_base"
record in_process_update_1pct_median "$t_local"
record btrfs_tcp_baseline_4g_sync "$t_btrfs_base"
record btrfs_tcp_update_1pct_median "$t_btrfs" with_sync_seconds "$t_btrfs_sync"
record rsync_baseline_4g_sync "$t_rsync_base"
record rsync_update_1pct_median "$t_rsync"
record fio_read_and_write_4g_at_once "$t_disk"
row "| run | baseline 4 GiB, s | update 1%, s (median of 3) |"
row "|---|---|---|"
row "| tandemd pair, TLS 1.3 | ${base[tls]} | ${update[tls]} |"
row "| tandemd pair, plaintext | ${base[plain]} | ${update[plain]} |"
row "| tandem in process (relationship update) | $t_local_base | $t_local |"
row "| btrfs send \\| socat \\| receive (+ sync) | $t_btrfs_base | $t_btrfs ($t_btrfs_sync) |"
row "| rsync daemon | $t_rsync_base | $t_rsync |"
row "| fio read 4 GiB + write 4 GiB at once (faster of 2) | $t_disk | |"
row ""
row "| goal | figure |"
row "|---|---|"
row "| update with TLS / in process (<= 1.15) | $(ratio "${update[tls]}" "$t_local") |"
row "| btrfs over TCP / update with TLS (>= 2) | $(ratio "$t_btrfs" "${update[tls]}") ($(ratio "$t_btrfs_sync" "${update[tls]}") with sync) |"
row "| rsync / update with TLS | $(ratio "$t_rsync" "${update[tls]}") |"
row "| baseline with TLS / plaintext (<= 1.15) | $(ratio "${base[tls]}" "${base[plain]}") |"
row "| disk / baseline with TLS (>= 0.80) | $(ratio "$t_disk" "${base[tls]}") |"
row "| peak RSS, TLS run: site a / site b (< 128 MiB each) | ${rss_a[tls]} / ${rss_b[tls]} MiB |"
row "| peak RSS, plaintext run: site a / site b | ${rss_a[plain]} / ${rss_b[plain]} MiB |"
finish
