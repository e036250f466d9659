//! `serve --cache-size`: deleting the least recently used fetched objects to keep the bytes
//! fetched from the remote under a bound.
//!
//! Like gc, eviction deletes only while it holds the store lock exclusively (it only tries,
//! and skips a round while an import, an image create or gc holds it). The unit is a whole
//! object: a fetched object in `objects/` (only one marked as fetched
//! from this remote, see [`origin`]) or a partial one (its `.chunks` map first, then its
//! file, so a crash between the two leaves chunks without marks, never marks without
//! chunks). An object being read or prefetched holds its handle's pin and is skipped; its
//! next read after an eviction fetches again. The bound is checked after every read and
//! prefetch, once its pin is released, so it is exceeded by at most what reads in flight
//! hold. Objects of the store when the server starts count too (oldest by modification
//! time first), so the bound holds across restarts.
//!
//! Other servers on the same store may hold descriptors of files evicted here: they keep
//! reading the (unlinked) files, or, for a whole object they open per read, fetch again.

use std::fs;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use super::partial::Eviction;
use super::{map_path, origin, Partial, RemoteCache, CHUNK};
use crate::store::{Area, ObjectId};

impl RemoteCache {
    /// Keep at most `limit` bytes of objects fetched from the remote here: counts what
    /// earlier runs fetched, and evicts down to the bound now.
    pub fn bound(self: &Arc<Self>, limit: u64) -> io::Result<()> {
        let _ = self.limit.set(limit);
        let mut found: Vec<(SystemTime, ObjectId, u64)> = Vec::new();
        let (objects, _) = self.local.list(Area::Object).map_err(io::Error::other)?;
        for id in objects {
            let path = self.local.object_path(&id);
            if origin::of(&path).as_deref() != Some(self.remote.url()) {
                continue;
            }
            if let Ok(meta) = fs::metadata(&path) {
                found.push((meta.modified()?, id, meta.len()));
            }
        }
        let fans = fs::read_dir(self.local.root().join("partial"))
            .into_iter()
            .flatten();
        for fan in fans.flatten() {
            for entry in fs::read_dir(fan.path()).into_iter().flatten().flatten() {
                let name = format!(
                    "{}{}",
                    fan.file_name().to_string_lossy(),
                    entry.file_name().to_string_lossy()
                );
                let (Ok(id), Ok(meta)) = (name.parse::<ObjectId>(), entry.metadata()) else {
                    continue;
                };
                let marks = fs::read(map_path(&entry.path())).unwrap_or_default();
                let held = marks
                    .iter()
                    .enumerate()
                    .filter(|(_, &m)| m == 1)
                    .map(|(c, _)| CHUNK.min(meta.len().saturating_sub(c as u64 * CHUNK)))
                    .sum();
                found.push((meta.modified()?, id, held));
            }
        }
        found.sort();
        {
            let mut lru = self.lru();
            for (_, id, bytes) in &found {
                lru.set(*id, *bytes);
            }
            tracing::info!(
                remote = self.remote.url(),
                limit,
                objects = lru.count(),
                bytes = lru.total(),
                "cache of the remote store: fetched objects kept here"
            );
        }
        self.enforce();
        Ok(())
    }

    /// Evict the least recently used objects not in use until the fetched bytes here are
    /// under the bound (with `--cache-size`; otherwise nothing). A read that finds another
    /// eviction under way leaves it the job: that one goes round again until under.
    pub(super) fn enforce(self: &Arc<Self>) {
        let Some(&limit) = self.limit.get() else {
            return;
        };
        while self.lru().total() > limit {
            let Ok(_one) = self.evicting.try_lock() else {
                return;
            };
            if self.evict_round(limit) == 0 {
                return;
            }
        }
    }

    /// One round: pick victims, then delete their files with only each one's pin held, so
    /// reads of other objects go on meanwhile (an unlink can wait on the filesystem's
    /// journal). How many were evicted.
    fn evict_round(self: &Arc<Self>, limit: u64) -> usize {
        // Deleting is done under the store lock held exclusively, as gc does, so no import
        // or image create (shared) is between finding an object here and naming it. Never
        // waited for: while one runs, the next read tries again.
        let _store = match self.local.try_lock(true) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                tracing::debug!("the store is locked (import, gc): evicting later");
                return 0;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot lock the store to evict");
                return 0;
            }
        };
        let mut evicted = 0;
        let mut freed = 0;
        for (handle, bytes) in self.pick(limit) {
            if self.evict_picked(&handle, bytes) {
                evicted += 1;
                freed += bytes;
            }
        }
        self.stats
            .evictions
            .fetch_add(evicted as u64, Ordering::Relaxed);
        self.stats.bytes_evicted.fetch_add(freed, Ordering::Relaxed);
        if evicted > 0 {
            tracing::debug!(
                objects = evicted,
                bytes = freed,
                kept = self.lru().total(),
                limit,
                "cache over its bound: evicted the least recently used"
            );
        }
        evicted
    }

    /// Evict an object [`Self::pick`] took off the list with `bytes`; true if it went.
    pub(super) fn evict_picked(&self, handle: &Partial, bytes: u64) -> bool {
        let id = handle.id();
        match handle.evict() {
            Eviction::Done => {
                tracing::debug!(object = %id, bytes, "evicted from the cache");
                return true;
            }
            // A read took it since it was picked: it stays, listed again with its bytes
            // added to what that read may have fetched and listed meanwhile.
            Eviction::InUse => self.lru().add(id, bytes),
            // Imported since: no longer counted as fetched.
            Eviction::Kept => tracing::debug!(object = %id, "kept: imported here since"),
        }
        false
    }

    /// The least recently used objects not in use, enough to get under `limit`, taken off
    /// the list, each with a handle: one nobody held gets a fresh one, whose pin keeps a
    /// new reader from reopening the files while they go.
    pub(super) fn pick(self: &Arc<Self>, limit: u64) -> Vec<(Arc<Partial>, u64)> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut lru = self.lru();
        let picked = lru.victims(limit, |id| {
            open.get(id)
                .and_then(Weak::upgrade)
                .is_none_or(|h| !h.in_use())
        });
        picked
            .into_iter()
            .map(|(id, bytes)| {
                lru.remove(&id);
                let handle = match open.get(&id).and_then(Weak::upgrade) {
                    Some(h) => h,
                    None => {
                        let h = Arc::new(Partial::new(self.clone(), id));
                        open.insert(id, Arc::downgrade(&h));
                        h
                    }
                };
                (handle, bytes)
            })
            .collect()
    }

    /// Delete the files of the fetched object `id`: the object if it came from this remote,
    /// and any partial file (map first). Missing files are fine.
    pub(super) fn delete_files(&self, id: &ObjectId) {
        let path = self.local.object_path(id);
        if origin::of(&path).as_deref() == Some(self.remote.url()) {
            remove(&path);
        }
        let partial = self.partial_path(id);
        remove(&map_path(&partial));
        remove(&partial);
    }

    /// Fetched bytes kept here now, and the bound.
    pub fn usage(&self) -> (u64, Option<u64>) {
        (self.lru().total(), self.limit.get().copied())
    }
}

fn remove(path: &std::path::Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot evict a cached file")
        }
    }
}
