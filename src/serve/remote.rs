//! `serve --remote URL`: the remote store's images, served from the local store as a cache.

use std::sync::Arc;

use anyhow::Context;

use crate::store::remote::{sync, Remote};
use crate::store::Store;

/// `store` as a cache of the remote at `url`: the remote's image records and trees are
/// fetched now (they are small, and the layout needs them), object bytes as they are read.
pub(super) fn attach(store: &Store, url: &str, endpoint: Option<&str>) -> anyhow::Result<Store> {
    let remote = Arc::new(
        Remote::open(url, endpoint)
            .with_context(|| format!("cannot open the remote store {url}"))?,
    );
    let images = sync::pull_metadata(store, &remote, &[])
        .with_context(|| format!("cannot fetch the image records of {url}"))?;
    tracing::info!(
        remote = url,
        images = images.len(),
        "serving the remote store's images"
    );
    Ok(store.clone().with_remote(remote))
}
