# Sourced by vmtests/run: the source directories of the test root, and their expectations.
#
# base/ is a busybox root whose /sbin/init is guest/init, plus /testdata: files of awkward
# sizes, a sparse file, hardlinks, odd modes and owners, timestamps with nanoseconds and
# outside 1970..2038, symlinks (fast, slow, to a directory, dangling), device nodes and a
# FIFO, and a directory of BIG_ENTRIES names (an htree). overlay-NAME/ is a small tree
# stacked on base/ per image: it replaces /etc/motd and /etc/tessera-image and adds 1 MiB of
# its own data. testdata/meta/ holds what the guest checks against, computed here from the
# source with GNU coreutils.
# shellcheck shell=bash

BIG_ENTRIES=${VMTESTS_BIG_ENTRIES:-5000}
# Shared random data in base/, read in full by every guest: what the page-cache
# comparison is about.
SHARED_MIB=${VMTESTS_SHARED_MIB:-16}

make_base_tree() {
    local d=$1
    mkdir -p "$d"/{bin,sbin,etc,dev,proc,sys,var/lib/vmtest} "$d"/testdata/{files,links,dev,big,meta}
    install -m 1777 -d "$d/tmp"
    cp /bin/busybox "$d/bin/busybox"
    local applet
    for applet in $(/bin/busybox --list); do
        [[ $applet == busybox || $applet == init || $applet == linuxrc ]] ||
            ln -s busybox "$d/bin/$applet"
    done
    install -m 0755 "$HERE/guest/init" "$d/sbin/init"
    # The kernelnbd case's user-space half; without a C compiler that case is skipped.
    # shellcheck disable=SC2034 # read by case_kernelnbd in vmtests/run
    HAVE_NBD_ATTACH=0
    if command -v cc > /dev/null &&
        cc -static -O2 -s -o "$d/bin/nbd-attach" "$HERE/guest/nbd-attach.c" 2> "$WORK/nbd-attach.cc.log"; then
        # shellcheck disable=SC2034
        HAVE_NBD_ATTACH=1
    else
        rm -f "$d/bin/nbd-attach"
        log "cannot build a static guest/nbd-attach.c (see $WORK/nbd-attach.cc.log): kernelnbd will skip"
    fi
    echo base > "$d/etc/tessera-image"
    echo base > "$d/etc/motd"

    local f="$d/testdata/files"
    echo "hello from a tessera image" > "$f/small.txt"
    : > "$f/empty"
    printf x > "$f/one-byte"
    local n
    for n in 4095 4096 4097 65537 1048579; do
        head -c "$n" /dev/urandom > "$f/size-$n"
    done
    for n in $(seq 0 $((SHARED_MIB / 4 - 1))); do
        head -c 4M /dev/urandom > "$f/shared-$n.bin"
    done
    # Holes at the start, between and after two data runs.
    truncate -s 8M "$f/sparse"
    head -c 4096 /dev/urandom | dd of="$f/sparse" bs=4096 seek=256 conv=notrunc status=none
    head -c 12288 /dev/urandom | dd of="$f/sparse" bs=4096 seek=1000 conv=notrunc status=none
    echo "two names, one inode" > "$f/hl-a"
    ln "$f/hl-a" "$f/hl-b"
    echo setuid > "$f/setuid" && chmod 4755 "$f/setuid"
    echo private > "$f/private" && chmod 0600 "$f/private"
    echo owned > "$f/owned" && chown 1234:5678 "$f/owned"
    mkdir "$f/sticky" && chmod 1777 "$f/sticky"
    mkdir "$f/setgid-dir" && chmod 2755 "$f/setgid-dir" && chown 0:4321 "$f/setgid-dir"
    echo "before 1970" > "$f/time-1969"
    echo "after 2038" > "$f/time-2100"

    local l="$d/testdata/links"
    ln -s ../files/small.txt "$l/rel"
    ln -s /testdata/files/small.txt "$l/abs"
    ln -s ../files "$l/dir"
    ln -s rel "$l/chain"
    # Longer than the 60 bytes that fit in the inode: stored in a data block.
    ln -s "../files/$(printf './%.0s' $(seq 1 100))small.txt" "$l/slow"
    ln -s ../no-such-file "$l/dangling"
    {
        for n in rel abs chain slow; do
            echo "/testdata/links/$n|$(readlink "$l/$n")|yes"
        done
        echo "/testdata/links/dangling|$(readlink "$l/dangling")|no"
    } > "$d/testdata/meta/LINKS"

    mknod "$d/testdata/dev/null-like" c 1 3
    mknod "$d/testdata/dev/zero-like" c 1 5
    mknod "$d/testdata/dev/block-like" b 7 0
    mkfifo "$d/testdata/dev/fifo"

    # BIG_ENTRIES empty files with names of 9 to 58 bytes, so the directory spans many
    # blocks and the kernel needs the htree to look names up.
    (cd "$d/testdata/big" && awk -v n="$BIG_ENTRIES" 'BEGIN {
        pad = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
        for (i = 0; i < n; i++) printf "e%05d-%s\n", i, substr(pad, 1, i % 50)
    }' | xargs touch)
    # shellcheck disable=SC2012 # names are plain ASCII
    (cd "$d/testdata/big" && ls -A | LC_ALL=C sort | awk 'NR % 50 == 1' > "$d/testdata/meta/BIG-SAMPLE")
    # shellcheck disable=SC2012
    ls -A "$d/testdata/big" | tail -n 1 >> "$d/testdata/meta/BIG-SAMPLE"
    echo "deleted by a writable boot" > "$d/testdata/rmme"

    # Fixed timestamps with nanoseconds (the guest compares them to the nanosecond); the
    # directories holding meta/ and rmme are left out of the checks since writes change them.
    find "$d/testdata/files" "$d/testdata/links" "$d/testdata/dev" \
        -exec touch -h -d '2024-02-29 12:34:56.123456789 UTC' {} +
    touch -d '1969-07-20 20:17:40.5 UTC' "$f/time-1969"
    touch -d '2100-01-01 00:00:00.000000001 UTC' "$f/time-2100"
    touch -d '2024-02-29 12:34:56.987654321 UTC' "$f/hl-a" "$f"

    (
        cd "$d" || exit 1
        find bin sbin testdata -type f ! -path 'testdata/meta/*' ! -path 'testdata/big/*' \
            ! -path testdata/rmme | LC_ALL=C sort | xargs sha256sum
    ) > "$d/testdata/meta/SHA256SUMS"
    write_stat_expectations "$d" > "$d/testdata/meta/STAT"
}

# FORMAT|PATH|EXPECTED lines for guest/init, from GNU stat (busybox's stat prints the
# same for these directives).
write_stat_expectations() {
    local d=$1 p fmt
    (
        cd "$d" || exit 1
        find testdata/files testdata/links testdata/dev | LC_ALL=C sort | while read -r p; do
            if [[ -L $p || -f $p ]]; then
                fmt='%f %u %g %h %s %y'
            elif [[ -d $p ]]; then
                fmt='%f %u %g %h %y'
            else
                fmt='%f %u %g %h %t %T %y'
            fi
            echo "$fmt|/$p|$(TZ=UTC stat -c "$fmt" "$p")"
        done
    )
}

make_overlay_tree() {
    local d=$1 name=$2
    mkdir -p "$d"/{etc,testdata/image,testdata/meta}
    echo "$name" > "$d/etc/tessera-image"
    echo "image $name" > "$d/etc/motd"
    { echo "$name"; head -c 1M /dev/urandom; } > "$d/testdata/image/own.bin"
    (cd "$d" && sha256sum testdata/image/own.bin) > "$d/testdata/meta/SHA256SUMS.image"
}

# How many lines the guest's sha256sum -c should find OK in an image of base + overlay.
expected_sums() {
    cat "$1/testdata/meta/SHA256SUMS" "$2/testdata/meta/SHA256SUMS.image" | wc -l
}
