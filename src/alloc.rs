//! The binary's allocator: the system's, asking for transparent huge pages for large
//! blocks when a command turns that on ([`huge_pages_for_large`]), or for large blocks to
//! be faulted in at once ([`populate_large`]).
//!
//! `image create` of a large tree builds tens of megabytes of short-lived tables (the
//! composed tree, the prepared inodes), and a fresh process pays a page fault per 4 KiB of
//! them: on /usr/share (53 000 entries) about 6 000 faults, a fifth of the command's time.
//! Blocks of 2 MiB and more are then advised `MADV_HUGEPAGE`, so that the kernel backs them
//! with 2 MiB pages where it has some (THP "madvise" mode, Debian's default), one fault
//! each. Off by default: a server keeps its heap in 4 KiB pages, whose memory it counts per
//! export.
//!
//! The server has glibc map every block of 256 KiB or more on its own (see the nbd crate's
//! `buffers.rs`), so each image it synthesizes gets fresh mappings for its tables (the
//! composed tree's nodes alone are ~1 MB for 6 300 entries) and faults them in a page at a
//! time: ~600 page-fault traps per first read. With those blocks populated in one
//! `madvise(MADV_POPULATE_WRITE)` each when they are made, 231 instead of 626
//! (`tools/bench-exports 300`), and the first read's synthesis took 4.8 instead of 5.7 ms
//! (means of four interleaved runs' medians; single runs on this machine vary more).
//! Such blocks are filled right after they are made (tables sized to their contents, reply
//! buffers sized to a request), so populating them costs no memory they would not have
//! used; blocks grown by `realloc` (a `Vec` doubling its capacity) are left alone. RSS per
//! read export was unchanged (`tools/bench-exports 1000`: 87 and 88 B/file).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

static HUGE: AtomicBool = AtomicBool::new(false);

/// Blocks at least this large are advised when huge pages are on.
const LARGE: usize = 2 << 20;
const PAGE: usize = 4096;

/// Turns huge-page advice for large blocks on or off for the rest of the process.
pub fn huge_pages_for_large(on: bool) {
    HUGE.store(on, Ordering::Relaxed);
}

static POPULATE: AtomicBool = AtomicBool::new(false);

/// Blocks at least this large are populated when that is on: those the server's glibc maps
/// on their own.
const POPULATED: usize = 256 << 10;

/// Linux 5.14's `MADV_POPULATE_WRITE` (not in the `libc` crate yet): fault the range in
/// writable now. Older kernels refuse it (`EINVAL`), and the block is faulted in as used.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Turns populating large blocks on or off for the rest of the process (see the module's
/// documentation).
pub fn populate_large(on: bool) {
    POPULATE.store(on, Ordering::Relaxed);
}

/// The system allocator plus huge-page advice and populating (see the module's documentation).
pub struct Allocator;

/// Advice for a block of `size` bytes just made at `p`; `fresh`: made by `alloc`, not
/// grown by `realloc` (a growing `Vec` doubles its capacity, which it has not filled yet).
fn advise(p: *mut u8, size: usize, fresh: bool) {
    if fresh && !p.is_null() && size >= POPULATED && POPULATE.load(Ordering::Relaxed) {
        let (start, end) = pages_within(p, size);
        if end > start {
            // SAFETY: `start..end` lies inside the block just allocated (rounded inwards to
            // whole pages). MADV_POPULATE_WRITE faults those pages in as a first write
            // would, without changing their contents; failure (an old kernel) is harmless.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE) };
        }
    }
    if p.is_null() || size < LARGE || !HUGE.load(Ordering::Relaxed) {
        return;
    }
    let (start, end) = pages_within(p, size);
    if end > start {
        // SAFETY: `start..end` lies inside the block just allocated (rounded inwards to
        // whole pages). MADV_HUGEPAGE only sets how future faults of the range are backed;
        // it changes no memory contents. Failure (no THP) is harmless and ignored.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// The whole pages of the block at `p` of `size` bytes.
fn pages_within(p: *mut u8, size: usize) -> (usize, usize) {
    let start = (p as usize).next_multiple_of(PAGE);
    (start, (p as usize + size) / PAGE * PAGE)
}

// SAFETY: every call is forwarded to `System` with the caller's arguments, which upholds
// the `GlobalAlloc` contract; `advise` only adds a hint on memory the block owns.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received (see the impl).
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size(), true);
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received (see the impl).
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size(), true);
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received (see the impl).
        unsafe { System.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as received (see the impl).
        let q = unsafe { System.realloc(p, layout, new_size) };
        // A block that was large already keeps its advice when it moves (mremap).
        if layout.size() < LARGE {
            advise(q, new_size, false);
        }
        q
    }
}

/// Gives free heap pages back to the kernel (glibc's `malloc_trim`); a no-op with other
/// allocators. It walks every arena: for work done now and then, not per request.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists under its
    // locks; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` line of the mapping holding `addr`, from /proc/self/smaps.
    fn vm_flags_at(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.to_owned();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn large_blocks_are_advised_only_once_turned_on() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            let msg = "alloc: needs a kernel with transparent huge pages";
            assert!(
                std::env::var_os("TESSERA_REQUIRE_PEERS").is_none_or(|v| v != "1"),
                "{msg} (TESSERA_REQUIRE_PEERS=1)"
            );
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {msg}");
            return;
        }
        let flags_of = |size: usize| {
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: a non-zero size; the block is freed with the same layout below.
            let p = unsafe { Allocator.alloc(layout) };
            assert!(!p.is_null());
            let flags = vm_flags_at(p as usize + size / 2);
            // SAFETY: allocated above with `layout`, not used after this.
            unsafe { Allocator.dealloc(p, layout) };
            flags
        };
        // Other tests in this process allocate through `System`, not `Allocator`: the
        // switch only affects the blocks made here.
        assert!(!flags_of(8 << 20).contains(" hg"), "advised while off");
        huge_pages_for_large(true);
        let large = flags_of(8 << 20);
        huge_pages_for_large(false);
        assert!(large.contains(" hg"), "8 MiB block not advised: {large}");
    }

    /// Pages of the block at `p` (`size` bytes) in memory, counted with `mincore`.
    fn resident_pages(p: *mut u8, size: usize) -> usize {
        let (start, end) = pages_within(p, size);
        let mut vec = vec![0u8; (end - start) / PAGE];
        // SAFETY: `start..end` is page-aligned and inside a live block; `vec` has one byte
        // per page of it.
        let r = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn large_blocks_are_populated_once_turned_on() {
        // Larger than glibc's mmap threshold can ever rise to (32 MiB): a fresh mapping
        // whatever other tests freed before.
        let size = 40 << 20;
        let resident = || {
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: a non-zero size; the block is freed with the same layout below.
            let p = unsafe { Allocator.alloc(layout) };
            assert!(!p.is_null());
            let n = resident_pages(p, size);
            // SAFETY: allocated above with `layout`, not used after this.
            unsafe { Allocator.dealloc(p, layout) };
            n
        };
        let pages = (size - PAGE) / PAGE;
        assert!(resident() < pages / 2, "populated while off");
        populate_large(true);
        let on = resident();
        populate_large(false);
        assert!(on >= pages, "{on} of {pages} pages resident");
    }
}
