//! What `serve --verify` knows about one object: which of its groups have been checked
//! against the object's name, and the outboard hashes that make checking one group possible.
//!
//! An object of at most [`OUTBOARD_MIN`] bytes is one group, checked whole against its id
//! the first time it is read. A longer one is checked per 64 KiB group against its outboard
//! (`store::outboard`), loaded once; an object without a valid outboard (a store older than
//! outboards, or a damaged one) is hashed whole once to compute it, and the result is written
//! back to the store. Checked groups are remembered in a bitmap for as long as the object is
//! loaded, so a hot group is hashed once; a group that failed is remembered too, so every
//! read touching it fails without hashing again, and it is logged once.
//!
//! What this does not catch: bytes that change after their group was checked (the object
//! modified in place while served, or a page evicted and re-read from a disk that now returns
//! other bytes). Verification is of the bytes as first read. `tessera store verify` rehashes
//! everything.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::store::error_chain as chain;
use crate::store::outboard::{groups_covering, OUTBOARD_MIN};
use crate::store::{ObjectId, Outboard, Store};

/// One bit per group.
#[derive(Debug)]
struct Bits(Box<[AtomicU64]>);

impl Bits {
    fn new(n: u64) -> Bits {
        Bits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; true if it was clear.
    fn set(&self, i: u64) -> bool {
        let bit = 1 << (i % 64);
        self.0[(i / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn fill(&self, n: u64) {
        for i in 0..n {
            self.set(i);
        }
    }
}

/// The verification state of one object.
#[derive(Debug)]
pub(super) struct Check {
    id: ObjectId,
    /// `None`: the object is one group, checked against `id`.
    outboard: Option<Outboard>,
    ok: Bits,
    bad: Bits,
    /// For objects read with `pread` (no mapping holds the file): the (device, inode) whose
    /// bytes were checked; a different file under the name is checked again.
    file: Mutex<Option<(u64, u64)>>,
}

impl Check {
    /// State for a mapped object whose bytes are `map`: its outboard loaded, or computed
    /// (and stored) if it has none.
    pub(super) fn load(id: ObjectId, object_path: &std::path::Path, map: &[u8]) -> Check {
        let len = map.len() as u64;
        if len <= OUTBOARD_MIN {
            return Check::whole(id);
        }
        let store = store_of(object_path);
        match store.as_ref().map(|s| s.read_outboard(&id)) {
            Some(Ok(Some(outboard))) => return Check::with_outboard(id, outboard),
            Some(Ok(None)) | None => {}
            Some(Err(e)) => {
                tracing::warn!(object = %id, error = %chain(&e), "ignoring the outboard; recomputing it")
            }
        }
        let outboard = Outboard::compute(map).expect("longer than one group");
        if outboard.root() != id {
            tracing::error!(
                object = %id,
                path = %object_path.display(),
                "object does not match its name and has no outboard to tell which part is \
                 damaged: every read of it fails with EIO; run `tessera store verify`"
            );
            let check = Check::whole(id);
            check.bad.set(0);
            return check;
        }
        if let Some(store) = store {
            if let Err(e) = store.put_outboard(&id, &outboard) {
                tracing::warn!(object = %id, error = %chain(&e), "cannot store the computed outboard");
            }
        }
        let check = Check::with_outboard(id, outboard);
        check.ok.fill(check.groups());
        check
    }

    /// State for an object checked whole against its id.
    pub(super) fn whole(id: ObjectId) -> Check {
        Check {
            id,
            outboard: None,
            ok: Bits::new(1),
            bad: Bits::new(1),
            file: Mutex::new(None),
        }
    }

    fn with_outboard(id: ObjectId, outboard: Outboard) -> Check {
        Check {
            id,
            ok: Bits::new(outboard.groups()),
            bad: Bits::new(outboard.groups()),
            outboard: Some(outboard),
            file: Mutex::new(None),
        }
    }

    fn groups(&self) -> u64 {
        self.outboard.as_ref().map_or(1, Outboard::groups)
    }

    /// The groups of `offset..offset + len`.
    fn covering(&self, offset: u64, len: u64) -> Range<u64> {
        match &self.outboard {
            Some(_) => {
                let r = groups_covering(offset, len);
                r.start.min(self.groups())..r.end.min(self.groups())
            }
            None => 0..u64::from(len > 0),
        }
    }

    /// Whether every group of the range has been checked and found good.
    pub(super) fn is_verified(&self, offset: u64, len: u64) -> bool {
        self.covering(offset, len).all(|g| self.ok.get(g))
    }

    /// Check the groups of `offset..offset + len` of the mapped object `map`.
    pub(super) fn verify_mapped(&self, map: &[u8], offset: u64, len: u64) -> io::Result<()> {
        for g in self.covering(offset, len) {
            if self.ok.get(g) {
                continue;
            }
            let range = self.group_range(g, map.len() as u64);
            if self.bad.get(g) {
                return Err(self.mismatch(range));
            }
            let good = match (
                &self.outboard,
                map.get(range.start as usize..range.end as usize),
            ) {
                (_, None) => false,
                (Some(outboard), Some(bytes)) => outboard.check_group(g, bytes).is_ok(),
                (None, Some(bytes)) => hash(bytes) == self.id,
            };
            self.record(g, good, &range)?;
        }
        Ok(())
    }

    /// For an object read with `pread`: whether `file` (identified by device and inode)
    /// has been checked and found good.
    pub(super) fn is_verified_file(&self, file: (u64, u64)) -> bool {
        self.ok.get(0) && *self.file.lock().unwrap_or_else(|e| e.into_inner()) == Some(file)
    }

    /// Check `bytes`, the whole of the object as read from `file`.
    pub(super) fn verify_whole(&self, file: (u64, u64), bytes: &[u8]) -> io::Result<()> {
        let range = 0..bytes.len() as u64;
        let good = hash(bytes) == self.id;
        if good {
            *self.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
        }
        self.record(0, good, &range)
    }

    fn record(&self, g: u64, good: bool, range: &Range<u64>) -> io::Result<()> {
        if good {
            self.ok.set(g);
            return Ok(());
        }
        if self.bad.set(g) {
            tracing::error!(
                object = %self.id,
                bytes = ?range,
                "object bytes do not match its name (BLAKE3): reads of them fail with EIO; \
                 run `tessera store verify`"
            );
        }
        Err(self.mismatch(range.clone()))
    }

    fn group_range(&self, g: u64, have: u64) -> Range<u64> {
        match &self.outboard {
            Some(outboard) => outboard.group_range(g),
            None => 0..have,
        }
    }

    fn mismatch(&self, range: Range<u64>) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "object {} bytes {}..{} do not match its name; run `tessera store verify`",
                self.id, range.start, range.end
            ),
        )
    }
}

fn hash(bytes: &[u8]) -> ObjectId {
    let mut hasher = blake3::Hasher::new();
    if bytes.len() >= 128 << 10 {
        hasher.update_rayon(bytes);
    } else {
        hasher.update(bytes);
    }
    hasher.finalize().into()
}

/// The store holding the object at `STORE/objects/ab/cdef…`.
fn store_of(object_path: &std::path::Path) -> Option<Store> {
    let root = object_path.parent()?.parent()?.parent()?;
    Store::open(root).ok()
}
