# Sourced by vmtests/run: fetch the pinned Debian kernel, build the initramfs.
#
# One exact package name and version: a wildcard would pull every kernel in the suite.
# The -unsigned package is the same kernel without the EFI signature wrapper.
# shellcheck shell=bash

KERNEL_PKG=${VMTESTS_KERNEL_PKG:-linux-image-6.12.95+deb12-cloud-amd64-unsigned}
KERNEL_PKG_VERSION=${VMTESTS_KERNEL_PKG_VERSION:-6.12.95-1~bpo12+1}

# virtio-blk and what it needs, in load order. Debian's 6.1 cloud kernel has all of these as
# modules; 6.12 builds all but virtio_blk in. Whatever is built in is skipped.
VIRTIO_MODULES=(virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)
# For the kernelnbd case: a network card for qemu's user network, and the NBD client.
# Loaded on every boot; without a NIC or an attach they only register their drivers.
EXTRA_MODULES=(failover net_failover virtio_net nbd)

# Sets VMLINUZ and INITRD.
prepare_kernel() {
    local deb="$CACHE/${KERNEL_PKG}_${KERNEL_PKG_VERSION//:/%3a}_amd64.deb"
    if [[ ! -s $deb ]]; then
        log "downloading $KERNEL_PKG=$KERNEL_PKG_VERSION"
        if ! (cd "$CACHE" && apt-get download "$KERNEL_PKG=$KERNEL_PKG_VERSION") >&2; then
            fallback_kernel ||
                die "apt-get download $KERNEL_PKG=$KERNEL_PKG_VERSION failed and apt offers no" \
                    "other linux-image-6.12.*-cloud-amd64: the suite must be in apt's sources" \
                    "(see vmtests/README.md) and apt-get update run"
            deb="$CACHE/${KERNEL_PKG}_${KERNEL_PKG_VERSION//:/%3a}_amd64.deb"
        fi
        [[ -s $deb ]] || die "apt-get download did not leave $deb"
    fi

    local kdir="$CACHE/kernel-$KERNEL_PKG_VERSION"
    if [[ ! -d $kdir ]]; then
        rm -rf "$kdir.tmp"
        dpkg -x "$deb" "$kdir.tmp" || die "dpkg -x $deb"
        mv "$kdir.tmp" "$kdir"
    fi
    local kvers=("$kdir"/lib/modules/*)
    [[ ${#kvers[@]} == 1 && -d ${kvers[0]} ]] || die "expected one lib/modules/VERSION in $deb"
    local moddir=${kvers[0]} kver
    kver=$(basename "$moddir")
    # For cases that add modules of their own (ublk).
    KMODDIR=$moddir
    VMLINUZ="$kdir/boot/vmlinuz-$kver"
    [[ -f $VMLINUZ ]] || die "no $VMLINUZ in $deb"
    if grep -qx 'CONFIG_EXT4_FS=m' "$kdir/boot/config-$kver"; then
        die "$kver has ext4 as a module; the initramfs only carries virtio modules"
    fi

    INITRD="$CACHE/initramfs-$kver-$(initramfs_key).cpio.gz"
    if [[ ! -s $INITRD ]]; then
        build_initramfs "$moddir" "$INITRD.tmp"
        mv "$INITRD.tmp" "$INITRD"
    fi
    log "kernel $kver ($KERNEL_PKG $KERNEL_PKG_VERSION), initramfs $(basename "$INITRD")"
}

# Debian drops a point release from its archive when a newer one lands. Then the pin cannot
# be downloaded: take the newest linux-image-6.12.N+deb12-cloud-amd64[-unsigned] that apt
# offers (one exact name and version, never a wildcard), say so loudly, and go on.
# Sets KERNEL_PKG and KERNEL_PKG_VERSION and downloads it.
fallback_kernel() {
    local pkg ver
    pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64(-unsigned)?$' |
        awk '{ print $1 }' | sort -V | tail -n 1)
    [[ -n $pkg ]] || return 1
    ver=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
    [[ -n $ver && $ver != "(none)" ]] || return 1
    log "WARNING: the pinned kernel $KERNEL_PKG=$KERNEL_PKG_VERSION cannot be downloaded" \
        "(gone from Debian's archive?): falling back to the newest 6.12 cloud kernel apt" \
        "offers, $pkg=$ver; pin it in vmtests/lib/kernel.sh"
    KERNEL_PKG=$pkg
    KERNEL_PKG_VERSION=$ver
    local deb="$CACHE/${pkg}_${ver//:/%3a}_amd64.deb"
    [[ -s $deb ]] || (cd "$CACHE" && apt-get download "$pkg=$ver") >&2
}

# The initramfs depends on its init script and on the busybox binary.
initramfs_key() {
    cat "$HERE/guest/initramfs-init" /bin/busybox "$HERE/lib/kernel.sh" | sha256sum | cut -c1-12
}

# A module's depends= from its .modinfo section (no modinfo binary needed).
module_depends() {
    tr '\0' '\n' < "$1" | sed -n 's/^depends=//p' | tr ',' ' '
}

build_initramfs() {
    local moddir=$1 out=$2 root
    root=$(mktemp -d "$WORK/initramfs.XXXXXX")
    mkdir -p "$root"/{bin,dev,proc,sys,etc,lib/modules,newroot}
    cp /bin/busybox "$root/bin/busybox"
    local applet
    for applet in $(/bin/busybox --list); do
        [[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
    done
    install -m 0755 "$HERE/guest/initramfs-init" "$root/init"

    local -A loaded=()
    local name ko found dep n=0
    : > "$root/etc/modules"
    for name in "${VIRTIO_MODULES[@]}" "${EXTRA_MODULES[@]}"; do
        if grep -Eq "/$name\.ko$" "$moddir/modules.builtin"; then
            loaded[$name]=builtin
            continue
        fi
        found=$(find "$moddir/kernel" -name "$name.ko" -o -name "$name.ko.xz" \
            -o -name "$name.ko.zst" -o -name "$name.ko.gz" | head -n 1)
        [[ -n $found ]] || die "$name is neither built into $(basename "$moddir") nor a module in it"
        n=$((n + 1))
        ko=$(printf '%02d-%s.ko' "$n" "$name")
        # busybox insmod passes the file to init_module(2) as is: decompress here.
        case "$found" in
            *.xz) /bin/busybox xz -dc "$found" > "$root/lib/modules/$ko" ;;
            *.zst) command -v zstd > /dev/null || die "$found: zstd needed"
                zstd -qdc "$found" > "$root/lib/modules/$ko" ;;
            *.gz) /bin/busybox gzip -dc "$found" > "$root/lib/modules/$ko" ;;
            *) cp "$found" "$root/lib/modules/$ko" ;;
        esac
        for dep in $(module_depends "$root/lib/modules/$ko"); do
            [[ -n ${loaded[${dep//-/_}]:-} ]] ||
                die "$name needs $dep, which is neither built in nor loaded before it" \
                    "(add it to VIRTIO_MODULES in vmtests/lib/kernel.sh)"
        done
        loaded[$name]=module
        echo "$ko" >> "$root/etc/modules"
    done
    log "initramfs modules: $(tr '\n' ' ' < "$root/etc/modules")(built in: $(
        for name in "${VIRTIO_MODULES[@]}" "${EXTRA_MODULES[@]}"; do
            [[ ${loaded[$name]} == builtin ]] && printf '%s ' "$name"
        done
    ))"
    (cd "$root" && find . | LC_ALL=C sort | /bin/busybox cpio -o -H newc 2>/dev/null) |
        gzip -1 > "$out"
    rm -rf "$root"
}
