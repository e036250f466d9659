//! Crash-safe creation of named files: write under `tmp/`, make the bytes durable, rename
//! to the final name, make the rename durable. A name never points at partial content.
//!
//! One file at a time ([`write`]) costs two fsyncs. Importing many objects instead stages
//! them ([`stage`]) and [`commit`]s the batch with one `syncfs` before the renames and one
//! after, which is several times faster for trees of small files.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
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

/// A complete file under `tmp/` waiting for its name. Dropping it uncommitted removes it.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
    /// Named right after this file (an object's outboard).
    companion: Option<Box<Staged>>,
}

impl Staged {
    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Name `other` together with this file, right after it.
    pub(crate) fn attach(&mut self, other: Staged) {
        self.companion = Some(Box::new(other));
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Write `fill`'s bytes to a new file under `tmp/` with permissions `mode`, bound for `dest`.
/// Returns the staged file and, open, the written file.
fn create(
    store: &Store,
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<(), Abort>,
) -> Result<(Staged, File), StoreError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = store.tmp_dir().join(format!("{}-{n}", std::process::id()));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| StoreError::io("create", &tmp, e))?;
    let staged = Staged {
        tmp,
        dest: dest.to_path_buf(),
        committed: false,
        companion: None,
    };
    fill(&mut file).map_err(|abort| match abort {
        Abort::Io(source) => StoreError::Write {
            path: dest.to_path_buf(),
            source,
        },
        Abort::Store(e) => e,
    })?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| StoreError::io("set permissions of", &staged.tmp, e))?;
    Ok((staged, file))
}

/// Give a durable staged file its name.
fn rename(staged: &mut Staged) -> Result<(), StoreError> {
    let parent = staged.dest.parent().expect("store paths have a parent");
    fs::create_dir_all(parent).map_err(|e| StoreError::io("create directory", parent, e))?;
    fs::rename(&staged.tmp, &staged.dest)
        .map_err(|e| StoreError::io("rename into", &staged.dest, e))?;
    staged.committed = true;
    match &mut staged.companion {
        Some(companion) => rename(companion),
        None => Ok(()),
    }
}

/// Write `dest` with `fill`; `dest` appears complete and durable, or not at all.
pub(crate) fn write(
    store: &Store,
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<(), Abort>,
) -> Result<(), StoreError> {
    let (mut staged, file) = create(store, dest, mode, fill)?;
    file.sync_all()
        .map_err(|e| StoreError::io("sync", &staged.tmp, e))?;
    drop(file);
    rename(&mut staged)?;
    sync_dir(dest.parent().expect("store paths have a parent"))
}

/// Like [`write`], but the rename is not made durable: after a crash `dest` may be missing,
/// never partial. For derived files that are rebuilt when missing.
pub(crate) fn write_unsynced_name(
    store: &Store,
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<(), Abort>,
) -> Result<(), StoreError> {
    let (mut staged, file) = create(store, dest, mode, fill)?;
    file.sync_all()
        .map_err(|e| StoreError::io("sync", &staged.tmp, e))?;
    drop(file);
    rename(&mut staged)
}

/// Write the content of `dest` under `tmp/` without syncing; [`commit`] names it.
pub(crate) fn stage(
    store: &Store,
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<(), Abort>,
) -> Result<Staged, StoreError> {
    create(store, dest, mode, fill).map(|(staged, _file)| staged)
}

/// Name every staged file: `syncfs` so their bytes are durable, rename them all, and
/// `syncfs` again so the renames are.
pub(crate) fn commit(store: &Store, mut batch: Vec<Staged>) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    syncfs(&store.tmp_dir())?;
    for staged in &mut batch {
        rename(staged)?;
    }
    syncfs(&store.tmp_dir())
}

/// fsync a directory so a rename or unlink in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("sync directory", dir, e))
}

/// Flush the whole filesystem holding `path`.
fn syncfs(path: &Path) -> Result<(), StoreError> {
    let dir = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
    // SAFETY: syncfs on a descriptor we own; no memory is passed.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(StoreError::io(
            "sync the filesystem of",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}
