//! The order in which fetched objects were last used, and the bytes each holds locally:
//! what `serve --cache-size` evicts first. Pure bookkeeping; the cache does the deleting.

use std::collections::{BTreeMap, HashMap};

use crate::store::ObjectId;

/// Fetched objects from least to most recently used, with their local bytes.
#[derive(Debug, Default)]
pub struct Lru {
    /// Bumped on every use; an object's tick orders it.
    clock: u64,
    entries: HashMap<ObjectId, Entry>,
    order: BTreeMap<u64, ObjectId>,
    total: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    tick: u64,
    bytes: u64,
}

impl Lru {
    /// Bytes held by every object listed.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Objects listed.
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    pub fn contains(&self, id: &ObjectId) -> bool {
        self.entries.contains_key(id)
    }

    /// `id` was just used: it becomes the most recently used, listed with no bytes if it
    /// was not listed.
    pub fn touch(&mut self, id: ObjectId) {
        self.clock += 1;
        let entry = self
            .entries
            .entry(id)
            .or_insert(Entry { tick: 0, bytes: 0 });
        self.order.remove(&entry.tick);
        entry.tick = self.clock;
        self.order.insert(self.clock, id);
    }

    /// `id` now holds `bytes` more (a fetch) and is the most recently used.
    pub fn add(&mut self, id: ObjectId, bytes: u64) {
        self.touch(id);
        self.entries.get_mut(&id).expect("touched").bytes += bytes;
        self.total += bytes;
    }

    /// `id` holds `bytes` fewer (a kept chunk that failed its check), keeping its place.
    pub fn sub(&mut self, id: &ObjectId, bytes: u64) {
        if let Some(e) = self.entries.get_mut(id) {
            let n = bytes.min(e.bytes);
            e.bytes -= n;
            self.total -= n;
        }
    }

    /// `id` holds exactly `bytes` (what a restart found on disk), keeping its place.
    pub fn set(&mut self, id: ObjectId, bytes: u64) {
        if !self.entries.contains_key(&id) {
            self.touch(id);
        }
        let e = self.entries.get_mut(&id).expect("listed");
        self.total = self.total - e.bytes + bytes;
        e.bytes = bytes;
    }

    /// Forget `id`; the bytes it held.
    pub fn remove(&mut self, id: &ObjectId) -> Option<u64> {
        let e = self.entries.remove(id)?;
        self.order.remove(&e.tick);
        self.total -= e.bytes;
        Some(e.bytes)
    }

    /// Objects from the least recently used on, with their bytes.
    pub fn oldest(&self) -> impl Iterator<Item = (ObjectId, u64)> + '_ {
        self.order.values().map(|id| (*id, self.entries[id].bytes))
    }

    /// What to evict to get down to `limit` bytes: the least recently used objects that
    /// `evictable` accepts (it may refuse one in use), oldest first, until enough is freed.
    pub fn victims(
        &self,
        limit: u64,
        mut evictable: impl FnMut(&ObjectId) -> bool,
    ) -> Vec<(ObjectId, u64)> {
        let mut over = self.total.saturating_sub(limit);
        let mut out = Vec::new();
        for (id, bytes) in self.oldest() {
            if over == 0 {
                break;
            }
            if evictable(&id) {
                over = over.saturating_sub(bytes);
                out.push((id, bytes));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ObjectId {
        ObjectId::of(&[n])
    }

    #[test]
    fn totals_follow_adds_subs_sets_and_removes() {
        let mut lru = Lru::default();
        lru.add(id(1), 100);
        lru.add(id(2), 50);
        lru.add(id(1), 20);
        assert_eq!(lru.total(), 170);
        lru.sub(&id(1), 30);
        assert_eq!(lru.total(), 140);
        lru.sub(&id(2), 500);
        assert_eq!(lru.total(), 90, "never below what an object holds");
        lru.set(id(3), 7);
        lru.set(id(1), 10);
        assert_eq!(lru.total(), 17);
        assert_eq!(lru.remove(&id(1)), Some(10));
        assert_eq!(lru.remove(&id(1)), None);
        assert_eq!(lru.total(), 7);
        assert_eq!(lru.count(), 2);
    }

    #[test]
    fn the_least_recently_used_go_first_and_in_use_ones_are_skipped() {
        let mut lru = Lru::default();
        for n in 1..=4 {
            lru.add(id(n), 10);
        }
        // 1 is used again: 2 is now the oldest.
        lru.touch(id(1));
        let order: Vec<_> = lru.oldest().map(|(i, _)| i).collect();
        assert_eq!(order, [id(2), id(3), id(4), id(1)]);
        // 40 held, limit 25: two objects go, the oldest ones not in use.
        let v = lru.victims(25, |i| *i != id(2));
        assert_eq!(v, [(id(3), 10), (id(4), 10)]);
        assert!(
            lru.victims(40, |_| true).is_empty(),
            "nothing over the limit"
        );
        // A set keeps its place; the order survives removals.
        lru.set(id(2), 30);
        lru.remove(&id(3));
        let order: Vec<_> = lru.oldest().collect();
        assert_eq!(order, [(id(2), 30), (id(4), 10), (id(1), 10)]);
        assert_eq!(lru.victims(25, |_| true), [(id(2), 30)]);
    }
}
