//! One object read through the cache: its shape (length, outboard), which of its chunks are
//! here, the files holding them, and the pin that keeps eviction away while it is read.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use super::{backend, map_path, mismatch, Kind, RemoteCache, CHUNK, OUTBOARD_MIN};
use crate::store::remote::origin;
use crate::store::{ObjectId, Outboard, StoreLock};

/// An object fetched, or being fetched, from the remote. Every read of it goes through
/// here, so the cache knows when it is in use and can delete its files when it is not.
#[derive(Debug)]
pub struct Partial {
    cache: Arc<RemoteCache>,
    id: ObjectId,
    /// Known from the first read on.
    shape: OnceLock<Shape>,
    /// Held shared by every read and prefetch; eviction only tries to take it, so an
    /// object being read is never evicted.
    pub(super) pin: RwLock<()>,
    /// Held while fetching (two readers of one chunk fetch it once): the chunk map.
    fetching: Mutex<Option<File>>,
    /// A large object's partial file while it is being fetched; complete objects, whole or
    /// chunked, are opened for each read (their descriptors would be too many to keep).
    data: Mutex<Option<Arc<File>>>,
}

#[derive(Debug)]
struct Shape {
    len: u64,
    /// `None`: fetched and checked whole, one "chunk".
    outboard: Option<Outboard>,
    /// Per chunk: 0 absent, 1 on disk from an earlier run (unchecked), 2 checked.
    state: Box<[AtomicU8]>,
}

const ABSENT: u8 = 0;
const ON_DISK: u8 = 1;
const CHECKED: u8 = 2;

impl Shape {
    fn whole(len: u64, here: bool) -> Shape {
        Shape {
            len,
            outboard: None,
            state: Box::new([AtomicU8::new(if here { CHECKED } else { ABSENT })]),
        }
    }

    fn chunked(outboard: Outboard, state: u8) -> Shape {
        let chunks = outboard.len().div_ceil(CHUNK) as usize;
        Shape {
            len: outboard.len(),
            outboard: Some(outboard),
            state: (0..chunks).map(|_| AtomicU8::new(state)).collect(),
        }
    }

    fn chunks(&self) -> u64 {
        self.state.len() as u64
    }

    fn chunk_range(&self, c: u64) -> Range<u64> {
        match self.outboard {
            Some(_) => c * CHUNK..((c + 1) * CHUNK).min(self.len),
            None => 0..self.len,
        }
    }

    /// The chunks holding `offset..end`.
    fn covering(&self, offset: u64, end: u64) -> Range<u64> {
        match self.outboard {
            Some(_) => offset / CHUNK..end.div_ceil(CHUNK),
            None => 0..1,
        }
    }

    fn state(&self, c: u64) -> u8 {
        self.state[c as usize].load(Ordering::Acquire)
    }

    fn set(&self, c: u64, s: u8) {
        self.state[c as usize].store(s, Ordering::Release);
    }

    fn all_checked(&self, chunks: Range<u64>) -> bool {
        chunks.into_iter().all(|c| self.state(c) == CHECKED)
    }

    /// Bytes of the chunks here (checked or not).
    fn held(&self) -> u64 {
        (0..self.chunks())
            .filter(|&c| self.state(c) != ABSENT)
            .map(|c| {
                let r = self.chunk_range(c);
                r.end - r.start
            })
            .sum()
    }
}

impl Partial {
    pub(super) fn new(cache: Arc<RemoteCache>, id: ObjectId) -> Partial {
        Partial {
            cache,
            id,
            shape: OnceLock::new(),
            pin: RwLock::new(()),
            fetching: Mutex::new(None),
            data: Mutex::new(None),
        }
    }

    fn fetching(&self) -> MutexGuard<'_, Option<File>> {
        self.fetching.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn data(&self) -> MutexGuard<'_, Option<Arc<File>>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fill `out` with the object's bytes at `offset`, fetching what is missing.
    pub fn read(&self, out: &mut [u8], offset: u64) -> io::Result<()> {
        let result = self.read_pinned(out, offset);
        // After the pin is gone, so this object too may go if it is the oldest.
        self.cache.enforce();
        result
    }

    fn read_pinned(&self, out: &mut [u8], offset: u64) -> io::Result<()> {
        let _pin = self.pin.read().unwrap_or_else(|e| e.into_inner());
        let (shape, fetched) = self.shape()?;
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&e| e <= shape.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "object {} is {} bytes, read of {}+{}",
                        self.id,
                        shape.len,
                        offset,
                        out.len()
                    ),
                )
            })?;
        if out.is_empty() {
            return Ok(());
        }
        let chunks = shape.covering(offset, end);
        let stats = &self.cache.stats;
        if !fetched && shape.all_checked(chunks.clone()) {
            stats.hits.fetch_add(1, Ordering::Relaxed);
            self.cache.lru().touch(self.id);
        } else {
            stats.misses.fetch_add(1, Ordering::Relaxed);
            self.ensure(shape, chunks.clone())?;
        }
        match self.read_here(shape, out, offset) {
            // A complete object deleted under us (gc, or another server's eviction).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                for c in 0..shape.chunks() {
                    shape.set(c, ABSENT);
                }
                self.cache.lru().remove(&self.id);
                self.ensure(shape, chunks)?;
                self.read_here(shape, out, offset)
            }
            r => r,
        }
    }

    /// Read bytes that are here: from the partial file, or from the complete object,
    /// opened for the read (descriptors of every object once read would be too many).
    fn read_here(&self, shape: &Shape, out: &mut [u8], offset: u64) -> io::Result<()> {
        let partial = shape.outboard.as_ref().and(self.data().clone());
        let file = match partial {
            Some(f) => f,
            None => Arc::new(File::open(self.cache.local.object_path(&self.id))?),
        };
        file.read_exact_at(out, offset)
    }

    /// Fetch the chunks of `chunks` (clamped to the object) unless they are here.
    pub(super) fn prefetch(&self, chunks: Range<u64>) -> io::Result<()> {
        let _pin = self.pin.read().unwrap_or_else(|e| e.into_inner());
        let (shape, _) = self.shape()?;
        let n = shape.chunks();
        let chunks = match shape.outboard {
            Some(_) => chunks.start.min(n)..chunks.end.min(n),
            None => 0..1,
        };
        self.ensure(shape, chunks)
    }

    /// The object's shape, found out on first use; true if finding it out fetched the
    /// object whole (a small one).
    fn shape(&self) -> io::Result<(&Shape, bool)> {
        if let Some(s) = self.shape.get() {
            return Ok((s, false));
        }
        let mut map = self.fetching();
        if let Some(s) = self.shape.get() {
            return Ok((s, false));
        }
        let (shape, fetched) = self.find_shape(&mut map)?;
        let _ = self.shape.set(shape);
        Ok((self.shape.get().expect("just set"), fetched))
    }

    fn find_shape(&self, map: &mut Option<File>) -> io::Result<(Shape, bool)> {
        let cache = &self.cache;
        let local = &cache.local;
        let id = &self.id;
        // Fetched earlier (by an earlier run, or a prefetch of this one).
        let path = local.object_path(id);
        if let Ok(meta) = fs::metadata(&path) {
            let len = meta.len();
            cache.lru().set(*id, len);
            let outboard = if len > OUTBOARD_MIN {
                local.read_outboard(id).ok().flatten()
            } else {
                None
            };
            return Ok(match outboard {
                Some(o) => (Shape::chunked(o, CHECKED), false),
                None => (Shape::whole(len, true), false),
            });
        }
        let mut outboard = local.read_outboard(id).ok().flatten();
        // Taken before the outboard is stored and held until the partial file exists:
        // gc keeps the outboard of a live object only while it is here or being fetched.
        let mut lock = None;
        if outboard.is_none() {
            if let Some(len) = cache.fetch_small(id)? {
                return Ok((Shape::whole(len, true), true));
            }
            outboard = match cache.remote.get_content(Kind::Outboard, id) {
                Ok(bytes) => match Outboard::decode(id, &bytes) {
                    Ok(o) => {
                        lock = Some(cache.write_lock()?);
                        local.put_outboard(id, &o).map_err(io::Error::other)?;
                        Some(o)
                    }
                    Err(e) => {
                        tracing::warn!(object = %id, error = %e, "the remote's outboard is invalid; fetching the object whole");
                        None
                    }
                },
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(backend(e)),
            };
        }
        match outboard.filter(|o| o.len() > OUTBOARD_MIN) {
            Some(o) => {
                let shape = Shape::chunked(o, ABSENT);
                let lock = match lock {
                    Some(l) => l,
                    None => cache.write_lock()?,
                };
                self.open_files(&shape, map, &lock)?;
                Ok((shape, false))
            }
            None => {
                drop(lock);
                let len = cache.fetch_whole(id, 2)?;
                Ok((Shape::whole(len, true), true))
            }
        }
    }

    /// Open (or create) the partial file and its chunk map, and take the marks of chunks
    /// an earlier run kept. The caller holds the store lock (shared).
    fn open_files(
        &self,
        shape: &Shape,
        map: &mut Option<File>,
        _locked: &StoreLock,
    ) -> io::Result<()> {
        let path = self.cache.partial_path(&self.id);
        fs::create_dir_all(path.parent().expect("fan directory"))?;
        let open = |p: &std::path::Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
        };
        let file = open(&path)?;
        file.set_len(shape.len)?;
        let chunks = open(&map_path(&path))?;
        let mut marks = vec![0u8; shape.chunks() as usize];
        let have = chunks.read_at(&mut marks, 0)?;
        marks[have..].fill(0);
        chunks.set_len(shape.chunks())?;
        for (c, &m) in marks.iter().enumerate() {
            shape.set(c as u64, if m == 1 { ON_DISK } else { ABSENT });
        }
        self.cache.lru().set(self.id, shape.held());
        *map = Some(chunks);
        *self.data() = Some(Arc::new(file));
        Ok(())
    }

    /// Make every chunk of `chunks` present and checked. The caller holds the pin.
    fn ensure(&self, shape: &Shape, chunks: Range<u64>) -> io::Result<()> {
        let mut map = self.fetching();
        let Some(outboard) = &shape.outboard else {
            if shape.state(0) != CHECKED {
                self.cache.fetch_whole(&self.id, 2)?;
                shape.set(0, CHECKED);
            }
            return Ok(());
        };
        if shape.all_checked(chunks.clone()) {
            return Ok(());
        }
        if self.data().is_none() {
            // Complete and evicted since (or deleted by someone else): start again.
            self.open_files(shape, &mut map, &self.cache.write_lock()?)?;
        }
        let file = self.data().clone().expect("opened");
        // Chunks kept by an earlier run: check them from disk.
        for c in chunks.clone() {
            if shape.state(c) == ON_DISK {
                let r = shape.chunk_range(c);
                let mut buf = vec![0u8; (r.end - r.start) as usize];
                file.read_exact_at(&mut buf, r.start)?;
                if check(outboard, r.start, &buf).is_ok() {
                    shape.set(c, CHECKED);
                } else {
                    shape.set(c, ABSENT);
                    self.cache.lru().sub(&self.id, r.end - r.start);
                }
            }
        }
        // Runs of missing neighbours, one request each.
        let mut c = chunks.start;
        while c < chunks.end {
            if shape.state(c) == CHECKED {
                c += 1;
                continue;
            }
            let start = c;
            while c < chunks.end && shape.state(c) != CHECKED {
                c += 1;
            }
            self.fetch(shape, outboard, &file, map.as_ref(), start..c)?;
        }
        if map.is_some() && shape.all_checked(0..shape.chunks()) {
            if let Err(e) = self.complete(&file, &mut map) {
                tracing::warn!(object = %self.id, error = %e, "cannot turn the fetched object into a local object");
            }
        }
        Ok(())
    }

    /// Fetch chunks `run`, check them, write them durably, mark them.
    fn fetch(
        &self,
        shape: &Shape,
        outboard: &Outboard,
        file: &File,
        map: Option<&File>,
        run: Range<u64>,
    ) -> io::Result<()> {
        let cache = &self.cache;
        let range = run.start * CHUNK..(run.end * CHUNK).min(shape.len);
        let mut bytes = None;
        for attempt in 0..2 {
            let got = cache
                .remote
                .get_object_range(&self.id, range.clone())
                .map_err(backend)?;
            cache
                .stats
                .bytes_fetched
                .fetch_add(got.len() as u64, Ordering::Relaxed);
            match check(outboard, range.start, &got) {
                Ok(()) => {
                    bytes = Some(got);
                    break;
                }
                Err(bad) => {
                    cache.stats.mismatches.fetch_add(1, Ordering::Relaxed);
                    if attempt == 0 {
                        tracing::warn!(object = %self.id, bytes = ?bad, "fetched bytes do not match the object's name; fetching them again");
                    } else {
                        tracing::error!(
                            object = %self.id,
                            bytes = ?bad,
                            remote = cache.remote.url(),
                            "object bytes fetched from the remote store do not match its name (BLAKE3): reads of them fail with EIO"
                        );
                        return Err(mismatch(&self.id, bad));
                    }
                }
            }
        }
        let bytes = bytes.expect("checked bytes");
        let _lock = cache.write_lock()?;
        file.write_all_at(&bytes, range.start)?;
        file.sync_data()?;
        if let Some(map) = map {
            let marks = vec![1u8; (run.end - run.start) as usize];
            map.write_all_at(&marks, run.start)?;
            map.sync_data()?;
        }
        let mut added = 0;
        for c in run.clone() {
            if shape.state(c) == ABSENT {
                let r = shape.chunk_range(c);
                added += r.end - r.start;
            }
            shape.set(c, CHECKED);
        }
        cache.lru().add(self.id, added);
        cache.record(self.id, run);
        Ok(())
    }

    /// Every chunk is here: mark the file as fetched and name it as the object.
    fn complete(&self, file: &File, map: &mut Option<File>) -> io::Result<()> {
        let cache = &self.cache;
        let path = cache.partial_path(&self.id);
        let dest = cache.local.object_path(&self.id);
        let _lock = cache.write_lock()?;
        if dest.exists() {
            // Someone else completed it: read theirs, drop ours.
            fs::remove_file(&path)?;
        } else {
            origin::mark(file, cache.remote.url());
            file.sync_all()?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o444))?;
            fs::create_dir_all(dest.parent().expect("fan directory"))?;
            fs::rename(&path, &dest)?;
            File::open(dest.parent().expect("fan directory"))?.sync_all()?;
        }
        *map = None;
        *self.data() = None;
        fs::remove_file(map_path(&path))?;
        Ok(())
    }

    pub(super) fn id(&self) -> ObjectId {
        self.id
    }

    /// Whether a read or prefetch holds the object now.
    pub(super) fn in_use(&self) -> bool {
        self.pin.try_write().is_err()
    }

    /// Delete the object's files here unless it is in use or no longer the cache's. Readers
    /// of it wait meanwhile (they hold the pin shared); any other way to the files goes
    /// through this handle, which the cache's table names while it lives.
    pub(super) fn evict(&self) -> Eviction {
        let Ok(_only) = self.pin.try_write() else {
            return Eviction::InUse;
        };
        let Ok(mut map) = self.fetching.try_lock() else {
            return Eviction::InUse;
        };
        if self.cache.local.has_kept_object(&self.id) {
            // Written here for good since it was fetched (an import of the same bytes):
            // reads find it complete, and it is not the cache's to delete.
            return Eviction::Kept;
        }
        *map = None;
        *self.data() = None;
        self.cache.delete_files(&self.id);
        if let Some(shape) = self.shape.get() {
            for c in 0..shape.chunks() {
                shape.set(c, ABSENT);
            }
        }
        Eviction::Done
    }
}

/// What [`Partial::evict`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Eviction {
    Done,
    /// A read or prefetch holds it.
    InUse,
    /// A local object kept for good now (see [`crate::store::Store::has_kept_object`]).
    Kept,
}

/// Check `bytes`, the object's bytes at the group-aligned `offset`; the first bad group's
/// range on a mismatch.
fn check(outboard: &Outboard, offset: u64, bytes: &[u8]) -> Result<(), Range<u64>> {
    for g in outboard.groups_covering(offset, bytes.len() as u64) {
        let r = outboard.group_range(g);
        let slice = bytes
            .get((r.start - offset) as usize..(r.end - offset) as usize)
            .ok_or(r.clone())?;
        outboard.check_group(g, slice).map_err(|m| m.range)?;
    }
    Ok(())
}
