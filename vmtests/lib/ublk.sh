# Sourced by vmtests/run: the ublk case. The host kernel has no ublk_drv, so tessera runs
# inside the guest: the initramfs gets a second archive appended (the kernel unpacks
# concatenated cpio archives in order, later files replacing earlier ones) that carries
# tessera and its shared libraries (from ldd), e2fsck, the static `manifest` tool, the
# ublk_drv module, a store with the images to serve, the expected manifest, and
# guest/ublk-init as /init. One boot runs every check (see guest/ublk-init).
# shellcheck shell=bash

UBLK_MEM=${VMTESTS_UBLK_MEM:-768}

# copy_with_libs BINARY ROOT: BINARY into ROOT/bin, its shared libraries at their paths.
copy_with_libs() {
    local bin=$1 root=$2 lib
    install -D -m 0755 "$bin" "$root/bin/$(basename "$bin")"
    for lib in $(ldd "$bin" 2> /dev/null | grep -o '/[^ ]*'); do
        [[ -e $root$lib ]] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

# The busybox root of the writable device: the shell and applets a chroot needs.
make_busybox_tree() {
    local d=$1 applet
    mkdir -p "$d"/{bin,etc,dev,proc,sys,tmp,root}
    cp /bin/busybox "$d/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [[ $applet == busybox ]] || ln -s busybox "$d/bin/$applet"
    done
    echo "delete me" > "$d/etc/rmme"
    echo "container root" > "$d/etc/motd"
}

# Entries with extended attributes (user.* and trusted.*, empty and binary values, one
# value of 1000 bytes) and odd owners, layered over solo for the ublk device.
make_xattr_tree() {
    local d=$1
    mkdir -p "$d/testdata/xattr/dir"
    echo "with xattrs" > "$d/testdata/xattr/file"
    ln -s file "$d/testdata/xattr/link"
    chown 1234:4321 "$d/testdata/xattr/file"
    chmod 2750 "$d/testdata/xattr/dir"
    python3 - "$d/testdata/xattr" << 'PY'
import os, sys
d = sys.argv[1]
os.setxattr(f"{d}/file", "user.greeting", b"hello")
os.setxattr(f"{d}/file", "user.empty", b"")
os.setxattr(f"{d}/file", "user.binary", bytes(range(256)))
os.setxattr(f"{d}/dir", "user.big", b"x" * 1000)
os.setxattr(f"{d}/dir", "trusted.tessera", b"\x00\x01\x02")
PY
}

# Sets UBLK_INITRD (base initramfs + the ublk archive) and UBLK_MANIFEST_LINES.
build_ublk_initrd() {
    local root="$WORK/ublk-root" store="$WORK/ublk-store" src="$WORK/ublk-src" t
    rm -rf "$root" "$store" "$src"
    mkdir -p "$root"/{bin,sbin,expect,lib/modules/ublk} "$src"
    command -v python3 > /dev/null || die "ublk: python3 is needed to set xattrs"
    make_xattr_tree "$src/xattr"
    make_busybox_tree "$src/bb"
    local base ov xa bb
    base=$("$TESSERA" --store "$store" import dir "$SRC/base")
    ov=$("$TESSERA" --store "$store" import dir "$SRC/overlay-solo")
    xa=$("$TESSERA" --store "$store" import dir "$src/xattr")
    bb=$("$TESSERA" --store "$store" import dir "$src/bb")
    "$TESSERA" --store "$store" image create solo --tree "$base" --tree "$ov" --tree "$xa" \
        --size 128M > /dev/null
    "$TESSERA" --store "$store" image create bb --tree "$bb" --size 64M > /dev/null

    # What the guest must read: the three trees stacked, as the manifest tool sees them.
    cc -static -O2 -s -o "$root/bin/manifest" "$HERE/guest/manifest.c" ||
        die "ublk: cannot build guest/manifest.c statically"
    local merged="$src/merged"
    mkdir -p "$merged"
    for t in "$SRC/base" "$SRC/overlay-solo" "$src/xattr"; do
        cp -a "$t/." "$merged/"
    done
    "$root/bin/manifest" "$merged" | grep -v '^\.|' | sort > "$root/expect/manifest"
    UBLK_MANIFEST_LINES=$(wc -l < "$root/expect/manifest")
    grep -q 'user.greeting=68656c6c6f' "$root/expect/manifest" ||
        die "ublk: the host's filesystem did not keep the test xattrs"

    cp -a "$store" "$root/store"
    install -m 0755 "$HERE/guest/ublk-init" "$root/init"
    copy_with_libs "$TESSERA" "$root"
    copy_with_libs "$(command -v e2fsck)" "$root"

    # For tools/bench-ublk: the benchmark, the nbd client's user half, and loop.
    cc -static -O2 -s -pthread -o "$root/bin/blkbench" "$HERE/guest/blkbench.c" ||
        die "ublk: cannot build guest/blkbench.c statically"
    [[ -x $SRC/base/bin/nbd-attach ]] && cp "$SRC/base/bin/nbd-attach" "$root/bin/"
    local loop
    loop=$(find "$KMODDIR/kernel" -name 'loop.ko*' | head -n 1)
    if [[ -n $loop ]] && ! grep -q '/loop\.ko$' "$KMODDIR/modules.builtin"; then
        /bin/busybox xz -dc "$loop" > "$root/lib/modules/ublk/loop.ko" 2> /dev/null ||
            cp "$loop" "$root/lib/modules/ublk/loop.ko"
    fi

    local ko
    ko=$(find "$KMODDIR/kernel" -name 'ublk_drv.ko*' | head -n 1)
    [[ -n $ko ]] || die "ublk: no ublk_drv module in $KMODDIR"
    case "$ko" in
        *.xz) /bin/busybox xz -dc "$ko" > "$root/lib/modules/ublk/ublk_drv.ko" ;;
        *.zst) zstd -qdc "$ko" > "$root/lib/modules/ublk/ublk_drv.ko" ;;
        *) cp "$ko" "$root/lib/modules/ublk/ublk_drv.ko" ;;
    esac
    local dep
    dep=$(module_depends "$root/lib/modules/ublk/ublk_drv.ko")
    [[ -z $dep ]] || die "ublk: ublk_drv needs modules this case does not load: $dep"

    # The same store on an ext4 disk, for the cold-read check: in the initramfs every
    # object is always in memory, so no read there ever waits on a disk.
    command -v mkfs.ext4 > /dev/null || die "ublk: mkfs.ext4 (e2fsprogs) is needed for the store disk"
    UBLK_STORE_DISK="$WORK/ublk-store.img"
    rm -f "$UBLK_STORE_DISK"
    mkfs.ext4 -q -F -d "$store" "$UBLK_STORE_DISK" "$(($(du -sm "$store" | cut -f1) + 64))M" ||
        die "ublk: cannot make the store disk"

    UBLK_INITRD="$WORK/ublk-initrd.cpio.gz"
    {
        cat "$INITRD"
        (cd "$root" && find . | LC_ALL=C sort | /bin/busybox cpio -o -H newc 2> /dev/null) | gzip -1
    } > "$UBLK_INITRD"
    log "ublk initramfs: $(du -h "$UBLK_INITRD" | cut -f1) (store $(du -sh "$store" | cut -f1))"
}

case_ublk() {
    build_ublk_initrd
    local glog="$LOGS/ublk.log" nonce t
    nonce=$(new_nonce)
    : > "$glog"
    GUEST_START=$(now)
    timeout "$((TIMEOUT > 400 ? TIMEOUT : 400))" qemu-system-x86_64 -accel tcg -machine pc \
        -m "$UBLK_MEM" -nodefaults -no-user-config -display none -monitor none -no-reboot \
        -kernel "$VMLINUZ" -initrd "$UBLK_INITRD" \
        -drive "file=$UBLK_STORE_DISK,format=raw,if=virtio,snapshot=on" \
        -append "console=ttyS0 panic=-1 loglevel=4 tessera.case=ublk tessera.nonce=$nonce" \
        -serial "file:$glog" < /dev/null > "$glog.qemu" 2>&1 &
    GUEST_PID=$!
    remember_pid "$GUEST_PID"
    wait_guest "$glog" "$GUEST_PID" "$GUEST_START" ublk "$nonce"
    # queues_listed=1: the guest has one vCPU, and the driver caps --ublk-queues 2 to that.
    expect_fields "$glog" ublk "$nonce" noserver=ok cold=4x64k+3manifests "manifest=$UBLK_MANIFEST_LINES" \
        lbs=4096 pbs=4096 dd=11 cmp=whole listed=2 unknown=ok mounted=ok busy=ok again=ok \
        stopped=clean queues_listed=1 kept=yes fsck=clean mounted_report=yes swept=yes \
        recovery_waits=yes other_store=left recovered=yes image_changed=failed export_gone=failed
    marker "$glog" ublk "$nonce" >> "$WORK/markers"
    report "ublk: one boot in ${BOOT_SECONDS}s: $(marker "$glog" ublk "$nonce" | cut -c1-400)"
}

# tools/bench-ublk: one boot that reads the same image through ublk, the kernel's nbd client
# and loop (see guest/ublk-init); reports the numbers and ublk's ratios to the others.
case_ublkbench() {
    build_ublk_initrd
    local glog="$LOGS/ublkbench.log" nonce line
    nonce=$(new_nonce)
    : > "$glog"
    GUEST_START=$(now)
    timeout "$((TIMEOUT > 400 ? TIMEOUT : 400))" qemu-system-x86_64 -accel tcg -machine pc \
        -m "$UBLK_MEM" -nodefaults -no-user-config -display none -monitor none -no-reboot \
        -kernel "$VMLINUZ" -initrd "$UBLK_INITRD" \
        -drive "file=$UBLK_STORE_DISK,format=raw,if=virtio,snapshot=on" \
        -append "console=ttyS0 panic=-1 loglevel=4 tessera.case=ublkbench tessera.nonce=$nonce tessera.bench=1" \
        -serial "file:$glog" < /dev/null > "$glog.qemu" 2>&1 &
    GUEST_PID=$!
    remember_pid "$GUEST_PID"
    wait_guest "$glog" "$GUEST_PID" "$GUEST_START" ublkbench "$nonce"
    line=$(marker "$glog" ublkbench "$nonce")
    marker "$glog" ublkbench "$nonce" >> "$WORK/markers"
    get() { tr ' ' '\n' <<< "$line" | sed -n "s/^$1=//p"; }
    {
        echo "ublk vs the kernel's nbd client vs loop, one guest (TCG: only the ratios mean anything)"
        printf '    %-6s %12s %12s %12s %12s\n' way "QD1 mean us" "QD1 p99 us" "QD32 IOPS" "seq MiB/s"
        local w
        for w in ublk nbd loop; do
            printf '    %-6s %12s %12s %12s %12s\n' "$w" "$(get "${w}_qd1_lat_us")" \
                "$(get "${w}_qd1_p99_us")" "$(get "${w}_qd32_iops")" "$(get "${w}_seq_mib_s")"
        done
        echo "    ublk/nbd: QD32 IOPS $(ratio "$(get ublk_qd32_iops)" "$(get nbd_qd32_iops)")x," \
            "QD1 latency $(ratio "$(get ublk_qd1_lat_us)" "$(get nbd_qd1_lat_us)")x," \
            "seq $(ratio "$(get ublk_seq_mib_s)" "$(get nbd_seq_mib_s)")x"
        echo "    ublk cold (store on a virtio disk, caches dropped, 4 O_DIRECT readers of 64 KiB):" \
            "$(get ublk_cold1_mib_s) MiB/s, again $(get ublk_cold2_mib_s) MiB/s"
        echo "    ublk/loop: QD32 IOPS $(ratio "$(get ublk_qd32_iops)" "$(get loop_qd32_iops)")x," \
            "QD1 latency $(ratio "$(get ublk_qd1_lat_us)" "$(get loop_qd1_lat_us)")x," \
            "seq $(ratio "$(get ublk_seq_mib_s)" "$(get loop_seq_mib_s)")x"
    } >> "$REPORT"
}
