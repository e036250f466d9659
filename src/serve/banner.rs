//! The start-up banner: where the server listens and ready-to-paste client commands for
//! each export, on stdout so scripts can pick them up. Read-only exports get read-only
//! commands (`nbdfuse -r`, `mount -o ro`, qemu's `readonly=on`, which it needs for a
//! read-only export); writable ones get writable commands.

use tessera_nbd::ExportInfo;

use super::exports::{OverlayPolicy, Policy, StoreExports};
use super::listen::ListenAddr;
use super::spec::WriteMode;

/// Exports beyond this many are listed by name only: a farm's server has thousands.
const DETAILED: usize = 8;

pub fn print(
    listen: &[ListenAddr],
    exports: &[ExportInfo],
    resolver: &StoreExports,
    policy: &Policy,
    tls: bool,
) {
    for addr in listen {
        println!("listening on {addr}");
    }
    if exports.is_empty() {
        println!("no images in the store yet: create one with `tessera image create`");
    }
    let addr = &listen[0];
    for (i, export) in exports.iter().enumerate() {
        // The mode a client asking for this name gets.
        let writable = resolver
            .resolve(&export.name)
            .is_ok_and(|name| name.mode != WriteMode::ReadOnly);
        if i >= DETAILED {
            println!("export {} ({})", export.name, mode_word(writable));
            continue;
        }
        commands(addr, &export.name, writable, tls);
    }
    if policy.only.is_none() {
        if policy.ephemeral {
            println!();
            println!("ephemeral overlays: open IMAGE+ephemeral for a fresh writable overlay per connection");
        }
        match policy.overlays {
            OverlayPolicy::None => {}
            OverlayPolicy::Existing => {
                println!();
                println!("persistent overlays: open IMAGE@OVERLAY to reattach an existing overlay");
            }
            OverlayPolicy::Create => {
                println!();
                println!("persistent overlays: open IMAGE@OVERLAY; a new OVERLAY is created on first connect");
            }
        }
    }
    // The last line, so a script knows the banner is complete and the server is up.
    println!();
    println!(
        "ready: {} export(s); Ctrl-C stops the server",
        exports.len()
    );
}

fn mode_word(writable: bool) -> &'static str {
    if writable {
        "writable"
    } else {
        "read-only"
    }
}

fn commands(addr: &ListenAddr, name: &str, writable: bool, tls: bool) {
    let uri = addr.uri(name, tls);
    // A directory name without the characters export names may carry.
    let dir = name.replace(['@', '+'], "-");
    let (fuse_ro, mount_ro, root, drive_ro) = if writable {
        ("", "", "rw", "")
    } else {
        ("-r ", ",ro", "ro", ",readonly=on")
    };
    println!();
    println!("export {name} ({}):", mode_word(writable));
    println!("  nbdinfo '{uri}'");
    println!("  nbdcopy '{uri}' {dir}.img");
    println!(
        "  mkdir -p /tmp/{dir}/fuse /tmp/{dir}/mnt && (nbdfuse {fuse_ro}/tmp/{dir}/fuse/disk.img '{uri}' &) \\"
    );
    println!(
        "      && sleep 1 && sudo mount -o loop{mount_ro} /tmp/{dir}/fuse/disk.img /tmp/{dir}/mnt"
    );
    println!("  # boot it: any kernel with virtio-blk and ext4 (vmtests/ fetches one), an init in the image");
    println!(
        "  qemu-system-x86_64 -m 256 -nographic -kernel VMLINUZ -append 'root=/dev/vda {root} console=ttyS0' -drive 'file={uri},format=raw,if=virtio{drive_ro}'"
    );
}
