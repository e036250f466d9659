# Sourced by vmtests/run and tools/bench-remote: a throwaway Ceph S3 gateway (tools/ceph-s3)
# and an image shaped like a fleet's, whose guest reads only a part of it.
#
# The image `remote` is the test root every case boots (base + its own overlay) plus a bulk
# tree of random files the guest never opens: a real root holds much that a boot does not
# touch, and without it "fetched only what was read" could not be told from "fetched all".
# shellcheck shell=bash

# MiB of never-read data in the image `remote` (files of 4 MiB).
REMOTE_BULK_MIB=${VMTESTS_REMOTE_BULK_MIB:-48}

CEPH_PACKAGES=(ceph-mon ceph-osd radosgw s3cmd)

# The Ceph binaries this needs that are missing, space-separated (empty: all there).
ceph_missing() {
    local t missing=()
    for t in "${CEPH_PACKAGES[@]}"; do
        command -v "$t" > /dev/null || missing+=("$t")
    done
    echo "${missing[*]}"
}

port_free() { ! (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }

# ceph_start DIR BUCKET: starts the engine with its state in DIR; prints tools/ceph-s3's
# KEY=VALUE lines. A fresh cluster now and then fails to come up (its OSD refused by the
# monitor); like tests/remote.rs, try three times, each on other ports, stopping what a
# failed try left.
ceph_start() {
    local dir=$1 bucket=$2 try port
    for try in 1 2 3; do
        for _ in $(seq 50); do
            port=$((20000 + RANDOM % 30000))
            # tools/ceph-s3 puts the monitor one port below the gateway.
            port_free "$port" && port_free $((port - 1)) && break
        done
        if "$REPO/tools/ceph-s3" start "$dir" "$port" "$bucket" 2> "$dir.err.$try"; then
            return 0
        fi
        log "tools/ceph-s3 start failed (try $try of 3): $(tail -n 3 "$dir.err.$try" | tr '\n' ' ')"
        "$REPO/tools/ceph-s3" stop "$dir" || true
        rm -rf "$dir"
    done
    return 1
}

ceph_stop() { [[ ! -d $1 ]] || "$REPO/tools/ceph-s3" stop "$1" || true; }

# make_bulk_tree DIR MIB: MIB MiB of random files under DIR/bulk.
make_bulk_tree() {
    local d=$1 mib=$2 n
    mkdir -p "$d/bulk"
    for n in $(seq 1 $(((mib + 3) / 4))); do
        head -c 4M /dev/urandom > "$d/bulk/blob-$n.bin"
    done
}

# make_remote_image STORE BULK_MIB: imports base + overlay-remote + BULK_MIB of bulk into
# STORE as image `remote` (SRC/base must exist; overlay-remote and the bulk are made here).
make_remote_image() {
    local store=$1 mib=$2 base ov bulk
    [[ -d $SRC/overlay-remote ]] || make_overlay_tree "$SRC/overlay-remote" remote
    rm -rf "$SRC/bulk-remote"
    make_bulk_tree "$SRC/bulk-remote" "$mib"
    base=$("$TESSERA" --store "$store" import dir "$SRC/base")
    ov=$("$TESSERA" --store "$store" import dir "$SRC/overlay-remote")
    bulk=$("$TESSERA" --store "$store" import dir "$SRC/bulk-remote")
    "$TESSERA" --store "$store" image create remote --tree "$base" --tree "$ov" --tree "$bulk" \
        --size $((128 + 2 * mib))M > /dev/null
}

# Bytes of object data a store holds: whole objects, loose or packed (`store stats`, which
# counts each once), plus the chunks of partly fetched ones (allocated, since those files
# are sparse).
store_data_bytes() {
    local whole part=0
    whole=$("$TESSERA" --store "$1" store stats --json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["object_bytes"])')
    [[ ! -d $1/partial ]] || part=$(find "$1/partial" -type f ! -name '*.chunks' -printf '%b\n' | awk '{ s += $1 * 512 } END { print s + 0 }')
    echo $((whole + part))
}

# The byte count of a `serve --remote` log's closing line ("… N bytes fetched, …").
fetched_bytes() { sed -n 's/^remote .* \([0-9][0-9]*\) bytes fetched.*/\1/p' "$1" | tail -n 1; }

# A guest boots from host B's export of `remote`, fetched lazily from a Ceph bucket that
# host A pushed to; B then holds only what the guest read, and left a prefetch trace.
case_remote() {
    local missing cdir="$WORK/ceph" require=${TESSERA_REQUIRE_PEERS:-}
    missing=$(ceph_missing)
    if [[ -n $missing ]]; then
        if [[ -n $require ]]; then
            log "remote: missing $missing (TESSERA_REQUIRE_PEERS is set)"
            return 1
        fi
        echo skip > "$WORK/skip-remote"
        log "remote: SKIPPED: missing $missing (apt-get install --no-install-recommends radosgw ceph-mon ceph-osd s3cmd)"
        return 0
    fi
    # This case runs in a subshell of its own: the trap stops the engine however it ends.
    # shellcheck disable=SC2064 # $cdir is local: expand it now
    trap "ceph_stop '$cdir'" EXIT
    local t0 vars
    t0=$(now)
    if ! vars=$(ceph_start "$cdir" tessera); then
        if [[ -n $require ]]; then
            log "remote: Ceph did not start in three tries (TESSERA_REQUIRE_PEERS is set)"
            return 1
        fi
        echo skip > "$WORK/skip-remote"
        log "remote: SKIPPED: Ceph did not start in three tries"
        return 0
    fi
    local k
    for k in AWS_ENDPOINT AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION AWS_ALLOW_HTTP S3CFG; do
        grep -q "^$k=" <<< "$vars" || die "remote: tools/ceph-s3 printed no $k"
    done
    eval "$vars"
    export AWS_ENDPOINT AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION AWS_ALLOW_HTTP
    local t_ceph
    t_ceph=$(elapsed "$t0" "$(now)")

    local a="$WORK/host-a" b="$WORK/host-b" url=s3://tessera/vmtests
    t0=$(now)
    make_remote_image "$a" "$REMOTE_BULK_MIB"
    "$TESSERA" --store "$a" store push remote --to "$url" > "$LOGS/remote.push.log" 2>&1 || {
        tail -n 20 "$LOGS/remote.push.log" >&2
        return 1
    }
    local t_push
    t_push=$(elapsed "$t0" "$(now)")

    local sock="$WORK/remote.sock" slog="$LOGS/remote.serve-b.log" nonce glog="$LOGS/remote.log"
    local STORE=$b
    start_tessera "$sock" "$slog" --remote "$url" --export remote
    nonce=$(new_nonce)
    boot "$glog" "$(nbd_drive "$sock" remote ro)" ro remote "$nonce"
    # shellcheck disable=SC2046
    expect_fields "$glog" remote "$nonce" $(image_fields remote) root=ro "bigdir=$BIG_ENTRIES"
    marker "$glog" remote "$nonce" >> "$WORK/markers"
    # Stopping B writes the image's prefetch trace and the cache's counters.
    stop_server "$SERVER_PID"

    local data held fetched bulk=$((REMOTE_BULK_MIB * 1048576)) read_min=$((SHARED_MIB * 1048576))
    data=$(store_data_bytes "$a")
    held=$(store_data_bytes "$b")
    fetched=$(fetched_bytes "$slog")
    [[ -n $fetched ]] || {
        log "remote: no 'bytes fetched' line in $slog"
        tail -n 5 "$slog" >&2
        return 1
    }
    local bad=0
    # The guest read every checked file (the shared data at least) and none of the bulk.
    if ((held < read_min || held > data - bulk)); then
        log "remote: B holds $held bytes of object data: expected between $read_min (what the" \
            "guest reads) and $((data - bulk)) (all but the never-read bulk) of $data"
        bad=1
    fi
    if ((fetched < held)); then
        log "remote: B fetched $fetched bytes but holds $held"
        bad=1
    fi
    [[ -s $b/images/remote.json ]] || {
        log "remote: B has no image record images/remote.json"
        bad=1
    }
    [[ -s $b/traces/remote ]] || {
        log "remote: B left no prefetch trace traces/remote"
        bad=1
    }
    local listing
    listing=$(s3cmd -c "$S3CFG" ls "s3://tessera/vmtests/traces/" 2>&1) || true
    grep -q 's3://tessera/vmtests/traces/remote$' <<< "$listing" || {
        log "remote: the bucket has no vmtests/traces/remote; s3cmd ls says: $listing"
        tail -n 5 "$slog" >&2
        bad=1
    }
    ((bad == 0)) || return 1
    report "remote: guest booted from host B's lazily fetched image in ${BOOT_SECONDS}s" \
        "(Ceph up in ${t_ceph}s, import + push on A ${t_push}s); B holds $(mib "$held") of" \
        "$(mib "$data") MiB of the image's object data ($(ratio "$((100 * held))" "$data")%)," \
        "fetched $(mib "$fetched") MiB; trace of $(wc -l < "$b/traces/remote") fetches left" \
        "locally and in the bucket"
}
