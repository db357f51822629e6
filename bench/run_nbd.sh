#!/usr/bin/env bash
# tandemd's NBD export against nbdkit's file plugin serving a plain file on
# the same disk ($TMPDIR, default /tmp), in one run:
#   - nbdcopy of a 4 GiB file (bench/prep: half random, half text) into a
#     4 GiB volume export and into nbdkit's file (both with --flush), and
#     back out to null:, caches dropped before each;
#   - fio's nbd engine against both: random 64 KiB read and write at queue
#     depth 32, random 4 KiB read and write at depth 32 (tandem with a
#     4 KiB-chunk pool, and with the 64 KiB one to show what the chunk size
#     costs), sequential 1 MiB read and write at depth 8;
#   - the p99 latency of 4 KiB reads from a mirror destination's read-only
#     export, idle and while updates (64 MiB of changes each) apply
#     underneath it.
# Usage (root: drop_caches):
#   bench/run_nbd.sh [--build DIR] [--seconds N per fio case] [--out DIR]
#     [--source-device DEV --destination-device DEV --destroy-data]
# With devices, site a's pool (the export measured) is the source device and
# site b's (the mirror) the destination; the 4 KiB-chunk site c and nbdkit's
# file stay in the work folder. Writes bench/results/run_nbd.md and .json.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
secs=10
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case $1 in
    --seconds) secs=$2; shift 2 ;;
    *) die "unknown option $1 (see the top of $0)" ;;
  esac
done
for tool in nbdcopy:libnbd-bin nbdkit:nbdkit fio:fio; do
  command -v "${tool%%:*}" >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool##*:}" >/dev/null
done
w=$work
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$w"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Two sites: a (the volume written and read here, and the update source)
# and b (the mirror destination), plaintext on loopback.
declare -A pool_of
site() {  # NAME CHUNK [source|destination]
  local name=$1 chunk=$2 side=${3:-}
  if [[ -n $side ]] && ((devices)); then
    pool_of[$name]=$(new_pool "$side" "$name" 12G)
  else
    pool_of[$name]=$w/$name.pool
    "$T" pool create "$w/$name.pool" --size 12G --chunk-size "$chunk" >/dev/null
  fi
  nbd_port[$name]=$(free_port)
  peer_port[$name]=$(free_port)
}
declare -A nbd_port peer_port
site a 64K source
site b 64K destination
site c 4K
config() {  # NAME PEER
  cat >"$w/$1.toml" <<EOF
site = "$1"
listen = "127.0.0.1:${peer_port[$1]}"
control = "$1.sock"
nbd = "127.0.0.1:${nbd_port[$1]}"
insecure_plaintext = true
[pools]
p = "${pool_of[$1]}"
[peers]
$2 = "127.0.0.1:${peer_port[$2]}"
EOF
}
config a b
config b a
config c a
for s in a b c; do
  "$TD" --config "$w/$s.toml" 2>"$w/$s.log" &
  pids+=($!)
done
for s in a b c; do
  for _ in $(seq 100); do [[ -S $w/$s.sock ]] && break; sleep 0.1; done
done
via() { local s=$1; shift; "$T" --daemon "$w/$s.sock" "$@"; }
via a volume create --pool p vol --size 4G >/dev/null
via c volume create --pool p vol --size 4G >/dev/null
truncate -s 4G "$w/plain.img"
"$P" fill-file "$w/src.img" 4G >/dev/null
kport=$(free_port)
nbdkit --exit-with-parent -f -p "$kport" -i 127.0.0.1 file "$w/plain.img" cache=none \
  2>"$w/nbdkit.log" &
pids+=($!)
sleep 0.5
tandem_uri="nbd://127.0.0.1:${nbd_port[a]}/p/vol"
small_uri="nbd://127.0.0.1:${nbd_port[c]}/p/vol"
nbdkit_uri="nbd://127.0.0.1:$kport/"

row "nbdcopy of 4 GiB"
row ""
row "| copy | tandemd | nbdkit file | tandemd / nbdkit (throughput) |"
row "|---|---|---|---|"
copy() {  # SRC DST -> seconds
  drop
  local t0 t1
  t0=$(now)
  nbdcopy --flush "$1" "$2"
  t1=$(now)
  echo "$t1 - $t0" | bc -l
}
ti=$(copy "$w/src.img" "$tandem_uri")
ki=$(copy "$w/src.img" "$nbdkit_uri")
to=$(copy "$tandem_uri" null:)
ko=$(copy "$nbdkit_uri" null:)
row "$(printf '| into the export | %.2f s (%.0f MiB/s) | %.2f s (%.0f MiB/s) | %.2f |' \
  "$ti" "$(echo "4096 / $ti" | bc -l)" "$ki" "$(echo "4096 / $ki" | bc -l)" "$(echo "$ki / $ti" | bc -l)")"
row "$(printf '| out of the export | %.2f s (%.0f MiB/s) | %.2f s (%.0f MiB/s) | %.2f |' \
  "$to" "$(echo "4096 / $to" | bc -l)" "$ko" "$(echo "4096 / $ko" | bc -l)" "$(echo "$ko / $to" | bc -l)")"
row ""
record nbdcopy_into_tandemd_4g "$ti"
record nbdcopy_into_nbdkit_4g "$ki"
record nbdcopy_out_of_tandemd_4g "$to"
record nbdcopy_out_of_nbdkit_4g "$ko"

# fio's nbd engine: IOPS, bandwidth, p99 completion latency.
fio_nbd() {  # URI RW BS DEPTH -> "iops MiB/s p99_us"
  # nbdkit's file is buffered: without this its reads come from memory.
  drop
  fio --name=nbd --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" \
    --size=4G --time_based --runtime="$secs" --output-format=json 2>/dev/null |
    python3 -c '
import json, sys
text = sys.stdin.read()  # after "fio: connected to NBD server"
j = json.loads(text[text.index("{"):])["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
p = d.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000
print("%.0f %.0f %.0f" % (d["iops"], d["bw"] / 1024, p))'
}
row "fio, nbd engine (${secs} s each)"
row ""
row "| case | depth | tandemd | nbdkit file | tandemd / nbdkit |"
row "|---|---|---|---|---|"
fio_row() {  # LABEL URI RW BS DEPTH
  local label=$1 uri=$2 rw=$3 bs=$4 depth=$5
  read -r ti tb tp < <(fio_nbd "$uri" "$rw" "$bs" "$depth")
  read -r ki kb kp < <(fio_nbd "$nbdkit_uri" "$rw" "$bs" "$depth")
  local key=${label// /_}
  record "fio_tandemd_$key" "$secs" depth "$depth" iops "$ti" mib_per_s "$tb" p99_us "$tp"
  record "fio_nbdkit_$key" "$secs" depth "$depth" iops "$ki" mib_per_s "$kb" p99_us "$kp"
  if [[ $bs == 1M ]]; then
    row "$(printf '| %s | %s | %s MiB/s (p99 %s us) | %s MiB/s (p99 %s us) | %.2f |' \
      "$label" "$depth" "$tb" "$tp" "$kb" "$kp" "$(echo "$tb / $kb" | bc -l)")"
  else
    row "$(printf '| %s | %s | %s IOPS (p99 %s us) | %s IOPS (p99 %s us) | %.2f |' \
      "$label" "$depth" "$ti" "$tp" "$ki" "$kp" "$(echo "$ti / $ki" | bc -l)")"
  fi
}
fio_row "random 64 KiB read" "$tandem_uri" randread 64k 32
fio_row "random 64 KiB write" "$tandem_uri" randwrite 64k 32
fio_row "random 4 KiB read, 4 KiB chunks" "$small_uri" randread 4k 32
fio_row "random 4 KiB write, 4 KiB chunks" "$small_uri" randwrite 4k 32
fio_row "random 4 KiB read, 64 KiB chunks" "$tandem_uri" randread 4k 32
fio_row "random 4 KiB write, 64 KiB chunks" "$tandem_uri" randwrite 4k 32
fio_row "sequential 1 MiB read" "$tandem_uri" read 1M 8
fio_row "sequential 1 MiB write" "$tandem_uri" write 1M 8
row ""
via a relationship create --source a/p:vol --destination b/p:vol >/dev/null
via b relationship initialize b/p:vol >/dev/null
ro_uri="nbd://127.0.0.1:${nbd_port[b]}/p/vol"
lat() { fio_nbd "$ro_uri" randread 4k 1 | awk '{print $3}'; }
idle=$(lat)
# The same with two CPU hogs and no update: how much of the busy tail is
# waiting for a core.
yes >/dev/null &
hog1=$!
yes >/dev/null &
hog2=$!
pids+=("$hog1" "$hog2")
hogs=$(lat)
kill "$hog1" "$hog2" 2>/dev/null || true
updates=0
(
  seed=1
  while :; do
    head -c 64M /dev/urandom | via a write --pool p vol --offset "$(((seed % 60) * 64))M" >/dev/null
    via a relationship update a/p:vol >/dev/null
    seed=$((seed + 1))
    echo >>"$w/updates"
  done
) &
updater=$!
pids+=($updater)
busy=$(lat)
kill "$updater" 2>/dev/null || true
updates=$(wc -l <"$w/updates" 2>/dev/null || echo 0)
record read_p99_idle_us "$secs" p99_us "$idle"
record read_p99_two_cpu_hogs_us "$secs" p99_us "$hogs"
record read_p99_during_updates_us "$secs" p99_us "$busy" updates "$updates"
row "4 KiB reads from a mirror destination while updates apply underneath"
row ""
row "| | p99, 4 KiB random read, depth 1 |"
row "|---|---|"
row "| idle | $idle us |"
row "| two CPU hogs, no updates | $hogs us |"
row "| while updates apply ($updates updates of 64 MiB in ${secs} s) | $busy us |"
row ""
for s in a b c; do
  pid=$(pgrep -f "tandemd --config $w/$s.toml" | head -1)
  m=$(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status")
  row "- tandemd $s: $m MiB peak"
  record "tandemd_${s}_peak_rss" 0 mib "$m"
done
finish
