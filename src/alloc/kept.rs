//! Large blocks the server maps itself, kept for reuse when freed.
//!
//! The server has glibc map every block of 256 KiB or more on its own (the nbd crate's
//! `buffers.rs`) and unmap it when freed. Each image's first read builds and frees several
//! megabytes of such tables (the composed tree, the prepared inodes, the placement), so every
//! synthesis mapped them fresh, faulted and zeroed every page, and unmapped them again, each
//! unmap a TLB shootdown: a quarter of the serving thread's time per first read in a profile
//! of 300 first reads (`madvise` populating, page faults, `munmap`). Blocks of that size are
//! now mapped here instead, and a freed one is kept (up to [`KEEP`] bytes) for the next block
//! that fits it, as the next image's tables usually do. What is kept is given back when the
//! server goes quiet ([`release`], called by the background thread once idle), so the memory
//! a settled server holds is what it uses.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::PAGE;

/// Bytes of freed blocks kept at most.
pub(super) const KEEP: usize = 32 << 20;

struct Blocks {
    /// Every live block made here: address to mapping length.
    live: BTreeMap<usize, usize>,
    /// Freed mappings kept for reuse: (address, length).
    kept: Vec<(usize, usize)>,
    kept_bytes: usize,
}

/// Large blocks made and kept; the allocator's are [`KEPT`].
pub(super) struct Kept {
    // Only small allocations happen under this lock (map nodes, the kept list), which never
    // come back here: no block made here is needed to make another.
    blocks: Mutex<Blocks>,
}

/// The allocator's large blocks.
pub(super) static KEPT: Kept = Kept::new();

impl Kept {
    pub(super) const fn new() -> Kept {
        Kept {
            blocks: Mutex::new(Blocks {
                live: BTreeMap::new(),
                kept: Vec::new(),
                kept_bytes: 0,
            }),
        }
    }

    fn blocks(&self) -> MutexGuard<'_, Blocks> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A page-aligned block of at least `size` bytes: a kept mapping no more than a quarter
    /// larger, or a fresh one, faulted in at once when `populate`. Null if mapping fails.
    pub(super) fn alloc(&self, size: usize, zeroed: bool, populate: bool) -> *mut u8 {
        let len = size.next_multiple_of(PAGE);
        let reused = {
            let mut b = self.blocks();
            let fit = b
                .kept
                .iter()
                .enumerate()
                .filter(|&(_, &(_, l))| l >= len && l - len <= len / 4)
                .min_by_key(|&(_, &(_, l))| l)
                .map(|(i, _)| i);
            fit.map(|i| {
                let (p, l) = b.kept.swap_remove(i);
                b.kept_bytes -= l;
                b.live.insert(p, l);
                p
            })
        };
        if let Some(p) = reused {
            if zeroed {
                // SAFETY: `p..p + size` lies inside the kept mapping just taken for this block.
                unsafe { std::ptr::write_bytes(p as *mut u8, 0, size) };
            }
            return p as *mut u8;
        }
        let flags =
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a new private anonymous mapping; it aliases no memory of this process.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        self.blocks().live.insert(p as usize, len);
        p as *mut u8
    }

    /// Frees `p` if this module made it, keeping its mapping if there is room; `false` if it
    /// did not (a block glibc made).
    pub(super) fn dealloc(&self, p: *mut u8) -> bool {
        let mut b = self.blocks();
        let Some(len) = b.live.remove(&(p as usize)) else {
            return false;
        };
        if len > KEEP {
            drop(b);
            unmap(p as usize, len);
            return true;
        }
        // Room is made by giving back the blocks kept longest: the sizes a server makes drift
        // (images differ, tables grow by doubling), and the newest are likeliest to fit next.
        let mut evicted = Vec::new();
        while b.kept_bytes + len > KEEP {
            let (q, l) = b.kept.remove(0);
            b.kept_bytes -= l;
            evicted.push((q, l));
        }
        b.kept.push((p as usize, len));
        b.kept_bytes += len;
        drop(b);
        for (q, l) in evicted {
            unmap(q, l);
        }
        true
    }

    /// Resizes `p` to `size` bytes if this module made it (`None` if not); null if the kernel
    /// could not, with the block left as it was.
    pub(super) fn realloc(&self, p: *mut u8, size: usize) -> Option<*mut u8> {
        let len = self.blocks().live.remove(&(p as usize))?;
        let new_len = size.next_multiple_of(PAGE);
        // SAFETY: `p..p + len` is a whole mapping made here and owned by the caller's block,
        // out of the live table while it is remapped.
        let q = unsafe { libc::mremap(p as *mut libc::c_void, len, new_len, libc::MREMAP_MAYMOVE) };
        let mut b = self.blocks();
        if q == libc::MAP_FAILED {
            b.live.insert(p as usize, len);
            return Some(std::ptr::null_mut());
        }
        b.live.insert(q as usize, new_len);
        Some(q as *mut u8)
    }

    /// Unmaps every kept block.
    pub(super) fn release(&self) {
        let kept = {
            let mut b = self.blocks();
            b.kept_bytes = 0;
            std::mem::take(&mut b.kept)
        };
        for (p, len) in kept {
            unmap(p, len);
        }
    }

    /// Bytes of freed blocks kept now.
    pub(super) fn kept_bytes(&self) -> usize {
        self.blocks().kept_bytes
    }

    /// Whether `p` is a live block made here.
    pub(super) fn owns(&self, p: *mut u8) -> bool {
        self.blocks().live.contains_key(&(p as usize))
    }
}

fn unmap(p: usize, len: usize) {
    // SAFETY: `p..p + len` is a whole mapping made here that no block uses any more.
    unsafe { libc::munmap(p as *mut libc::c_void, len) };
}
