//! Which local objects came from a remote store: an extended attribute on the object file
//! naming the remote, set before the file gets its name. Only such objects may a bounded
//! cache of that remote delete (it can fetch them again); an object without it was
//! imported or written here and may exist nowhere else. `store stats` counts both kinds.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use xattr::FileExt;

/// `user.` attributes need no privilege; ext4, xfs, btrfs and tmpfs (6.6+) keep them.
const NAME: &str = "user.tessera.remote";

/// The remote the object at `path` was fetched from, if it was.
pub fn of(path: &Path) -> Option<String> {
    let value = xattr::get(path, NAME).ok()??;
    String::from_utf8(value).ok()
}

/// Mark `file`, a new object being written, as fetched from `url`. A filesystem without
/// user attributes leaves it unmarked (kept for good): said once, not an error.
pub fn mark(file: &File, url: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = file.set_xattr(NAME, url.as_bytes()) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "cannot mark fetched objects (extended attributes); --cache-size will not evict them");
        }
    }
}
