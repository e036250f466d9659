//! Open descriptors of small store objects, kept across reads within a bound.
//!
//! Opening an object for every read cost an `open`, a `close` and a hand-off to an I/O
//! thread per request: most files of a root filesystem are small objects, so that was most
//! requests. Each small object now has a [`Slot`] that keeps its file open after the first
//! read, and a process-wide clock (second-chance LRU) closes the least recently used ones
//! when more than [`capacity`] are open, a bound derived from `RLIMIT_NOFILE` so that
//! sockets and the store's own files always find descriptors.
//!
//! A reader holds an `Arc` of the open file for the duration of its `pread`, so closing a
//! slot never closes a descriptor under a read (no descriptor-number reuse races).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// An open object file, and whether its following bytes were already handed to readahead.
#[derive(Debug)]
pub(super) struct Open {
    pub file: File,
    /// (device, inode), for verification of small objects (`check.rs`).
    pub ident: (u64, u64),
    /// The file's owner, which decides whether `mincore` answers for it (`resident.rs`).
    pub owner: u32,
    /// Set once readahead was requested for the whole object through this descriptor.
    pub advised: AtomicBool,
    /// The object mapped through this descriptor, once a read was answered from it
    /// (`object/shared.rs`); unmapped with the descriptor.
    pub map: OnceLock<super::object::resident::Mapping>,
}

/// One small object's descriptor, if open.
#[derive(Debug, Default)]
pub(super) struct Slot {
    open: Mutex<Option<Arc<Open>>>,
    /// Second chance: set by every use, cleared by the clock hand.
    used: AtomicBool,
}

impl Slot {
    /// The open file, if it is open: never opens (callers on async threads use this).
    pub fn get(&self) -> Option<Arc<Open>> {
        let open = self.lock().clone();
        if open.is_some() {
            self.used.store(true, Ordering::Relaxed);
        }
        open
    }

    /// The open file, opening it with `open` if needed and registering the slot with the
    /// clock (which may close other slots' files).
    pub fn get_or_open(
        self: &Arc<Self>,
        open: impl FnOnce() -> io::Result<Open>,
    ) -> io::Result<Arc<Open>> {
        if let Some(o) = self.get() {
            return Ok(o);
        }
        let fresh = Arc::new(open()?);
        {
            let mut slot = self.lock();
            if let Some(o) = slot.as_ref() {
                // Another thread opened it meanwhile; ours closes when dropped.
                return Ok(o.clone());
            }
            *slot = Some(fresh.clone());
        }
        self.used.store(true, Ordering::Relaxed);
        clock().admit(self.clone());
        Ok(fresh)
    }

    /// Closes the file (once no read holds it).
    pub fn close(&self) {
        let closed = self.lock().take();
        drop(closed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Open>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How many small-object descriptors stay open at most: half the soft `RLIMIT_NOFILE`
/// (the rest is for sockets, overlays and the store), within 64..=32768, and at most a
/// quarter of `vm.max_map_count`, since each may also hold a mapping (`object/shared.rs`;
/// the rest is for large objects, the allocator and libraries).
pub(super) fn capacity() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` into the struct we pass, which is live.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur
        } else {
            1024
        };
        let maps = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(65530);
        (soft / 2).min(maps / 4).clamp(64, 32768) as usize
    })
}

/// The slots that hold open files, in admission order; the hand is the front.
struct Clock {
    ring: Mutex<VecDeque<Arc<Slot>>>,
}

fn clock() -> &'static Clock {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    CLOCK.get_or_init(|| Clock {
        ring: Mutex::new(VecDeque::new()),
    })
}

impl Clock {
    /// Adds a newly opened slot, first closing older ones while the ring is full: a slot
    /// used since the hand last passed gets a second chance, others are closed.
    fn admit(&self, slot: Arc<Slot>) {
        let cap = capacity();
        let mut closing = Vec::new();
        {
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            let mut spins = 0;
            while ring.len() >= cap {
                let Some(old) = ring.pop_front() else { break };
                // Every entry gets at most one second chance per admission, so this ends.
                if spins < cap && old.used.swap(false, Ordering::Relaxed) {
                    spins += 1;
                    ring.push_back(old);
                } else {
                    closing.push(old);
                }
            }
            ring.push_back(slot);
        }
        // Closed outside the ring's lock.
        for old in closing {
            old.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_once_and_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"abc").unwrap();
        let slot = Arc::new(Slot::default());
        assert!(slot.get().is_none());
        let mut opens = 0;
        for _ in 0..3 {
            slot.get_or_open(|| {
                opens += 1;
                Ok(Open {
                    file: File::open(&path)?,
                    ident: (0, 0),
                    owner: 0,
                    advised: AtomicBool::new(false),
                    map: OnceLock::new(),
                })
            })
            .unwrap();
        }
        assert_eq!(opens, 1);
        let held = slot.get().unwrap();
        slot.close();
        assert!(slot.get().is_none());
        // A reader's Arc keeps its descriptor usable after the slot closed.
        assert!(held.file.metadata().is_ok());
        assert!(capacity() >= 64);
    }
}
