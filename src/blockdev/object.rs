//! One store object behind a data handle.
//!
//! Large objects are memory-mapped on first use and stay mapped: reads are a copy, and
//! images sharing an object share its pages. Small objects are read with `pread` from a
//! descriptor kept open between reads, within a process-wide bound (`fds.rs`), so an image
//! of a hundred thousand small files holds neither a hundred thousand mappings (the
//! kernel's default `vm.max_map_count` is 65530) nor as many open descriptors, and a hot
//! small object costs one `pread` per read (inline, with `RWF_NOWAIT`, when resident).
//!
//! A packed small object (`store::pack`) is read from its pack instead: one mapping and one
//! descriptor per pack for the whole process (`packed.rs`), the object a window of it.
//!
//! With verification on (`serve --verify`), bytes are checked against the object's name
//! before they are copied out; the state lives in `check.rs`.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use memmap2::Mmap;
use tessera_nbd::pread_nowait;

use super::check::Check;
use super::fds::{Open, Slot};
use crate::store::remote::cache::{Fetched, Partial, RemoteCache};
use crate::store::{ObjectId, Store};
pub(super) use packed::Pack;
use resident::{Mapping, Window};

pub(super) mod direct;
pub(super) mod packed;
pub(super) mod resident;
mod shared;

/// Every image that names an object shares one [`Object`] for it, so a thousand images of
/// one base tree hold one table entry and at most one mapping per object, not a thousand.
/// Keyed by store root and id; sound because objects are immutable files.
pub(super) fn shared(
    id: ObjectId,
    root: &Arc<Path>,
    packed: Option<(Arc<Pack>, u64, u64)>,
    remote: Option<&Arc<RemoteCache>>,
) -> Arc<Object> {
    static LIVE: OnceLock<Mutex<HashMap<LiveKey, Weak<Object>>>> = OnceLock::new();
    let mut live = LIVE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = LiveKey {
        id,
        root: root.clone(),
    };
    if let Some(obj) = live.get(&key).and_then(Weak::upgrade) {
        return obj;
    }
    // Drop entries of objects no image uses any more, amortized over insertions.
    if live.len() >= 1024 && live.len().is_power_of_two() {
        live.retain(|_, w| w.strong_count() > 0);
    }
    let mut obj = Object::new(id, root.clone());
    // A packed object is read from its pack, which is local: no remote is asked for it.
    if packed.is_none() {
        obj.remote = remote.cloned();
    }
    obj.packed = packed;
    let obj = Arc::new(obj);
    live.insert(key, Arc::downgrade(&obj));
    obj
}

/// Objects in use, by store root and id. Keyed by path, every image's first read formatted,
/// hashed and compared a path per object (4 362 for a 6 337-entry image: ~9% of a profile of
/// first reads); an object's path is now built when its file is opened.
struct LiveKey {
    id: ObjectId,
    root: Arc<Path>,
}

impl PartialEq for LiveKey {
    fn eq(&self, other: &Self) -> bool {
        // Bytes, not `Path`'s component-wise comparison (4% of a first read's thread in a profile).
        self.id == other.id
            && (Arc::ptr_eq(&self.root, &other.root)
                || self.root.as_os_str() == other.root.as_os_str())
    }
}

impl Eq for LiveKey {}

impl std::hash::Hash for LiveKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // A BLAKE3 digest's first bytes are as good a hash as any; the root is compared.
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.id.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// Objects at least this large are mapped.
const MAP_MIN: u64 = 256 << 10;

#[derive(Debug)]
pub(super) struct Object {
    id: ObjectId,
    /// The root of the store holding it.
    root: Arc<Path>,
    backing: OnceLock<Backing>,
    /// Created by the first verified read.
    check: OnceLock<Check>,
    /// Where the object is fetched from while the local store lacks it (`serve --remote`).
    remote: Option<Arc<RemoteCache>>,
    /// The pack holding the object, and where in it (offset, length): read there, not from
    /// the loose file (`store::pack`).
    packed: Option<(Arc<Pack>, u64, u64)>,
    /// The object being fetched, once a read found it missing here.
    partial: OnceLock<Arc<Partial>>,
    /// A small object's packed copy, once its loose file was found gone on opening it
    /// again: packing removes loose copies (`store::pack`), and reads go to the pack.
    moved: OnceLock<Window>,
    /// Held while the backing is set up, so that one thread opens (and maps) the object
    /// while others wait for it: a cold sequential read has every I/O thread prefetch the
    /// same objects ahead, and each of them opened, stat'ed and mapped every object once
    /// (34 000 opens for the 4 000 objects of one image's first read).
    opening: Mutex<()>,
}

#[derive(Debug)]
enum Backing {
    /// A large object's own mapping, or a packed object's range of its pack's.
    Mapped(Window),
    Small {
        len: u64,
        fd: Arc<Slot>,
    },
}

impl Drop for Object {
    fn drop(&mut self) {
        // The clock may still list the slot; it must not keep the file open.
        if let Some(Backing::Small { fd, .. }) = self.backing.get() {
            fd.close();
        }
    }
}

impl Object {
    pub(super) fn new(id: ObjectId, root: Arc<Path>) -> Self {
        Object {
            id,
            root,
            backing: OnceLock::new(),
            check: OnceLock::new(),
            remote: None,
            packed: None,
            partial: OnceLock::new(),
            moved: OnceLock::new(),
            opening: Mutex::new(()),
        }
    }

    /// With a remote store: the object's handle in its cache, if the local store lacks it
    /// or holds it as fetched from the remote (so `--cache-size` may evict it; see
    /// `store::remote::cache`).
    fn fetching(&self) -> io::Result<Option<&Arc<Partial>>> {
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        if let Some(p) = self.partial.get() {
            return Ok(Some(p));
        }
        if self.backing.get().is_some() {
            return Ok(None);
        }
        match remote.open(self.id).map_err(|e| self.context("fetch", e))? {
            Fetched::Local => Ok(None),
            Fetched::Partial(p) => Ok(Some(self.partial.get_or_init(|| p))),
        }
    }

    /// Fill `out` with the object's bytes at `offset`; reading past its end is an error.
    /// With `verify`, the bytes are first checked against the object's name, and a
    /// mismatch is an error (never wrong bytes).
    pub(super) fn read(&self, out: &mut [u8], offset: u64, verify: bool) -> io::Result<()> {
        if let Some(partial) = self.fetching()? {
            // Fetched bytes are always checked (`store::remote::cache`).
            return partial
                .read(out, offset)
                .map_err(|e| self.context("read", e));
        }
        let len = out.len() as u64;
        match self.backing()? {
            Backing::Mapped(map) => self.read_mapped(map, out, offset, verify),
            Backing::Small { len: have, fd } => {
                if offset.checked_add(len).is_none_or(|end| end > *have) {
                    return Err(self.too_short(*have, offset, len));
                }
                if let Some(map) = self.moved.get() {
                    return self.read_mapped(map, out, offset, verify);
                }
                let open = match fd.get_or_open(|| self.open_small()) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        let map = self.relocate().ok_or(e)?;
                        return self.read_mapped(map, out, offset, verify);
                    }
                    r => r?,
                };
                if verify {
                    return self.read_verified(&open, out, offset);
                }
                open.file
                    .read_exact_at(out, offset)
                    .map_err(|e| self.context("read", e))
            }
        }
    }

    /// The object's packed copy, for a small object whose loose file is gone.
    fn relocate(&self) -> Option<&Window> {
        if let Some(map) = self.moved.get() {
            return Some(map);
        }
        let map = packed::relocate(&self.root, &self.id)?;
        tracing::debug!(object = %self.id, "its loose file is gone: reading its packed copy");
        Some(self.moved.get_or_init(|| map))
    }

    /// Reads from a mapping: a large object's own, or a packed object's window of its pack.
    fn read_mapped(
        &self,
        map: &Window,
        out: &mut [u8],
        offset: u64,
        verify: bool,
    ) -> io::Result<()> {
        let len = out.len() as u64;
        if verify {
            self.check
                .get_or_init(|| Check::load(self.id, &self.path(), map))
                .verify_mapped(map, offset, len)?;
        }
        let src = offset
            .checked_add(len)
            .filter(|&end| end <= map.len() as u64)
            .map(|end| &map[offset as usize..end as usize])
            .ok_or_else(|| self.too_short(map.len() as u64, offset, len))?;
        // A pack is read like a file, not through page faults: the kernel's readahead then
        // follows a sequential reader across its objects.
        if let Some((pack, base)) = map.pack_file().filter(|_| !verify) {
            return pack
                .read_exact_at(out, base + offset)
                .map_err(|e| self.context("read pack of", e));
        }
        out.copy_from_slice(src);
        Ok(())
    }

    /// For a packed object: its pack and where `offset..offset + len` of it lies there, so
    /// that readahead of neighbours in a pack is asked for once (`prefetch_pieces`).
    pub(super) fn pack_span(&self, offset: u64, len: u64) -> Option<(&Arc<Pack>, u64, u64)> {
        let (pack, base, have) = self.packed.as_ref()?;
        let end = offset.checked_add(len).filter(|&e| e <= *have)?;
        Some((pack, base + offset, base + end))
    }

    /// Asks the kernel to start reading the object's bytes at `offset..offset + len` into
    /// the page cache, without waiting: the read path calls this for the objects a
    /// sequential reader is about to reach, so that many small files are read from disk
    /// in parallel rather than one `pread` at a time. Small objects are advised whole, once
    /// per open descriptor. Errors are ignored (it is a hint; the read reports them).
    pub(super) fn prefetch(&self, offset: u64, len: u64) {
        // An object read through a remote cache is never mapped or held open here: the
        // cache may evict it.
        if self.remote.is_some() && self.backing.get().is_none() {
            return;
        }
        let Ok(backing) = self.backing() else {
            return;
        };
        match backing {
            Backing::Mapped(map) => {
                let Some(end) = offset.checked_add(len).filter(|&e| e <= map.len() as u64) else {
                    return;
                };
                let first = offset as usize / PAGE * PAGE;
                // SAFETY: `first..end` lies inside the live mapping (checked above; the
                // mapping starts page-aligned). MADV_WILLNEED only schedules reads of
                // the file pages behind it and changes no memory contents.
                unsafe {
                    libc::madvise(
                        map.as_ptr().add(first) as *mut libc::c_void,
                        end as usize - first,
                        libc::MADV_WILLNEED,
                    );
                }
            }
            Backing::Small { fd, .. } => {
                let Ok(open) = fd.get_or_open(|| self.open_small()) else {
                    return;
                };
                if open.advised.swap(true, Ordering::Relaxed) {
                    return;
                }
                // SAFETY: posix_fadvise takes integers only; the descriptor is kept open
                // by `open` for the duration of the call.
                unsafe {
                    libc::posix_fadvise(open.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
                }
            }
        }
    }

    /// A small object read with `pread`: the whole object is read and checked once per
    /// file, then ranges of the same file are read directly.
    fn read_verified(&self, open: &Open, out: &mut [u8], offset: u64) -> io::Result<()> {
        let file = &open.file;
        let check = self.check.get_or_init(|| Check::whole(self.id));
        if check.is_verified_file(open.ident) {
            return file
                .read_exact_at(out, offset)
                .map_err(|e| self.context("read", e));
        }
        let meta = file.metadata().map_err(|e| self.context("stat", e))?;
        let mut whole = vec![0u8; meta.len() as usize];
        file.read_exact_at(&mut whole, 0)
            .map_err(|e| self.context("read", e))?;
        check.verify_whole(open.ident, &whole)?;
        let src = whole
            .get(offset as usize..offset as usize + out.len())
            .ok_or_else(|| self.too_short(meta.len(), offset, out.len() as u64))?;
        out.copy_from_slice(src);
        Ok(())
    }

    /// Like [`Object::read`], but only when no disk I/O can be needed: the object is
    /// already mapped and its pages are resident (`mincore`, or a recent sighting of the
    /// whole chunk: `resident.rs`), or it is a small object whose descriptor is open and
    /// `preadv2(RWF_NOWAIT)` finds the range in the page cache (and, with `verify`, the
    /// range already checked). `None` means "might block"; the caller then reads on an I/O
    /// thread. `out` may be partly written.
    pub(super) fn read_resident(
        &self,
        out: &mut [u8],
        offset: u64,
        verify: bool,
    ) -> Option<io::Result<()>> {
        // A small object whose loose file went is read from its pack's window (`moved`).
        let map = match (self.backing.get()?, self.moved.get()) {
            (Backing::Mapped(map), _) | (Backing::Small { .. }, Some(map)) => map,
            (Backing::Small { len, fd }, None) => {
                offset
                    .checked_add(out.len() as u64)
                    .filter(|&e| e <= *len)?;
                let open = fd.get()?;
                if verify && !self.check.get()?.is_verified_file(open.ident) {
                    return None;
                }
                return pread_nowait(&open.file, out, offset);
            }
        };
        if verify && !self.check.get()?.is_verified(offset, out.len() as u64) {
            return None;
        }
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&e| e <= map.len() as u64)?;
        if out.is_empty() {
            return Some(Ok(()));
        }
        if !map.resident(offset as usize, end as usize) {
            // The kernel will not say what of this file is cached (not ours): a pack's
            // descriptor can.
            return match map.pack_file() {
                Some((pack, base)) if !map.truthful() => pread_nowait(pack, out, base + offset),
                _ => None,
            };
        }
        out.copy_from_slice(&map[offset as usize..end as usize]);
        Some(Ok(()))
    }

    fn backing(&self) -> io::Result<&Backing> {
        if let Some(b) = self.backing.get() {
            return Ok(b);
        }
        let _opening = self.opening.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = self.backing.get() {
            return Ok(b);
        }
        if let Some((pack, offset, len)) = &self.packed {
            if let Some(window) = pack.window(*offset, *len) {
                return Ok(self.backing.get_or_init(|| Backing::Mapped(window)));
            }
            tracing::warn!(object = %self.id, "its pack entry lies outside the pack; reading the loose object");
        }
        let file = match self.open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let map = packed::relocate(&self.root, &self.id).ok_or(e)?;
                return Ok(self.backing.get_or_init(|| Backing::Mapped(map)));
            }
            r => r?,
        };
        let meta = file.metadata().map_err(|e| self.context("stat", e))?;
        let len = meta.len();
        let backing = if len < MAP_MIN {
            let fd = Arc::new(Slot::default());
            // Keep the descriptor we already have rather than open it again on first read.
            let open = open_of(file)?;
            fd.get_or_open(|| Ok(open))
                .map_err(|e| self.context("stat", e))?;
            Backing::Small { len, fd }
        } else {
            // SAFETY: store objects are immutable: they are written under tmp/, renamed
            // into place read-only and never modified or truncated afterwards (gc only
            // unlinks, which keeps existing mappings valid). Reads are bounds-checked
            // against the mapping's length, fixed at map time.
            Backing::Mapped(Window::whole(Mapping::new(
                unsafe { Mmap::map(&file) }.map_err(|e| self.context("map", e))?,
                meta.uid(),
            )))
        };
        let mut ours = Some(backing);
        let won = self
            .backing
            .get_or_init(|| ours.take().expect("taken once"));
        // Another thread set up the backing first: close the descriptor we registered.
        if let Some(Backing::Small { fd, .. }) = ours {
            fd.close();
        }
        Ok(won)
    }

    /// The object's file in its store.
    fn path(&self) -> PathBuf {
        Store::object_path_under(&self.root, &self.id)
    }

    fn open(&self) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path();
        // O_NOATIME: a read of a served object need not update its inode (reads showed
        // up as `touch_atime` in profiles). Only the owner may ask; others open plainly.
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOATIME)
            .open(&path)
        {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => File::open(&path),
            r => r,
        }
        .map_err(|e| self.context("open", e))
    }

    fn open_small(&self) -> io::Result<Open> {
        open_of(self.open()?).map_err(|e| self.context("stat", e))
    }

    fn context(&self, op: &str, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            format!("{op} object {}: {e}", self.path().display()),
        )
    }

    fn too_short(&self, have: u64, offset: u64, len: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "object {} is {have} bytes, shorter than the image needs ({len} at {offset}); \
                 run `tessera store verify`",
                self.id
            ),
        )
    }
}

const PAGE: usize = 4096;

fn open_of(file: File) -> io::Result<Open> {
    let meta = file.metadata()?;
    Ok(Open {
        file,
        ident: (meta.dev(), meta.ino()),
        owner: meta.uid(),
        advised: AtomicBool::new(false),
        map: OnceLock::new(),
    })
}
