//! Recycled reply buffers.
//!
//! A fresh multi-hundred-KiB `Vec` per read costs a zero-fill and, because
//! glibc serves such sizes with mmap and the buffer is freed on another
//! thread, a page fault per 4 KiB: measured at ~240k faults and 2.7x the
//! CPU of nbdkit for an nbdcopy of 1 GiB. Buffers here keep their length
//! (their bytes stay initialized), so reuse costs neither. The pool is
//! server-wide: per connection, every new client faulted its buffers in
//! again.
//!
//! What the pool keeps is bounded ([`KEEP_BYTES`]) and trimmed when clients
//! leave; buffers too big to keep are freed and, because glibc keeps freed
//! heap memory (its mmap threshold rises after such frees), followed by a
//! `malloc_trim` now and then. Hostile clients once left a server at 300 MB
//! of RSS this way.
//!
//! Trimming cannot return heap pages that a few live allocations still
//! touch, and glibc's rising mmap threshold puts every buffer up to 32 MiB
//! on the heap. After hostile traffic (requests of every size) the heap
//! stayed 10–45 MiB above where it started, a different amount each run,
//! and a soak test failed on it in CI. The server therefore fixes the
//! threshold ([`fix_mmap_threshold`]): buffers of [`MMAP_THRESHOLD`] and
//! more are mapped and unmapped whole. The soak then ends within 1 MiB of
//! where it started. The cost, a fresh mapping's page faults, falls on
//! buffers the pool does not recycle.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Bytes of idle buffers the server keeps at most.
const KEEP_BYTES: usize = 64 << 20;
/// Buffers larger than this are not kept: rare, and they would crowd out
/// the common sizes.
const KEEP_MAX: usize = 4 << 20;
/// Idle bytes kept per open connection once a client leaves.
pub(crate) const KEEP_PER_CONNECTION: usize = 4 << 20;
/// `malloc_trim` after freeing large buffers at most this often: it walks
/// the whole heap.
const TRIM_INTERVAL: Duration = Duration::from_millis(250);
/// Allocations of at least this size get their own mapping.
const MMAP_THRESHOLD: usize = 256 << 10;

#[derive(Default)]
pub(crate) struct BufPool {
    free: Mutex<(Vec<Vec<u8>>, usize)>,
}

impl BufPool {
    /// A buffer of at least `len` initialized bytes (contents arbitrary).
    pub fn get(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let (bufs, bytes) = &mut *free;
            // Prefer a buffer that is already big enough.
            let pick = bufs
                .iter()
                .position(|b| b.len() >= len)
                .or(if bufs.is_empty() { None } else { Some(0) });
            pick.map(|i| {
                let b = bufs.swap_remove(i);
                *bytes -= b.len();
                b
            })
        };
        let mut buf = reused.unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf
    }

    /// Returns a buffer obtained from [`get`](Self::get).
    pub fn put(&self, buf: Vec<u8>) {
        if buf.len() > KEEP_MAX {
            drop(buf);
            release_free_memory_now_and_then();
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let (bufs, bytes) = &mut *free;
        if *bytes + buf.len() <= KEEP_BYTES {
            *bytes += buf.len();
            bufs.push(buf);
        }
    }
}

impl BufPool {
    /// Frees idle buffers until at most `keep` bytes remain.
    pub fn trim(&self, keep: usize) {
        let dropped: Vec<Vec<u8>> = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let (bufs, bytes) = &mut *free;
            let mut out = Vec::new();
            while *bytes > keep {
                let Some(b) = bufs.pop() else { break };
                *bytes -= b.len();
                out.push(b);
            }
            out
        };
        // Freed outside the lock.
        drop(dropped);
    }
}

/// Returns free heap pages to the kernel (glibc's `malloc_trim`); a no-op
/// with other allocators.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free
    // lists under its locks; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Stops glibc from moving its mmap threshold up (see the module comment);
/// process-wide, set once. A no-op with other allocators.
pub(crate) fn fix_mmap_threshold() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes the allocator's own parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        }
    });
}

/// [`release_free_memory`], unless it ran within [`TRIM_INTERVAL`].
fn release_free_memory_now_and_then() {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    let last = LAST_MS.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < TRIM_INTERVAL.as_millis() as u64 {
        return;
    }
    if LAST_MS
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        release_free_memory();
    }
}

/// [`release_free_memory`] [`TRIM_INTERVAL`] from now, once for every call made meanwhile.
/// When every client leaving trimmed at once, a server whose clients each connect, read and
/// leave (probes, `nbdinfo`, a fleet's boots) walked its heap and gave its free pages back
/// after each (40 621 `madvise` calls, each a TLB shootdown, over the first reads of 300
/// images), then faulted them in again for the next image: a first read's synthesis took
/// 5.6 ms instead of 4.9 (means of four interleaved runs' medians). Must run within a
/// tokio runtime.
pub(crate) fn release_free_memory_soon() {
    static PENDING: AtomicBool = AtomicBool::new(false);
    if PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(TRIM_INTERVAL).await;
        // A client leaving from here on schedules the next trim.
        PENDING.store(false, Ordering::Release);
        release_free_memory();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds() {
        let pool = BufPool::default();
        let mut a = pool.get(1000);
        assert!(a.len() >= 1000);
        a[999] = 7;
        let ptr = a.as_ptr();
        pool.put(a);
        let b = pool.get(500);
        assert_eq!(b.as_ptr(), ptr, "reused");
        assert_eq!(b[999], 7, "kept its length, not re-zeroed");
        pool.put(vec![0; KEEP_MAX + 1]);
        assert!(pool.free.lock().unwrap().0.is_empty());
        for _ in 0..10 {
            pool.put(vec![0; KEEP_MAX]);
        }
        assert!(pool.free.lock().unwrap().1 <= KEEP_BYTES);
        pool.trim(KEEP_MAX);
        assert!(pool.free.lock().unwrap().1 <= KEEP_MAX);
        pool.trim(0);
        assert_eq!(pool.free.lock().unwrap().1, 0);
        assert!(pool.free.lock().unwrap().0.is_empty());
    }
}
