//! `tessera store stats`: sizes, counts, the deduplication ratio, and what came from a
//! remote store.

use std::collections::HashSet;
use std::fs;

use crate::image::{self, ImageError};
use crate::store::remote::counters::{self, Counts};
use crate::store::remote::{cache, origin};
use crate::store::{Area, Store, StoreError};
use crate::tree::Kind;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub objects: usize,
    /// Bytes held by objects.
    pub object_bytes: u64,
    pub trees: usize,
    pub images: usize,
    /// Bytes the images' file data would take stored separately, without deduplication:
    /// per image, the data of each inode (hardlinks count once, holes not at all).
    pub image_bytes: u64,
    /// Objects fetched from a remote store (`serve --remote`, `store pull`), and their
    /// bytes; the rest were imported or written here.
    pub fetched_objects: usize,
    pub fetched_bytes: u64,
    /// Objects being fetched (`partial/`), and the disk their fetched chunks take.
    pub partial_objects: u64,
    pub partial_bytes: u64,
    /// Packs (`store pack`): how many, the objects they hold, and their bytes. Objects
    /// (and `object_bytes`) count each object once, loose or packed or both.
    pub packs: usize,
    pub packed_objects: usize,
    pub pack_bytes: u64,
    /// What the caches of remote stores did, summed over every server on this store.
    pub cache: Option<Counts>,
}

impl StoreStats {
    /// `image_bytes / object_bytes`; `None` when the store holds no data.
    pub fn dedup_ratio(&self) -> Option<f64> {
        (self.object_bytes > 0).then(|| self.image_bytes as f64 / self.object_bytes as f64)
    }
}

pub fn stats(store: &Store) -> Result<StoreStats, ImageError> {
    let mut stats = StoreStats::default();
    let (objects, _) = store.list(Area::Object)?;
    stats.objects = objects.len();
    for id in &objects {
        let path = store.object_path(id);
        let len = fs::symlink_metadata(&path)
            .map_err(|e| StoreError::io("stat", &path, e))?
            .len();
        stats.object_bytes += len;
        if origin::of(&path).is_some() {
            stats.fetched_objects += 1;
            stats.fetched_bytes += len;
        }
    }
    (stats.partial_objects, stats.partial_bytes) = cache::partial_objects(store.root());
    let mut counted: HashSet<_> = objects.iter().copied().collect();
    for pack in store.packs().packs() {
        stats.packs += 1;
        stats.packed_objects += pack.len();
        stats.pack_bytes += pack.pack_len();
        for (id, _, len) in pack.entries() {
            if counted.insert(id) {
                stats.objects += 1;
                stats.object_bytes += len;
            }
        }
    }
    let root = store.root();
    stats.cache = counters::load(root).map_err(|e| StoreError::io("read", root, e))?;
    stats.trees = store.list(Area::Tree)?.0.len();
    let images = store.list_images()?;
    stats.images = images.len();
    for name in images {
        let record = image::load(store, &name)?;
        let mut seen_links = HashSet::new();
        for layered in image::merged_entries(store, &record)? {
            let e = &layered.entry;
            let first_link = e.link.is_none_or(|l| seen_links.insert((layered.layer, l)));
            if e.kind == Kind::File && first_link {
                stats.image_bytes += e.data_len();
            }
        }
    }
    Ok(stats)
}
