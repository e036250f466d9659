//! A mapped object, and whether a range of it can be read without waiting on the disk.
//!
//! The answer comes from `mincore(2)`, which cost about a tenth of the server's CPU per
//! random 4 KiB read: a VMA lookup, an ownership check and a page-table walk per call, more
//! than one call per read. A chunk of a mapping that `mincore` found wholly resident a
//! moment ago almost surely still is, so each mapping remembers, per [`CHUNK`] bytes, when
//! it last saw the whole chunk resident, and for [`TRUST_MS`] after that a read inside the
//! chunk skips the call. One `mincore` over a whole chunk costs about what one over a
//! page does, and is then shared by every read of the chunk. A chunk found resident at
//! every check in a row is trusted longer each time, up to [`MAX_STREAK`] doublings (2 s):
//! a store of small objects is one mapping, and one chunk, per object, and random reads over
//! 4 000 of them made 0.16 `mincore` calls per read at QD32 against 0.012 for the same
//! objects packed into one file (3% of the server's samples against 0.5%).
//!
//! Being wrong costs time, never bytes: the reply is still copied from the mapping, and a
//! page evicted meanwhile is read back by a page fault on the async thread, which then
//! waits on the disk. Pages read within the last quarter second are the last the kernel
//! evicts.
//!
//! `mincore` answers truly only for files the caller owns (or has `CAP_FOWNER` over) or
//! could open for writing; for any other file it says every page is resident, to close a
//! side channel (`can_do_mincore()`, mm/mincore.c). Store objects are read-only, so a
//! server running as another user than the store's owner would take every read as
//! resident and fault cold pages in on its async threads. A mapping of such a file
//! ([`mincore_tells`] false) is never taken as resident: reads of it go to `pread`, with
//! `RWF_NOWAIT` where a descriptor is at hand.

use std::fs::File;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Once};
use std::time::Instant;

use memmap2::Mmap;

use super::PAGE;

/// How long a chunk seen resident is taken as still resident, doubled for each check in a
/// row that found it resident, up to [`MAX_STREAK`] times.
const TRUST_MS: u32 = 250;
const MAX_STREAK: u64 = 3;
/// Bytes of a mapping tracked together (at most 512 pages per `mincore`).
const CHUNK: usize = 2 << 20;

/// An object's mapping and when each of its chunks was last seen wholly resident.
#[derive(Debug)]
pub(in crate::blockdev) struct Mapping {
    map: Mmap,
    /// Per chunk: [`now_ms`] when last seen resident, plus one (zero: never), in the low 32
    /// bits; above them, how many checks in a row before that one found it resident.
    seen: Box<[AtomicU64]>,
    /// Whether `mincore` tells the truth about this mapping's file ([`mincore_tells`]).
    truthful: bool,
}

impl Deref for Mapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Mapping {
    /// `map` of a file owned by user `owner`.
    pub fn new(map: Mmap, owner: u32) -> Mapping {
        Self::with_truth(map, mincore_tells(owner))
    }

    fn with_truth(map: Mmap, truthful: bool) -> Mapping {
        let seen = (0..map.len().div_ceil(CHUNK))
            .map(|_| AtomicU64::new(0))
            .collect();
        Mapping {
            map,
            seen,
            truthful,
        }
    }

    /// Whether every page of `self[start..end]` is in memory, so that reading it cannot
    /// wait on the disk. `start < end <= self.len()`. Always false when `mincore` cannot
    /// tell ([`Mapping::truthful`]).
    pub fn resident(&self, start: usize, end: usize) -> bool {
        self.truthful && self.resident_at(start, end, now_ms())
    }

    /// Whether [`Mapping::resident`] can ever say yes: `mincore` tells this process the
    /// truth about the file.
    pub fn truthful(&self) -> bool {
        self.truthful
    }

    fn resident_at(&self, start: usize, end: usize, now: u32) -> bool {
        let chunks = start / CHUNK..=(end - 1) / CHUNK;
        if chunks.clone().all(|c| self.fresh(c, now)) {
            return true;
        }
        for c in chunks {
            if self.fresh(c, now) {
                continue;
            }
            let (from, to) = (c * CHUNK, ((c + 1) * CHUNK).min(self.map.len()));
            let before = self.seen[c].load(Ordering::Relaxed);
            if mincore(&self.map, from, to) {
                let streak = if before == 0 {
                    0
                } else {
                    ((before >> 32) + 1).min(MAX_STREAK)
                };
                let seen = (streak << 32) | now.wrapping_add(1).max(1) as u64;
                self.seen[c].store(seen, Ordering::Relaxed);
            } else {
                // Part of the chunk is out: trust it no longer, and ask about just the range.
                self.seen[c].store(0, Ordering::Relaxed);
                return mincore(&self.map, start, end);
            }
        }
        true
    }

    fn fresh(&self, chunk: usize, now: u32) -> bool {
        let seen = self.seen[chunk].load(Ordering::Relaxed);
        let (at, streak) = (seen as u32, seen >> 32);
        at != 0 && now.wrapping_sub(at.wrapping_sub(1)) <= TRUST_MS << streak
    }
}

/// An object's bytes in a mapping: a large object's own, or its range of a pack's
/// (`store::pack`), which starts page-aligned.
#[derive(Debug)]
pub(in crate::blockdev) struct Window {
    map: Arc<Mapping>,
    base: usize,
    len: usize,
    /// The pack's descriptor, for reads the caller makes itself (`direct.rs`); a large
    /// object's own mapping keeps none.
    pack: Option<Arc<File>>,
}

impl Window {
    /// The whole of `map`.
    pub fn whole(map: Mapping) -> Window {
        Window {
            len: map.len(),
            map: Arc::new(map),
            base: 0,
            pack: None,
        }
    }

    /// `len` bytes at `base` of the pack mapped as `map` from `file`; `None` unless they lie
    /// inside it and `base` is page-aligned (as the pack's index promises: `store::pack`).
    pub fn packed(map: Arc<Mapping>, file: Arc<File>, base: u64, len: u64) -> Option<Window> {
        base.checked_add(len).filter(|&e| e <= map.len() as u64)?;
        (base as usize % PAGE == 0).then(|| Window {
            map,
            base: base as usize,
            len: len as usize,
            pack: Some(file),
        })
    }

    /// Like [`Mapping::resident`], for `self[start..end]`.
    pub fn resident(&self, start: usize, end: usize) -> bool {
        self.map.resident(self.base + start, self.base + end)
    }

    /// Like [`Mapping::truthful`].
    pub fn truthful(&self) -> bool {
        self.map.truthful()
    }

    /// The pack file and where the object starts in it, for a packed object.
    pub fn pack_file(&self) -> Option<(&Arc<File>, u64)> {
        self.pack.as_ref().map(|f| (f, self.base as u64))
    }
}

impl Deref for Window {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.base..self.base + self.len]
    }
}

/// Milliseconds since the first call, wrapping.
fn now_ms() -> u32 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    START.elapsed().as_millis() as u32
}

/// Whether `mincore(2)` reports the pages of a file owned by `owner` as they are to this
/// process: the kernel does for a file whose owner is the caller's (file system) user id or
/// that the caller holds `CAP_FOWNER` over, or that it could open for writing. The last is
/// not checked: store files are read-only, so the answer is at worst a false "no", which
/// costs a `pread` where a copy from the mapping would have done.
fn mincore_tells(owner: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let told = owner == unsafe { libc::geteuid() } || *CAP_FOWNER;
    if !told {
        static SAID: Once = Once::new();
        SAID.call_once(|| {
            tracing::warn!(
                owner,
                "store objects are owned by another user: the kernel does not tell this \
                 server which of their pages are cached (mincore), so reads of mapped \
                 objects go through pread; run the server as the store's owner for \
                 zero-copy replies"
            )
        });
    }
    told
}

/// `CAP_FOWNER`'s bit in a capability set (linux/capability.h).
const CAP_FOWNER_BIT: u32 = 3;

/// Whether this process holds `CAP_FOWNER` (in `CapEff` of /proc/self/status).
static CAP_FOWNER: LazyLock<bool> = LazyLock::new(|| {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_FOWNER_BIT) != 0)
});

/// `mincore(2)` over the pages of `map[start..end]`: all resident?
fn mincore(map: &[u8], start: usize, end: usize) -> bool {
    let first = start / PAGE * PAGE;
    let span = end - first;
    let pages = span.div_ceil(PAGE);
    let mut small = [0u8; 64];
    let mut large = Vec::new();
    let vec: &mut [u8] = if pages <= small.len() {
        &mut small[..pages]
    } else {
        large.resize(pages, 0);
        &mut large
    };
    // SAFETY: `first..end` lies inside the live mapping `map` (the caller checks `end`, and
    // a mapping starts page-aligned), and `vec` has one byte per page of that range.
    let r = unsafe {
        libc::mincore(
            map.as_ptr().add(first) as *mut libc::c_void,
            span,
            vec.as_mut_ptr(),
        )
    };
    r == 0 && vec.iter().all(|&v| v & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    fn mapping_of(bytes: &[u8]) -> Mapping {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        // SAFETY: a private temporary file nobody else writes.
        Mapping::new(
            unsafe { Mmap::map(&f) }.unwrap(),
            f.metadata().unwrap().uid(),
        )
    }

    #[test]
    fn a_chunk_seen_resident_is_trusted_for_a_while() {
        let m = mapping_of(&vec![7u8; CHUNK + 3 * PAGE]);
        assert_eq!(m.seen.len(), 2);
        let t = 1_000;
        // Just written: the file's pages are in the page cache.
        assert!(m.resident_at(PAGE, 2 * PAGE, t));
        assert!(m.fresh(0, t) && m.fresh(0, t + TRUST_MS) && !m.fresh(0, t + TRUST_MS + 1));
        assert!(!m.fresh(1, t), "only the chunks read are remembered");
        // A range across both chunks checks the second and remembers it.
        assert!(m.resident_at(CHUNK - PAGE, CHUNK + PAGE, t));
        assert!(m.fresh(1, t));
        // The clock wraps around without trusting old sightings.
        m.seen[0].store(u32::MAX as u64, Ordering::Relaxed); // seen at u32::MAX - 1
        assert!(m.fresh(0, 5));
        assert!(!m.fresh(0, u32::MAX / 2));
    }

    #[test]
    fn a_chunk_found_resident_check_after_check_is_trusted_longer_until_a_check_fails() {
        let mut anon = memmap2::MmapMut::map_anon(2 * PAGE).unwrap();
        anon[0] = 1;
        anon[PAGE] = 1;
        let m = Mapping::with_truth(anon.make_read_only().unwrap(), true);
        let mut t = 1_000;
        assert!(m.resident_at(0, PAGE, t));
        for trust in [
            TRUST_MS,
            2 * TRUST_MS,
            4 * TRUST_MS,
            8 * TRUST_MS,
            8 * TRUST_MS,
        ] {
            assert!(
                m.fresh(0, t + trust) && !m.fresh(0, t + trust + 1),
                "trust {trust}"
            );
            // The next check, once the trust ran out.
            t += trust + 1;
            assert!(m.resident_at(0, PAGE, t));
        }
        // A check that finds part of the chunk out resets the streak.
        // SAFETY: the range is the second page of `m`'s private anonymous mapping, whose
        // bytes nothing reads again; MADV_DONTNEED only drops it from memory.
        let r = unsafe {
            libc::madvise(
                m.as_ptr().add(PAGE) as *mut libc::c_void,
                PAGE,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
        t += 8 * TRUST_MS + 1;
        assert!(m.resident_at(0, PAGE, t), "the first page is still in");
        assert!(!m.fresh(0, t), "the chunk is not all in");
        assert!(m.seen[0].load(Ordering::Relaxed) == 0, "the streak is gone");
    }

    #[test]
    fn a_chunk_partly_out_of_memory_is_asked_about_the_range_and_not_remembered() {
        // An anonymous mapping's pages are out of memory until written.
        let mut anon = memmap2::MmapMut::map_anon(CHUNK + 4 * PAGE).unwrap();
        anon[0] = 1;
        anon[CHUNK] = 1;
        let m = Mapping::with_truth(anon.make_read_only().unwrap(), true);
        let t = 1_000;
        assert!(m.resident_at(0, PAGE, t));
        assert!(!m.fresh(0, t), "the rest of the chunk is out");
        assert!(!m.resident_at(PAGE, 2 * PAGE, t));
        assert!(!m.resident_at(0, 2 * PAGE, t));
        // The last chunk is short (4 pages), and only its first page was written.
        assert!(m.resident_at(CHUNK, CHUNK + PAGE, t));
        assert!(!m.fresh(1, t));
    }
}
