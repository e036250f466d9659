//! `treecache/`: derived, disposable companions of tree manifests (the binary form of
//! [`crate::tree::binary`]), one per tree id. The store only keeps the bytes; what they mean
//! and whether they are still usable is the tree module's business.

use std::fs::{self, File};
use std::io;
use std::path::PathBuf;

use memmap2::Mmap;

use super::{atomic, Area, ObjectId, Store, StoreError};

impl Store {
    pub fn tree_cache_path(&self, id: &ObjectId) -> PathBuf {
        self.content_path(Area::TreeCache, id)
    }

    /// The cached companion of tree `id`, mapped read-only; `None` if there is none.
    pub fn map_tree_cache(&self, id: &ObjectId) -> Result<Option<Mmap>, StoreError> {
        let path = self.tree_cache_path(id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("open tree cache", &path, e)),
        };
        // SAFETY: cache files are written under tmp/ and renamed into place complete, mode
        // 0444, and never written or truncated after; removing one (gc, a rebuild replacing
        // it by rename) leaves existing mappings of the old file intact.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| StoreError::io("map", &path, e))?;
        Ok(Some(map))
    }

    /// Store the companion of tree `id`, replacing any. The bytes are made durable before
    /// they get the name, but the name itself is not synced: a crash may lose the file, never
    /// leave a partial one, and a lost cache is rebuilt.
    pub fn put_tree_cache(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError> {
        atomic::write_unsynced_name(self, &self.tree_cache_path(id), 0o444, |f| {
            Ok(io::Write::write_all(f, bytes)?)
        })
    }

    /// Remove the companion of tree `id`, if any.
    pub fn remove_tree_cache(&self, id: &ObjectId) -> Result<(), StoreError> {
        let path = self.tree_cache_path(id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::io("remove", &path, e))
            }
            _ => Ok(()),
        }
    }
}
