#!/bin/sh
# Read throughput of tessera-nbd (FileDevice) vs nbdkit's file plugin on the
# same raw image over a Unix socket: nbdcopy to null: and fio's nbd engine.
#   crates/nbd/bench/compare.sh IMAGE [tessera|nbdkit|both]
# Needs a release build of the serve_file example:
#   cargo build --release -p tessera-nbd --example serve_file
set -eu
img=$1
which=${2:-both}
bin=${CARGO_TARGET_DIR:-target}/release/examples/serve_file
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT

bench() {
    uri="nbd+unix:///disk?socket=$dir/s.sock"
    start=$(date +%s.%N)
    nbdcopy "$uri" null:
    end=$(date +%s.%N)
    size=$(stat -c %s "$img")
    echo "$1 nbdcopy: $(echo "$size / ($end - $start) / 1073741824" | bc -l | cut -c1-5) GiB/s"
    for job in "seq1m --rw=read --bs=1m --iodepth=8" "rand4k --rw=randread --bs=4k --iodepth=32"; do
        set -- $job
        name=$1; shift
        fio --name="$name" --ioengine=nbd --uri="$uri" "$@" --size="$size" \
            --time_based --runtime=8 --output-format=json | sed -n "/^{/,\$p" |
            python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; print("%s fio %s: %.0f MiB/s, %.0f IOPS" % (sys.argv[1], sys.argv[2], r["bw"]/1024, r["iops"]))' "$which_server" "$name"
    done
}

if [ "$which" != nbdkit ]; then
    "$bin" "$dir/s.sock" "disk=$img" 2>/dev/null &
    pid=$!
    sleep 0.5
    which_server=tessera bench tessera
    kill $pid; wait $pid 2>/dev/null || true
fi
if [ "$which" != tessera ]; then
    rm -f "$dir/s.sock"
    nbdkit -r -U "$dir/s.sock" -e disk --foreground file "$img" &
    pid=$!
    sleep 0.5
    which_server=nbdkit bench nbdkit
    kill $pid; wait $pid 2>/dev/null || true
fi
