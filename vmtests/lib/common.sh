# Sourced by vmtests/run: logging, servers, guests and the checks on their console logs.
# shellcheck shell=bash

log() { printf 'vmtests: %s\n' "$*" >&2; }
die() {
    printf 'vmtests: error: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
# Seconds between two now() values, to 0.01 s.
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# Background processes this run started, killed on exit.
PIDFILE=""
remember_pid() { echo "$1" >> "$PIDFILE"; }
kill_remembered() {
    [[ -n $PIDFILE && -f $PIDFILE ]] || return 0
    local pid
    while read -r pid; do
        kill "$pid" 2>/dev/null || true
    done < "$PIDFILE"
    : > "$PIDFILE"
}

wait_for_socket() {
    local sock=$1 pid=$2 _
    for _ in $(seq 1 200); do
        [[ -S $sock ]] && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# start_tessera SOCK LOG [serve options...]: sets SERVER_PID.
start_tessera() {
    local sock=$1 slog=$2
    shift 2
    rm -f "$sock"
    "$TESSERA" --store "$STORE" serve --listen "unix:$sock" "$@" > "$slog" 2>&1 &
    SERVER_PID=$!
    remember_pid "$SERVER_PID"
    wait_for_socket "$sock" "$SERVER_PID" || {
        tail -n 20 "$slog" >&2
        die "tessera serve did not listen on $sock"
    }
}

# start_nbdkit SOCK LOG nbdkit-arguments...: a read-only nbdkit; sets SERVER_PID.
start_nbdkit() { run_nbdkit -r "$@"; }
# start_nbdkit_writable SOCK LOG nbdkit-arguments...: the same without -r (use with the
# cow filter so the raw image is never modified).
start_nbdkit_writable() { run_nbdkit "" "$@"; }
run_nbdkit() {
    local ro=$1 sock=$2 slog=$3
    shift 3
    rm -f "$sock"
    # shellcheck disable=SC2086 # $ro is -r or nothing
    nbdkit $ro -f -U "$sock" "$@" > "$slog" 2>&1 &
    SERVER_PID=$!
    remember_pid "$SERVER_PID"
    wait_for_socket "$sock" "$SERVER_PID" || {
        tail -n 20 "$slog" >&2
        die "nbdkit did not listen on $sock"
    }
}

stop_server() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

nbd_drive() { # SOCK EXPORT ro|rw
    local ro=on
    [[ $3 == rw ]] && ro=off
    echo "file=nbd+unix:///$2?socket=$1,format=raw,if=virtio,readonly=$ro"
}
file_drive() { echo "file=$1,format=raw,if=virtio,readonly=on"; }

# Extra qemu arguments and kernel arguments for the next start_guest (kernelnbd's network).
GUEST_QEMU_ARGS=()
GUEST_APPEND=""

# start_guest LOG DRIVE ro|rw CASE NONCE: boots in the background; sets GUEST_PID and
# GUEST_START. The console goes to LOG, qemu's own messages to LOG.qemu.
start_guest() {
    local glog=$1 drive=$2 root=$3 case=$4 nonce=$5
    : > "$glog"
    GUEST_START=$(now)
    timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -machine pc -m 256 -nodefaults \
        -no-user-config -display none -monitor none -no-reboot \
        -kernel "$VMLINUZ" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 loglevel=4 tessera.root=$root tessera.case=$case tessera.nonce=$nonce $GUEST_APPEND" \
        -drive "$drive" "${GUEST_QEMU_ARGS[@]}" -serial "file:$glog" < /dev/null > "$glog.qemu" 2>&1 &
    GUEST_PID=$!
    remember_pid "$GUEST_PID"
}

# wait_guest LOG PID START CASE NONCE: waits for this boot's marker line and for qemu to
# exit. Sets BOOT_SECONDS to the time from qemu's start to the marker. Fails, with the console's tail,
# on a FAIL marker, on no marker (qemu's exit status means nothing: it exits 0 when the
# guest panics), or when qemu does not exit after the guest powered off.
wait_guest() {
    local glog=$1 pid=$2 start=$3 case=$4 nonce=$5 t="" line
    BOOT_SECONDS=""
    local re="TESSERA-BOOT-(OK|FAIL) case=$case nonce=$nonce"
    while :; do
        if line=$(grep -aE "$re" "$glog" | head -n 1) && [[ -n $line ]]; then
            t=$(elapsed "$start" "$(now)")
            break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if [[ -z $t ]]; then
        # qemu exited (or timed out) between two polls: look once more.
        line=$(grep -aE "$re" "$glog" | head -n 1) || true
        t=$(elapsed "$start" "$(now)")
    fi
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    if [[ -z $line ]]; then
        log "$case: no marker in $glog after ${t}s (qemu/timeout exit status $rc); console tail:"
        tail -n 40 "$glog" | sed 's/^/    | /' >&2
        sed 's/^/    qemu: /' "$glog.qemu" >&2
        return 1
    fi
    if [[ $line == TESSERA-BOOT-FAIL* ]]; then
        [[ ${QUIET:-0} == 1 ]] && return 1
        log "$case: guest reported failure; console tail:"
        tail -n 40 "$glog" | sed 's/^/    | /' >&2
        return 1
    fi
    if [[ $rc == 124 ]]; then
        log "$case: marker seen but qemu did not power off within ${TIMEOUT}s"
        return 1
    fi
    # shellcheck disable=SC2034 # read by the cases in vmtests/run
    BOOT_SECONDS=$t
}

# boot LOG DRIVE ro|rw CASE NONCE: start_guest + wait_guest.
boot() {
    start_guest "$@"
    wait_guest "$1" "$GUEST_PID" "$GUEST_START" "$4" "$5"
}

# The OK marker line of a console log.
marker() { grep -aE "^TESSERA-BOOT-OK case=$2 nonce=$3( |$)" "$1" | head -n 1 | tr -d '\r'; }

# expect_fields LOG CASE NONCE key=value...: every pair must appear in the marker line.
expect_fields() {
    local glog=$1 case=$2 nonce=$3 line kv bad=0
    shift 3
    line=$(marker "$glog" "$case" "$nonce")
    [[ -n $line ]] || {
        log "$case: no OK marker in $glog"
        return 1
    }
    for kv in "$@"; do
        if [[ " $line " != *" $kv "* ]]; then
            log "$case: expected $kv in: $line"
            bad=1
        fi
    done
    return "$bad"
}

# Fields every boot of an image of base + overlay NAME must report.
image_fields() { # NAME
    echo "image=$1 motd=image_$1 sums=$(expected_sums "$SRC/base" "$SRC/overlay-$1")" \
        "stat=$(wc -l < "$SRC/base/testdata/meta/STAT")" \
        "links=$(wc -l < "$SRC/base/testdata/meta/LINKS")" \
        "lookups=$(wc -l < "$SRC/base/testdata/meta/BIG-SAMPLE")"
}

new_nonce() { head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# Drop FILES from the host page cache (fsync first: dirty pages cannot be dropped).
evict() {
    local f
    for f in "$@"; do
        sync "$f"
        dd if="$f" iflag=nocache count=0 status=none
    done
}

# Bytes of FILES resident in the host page cache.
cached_bytes() {
    fincore --bytes --noheadings --output RES "$@" | awk '{ s += $1 } END { print s + 0 }'
}
# A process's resident memory as "ANON/FILE" MiB.
rss_split() {
    awk '/^RssAnon/ { a = $2 } /^RssFile/ { f = $2 } END { printf "%.1f/%.1f", a / 1024, f / 1024 }' \
        "/proc/$1/status"
}
file_bytes() { du -cb --apparent-size "$@" | tail -n 1 | cut -f1; }
alloc_bytes() { du -cB1 "$@" | tail -n 1 | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
