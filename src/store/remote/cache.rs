//! The local store as a cache of a remote one: object bytes fetched on demand, verified
//! against the object's name before anyone sees them, and kept.
//!
//! An object of at most [`OUTBOARD_MIN`] bytes (or a larger one the remote has no outboard
//! for) is fetched whole, hashed, and stored as an ordinary local object. A larger one is
//! fetched in [`CHUNK`]-aligned chunks (a read's missing chunks in one range request per
//! run of neighbours), each 64 KiB group checked against the object's outboard, which is
//! fetched first and checked against the id. Its chunks accumulate in
//! `STORE/partial/ab/cdef…`, a sparse file of the object's length, beside
//! `…​.chunks`, one byte per chunk (1: present). A chunk's bytes are written and synced
//! before its byte is, so after a crash a marked chunk holds fetched bytes; they are checked
//! against the outboard again when first read after a restart all the same. When every
//! chunk is there, the file is renamed into `objects/` and is an ordinary object.
//!
//! A fetched range that does not match is fetched once more; if it still does not, the read
//! fails (EIO at the NBD client) and the log names the object. Reads of chunks already
//! here never touch the network, so they keep working while the backend is down.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::{trace, Kind, Remote, RemoteError};
use crate::store::outboard::OUTBOARD_MIN;
use crate::store::{ObjectId, Outboard, Store};

/// The unit of fetching: 16 outboard groups.
pub const CHUNK: u64 = 1 << 20;

/// Counters of what the cache did since it was opened.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Object reads answered from chunks already here.
    pub hits: AtomicU64,
    /// Object reads that had to fetch.
    pub misses: AtomicU64,
    pub bytes_fetched: AtomicU64,
    /// Fetched ranges that did not match the object's name.
    pub mismatches: AtomicU64,
}

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
    open: Mutex<HashMap<ObjectId, Weak<Partial>>>,
    pub stats: CacheStats,
    /// What was fetched, in order: the prefetch trace being recorded (see [`trace`]).
    fetched: Mutex<Vec<trace::Entry>>,
}

/// What a read of a missing object goes through.
#[derive(Debug)]
pub enum Fetched {
    /// The object is now an ordinary local object: open it.
    Local,
    /// The object is being fetched chunk by chunk.
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
        match self.open(entry.id)? {
            Fetched::Local => Ok(()),
            Fetched::Partial(p) => {
                let chunks = entry.chunks.start.min(p.chunks())..entry.chunks.end.min(p.chunks());
                p.ensure(chunks)
            }
        }
    }

    pub fn remote(&self) -> &Arc<Remote> {
        &self.remote
    }

    fn partial_path(&self, id: &ObjectId) -> PathBuf {
        let hex = id.to_hex();
        self.local
            .root()
            .join("partial")
            .join(&hex[..2])
            .join(&hex[2..])
    }

    /// Make object `id`, missing locally, readable: small objects are fetched whole now,
    /// large ones get a [`Partial`] that fetches as it is read.
    pub fn open(self: &Arc<Self>, id: ObjectId) -> io::Result<Fetched> {
        if let Some(p) = self.live(&id) {
            return Ok(Fetched::Partial(p));
        }
        if self.local.has_object(&id) {
            return Ok(Fetched::Local);
        }
        let outboard = if self.local.outboard_path(&id).exists() {
            self.local.read_outboard(&id).ok().flatten()
        } else {
            None
        };
        if outboard.is_none() && self.fetch_small(&id)? {
            return Ok(Fetched::Local);
        }
        let outboard = match outboard {
            Some(o) => Some(o),
            None => match self.remote.get_content(Kind::Outboard, &id) {
                Ok(bytes) => match Outboard::decode(&id, &bytes) {
                    Ok(o) => {
                        self.local.put_outboard(&id, &o).map_err(io::Error::other)?;
                        Some(o)
                    }
                    Err(e) => {
                        tracing::warn!(object = %id, error = %e, "the remote's outboard is invalid; fetching the object whole");
                        None
                    }
                },
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(backend(e)),
            },
        };
        let Some(outboard) = outboard.filter(|o| o.len() > OUTBOARD_MIN) else {
            self.fetch_whole(&id, 2)?;
            return Ok(Fetched::Local);
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = open.get(&id).and_then(Weak::upgrade) {
            return Ok(Fetched::Partial(p));
        }
        let partial = Arc::new(Partial::open(self.clone(), id, outboard)?);
        open.insert(id, Arc::downgrade(&partial));
        Ok(Fetched::Partial(partial))
    }

    fn live(&self, id: &ObjectId) -> Option<Arc<Partial>> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(id).and_then(Weak::upgrade)
    }

    /// One request for the first [`OUTBOARD_MIN`]` + 1` bytes of `id`: if that is all of
    /// it, the object is small and now stored here (true); otherwise it has an outboard to
    /// fetch (false). Saves small objects, the many, a round trip for the outboard.
    fn fetch_small(&self, id: &ObjectId) -> io::Result<bool> {
        if *id == ObjectId::of(b"") {
            // An empty range cannot be requested; the empty object needs no fetching.
            self.local.put_object_bytes(b"").map_err(io::Error::other)?;
            return Ok(true);
        }
        let head = self
            .remote
            .get_object_range(id, 0..OUTBOARD_MIN + 1)
            .map_err(backend)?;
        if head.len() as u64 > OUTBOARD_MIN {
            return Ok(false);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_fetched
            .fetch_add(head.len() as u64, Ordering::Relaxed);
        if ObjectId::of(&head) == *id {
            self.local
                .put_object_bytes(&head)
                .map_err(io::Error::other)?;
            self.record(*id, 0..0);
            return Ok(true);
        }
        self.stats.mismatches.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(object = %id, "fetched object does not match its name; fetching it again");
        self.fetch_whole(id, 1)?;
        Ok(true)
    }

    /// Fetch `id` whole, check it, store it; up to `tries` fetches while it mismatches.
    fn fetch_whole(&self, id: &ObjectId, tries: u32) -> io::Result<()> {
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        for attempt in 1..=tries {
            let bytes = self.remote.get_content(Kind::Object, id).map_err(backend)?;
            self.stats
                .bytes_fetched
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if ObjectId::of(&bytes) == *id {
                self.local
                    .put_object_bytes(&bytes)
                    .map_err(io::Error::other)?;
                self.record(*id, 0..0);
                return Ok(());
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
}

/// A large object being fetched chunk by chunk into a sparse file.
#[derive(Debug)]
pub struct Partial {
    cache: Arc<RemoteCache>,
    id: ObjectId,
    outboard: Outboard,
    file: File,
    map: File,
    path: PathBuf,
    /// Per chunk: 0 absent, 1 on disk from an earlier run (unchecked), 2 checked.
    state: Box<[AtomicU8]>,
    /// Held while fetching, so two readers of one chunk fetch it once.
    fetching: Mutex<()>,
    /// Every chunk is here and the file has been named as the object.
    completed: AtomicBool,
}

const ABSENT: u8 = 0;
const ON_DISK: u8 = 1;
const CHECKED: u8 = 2;

impl Partial {
    fn open(cache: Arc<RemoteCache>, id: ObjectId, outboard: Outboard) -> io::Result<Partial> {
        let path = cache.partial_path(&id);
        let dir = path.parent().expect("fan directory");
        fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        file.set_len(outboard.len())?;
        let map = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(map_path(&path))?;
        let chunks = outboard.len().div_ceil(CHUNK) as usize;
        let mut marks = vec![0u8; chunks];
        let have = map.read_at(&mut marks, 0)?;
        marks[have..].fill(0);
        map.set_len(chunks as u64)?;
        let state = marks
            .iter()
            .map(|&m| AtomicU8::new(if m == 1 { ON_DISK } else { ABSENT }))
            .collect();
        Ok(Partial {
            cache,
            id,
            outboard,
            file,
            map,
            path,
            state,
            fetching: Mutex::new(()),
            completed: AtomicBool::new(false),
        })
    }

    fn len(&self) -> u64 {
        self.outboard.len()
    }

    fn chunks(&self) -> u64 {
        self.state.len() as u64
    }

    fn chunk_range(&self, c: u64) -> Range<u64> {
        c * CHUNK..((c + 1) * CHUNK).min(self.len())
    }

    /// Fill `out` with the object's bytes at `offset`, fetching what is missing.
    pub fn read(&self, out: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&e| e <= self.len())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "object {} is {} bytes, read of {}+{}",
                        self.id,
                        self.len(),
                        offset,
                        out.len()
                    ),
                )
            })?;
        if out.is_empty() {
            return Ok(());
        }
        let chunks = offset / CHUNK..end.div_ceil(CHUNK);
        if chunks.clone().all(|c| self.state(c) == CHECKED) {
            self.cache.stats.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.cache.stats.misses.fetch_add(1, Ordering::Relaxed);
            self.ensure(chunks)?;
        }
        self.file.read_exact_at(out, offset)
    }

    fn state(&self, c: u64) -> u8 {
        self.state[c as usize].load(Ordering::Acquire)
    }

    /// Make every chunk of `chunks` present and checked.
    fn ensure(&self, chunks: Range<u64>) -> io::Result<()> {
        let _guard = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        // Chunks kept by an earlier run: check them from disk.
        for c in chunks.clone() {
            if self.state(c) == ON_DISK {
                let r = self.chunk_range(c);
                let mut buf = vec![0u8; (r.end - r.start) as usize];
                self.file.read_exact_at(&mut buf, r.start)?;
                let next = if self.check(r.start, &buf).is_ok() {
                    CHECKED
                } else {
                    ABSENT
                };
                self.state[c as usize].store(next, Ordering::Release);
            }
        }
        // Runs of missing neighbours, one request each.
        let mut c = chunks.start;
        while c < chunks.end {
            if self.state(c) == CHECKED {
                c += 1;
                continue;
            }
            let start = c;
            while c < chunks.end && self.state(c) != CHECKED {
                c += 1;
            }
            self.fetch(start..c)?;
        }
        let all_here = || {
            self.state
                .iter()
                .all(|s| s.load(Ordering::Acquire) == CHECKED)
        };
        if !self.completed.load(Ordering::Acquire) && all_here() {
            self.completed.store(true, Ordering::Release);
            if let Err(e) = self.complete() {
                tracing::warn!(object = %self.id, error = %e, "cannot turn the fetched object into a local object");
            }
        }
        Ok(())
    }

    /// Fetch chunks `run`, check them, write them durably, mark them.
    fn fetch(&self, run: Range<u64>) -> io::Result<()> {
        let range = run.start * CHUNK..(run.end * CHUNK).min(self.len());
        let mut bytes = None;
        for attempt in 0..2 {
            let got = self
                .cache
                .remote
                .get_object_range(&self.id, range.clone())
                .map_err(backend)?;
            self.cache
                .stats
                .bytes_fetched
                .fetch_add(got.len() as u64, Ordering::Relaxed);
            match self.check(range.start, &got) {
                Ok(()) => {
                    bytes = Some(got);
                    break;
                }
                Err(bad) => {
                    self.cache.stats.mismatches.fetch_add(1, Ordering::Relaxed);
                    if attempt == 0 {
                        tracing::warn!(object = %self.id, bytes = ?bad, "fetched bytes do not match the object's name; fetching them again");
                    } else {
                        tracing::error!(
                            object = %self.id,
                            bytes = ?bad,
                            remote = self.cache.remote.url(),
                            "object bytes fetched from the remote store do not match its name (BLAKE3): reads of them fail with EIO"
                        );
                        return Err(mismatch(&self.id, bad));
                    }
                }
            }
        }
        let bytes = bytes.expect("checked bytes");
        self.file.write_all_at(&bytes, range.start)?;
        self.file.sync_data()?;
        let marks = vec![1u8; (run.end - run.start) as usize];
        self.map.write_all_at(&marks, run.start)?;
        self.map.sync_data()?;
        for c in run.clone() {
            self.state[c as usize].store(CHECKED, Ordering::Release);
        }
        self.cache.record(self.id, run);
        Ok(())
    }

    /// Check `bytes`, the object's bytes at the group-aligned `offset`; the first bad
    /// group's range on a mismatch.
    fn check(&self, offset: u64, bytes: &[u8]) -> Result<(), Range<u64>> {
        let groups = self.outboard.groups_covering(offset, bytes.len() as u64);
        for g in groups {
            let r = self.outboard.group_range(g);
            let slice = bytes
                .get((r.start - offset) as usize..(r.end - offset) as usize)
                .ok_or(r.clone())?;
            self.outboard.check_group(g, slice).map_err(|m| m.range)?;
        }
        Ok(())
    }

    /// Every chunk is here: name the file as the object.
    fn complete(&self) -> io::Result<()> {
        let dest = self.cache.local.object_path(&self.id);
        if dest.exists() {
            fs::remove_file(&self.path)?;
        } else {
            self.file.sync_all()?;
            fs::set_permissions(&self.path, fs::Permissions::from_mode(0o444))?;
            fs::create_dir_all(dest.parent().expect("fan directory"))?;
            fs::rename(&self.path, &dest)?;
            File::open(dest.parent().expect("fan directory"))?.sync_all()?;
        }
        fs::remove_file(map_path(&self.path))?;
        Ok(())
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
mod tests {
    use super::*;

    fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) as u8
            })
            .collect()
    }

    /// A remote (a directory) holding `data` as an object with its outboard, and an empty
    /// local store caching it.
    fn setup(dir: &std::path::Path, data: &[u8]) -> (Arc<RemoteCache>, ObjectId, PathBuf) {
        let remote_dir = dir.join("remote");
        let remote =
            Arc::new(Remote::open(&format!("file://{}", remote_dir.display()), None).unwrap());
        let id = ObjectId::of(data);
        remote
            .put_content(Kind::Object, &id, bytes::Bytes::copy_from_slice(data))
            .unwrap();
        if let Some(o) = Outboard::compute(data).filter(|_| data.len() as u64 > OUTBOARD_MIN) {
            remote
                .put_content(Kind::Outboard, &id, bytes::Bytes::from(o.encode()))
                .unwrap();
        }
        let hex = id.to_hex();
        let remote_path = remote_dir.join("objects").join(&hex[..2]).join(&hex[2..]);
        let local = Store::open(&dir.join("local")).unwrap().with_remote(remote);
        (local.remote_cache().unwrap().clone(), id, remote_path)
    }

    fn partial(cache: &Arc<RemoteCache>, id: ObjectId) -> Arc<Partial> {
        match cache.open(id).unwrap() {
            Fetched::Partial(p) => p,
            Fetched::Local => panic!("a large object is fetched in chunks"),
        }
    }

    #[test]
    fn chunks_survive_a_restart_are_rechecked_and_complete_into_an_object() {
        let dir = tempfile::tempdir().unwrap();
        let data = pseudo_random(3 * CHUNK as usize + 777, 1);
        let (cache, id, _) = setup(dir.path(), &data);
        let p = partial(&cache, id);
        let mut out = vec![0u8; 100];
        p.read(&mut out, 2 * CHUNK + 5).unwrap();
        assert_eq!(out, data[2 * CHUNK as usize + 5..][..100]);
        let path = cache.partial_path(&id);
        assert_eq!(fs::read(map_path(&path)).unwrap(), [0, 0, 1, 0]);
        assert_eq!(cache.stats.bytes_fetched.load(Ordering::Relaxed), CHUNK);
        drop(p);

        // A restart, with the kept chunk damaged on disk: it is checked and fetched again.
        let local = cache.local.root().to_path_buf();
        let remote = cache.remote.clone();
        drop(cache);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"garbage", 2 * CHUNK + 5).unwrap();
        let store = Store::open(&local).unwrap().with_remote(remote);
        let cache = store.remote_cache().unwrap().clone();
        let p = partial(&cache, id);
        p.read(&mut out, 2 * CHUNK + 5).unwrap();
        assert_eq!(out, data[2 * CHUNK as usize + 5..][..100]);

        // Reading the rest (two neighbouring chunks in one request) completes the object.
        let mut all = vec![0u8; data.len()];
        p.read(&mut all, 0).unwrap();
        assert_eq!(all, data);
        assert!(store.has_object(&id));
        assert!(!path.exists() && !map_path(&path).exists());
        assert_eq!(
            fs::read(store.object_path(&id)).unwrap(),
            data,
            "the completed object is the object"
        );
    }

    #[test]
    fn a_damaged_remote_chunk_fails_only_its_reads() {
        let dir = tempfile::tempdir().unwrap();
        let data = pseudo_random(2 * CHUNK as usize + 10, 2);
        let (cache, id, remote_path) = setup(dir.path(), &data);
        let mut bad = data.clone();
        bad[CHUNK as usize + 3] ^= 1;
        fs::write(&remote_path, &bad).unwrap();
        let p = partial(&cache, id);
        let mut out = vec![0u8; 10];
        let err = p.read(&mut out, CHUNK).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&id.to_hex()), "{err}");
        assert_eq!(
            cache.stats.mismatches.load(Ordering::Relaxed),
            2,
            "refetched once"
        );
        p.read(&mut out, 0).unwrap();
        assert_eq!(out, data[..10]);
        p.read(&mut out, 2 * CHUNK).unwrap();
        assert_eq!(out, data[2 * CHUNK as usize..]);
    }

    #[test]
    fn small_objects_are_fetched_whole_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let data = pseudo_random(5000, 3);
        let (cache, id, remote_path) = setup(dir.path(), &data);
        fs::write(&remote_path, b"not the object").unwrap();
        let err = cache.open(id).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(!cache.local.has_object(&id));
        fs::write(&remote_path, &data).unwrap();
        assert!(matches!(cache.open(id).unwrap(), Fetched::Local));
        assert_eq!(fs::read(cache.local.object_path(&id)).unwrap(), data);
    }
}
