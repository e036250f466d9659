//! The local store as a cache of a remote one: object bytes fetched on demand, verified
//! against the object's name before anyone sees them, kept, and with `--cache-size`
//! evicted again, least recently used first.
//!
//! Every object a read finds missing here gets a handle ([`Partial`]) that all its reads
//! go through from then on. An object of at most [`OUTBOARD_MIN`] bytes (or a larger one
//! the remote has no outboard for) is fetched whole, hashed, and stored as an ordinary
//! local object marked as fetched ([`super::origin`]). A larger one is fetched in
//! [`CHUNK`]-aligned chunks (a read's missing chunks in one range request per run of
//! neighbours), each 64 KiB group checked against the object's outboard, which is fetched
//! first and checked against the id. Its chunks accumulate in `STORE/partial/ab/cdef…`, a
//! sparse file of the object's length, beside `…​.chunks`, one byte per chunk (1: present).
//! A chunk's bytes are written and synced before its byte is, so after a crash a marked
//! chunk holds fetched bytes; they are checked against the outboard again when first read
//! after a restart all the same. When every chunk is there, the file is marked and renamed
//! into `objects/` and is an ordinary (fetched) object.
//!
//! A fetched range that does not match is fetched once more; if it still does not, the read
//! fails (EIO at the NBD client) and the log names the object. Reads of chunks already
//! here never touch the network, so they keep working while the backend is down.
//!
//! Eviction (`cache/evict.rs`) deletes whole objects, fetched or partial, never one a read
//! or prefetch is using, and never one not marked as fetched from this remote.

mod evict;
mod partial;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};

pub use super::counters::CacheStats;
use super::lru::Lru;
use super::{origin, trace, Kind, Remote, RemoteError};
use crate::store::{ObjectId, Store, StoreLock};
pub use partial::Partial;

/// The unit of fetching: 16 outboard groups.
pub const CHUNK: u64 = 1 << 20;

use crate::store::outboard::OUTBOARD_MIN;

/// Objects of the store at `root` being fetched from a remote (files under `partial/`), and
/// the disk their fetched chunks take.
pub fn partial_objects(root: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut count, mut bytes) = (0, 0);
    let Ok(fans) = fs::read_dir(root.join("partial")) else {
        return (0, 0);
    };
    for fan in fans.flatten() {
        for entry in fs::read_dir(fan.path()).into_iter().flatten().flatten() {
            if let Ok(meta) = entry.metadata() {
                bytes += meta.blocks() * 512;
                if !entry.file_name().to_string_lossy().ends_with(".chunks") {
                    count += 1;
                }
            }
        }
    }
    (count, bytes)
}

/// A local store backed by a remote one.
#[derive(Debug)]
pub struct RemoteCache {
    local: Store,
    remote: Arc<Remote>,
    /// The handle of every object being read through the cache.
    open: Mutex<HashMap<ObjectId, Weak<Partial>>>,
    pub stats: CacheStats,
    /// What was fetched, in order: the prefetch trace being recorded (see [`trace`]).
    fetched: Mutex<Vec<trace::Entry>>,
    /// Fetched objects here (whole or partial), least recently used first.
    lru: Mutex<Lru>,
    /// `--cache-size`: the most bytes of fetched objects kept here.
    limit: OnceLock<u64>,
    /// One eviction at a time.
    evicting: Mutex<()>,
}

/// What a read of an object goes through.
#[derive(Debug)]
pub enum Fetched {
    /// The object is a local object that did not come from this remote: open it.
    Local,
    /// The object comes from the remote: read it through its handle.
    Partial(Arc<Partial>),
}

impl RemoteCache {
    /// `local` (without a remote of its own) as a cache of `remote`.
    pub fn new(local: Store, remote: Arc<Remote>) -> RemoteCache {
        RemoteCache {
            local,
            remote,
            open: Mutex::new(HashMap::new()),
            stats: CacheStats::default(),
            fetched: Mutex::new(Vec::new()),
            lru: Mutex::new(Lru::default()),
            limit: OnceLock::new(),
            evicting: Mutex::new(()),
        }
    }

    fn record(&self, id: ObjectId, chunks: Range<u64>) {
        let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
        if fetched.len() < trace::MAX_ENTRIES {
            fetched.push(trace::Entry { id, chunks });
        }
    }

    /// Everything fetched since the cache was opened, in order.
    pub fn fetched(&self) -> Vec<trace::Entry> {
        self.fetched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Fetch what `entry` names unless it is here already (a prefetch).
    pub fn prefetch(self: &Arc<Self>, entry: &trace::Entry) -> io::Result<()> {
        if self.local.has_object(&entry.id) {
            return Ok(());
        }
        let result = match self.open(entry.id)? {
            Fetched::Local => Ok(()),
            Fetched::Partial(p) => p.prefetch(entry.chunks.clone()),
        };
        self.enforce();
        result
    }

    pub fn remote(&self) -> &Arc<Remote> {
        &self.remote
    }

    pub fn local(&self) -> &Store {
        &self.local
    }

    fn partial_path(&self, id: &ObjectId) -> PathBuf {
        let hex = id.to_hex();
        self.local
            .root()
            .join("partial")
            .join(&hex[..2])
            .join(&hex[2..])
    }

    /// Whether the local object `id` was fetched from this remote (so may be evicted).
    fn fetched_here(&self, id: &ObjectId) -> bool {
        origin::of(&self.local.object_path(id)).as_deref() == Some(self.remote.url())
    }

    /// How object `id` is to be read: objects missing here and objects fetched from this
    /// remote get a handle (no I/O yet: the first read fetches); other local objects are
    /// read like any.
    pub fn open(self: &Arc<Self>, id: ObjectId) -> io::Result<Fetched> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = open.get(&id).and_then(Weak::upgrade) {
            return Ok(Fetched::Partial(p));
        }
        if self.local.has_object(&id) && !self.lru().contains(&id) && !self.fetched_here(&id) {
            return Ok(Fetched::Local);
        }
        // Drop entries of handles nobody holds, amortized over insertions.
        if open.len() >= 1024 && open.len().is_power_of_two() {
            open.retain(|_, w| w.strong_count() > 0);
        }
        let p = Arc::new(Partial::new(self.clone(), id));
        open.insert(id, Arc::downgrade(&p));
        Ok(Fetched::Partial(p))
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One request for the first [`OUTBOARD_MIN`]` + 1` bytes of `id`: if that is all of
    /// it, the object is small and now stored here (`Some(len)`); otherwise it has an
    /// outboard to fetch (`None`). Saves small objects, the many, a round trip for the
    /// outboard.
    fn fetch_small(&self, id: &ObjectId) -> io::Result<Option<u64>> {
        if *id == ObjectId::of(b"") {
            // An empty range cannot be requested; the empty object needs no fetching.
            self.store_fetched(id, b"")?;
            return Ok(Some(0));
        }
        let head = self
            .remote
            .get_object_range(id, 0..OUTBOARD_MIN + 1)
            .map_err(backend)?;
        if head.len() as u64 > OUTBOARD_MIN {
            return Ok(None);
        }
        self.stats
            .bytes_fetched
            .fetch_add(head.len() as u64, Ordering::Relaxed);
        if ObjectId::of(&head) == *id {
            self.store_fetched(id, &head)?;
            return Ok(Some(head.len() as u64));
        }
        self.stats.mismatches.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(object = %id, "fetched object does not match its name; fetching it again");
        self.fetch_whole(id, 1).map(Some)
    }

    /// Fetch `id` whole, check it, store it; up to `tries` fetches while it mismatches.
    /// The object's length.
    fn fetch_whole(&self, id: &ObjectId, tries: u32) -> io::Result<u64> {
        for attempt in 1..=tries {
            let bytes = self.remote.get_content(Kind::Object, id).map_err(backend)?;
            self.stats
                .bytes_fetched
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if ObjectId::of(&bytes) == *id {
                self.store_fetched(id, &bytes)?;
                return Ok(bytes.len() as u64);
            }
            self.stats.mismatches.fetch_add(1, Ordering::Relaxed);
            if attempt < tries {
                tracing::warn!(object = %id, "fetched object does not match its name; fetching it again");
            }
        }
        tracing::error!(
            object = %id,
            remote = self.remote.url(),
            "object fetched from the remote store does not match its name (BLAKE3): reads of it fail with EIO"
        );
        Err(mismatch(id, 0..u64::MAX))
    }

    /// Keep the checked bytes of object `id`, fetched whole.
    fn store_fetched(&self, id: &ObjectId, bytes: &[u8]) -> io::Result<()> {
        {
            let _lock = self.write_lock()?;
            self.local
                .put_fetched_object(bytes, self.remote.url())
                .map_err(io::Error::other)?;
        }
        // Unless it was here for good already (imported), or cannot be marked.
        if self.fetched_here(id) {
            self.lru().add(*id, bytes.len() as u64);
        }
        self.record(*id, 0..0);
        Ok(())
    }
}

impl RemoteCache {
    /// The store lock, shared, held while fetched bytes are written under `tmp/` or
    /// `partial/` and named, as an import holds it: a `store gc` (exclusive) never empties
    /// `tmp/` or judges `partial/` and the outboards halfway through. Not held across
    /// network requests, so an eviction (which only tries the lock exclusively) is not kept
    /// out by slow fetches.
    fn write_lock(&self) -> io::Result<StoreLock> {
        self.local.lock(false).map_err(io::Error::other)
    }
}

fn map_path(path: &std::path::Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".chunks");
    PathBuf::from(p)
}

fn backend(e: RemoteError) -> io::Error {
    io::Error::other(e)
}

fn mismatch(id: &ObjectId, range: Range<u64>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "object {id} bytes {}..{} fetched from the remote store do not match its name",
            range.start, range.end
        ),
    )
}

#[cfg(test)]
mod tests;
