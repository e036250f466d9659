//! Prefetch traces: what the first serving of an image fetched, in order, replayed by later
//! servers while their guests start, so the guest's reads find the data already here.
//!
//! A trace is text, one fetch a line: `HEX FIRST_CHUNK END_CHUNK` ([`cache::CHUNK`]s of
//! the object; `0 0` for an object fetched whole). It is kept as `STORE/traces/NAME` and
//! pushed to the remote as `traces/NAME`. A trace only speeds things up: a line naming an
//! object the image does not have, or a damaged trace, costs a wasted fetch at most, and
//! everything fetched is verified as on any read.
//!
//! [`cache::CHUNK`]: super::cache::CHUNK

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::cache::RemoteCache;
use crate::store::ObjectId;

/// Entries kept per trace (a few MB of text at most).
pub const MAX_ENTRIES: usize = 100_000;

/// One fetch: chunks `chunks` of object `id` (empty: the whole small object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: ObjectId,
    pub chunks: Range<u64>,
}

pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = String::new();
    for e in entries {
        out.push_str(&format!("{} {} {}\n", e.id, e.chunks.start, e.chunks.end));
    }
    out.into_bytes()
}

/// The entries of a trace; lines that do not parse are skipped.
pub fn decode(bytes: &[u8]) -> Vec<Entry> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let id = f.next()?.parse().ok()?;
            let start = f.next()?.parse().ok()?;
            let end = f.next()?.parse().ok()?;
            Some(Entry {
                id,
                chunks: start..end,
            })
        })
        .take(MAX_ENTRIES)
        .collect()
}

/// Fetch what `entries` name, in order, `parallel` at a time, on threads of its own;
/// returns at once. Failures are logged at debug level and skipped: a guest's own reads
/// fetch (and report) whatever a prefetch could not.
pub fn replay(cache: Arc<RemoteCache>, entries: Vec<Entry>, parallel: usize) {
    let entries = Arc::new(entries);
    let next = Arc::new(AtomicUsize::new(0));
    for _ in 0..parallel.max(1) {
        let (cache, entries, next) = (cache.clone(), entries.clone(), next.clone());
        std::thread::Builder::new()
            .name("tessera-prefetch".into())
            .spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(entry) = entries.get(i) else { break };
                if let Err(e) = cache.prefetch(entry) {
                    tracing::debug!(object = %entry.id, error = %e, "prefetch failed");
                }
            })
            .expect("spawn a prefetch thread");
    }
}

fn local_path(store: &crate::store::Store, name: &str) -> std::path::PathBuf {
    store.root().join("traces").join(name)
}

/// The local trace of image `name`, if there is one.
pub fn load_local(store: &crate::store::Store, name: &str) -> Option<Vec<u8>> {
    std::fs::read(local_path(store, name)).ok()
}

/// Keep `bytes` as the local trace of image `name` (written aside, then renamed).
pub fn save_local(store: &crate::store::Store, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let path = local_path(store, name);
    std::fs::create_dir_all(path.parent().expect("traces/"))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)
}
