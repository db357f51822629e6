# Shared by the end-to-end bench scripts (source it): options, devices, the
# machine, cold caches, and results as Markdown and JSON.
#
# Options every script takes (before its own):
#   --build DIR                 the build to run (default: build)
#   --source-device DEV         put the source pools (and peers' source side)
#   --destination-device DEV    on these block devices instead of files
#   --destroy-data              required with a device: everything on it goes
#   --out DIR                   results: DIR/NAME.md and DIR/NAME.json
#                               (default: bench/results)
# Everything else is left in ARGS for the script.

bench_name=$(basename "$0" .sh)
build=build src_dev="" dst_dev="" destroy=0 out_dir=bench/results
ARGS=()
while (($#)); do
  case $1 in
    --build) build=$2; shift 2 ;;
    --source-device) src_dev=$2; shift 2 ;;
    --destination-device) dst_dev=$2; shift 2 ;;
    --destroy-data) destroy=1; shift ;;
    --out) out_dir=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
build=$(realpath "$build")
T=$build/tools/tandem
D=$build/tools/tandem-delta
TD=$build/tools/tandemd
P=$build/bench/prep
[[ -x $T && -x $D ]] || { echo "$bench_name: no build in $build: run cmake and ninja first" >&2; exit 1; }

die() { echo "$bench_name: $*" >&2; exit 1; }

# A device named must be a block device, not mounted, and given up for it.
check_device() {
  local dev=$1
  [[ -b $dev ]] || die "$dev is not a block device"
  ((destroy)) || die "refusing to overwrite $dev: pass --destroy-data if everything on it may go"
  if lsblk -nro MOUNTPOINT "$dev" | grep -q .; then
    die "$dev (or a partition of it) is mounted: unmount it first"
  fi
}
[[ -n $src_dev ]] && check_device "$src_dev"
[[ -n $dst_dev ]] && check_device "$dst_dev"
[[ -n $src_dev && $src_dev == "$dst_dev" ]] && die "name two different devices"
if [[ -n $src_dev && -z $dst_dev ]] || [[ -z $src_dev && -n $dst_dev ]]; then
  die "name both --source-device and --destination-device, or neither"
fi
devices=0
[[ -n $src_dev ]] && devices=1

work=$(mktemp -d "${TMPDIR:-/tmp}/tandem-$bench_name-XXXXXX")
trap 'rm -rf "$work"' EXIT  # scripts with more to clean set their own
mkdir -p "$out_dir"
out_dir=$(realpath "$out_dir")

# The pool of a side: the device, or a file of SIZE in the work folder (made
# anew each time: a device's old pool is overwritten).
new_pool() {  # new_pool source|destination NAME SIZE -> prints the path
  local side=$1 name=$2 size=$3 dev
  [[ $side == source ]] && dev=$src_dev || dev=$dst_dev
  if [[ -n $dev ]]; then
    wipefs -qa "$dev" >/dev/null 2>&1 || true
    "$T" pool create "$dev" --force >/dev/null
    echo "$dev"
  else
    rm -f "$work/$name.pool"
    "$T" pool create "$work/$name.pool" --size "$size" >/dev/null
    echo "$work/$name.pool"
  fi
}

# Cold data, warm programs: drop the page cache, then read back in full the
# programs the timed steps run and their libraries (a --help pages in only
# the code it runs; the rest came from disk inside the timing, 20-40 ms a
# process on these VMs). A host that replicates on a schedule has its tools
# in memory, and fio's floors leave out its start too (fio times its jobs
# itself). `warm PROGRAM...` adds a peer's programs; drop_all drops the
# programs too.
warm_files=()
warm() {
  local p
  for p; do
    p=$(command -v "$p") || continue
    warm_files+=("$p")
    mapfile -t -O "${#warm_files[@]}" warm_files < <(ldd "$p" 2>/dev/null |
      awk '$3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
  done
}
warm "$T" "$D" "$TD"
drop_all() {
  sync
  echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
}
drop() {
  drop_all
  cat "${warm_files[@]}" >/dev/null
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# What a device is: model, size and queue settings (lsblk and sysfs).
describe_device() {  # prints one JSON object
  local dev=$1 name q
  name=$(lsblk -ndo NAME "$dev" 2>/dev/null | head -1)
  local parent
  parent=$(lsblk -ndo PKNAME "$dev" 2>/dev/null | head -1)
  q=/sys/block/${parent:-$name}/queue
  local backing=""
  [[ $name == loop* ]] && backing=$(cat "/sys/block/$name/loop/backing_file" 2>/dev/null)
  printf '{"path": "%s", "model": "%s", "size_bytes": %s, "rotational": %s, "scheduler": "%s", "nr_requests": %s, "max_sectors_kb": %s, "logical_block_size": %s, "physical_block_size": %s, "loop_backing_file": "%s"}' \
    "$dev" "$(lsblk -ndo MODEL "$dev" 2>/dev/null | xargs)" \
    "$(lsblk -bndo SIZE "$dev" 2>/dev/null || echo 0)" \
    "$(cat "$q/rotational" 2>/dev/null || echo null)" \
    "$(cat "$q/scheduler" 2>/dev/null | sed 's/.*\[\(.*\)\].*/\1/')" \
    "$(cat "$q/nr_requests" 2>/dev/null || echo null)" \
    "$(cat "$q/max_sectors_kb" 2>/dev/null || echo null)" \
    "$(cat "$q/logical_block_size" 2>/dev/null || echo null)" \
    "$(cat "$q/physical_block_size" 2>/dev/null || echo null)" \
    "$backing"
}

# The machine and where the data lives, as Markdown lines and JSON.
machine_json() {
  local cpu disks=""
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)
  if ((devices)); then
    disks="$(describe_device "$src_dev"), $(describe_device "$dst_dev")"
  else
    local fsdev
    fsdev=$(df --output=source "$work" | tail -1)
    disks="$(describe_device "$fsdev")"
  fi
  printf '{"nproc": %s, "cpu": "%s", "kernel": "%s", "files_in": "%s", "devices": [%s]}' \
    "$(nproc)" "$cpu" "$(uname -r)" "$( ((devices)) && echo "block devices" || echo "$work")" "$disks"
}

cases_json=() table=()
# record CASE SECONDS [KEY VALUE]...: one measured case (numbers and [arrays] as JSON).
record() {
  local name=$1 secs=$2
  shift 2
  local extra=""
  while (($# >= 2)); do
    if [[ $2 =~ ^-?[0-9]+(\.[0-9]+)?$ || $2 =~ ^\[.*\]$ ]]; then  # numbers, arrays
      extra+=", \"$1\": $2"
    else
      extra+=", \"$1\": \"$2\""
    fi
    shift 2
  done
  cases_json+=("{\"case\": \"$name\", \"seconds\": $secs$extra}")
}
# row "| a | b |": a line of the Markdown table.
row() { table+=("$1"); }

# Writes NAME.md (the table) and NAME.json (machine + cases) and prints the
# table.
finish() {
  local md=$out_dir/$bench_name.md json=$out_dir/$bench_name.json
  {
    echo "# $bench_name, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "nproc $(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs);" \
      "$( ((devices)) && echo "devices $src_dev -> $dst_dev" || echo "files in $(df --output=source "$work" | tail -1)")"
    echo
    printf '%s\n' "${table[@]}"
  } >"$md"
  {
    printf '{"bench": "%s", "date": "%s", "machine": %s, "cases": [\n' \
      "$bench_name" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(machine_json)"
    local i n=${#cases_json[@]}
    for ((i = 0; i < n; i++)); do
      printf '  %s%s\n' "${cases_json[i]}" "$( ((i + 1 < n)) && echo ,)"
    done
    printf ']}\n'
  } >"$json"
  cat "$md"
  echo
  echo "written: $md $json"
}
