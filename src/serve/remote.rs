//! `serve --remote URL`: the remote store's images, served from the local store as a cache.

use std::sync::Arc;

use anyhow::Context;

use crate::store::remote::{sync, Remote};
use crate::store::Store;

/// `store` as a cache of the remote at `url`: the remote's image records and trees are
/// fetched now (they are small, and the layout needs them), object bytes as they are read.
/// If the remote cannot be reached, the records fetched before are served.
pub(super) fn attach(store: &Store, url: &str, endpoint: Option<&str>) -> anyhow::Result<Store> {
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
    Ok(store.clone().with_remote(remote))
}

/// What the cache did, on stderr when the server stops: reads answered from chunks already
/// here, reads that fetched, bytes fetched and fetched ranges that did not match.
pub(super) fn report(store: &Store) {
    if let Some(cache) = store.remote_cache() {
        let s = &cache.stats;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "remote {}: {} reads hit local chunks, {} missed, {} bytes fetched, {} mismatches",
            cache.remote().url(),
            n(&s.hits),
            n(&s.misses),
            n(&s.bytes_fetched),
            n(&s.mismatches)
        );
    }
}
