//! From `lstat` results to manifest entries.

use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::tree::{Bytes, Entry, Kind, Time};

/// The entry for `meta` at manifest path `path`, without content, xattrs or symlink target.
/// `None` for a file type we do not know.
pub(crate) fn entry(path: Vec<u8>, meta: &Metadata) -> Option<Entry> {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_char_device() {
        Kind::Chardev
    } else if ft.is_block_device() {
        Kind::Blockdev
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else {
        return None;
    };
    let rdev = meta.rdev();
    Some(Entry {
        path: Bytes(path),
        kind,
        mode: (meta.mode() & 0o7777) as u16,
        uid: meta.uid(),
        gid: meta.gid(),
        atime: Time(meta.atime(), meta.atime_nsec() as u32),
        mtime: Time(meta.mtime(), meta.mtime_nsec() as u32),
        ctime: Time(meta.ctime(), meta.ctime_nsec() as u32),
        crtime: meta.created().ok().map(time),
        xattrs: Vec::new(),
        size: (kind == Kind::File).then_some(meta.len()),
        object: None,
        segments: None,
        link: None,
        target: None,
        rdev: matches!(kind, Kind::Chardev | Kind::Blockdev)
            .then(|| (libc::major(rdev), libc::minor(rdev))),
        opaque: false,
    })
}

fn time(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time(d.as_secs() as i64, d.subsec_nanos()),
        Err(before) => {
            let d = before.duration();
            if d.subsec_nanos() == 0 {
                Time(-(d.as_secs() as i64), 0)
            } else {
                Time(-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}
