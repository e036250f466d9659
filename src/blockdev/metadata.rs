//! Generated metadata of served images, held under one memory budget per server.
//!
//! A read image keeps its block map (~7 bytes per file extent) for as long as it is served,
//! but its metadata blocks (inode tables, directories, bitmaps: most of what it costs) only
//! while the server's budget allows: when the metadata of all images exceeds it, the least
//! recently read image's metadata is dropped, and generated again from the image's trees
//! when it is next read. Generation is deterministic (the pinned-digest tests), so the bytes
//! do not change. A fleet server with thousands of exports keeps the metadata of those its
//! guests are using; an idle export costs its block map.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tessera_ext4::MetadataBlocks;

/// Generates an image's metadata again (a new build of the same record).
pub type Regenerate = Box<dyn Fn() -> io::Result<MetadataBlocks> + Send + Sync>;

/// The bytes of metadata a server keeps for all its images together.
#[derive(Clone)]
pub struct MetadataBudget(Arc<Budget>);

struct Budget {
    limit: u64,
    held: Mutex<Held>,
    /// Orders uses for least-recently-used eviction.
    clock: AtomicU64,
    evictions: AtomicU64,
    regenerations: AtomicU64,
}

#[derive(Default)]
struct Held {
    /// Slots whose metadata is held and counted in `bytes`.
    slots: Vec<Weak<MetaSlot>>,
    bytes: u64,
}

/// Counters of a budget, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetStats {
    pub held_bytes: u64,
    pub held_images: usize,
    pub evictions: u64,
    pub regenerations: u64,
}

impl MetadataBudget {
    /// At most `limit` bytes of metadata held (always at least the image being read).
    pub fn new(limit: u64) -> Self {
        MetadataBudget(Arc::new(Budget {
            limit,
            held: Mutex::new(Held::default()),
            clock: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            regenerations: AtomicU64::new(0),
        }))
    }

    /// No limit: metadata is never dropped.
    pub fn unbounded() -> Self {
        Self::new(u64::MAX)
    }

    pub fn stats(&self) -> BudgetStats {
        let held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        BudgetStats {
            held_bytes: held.bytes,
            held_images: held.slots.len(),
            evictions: self.0.evictions.load(Ordering::Relaxed),
            regenerations: self.0.regenerations.load(Ordering::Relaxed),
        }
    }

    /// Counts `slot`'s metadata as held, then drops others', least recently used first,
    /// until the total is within the limit.
    fn admit(&self, slot: &Arc<MetaSlot>) {
        let mut held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        held.slots.push(Arc::downgrade(slot));
        held.bytes += slot.bytes.load(Ordering::Relaxed);
        while held.bytes > self.0.limit {
            let victim = held
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, w)| Some((i, w.upgrade()?)))
                .filter(|(_, s)| !Arc::ptr_eq(s, slot))
                .min_by_key(|(_, s)| s.last_used.load(Ordering::Relaxed));
            let Some((i, victim)) = victim else { break };
            // A reader holding the metadata keeps its copy until it is done. Freed on the
            // background thread: the image being read waits for neither the free nor the
            // allocator's lock it takes.
            let dropped = victim.held.lock().unwrap_or_else(|e| e.into_inner()).take();
            super::background::later(move || drop(dropped));
            held.slots.swap_remove(i);
            held.bytes -= victim.bytes.load(Ordering::Relaxed);
            self.0.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One image's metadata: held, or dropped and generated again on demand.
pub struct MetaSlot {
    held: Mutex<Option<Arc<MetadataBlocks>>>,
    /// What the held metadata counts against the budget; changed under the budget's lock.
    bytes: AtomicU64,
    last_used: AtomicU64,
    /// `None`: never dropped (nothing to generate it from).
    regenerate: Option<(MetadataBudget, Regenerate)>,
}

impl std::fmt::Debug for MetaSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaSlot")
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .field("budgeted", &self.regenerate.is_some())
            .finish_non_exhaustive()
    }
}

impl MetaSlot {
    /// Metadata that stays as long as the slot.
    pub fn pinned(meta: MetadataBlocks) -> Arc<Self> {
        Arc::new(MetaSlot {
            bytes: AtomicU64::new(meta.memory_bytes() as u64),
            held: Mutex::new(Some(Arc::new(meta))),
            last_used: AtomicU64::new(0),
            regenerate: None,
        })
    }

    /// Metadata counted against `budget`, dropped when others are used more recently and
    /// the budget is exceeded, and then generated again by `regenerate`.
    pub fn budgeted(
        meta: MetadataBlocks,
        budget: &MetadataBudget,
        regenerate: Regenerate,
    ) -> Arc<Self> {
        let slot = Arc::new(MetaSlot {
            bytes: AtomicU64::new(meta.memory_bytes() as u64),
            held: Mutex::new(Some(Arc::new(meta))),
            last_used: AtomicU64::new(budget.0.clock.fetch_add(1, Ordering::Relaxed)),
            regenerate: Some((budget.clone(), regenerate)),
        });
        budget.admit(&slot);
        slot
    }

    /// Counts the held metadata's memory again, after it changed (on-demand metadata
    /// completed: the tree it kept is gone).
    pub fn recount(&self) {
        let Some(meta) = self.held.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        let now = meta.memory_bytes() as u64;
        let Some((budget, _)) = &self.regenerate else {
            self.bytes.store(now, Ordering::Relaxed);
            return;
        };
        let mut held = budget.0.held.lock().unwrap_or_else(|e| e.into_inner());
        let me: *const MetaSlot = self;
        let old = self.bytes.swap(now, Ordering::Relaxed);
        if held.slots.iter().any(|w| std::ptr::eq(w.as_ptr(), me)) {
            held.bytes = held.bytes - old + now;
        }
    }

    fn touch(&self) {
        if let Some((budget, _)) = &self.regenerate {
            let now = budget.0.clock.fetch_add(1, Ordering::Relaxed);
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// The metadata if it is held: what a read that must not block can use.
    pub fn if_held(&self) -> Option<Arc<MetadataBlocks>> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if held.is_some() {
            self.touch();
        }
        held
    }

    /// The metadata, generated again if it was dropped (milliseconds to a fraction of a
    /// second: only on a thread that may block).
    pub fn get(self: &Arc<Self>) -> io::Result<Arc<MetadataBlocks>> {
        self.touch();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(meta) = &*held {
            return Ok(meta.clone());
        }
        let (budget, regenerate) = self
            .regenerate
            .as_ref()
            .expect("only budgeted metadata is dropped");
        let meta = Arc::new(regenerate()?);
        self.bytes
            .store(meta.memory_bytes() as u64, Ordering::Relaxed);
        budget.0.regenerations.fetch_add(1, Ordering::Relaxed);
        *held = Some(meta.clone());
        drop(held);
        budget.admit(self);
        if !meta.is_complete() {
            self.complete_later();
        }
        Ok(meta)
    }

    /// Has the background thread generate what reads have not reached of on-demand
    /// metadata, which then drops the tree it kept, and count it again.
    pub fn complete_later(self: &Arc<Self>) {
        let slot = Arc::downgrade(self);
        super::background::later(move || {
            if let Some(slot) = slot.upgrade() {
                slot.complete();
            }
        });
    }

    /// Generates the rest of the held metadata, if it is still held, and counts it again.
    fn complete(&self) {
        // Not `if_held`: completing is not a use that should keep the image's metadata.
        let Some(meta) = self.held.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        let started = std::time::Instant::now();
        meta.generate_all();
        self.recount();
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            bytes = meta.memory_bytes(),
            "generated the rest of an image's metadata"
        );
    }
}

impl Drop for MetaSlot {
    fn drop(&mut self) {
        let Some((budget, _)) = &self.regenerate else {
            return;
        };
        let me: *const MetaSlot = self;
        let mut held = budget.0.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.slots.iter().position(|w| std::ptr::eq(w.as_ptr(), me)) {
            held.slots.swap_remove(i);
            held.bytes -= self.bytes.load(Ordering::Relaxed);
        }
    }
}
