//! The binary's allocator: the system's, asking for transparent huge pages for large
//! blocks when a command turns that on ([`huge_pages_for_large`]), or, in the server
//! ([`populate_large`]), making large blocks itself: faulted in at once and kept for reuse
//! when freed (`kept.rs`).
//!
//! `image create` of a large tree builds tens of megabytes of short-lived tables (the
//! composed tree, the prepared inodes), and a fresh process pays a page fault per 4 KiB of
//! them: on /usr/share (53 000 entries) about 6 000 faults, a fifth of the command's time.
//! Blocks of 2 MiB and more are then advised `MADV_HUGEPAGE`, so that the kernel backs them
//! with 2 MiB pages where it has some (THP "madvise" mode, Debian's default), one fault
//! each. Off by default: a server keeps its heap in 4 KiB pages, whose memory it counts per
//! export. Most of those tables are small blocks, though (a name, a directory's entries):
//! `image create` also grows glibc's heap by 64 MiB in one step and advises that part
//! ([`huge_heap`]), and blocks under 2 MiB come from that heap rather than from mappings of
//! their own: 699 page faults instead of 4 150 for /usr/share, and 29.7 instead of 37.4 ms
//! (medians of `tools/bench-create`'s 30 interleaved runs), for 2-3 MB more peak RSS.
//!
//! The server has glibc map every block of 256 KiB or more on its own (see the nbd crate's
//! `buffers.rs`), so each image it synthesizes got fresh mappings for its tables (the
//! composed tree's nodes alone are ~1 MB for 6 300 entries) and faulted them in a page at a
//! time: ~600 page-fault traps per first read. With those blocks populated in one go when
//! they are made, 231 instead of 626 (`tools/bench-exports 300`), and the first read's
//! synthesis took 4.8 instead of 5.7 ms (means of four interleaved runs' medians; single
//! runs on this machine vary more). Such blocks are filled right after they are made (tables
//! sized to their contents, reply buffers sized to a request), so populating them costs no
//! memory they would not have used; blocks grown by `realloc` (a `Vec` doubling its
//! capacity) are not populated. The server now makes these blocks itself and keeps freed
//! ones for the next image's tables (`kept.rs`), which spares the faults, the zeroing and
//! the unmapping altogether for most of them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

mod kept;

static HUGE: AtomicBool = AtomicBool::new(false);

/// Blocks at least this large are advised when huge pages are on.
const LARGE: usize = 2 << 20;
const PAGE: usize = 4096;

/// Turns huge-page advice for large blocks on or off for the rest of the process.
pub fn huge_pages_for_large(on: bool) {
    HUGE.store(on, Ordering::Relaxed);
}

/// Grows glibc's heap by `bytes` at once and advises that part `MADV_HUGEPAGE`, for a short
/// command whose many small blocks would otherwise fault the heap in 4 KiB at a time (see
/// the module's documentation). The heap then keeps what it grew: the command exits soon.
/// Call it on the main thread: other threads' blocks come from arenas of their own.
pub fn huge_heap(bytes: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt, sbrk(0) and malloc/free of blocks we own touch only the allocator's
    // own state; madvise(MADV_HUGEPAGE) on the whole pages of the heap's new part changes
    // how its future faults are backed, not its contents.
    unsafe {
        let bytes = bytes.min(i32::MAX as usize / 2) as libc::c_int;
        libc::mallopt(libc::M_TOP_PAD, bytes);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * bytes);
        // Blocks below the size `advise` takes come from this heap too, not from mappings
        // of their own in 4 KiB pages.
        libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE as libc::c_int);
        let before = libc::sbrk(0) as usize;
        // Blocks under the mmap threshold come from the heap's top; a few of them use up
        // what is left of it, and the next makes glibc grow the heap by `bytes` more.
        let mut held = Vec::with_capacity(8);
        while held.len() < 8 && (libc::sbrk(0) as usize) < before + bytes as usize / 2 {
            held.push(libc::malloc(64 << 10));
        }
        for p in held {
            libc::free(p);
        }
        let end = libc::sbrk(0) as usize / PAGE * PAGE;
        let start = before.next_multiple_of(PAGE);
        if end > start {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

static POPULATE: AtomicBool = AtomicBool::new(false);

/// Blocks at least this large are made by `kept` when that is on: the size from which the
/// server's glibc would map them on their own.
const POPULATED: usize = 256 << 10;

/// Turns making large blocks here (faulted in at once, kept for reuse when freed) on or off
/// for the rest of the process (see the module's documentation).
pub fn populate_large(on: bool) {
    if on {
        EVER_KEPT.store(true, Ordering::Relaxed);
    }
    POPULATE.store(on, Ordering::Relaxed);
}

/// The system allocator plus huge-page advice and populating (see the module's documentation).
pub struct Allocator;

/// Huge-page advice for a block of `size` bytes just made at `p` by `System`.
fn advise(p: *mut u8, size: usize) {
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

/// Whether a block of `layout` is made by [`kept`] now: large, page-aligned at most, and
/// populating on (the server).
fn kept_size(layout: &Layout) -> bool {
    layout.size() >= POPULATED && layout.align() <= PAGE && POPULATE.load(Ordering::Relaxed)
}

/// Whether a block of `layout` may have been made by [`kept`]: it made blocks of that size
/// if populating was ever on.
fn maybe_kept(layout: &Layout) -> bool {
    layout.size() >= POPULATED && layout.align() <= PAGE && EVER_KEPT.load(Ordering::Relaxed)
}

static EVER_KEPT: AtomicBool = AtomicBool::new(false);

// SAFETY: blocks of the server's large sizes come from `kept`'s own page-aligned mappings,
// each used by one block at a time and freed (or kept) only through `kept`, which knows
// every block it made; every other call is forwarded to `System` with the caller's
// arguments, which upholds the `GlobalAlloc` contract; `advise` only adds a hint on memory
// the block owns.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if kept_size(&layout) {
            return kept::KEPT.alloc(layout.size(), false, true);
        }
        // SAFETY: forwarded as received (see the impl).
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if kept_size(&layout) {
            return kept::KEPT.alloc(layout.size(), true, true);
        }
        // SAFETY: forwarded as received (see the impl).
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if maybe_kept(&layout) && kept::KEPT.dealloc(p) {
            return;
        }
        // SAFETY: forwarded as received (see the impl).
        unsafe { System.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align(new_size, layout.align()).expect("the caller's layout");
        if maybe_kept(&layout) {
            if kept_size(&new) {
                if let Some(q) = kept::KEPT.realloc(p, new_size) {
                    return q;
                }
            } else if kept::KEPT.owns(p) {
                // SAFETY: a block of `kept`, smaller now: moved into a `System` block of the
                // new size, then freed; the caller's contract covers `p` and `layout`.
                unsafe { return moved(p, layout, new) };
            }
        } else if kept_size(&new) {
            // SAFETY: a `System` block grown to a size `kept` makes: moved likewise.
            unsafe { return moved(p, layout, new) };
        }
        // SAFETY: forwarded as received (see the impl).
        let q = unsafe { System.realloc(p, layout, new_size) };
        // A block that was large already keeps its advice when it moves (mremap).
        if layout.size() < LARGE {
            advise(q, new_size);
        }
        q
    }
}

/// `realloc` by copying: a block of `new` from the allocator, the first bytes of `p`
/// copied into it, `p` freed. Null (and `p` left) if no block could be made.
///
/// # Safety
/// `p` is a live block of `layout` from [`Allocator`].
unsafe fn moved(p: *mut u8, layout: Layout, new: Layout) -> *mut u8 {
    // SAFETY: `new` has a non-zero size (the caller's realloc contract).
    let q = unsafe {
        if kept_size(&new) {
            kept::KEPT.alloc(new.size(), false, false)
        } else {
            System.alloc(new)
        }
    };
    if !q.is_null() {
        // SAFETY: both blocks are live and distinct; the copy stays within both.
        unsafe {
            std::ptr::copy_nonoverlapping(p, q, layout.size().min(new.size()));
            Allocator.dealloc(p, layout);
        }
    }
    q
}

/// Bytes of freed large blocks kept for reuse now (given back by [`release_free_memory`]).
pub fn kept_bytes() -> usize {
    kept::KEPT.kept_bytes()
}

/// Gives the large blocks kept for reuse and free heap pages back to the kernel (glibc's
/// `malloc_trim`, a no-op with other allocators). It walks every arena: for work done now and then, not per request.
pub fn release_free_memory() {
    kept::KEPT.release();
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

    /// Held by every test that turns a switch of this module on or off.
    static SWITCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn switches() -> std::sync::MutexGuard<'static, ()> {
        SWITCHES.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn large_blocks_are_advised_only_once_turned_on() {
        let _switches = switches();
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
        let _switches = switches();
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

    fn fill(p: *mut u8, len: usize, byte: u8) {
        // SAFETY: the callers pass live blocks of at least `len` bytes.
        unsafe { std::ptr::write_bytes(p, byte, len) };
    }

    fn all(p: *mut u8, len: usize, byte: u8) -> bool {
        // SAFETY: the callers pass live blocks of at least `len` bytes.
        unsafe { std::slice::from_raw_parts(p, len) }
            .iter()
            .all(|&b| b == byte)
    }

    #[test]
    fn a_freed_large_block_is_kept_for_the_next_one_that_fits_until_released() {
        // An instance of its own: the allocator's is released by other tests' threads.
        let kept = kept::Kept::new();
        let p = kept.alloc(1 << 20, false, true);
        assert!(!p.is_null());
        fill(p, 1 << 20, 0xAB);
        assert!(kept.dealloc(p));
        assert_eq!(kept.kept_bytes(), 1 << 20, "the freed block is kept");
        assert!(!kept.dealloc(0x1000 as *mut u8), "not a block made here");

        // A little smaller fits the kept block; zeroed means zeroed all the same.
        let smaller = (1 << 20) - 12345;
        let q = kept.alloc(smaller, true, true);
        assert_eq!(q, p, "the kept block is reused");
        assert!(all(q, smaller, 0), "a reused block made zeroed is zeroed");
        assert_eq!(kept.kept_bytes(), 0);

        // Much smaller does not take it: its mapping would be mostly waste.
        assert!(kept.dealloc(q));
        let r = kept.alloc(512 << 10, false, true);
        assert_ne!(r, q, "a block twice the size is not handed out");
        assert!(kept.dealloc(r));
        assert_eq!(kept.kept_bytes(), (1 << 20) + (512 << 10));

        kept.release();
        assert_eq!(kept.kept_bytes(), 0, "released");
        let mut vec = [0u8; 1];
        // SAFETY: mincore only reports on the range; ENOMEM means nothing is mapped there.
        let r = unsafe { libc::mincore(p as *mut libc::c_void, PAGE, vec.as_mut_ptr()) };
        assert_eq!(r, -1, "a released block is unmapped");
    }

    #[test]
    fn what_is_kept_stays_within_its_bound() {
        let kept = kept::Kept::new();
        let size = kept::KEEP / 4 + PAGE;
        let blocks: Vec<*mut u8> = (0..6).map(|_| kept.alloc(size, false, false)).collect();
        for &p in &blocks {
            assert!(!p.is_null());
            assert!(kept.dealloc(p));
            assert!(kept.kept_bytes() <= kept::KEEP);
        }
        // The newest are kept, the oldest given back.
        assert_eq!(kept.kept_bytes(), 3 * size);
        let again = kept.alloc(size, false, false);
        assert!(blocks[3..].contains(&again), "a block freed last is reused");
        assert!(kept.dealloc(again));
        // Too large to keep at all: unmapped at once.
        let huge = kept.alloc(kept::KEEP + PAGE, false, false);
        assert!(kept.dealloc(huge));
        assert_eq!(kept.kept_bytes(), 3 * size);
        kept.release();
    }

    #[test]
    fn blocks_keep_their_bytes_when_resized_across_the_large_size() {
        let _switches = switches();
        populate_large(true);
        let small = Layout::from_size_align(100 << 10, 8).unwrap();
        // SAFETY: non-zero sizes; each block is resized or freed with its current layout.
        unsafe {
            let p = Allocator.alloc(small);
            fill(p, small.size(), 1);
            // Small to large: moved into a block made here.
            let q = Allocator.realloc(p, small, 300 << 10);
            assert!(kept::KEPT.owns(q));
            assert!(all(q, small.size(), 1));
            fill(q.add(small.size()), (300 << 10) - small.size(), 2);
            // Large to larger: remapped.
            let large = Layout::from_size_align(300 << 10, 8).unwrap();
            let r = Allocator.realloc(q, large, 5 << 20);
            assert!(kept::KEPT.owns(r));
            assert!(
                all(r, small.size(), 1) && all(r.add(small.size()), (300 << 10) - small.size(), 2)
            );
            // Larger to small: back to the system's heap.
            let larger = Layout::from_size_align(5 << 20, 8).unwrap();
            let s = Allocator.realloc(r, larger, 64 << 10);
            assert!(!kept::KEPT.owns(s));
            assert!(all(s, 64 << 10, 1));
            Allocator.dealloc(s, Layout::from_size_align(64 << 10, 8).unwrap());
        }
        kept::KEPT.release();
        populate_large(false);
    }
}
