//! Crash-safe creation of a named file: write under `tmp/`, fsync, rename, fsync the directory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Store, StoreError};

/// Why the content callback gave up.
pub(crate) enum Abort {
    Io(io::Error),
    Store(StoreError),
}

impl From<io::Error> for Abort {
    fn from(e: io::Error) -> Self {
        Abort::Io(e)
    }
}

/// Write `dest` with `fill`; `dest` appears complete and durable, or not at all.
pub(crate) fn write(
    store: &Store,
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<(), Abort>,
) -> Result<(), StoreError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = store.tmp_dir().join(format!("{}-{n}", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| StoreError::io("create", &tmp, e))?;
    let result = fill(&mut file)
        .map_err(|abort| match abort {
            Abort::Io(source) => StoreError::Write {
                path: dest.to_path_buf(),
                source,
            },
            Abort::Store(e) => e,
        })
        .and_then(|()| {
            file.set_permissions(fs::Permissions::from_mode(mode))
                .and_then(|()| file.sync_all())
                .map_err(|e| StoreError::io("sync", &tmp, e))
        });
    drop(file);
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let parent = dest.parent().expect("store paths have a parent");
    let committed = fs::create_dir_all(parent)
        .map_err(|e| StoreError::io("create directory", parent, e))
        .and_then(|()| fs::rename(&tmp, dest).map_err(|e| StoreError::io("rename into", dest, e)));
    if let Err(e) = committed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(parent)
}

/// fsync a directory so a rename or unlink in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("sync directory", dir, e))
}
