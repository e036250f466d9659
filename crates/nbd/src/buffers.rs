//! Recycled reply buffers.
//!
//! A fresh multi-hundred-KiB `Vec` per read costs a zero-fill and, because
//! glibc serves such sizes with mmap and the buffer is freed on another
//! thread, a page fault per 4 KiB: measured at ~240k faults and 2.7x the
//! CPU of nbdkit for an nbdcopy of 1 GiB. Buffers here keep their length
//! (their bytes stay initialized), so reuse costs neither. The pool is
//! server-wide: per connection, every new client faulted its buffers in
//! again.

use std::sync::Mutex;

/// Bytes of idle buffers the server keeps at most.
const KEEP_BYTES: usize = 64 << 20;
/// Buffers larger than this are not kept: rare, and they would crowd out
/// the common sizes.
const KEEP_MAX: usize = 4 << 20;

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
    }
}
