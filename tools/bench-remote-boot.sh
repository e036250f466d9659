# Sourced by `tools/bench-remote boot` (Ceph is up, fetch_env set, the vmtests helpers
# loaded): boots of the vmtests guest from a remote image, lazily without and with the
# prefetch trace, after a whole `store pull`, and from the local store. Reported, not asserted.
# shellcheck shell=bash

BULK_MIB=${BULK_MIB:-128}
BOOT_REPEAT=${BOOT_REPEAT:-3}
url=s3://bench/boot

prepare_kernel
make_base_tree "$SRC/base"
make_remote_image "$work/a" "$BULK_MIB"
data=$(store_data_bytes "$work/a")
t=$(now)
"$bin" --store "$work/a" store push remote --to "$url" > /dev/null
echo "image remote: $(mib "$data") MiB of object data (${BULK_MIB} MiB never read by the guest);" \
  "pushed in $(since "$t") s"

# boot_on STORE LABEL [serve options…]: drops the host's caches, serves STORE, boots the guest
# from it and stops the server; appends the time to the marker to times[LABEL].
declare -A times
boot_on() {
  local store=$1 label=$2 sock="$work/boot.sock" nonce glog="$LOGS/$2.log"
  shift 2
  drop_caches
  STORE=$store fetch_env start_tessera "$sock" "$LOGS/$label.serve.log" --export remote "$@"
  nonce=$(new_nonce)
  boot "$glog" "$(nbd_drive "$sock" remote ro)" ro "$label" "$nonce" || exit 1
  # shellcheck disable=SC2046
  expect_fields "$glog" "$label" "$nonce" $(image_fields remote) root=ro || exit 1
  stop_server "$SERVER_PID"
  times[$label]+=" $BOOT_SECONDS"
}

declare -A fetched held
for r in $(seq 1 "$BOOT_REPEAT"); do
  boot_on "$work/a" local

  # (a) No trace: delete the one an earlier round left; this B leaves a new one when stopped.
  s3cmd -q -c "$S3CFG" del "$url/traces/remote" > /dev/null 2>&1 || true
  rm -rf "$work/b"
  boot_on "$work/b" lazy --remote "$url"
  fetched[lazy]+=" $(fetched_bytes "$LOGS/lazy.serve.log")"
  held[lazy]+=" $(store_data_bytes "$work/b")"
  [ -s "$work/b/traces/remote" ] || { echo "B left no trace" >&2; exit 1; }

  # (b) A fresh host E replays B's trace from the moment it starts serving.
  rm -rf "$work/e"
  boot_on "$work/e" traced --remote "$url"
  fetched[traced]+=" $(fetched_bytes "$LOGS/traced.serve.log")"
  held[traced]+=" $(store_data_bytes "$work/e")"

  # (c) The whole image first, then a local boot.
  rm -rf "$work/c"
  drop_caches
  t=$(now)
  fetch_env "$bin" --store "$work/c" store pull remote --from "$url" > /dev/null
  pull=$(elapsed "$t" "$(now)")
  times[pull]+=" $pull"
  boot_on "$work/c" pulled
  last=${times[pulled]##* }
  times[pull+boot]+=" $(awk -v a="$pull" -v b="$last" 'BEGIN { printf "%.2f", a + b }')"
done

least() { tr ' ' '\n' | grep . | sort -g | head -n 1; }
local_m=$(median <<< "${times[local]}")
local_l=$(least <<< "${times[local]}")
share() { ratio "$((100 * $(median <<< "$1")))" "$data"; }
echo
echo "Boot of the vmtests guest from image remote ($(mib "$data") MiB of object data; the guest reads"\
  "$(mib "$((data - BULK_MIB * 1048576))") MiB of it in full and never opens the other $BULK_MIB MiB)," \
  "S3 round trip $((2 * ${DELAY_MS:-0})) ms added; $BOOT_REPEAT rounds: median and least time"
printf '  %-30s %7s %8s %7s %8s %12s %9s   %s\n' way "median" "/ local" "least" "/ local" "fetched MiB" "% of data" "all times (s)"
for way in local lazy traced pull+boot; do
  case $way in
    local) label="(d) local store of A" ;;
    lazy) label="(a) lazy from B, no trace" ;;
    traced) label="(b) lazy from E, B's trace" ;;
    pull+boot) label="(c) store pull, then boot" ;;
  esac
  m=$(median <<< "${times[$way]}")
  l=$(least <<< "${times[$way]}")
  f=- p=-
  if [ -n "${fetched[$way]:-}" ]; then
    f=$(mib "$(median <<< "${fetched[$way]}")")
    p=$(share "${fetched[$way]}")
  fi
  printf '  %-30s %7s %8s %7s %8s %12s %9s  %s\n' "$label" "$m" "$(ratio "$m" "$local_m")" "$l" \
    "$(ratio "$l" "$local_l")" "$f" "$p" "${times[$way]}"
done
read_bytes=$((data - BULK_MIB * 1048576))
echo "  (c) pull alone:${times[pull]} s; held on disk after (a): $(mib "$(median <<< "${held[lazy]}")") MiB," \
  "after (b): $(mib "$(median <<< "${held[traced]}")") MiB; fetched / what the guest reads:" \
  "(a) $(ratio "$(median <<< "${fetched[lazy]}")" "$read_bytes"), (b) $(ratio "$(median <<< "${fetched[traced]}")" "$read_bytes")"
# The proxy's count of what crossed it.
[ -z "${proxy_pid:-}" ] || { kill "$proxy_pid"; wait "$proxy_pid" || true; }
