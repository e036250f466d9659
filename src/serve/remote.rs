//! `serve --remote URL`: the remote store's images, served from the local store as a cache.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use std::collections::HashSet;

use crate::store::remote::cache::RemoteCache;
use crate::store::remote::{counters, sync, trace, Remote};
use crate::store::{ObjectId, Store};

/// `store` as a cache of the remote at `url`: the remote's image records and trees are
/// fetched now (they are small, and the layout needs them), object bytes as they are read.
/// If the remote cannot be reached, the records fetched before are served.
pub(super) fn attach(
    store: &Store,
    url: &str,
    endpoint: Option<&str>,
    cache_size: Option<u64>,
) -> anyhow::Result<Store> {
    let remote = Arc::new(
        Remote::open(url, endpoint)
            .with_context(|| format!("cannot open the remote store {url}"))?,
    );
    match sync::pull_metadata(store, &remote, &[]) {
        Ok(images) => tracing::info!(
            remote = url,
            images = images.len(),
            "serving the remote store's images"
        ),
        // A host restarting during an outage still serves what it fetched before.
        Err(e) if !store.list_images()?.is_empty() => tracing::warn!(
            remote = url,
            error = %anyhow::Error::from(e),
            "cannot fetch the remote's image records; serving the ones fetched before"
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot fetch the image records of {url}"))
        }
    }
    let store = store.clone().with_remote(remote.clone());
    let cache = store.remote_cache().expect("attached").clone();
    if let Some(limit) = cache_size {
        cache
            .bound(limit)
            .context("cannot count the objects fetched before")?;
    }
    keep_counting(store.root().to_path_buf(), cache.clone());
    // Replay the images' prefetch traces while the first clients connect.
    let mut entries = Vec::new();
    for name in store.list_images()? {
        let bytes = trace::load_local(&store, &name).or_else(|| {
            let b = remote.get_trace(&name).ok()?.to_vec();
            let _ = trace::save_local(&store, &name, &b);
            Some(b)
        });
        entries.extend(bytes.map(|b| trace::decode(&b)).unwrap_or_default());
    }
    if !entries.is_empty() {
        tracing::info!(entries = entries.len(), "replaying prefetch traces");
        trace::replay(cache, entries, PREFETCH_PARALLEL);
    }
    Ok(store)
}

/// Add the cache's counters to the store's statistics now and then (see
/// `store::remote::counters`), and say at info level when it evicted.
fn keep_counting(root: PathBuf, cache: Arc<RemoteCache>) {
    let spawned = std::thread::Builder::new()
        .name("tessera-cache-stats".into())
        .spawn(move || {
            let mut said = (0, 0);
            loop {
                std::thread::sleep(counters::FLUSH_EVERY);
                if let Err(e) = cache.stats.flush(&root) {
                    tracing::warn!(error = %e, "cannot keep the remote cache's statistics");
                }
                let now = cache.stats.snapshot();
                if now.evictions != said.0 {
                    let (kept, limit) = cache.usage();
                    tracing::info!(
                        evicted = now.evictions - said.0,
                        bytes = now.bytes_evicted - said.1,
                        kept,
                        limit,
                        "cache of the remote store: evicted the least recently used objects"
                    );
                    said = (now.evictions, now.bytes_evicted);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start keeping the remote cache's statistics");
    }
}

/// Prefetches in flight at once.
const PREFETCH_PARALLEL: usize = 4;

/// When the server stops: images without a trace get one from what this server fetched for
/// them, in order, kept locally and pushed (create-only: the first host's trace stays).
fn save_traces(store: &Store, cache: &RemoteCache) {
    let fetched = cache.fetched();
    if fetched.is_empty() {
        return;
    }
    for name in store.list_images().unwrap_or_default() {
        if trace::load_local(store, &name).is_some() {
            continue;
        }
        let Ok(objects) = image_objects(store, &name) else {
            continue;
        };
        let mine: Vec<_> = fetched
            .iter()
            .filter(|e| objects.contains(&e.id))
            .cloned()
            .collect();
        if mine.is_empty() {
            continue;
        }
        let bytes = trace::encode(&mine);
        if let Err(e) = trace::save_local(store, &name, &bytes) {
            tracing::warn!(image = name, error = %e, "cannot keep the prefetch trace");
        }
        if let Err(e) = cache.remote().put_trace(&name, bytes.into()) {
            tracing::warn!(image = name, error = %anyhow::Error::from(e), "cannot push the prefetch trace");
        }
    }
}

fn image_objects(store: &Store, name: &str) -> anyhow::Result<HashSet<ObjectId>> {
    let mut objects = HashSet::new();
    for tree in crate::image::load(store, name)?.trees {
        let manifest = crate::image::load_tree(store, &tree)?;
        objects.extend(manifest.entries.iter().filter_map(|e| e.object));
    }
    Ok(objects)
}

/// What the cache did, on stderr when the server stops (and added to the store's
/// statistics): reads answered from bytes already here, reads that fetched, bytes fetched,
/// fetched ranges that did not match, evictions.
pub(super) fn report(store: &Store) {
    if let Some(cache) = store.remote_cache() {
        save_traces(store, cache);
        if let Err(e) = cache.stats.flush(store.root()) {
            tracing::warn!(error = %e, "cannot keep the remote cache's statistics");
        }
        let s = cache.stats.snapshot();
        let (kept, _) = cache.usage();
        eprintln!(
            "remote {}: {} reads hit local chunks, {} missed, {} bytes fetched, {} mismatches, \
             {} objects evicted ({} bytes), {kept} fetched bytes kept",
            cache.remote().url(),
            s.hits,
            s.misses,
            s.bytes_fetched,
            s.mismatches,
            s.evictions,
            s.bytes_evicted,
        );
    }
}
