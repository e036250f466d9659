//! Small objects an import writes, held until it knows the order to pack them in.
//!
//! An import learns an image's order only once it has read every file and built the tree,
//! and a pack must be written in that order (see [`super::pack`]). Writing each small
//! object as a loose file first and packing it afterwards wrote it twice, and created and
//! later removed a file per object. Instead the import appends each new small object to a
//! spool: one unlinked file under `tmp/` (gone with the process on a crash, so nothing is
//! left to clean up), written at 4 KiB boundaries and never synced. [`Store::write_spooled_pack`]
//! then copies the spooled objects into a pack in the order the import asks for, from the
//! page cache in the common case, and the spool is dropped. Until that pack is named no
//! reader can see the objects, as with staged loose objects before their commit.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::pack::{PACK_ALIGN, PACK_MAX};
use super::{ObjectId, Store, StoreError};

/// Objects appended by any number of threads, each at its own aligned range.
#[derive(Debug)]
pub struct Spool {
    file: File,
    end: AtomicU64,
    /// (id, offset, length) in the order they were appended.
    entries: Mutex<Vec<(ObjectId, u64, u64)>>,
}

impl Spool {
    /// A new empty spool in `store`'s `tmp/`.
    pub fn new(store: &Store) -> Result<Spool, StoreError> {
        let tmp = store.tmp_dir();
        let file = tempfile::tempfile_in(&tmp).map_err(|e| StoreError::io("create in", &tmp, e))?;
        Ok(Spool {
            file,
            end: AtomicU64::new(0),
            entries: Mutex::new(Vec::new()),
        })
    }

    /// Whether an object of `len` bytes belongs in a spool (and so in a pack).
    pub fn takes(len: u64) -> bool {
        len < PACK_MAX
    }

    /// Appends object `id`, whose bytes are `bytes` (the caller hashed them). The caller
    /// appends each object once (imports claim an object before storing it).
    pub fn append(&self, id: ObjectId, bytes: &[u8]) -> io::Result<()> {
        let len = bytes.len() as u64;
        debug_assert!(Self::takes(len));
        let offset = self.end.fetch_add(
            len.next_multiple_of(PACK_ALIGN).max(PACK_ALIGN),
            Ordering::Relaxed,
        );
        self.file.write_all_at(bytes, offset)?;
        self.lock().push((id, offset, len));
        Ok(())
    }

    /// Objects appended so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every spooled object's (id, offset, length), in the order appended.
    pub(super) fn entries(&self) -> Vec<(ObjectId, u64, u64)> {
        self.lock().clone()
    }

    /// Reads object bytes at `offset` into `buf` (sized to the object).
    pub(super) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(ObjectId, u64, u64)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}
