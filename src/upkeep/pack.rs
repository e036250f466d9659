//! `tessera store pack`: copy the small objects of images into a pack, in the order the
//! image reads them (`store::pack` says why). Above the store: it must lay images out to
//! know that order.

use std::collections::HashSet;

use crate::image::{self, ImageError, ImageRecord};
use crate::store::pack::PackIndex;
use crate::store::{ObjectId, Store};

#[derive(Debug, Default)]
pub struct PackReport {
    /// The new pack, if any object was left to pack.
    pub pack: Option<PackIndex>,
    /// Distinct objects the images name.
    pub objects: usize,
    /// Objects not packed because the store does not have them (a remote cache's).
    pub missing: usize,
    /// Loose copies of packed objects removed afterwards, and their bytes (see
    /// `gc::prune_loose_copies`).
    pub loose_copies: usize,
    pub loose_copy_bytes: u64,
}

/// Packs the small objects of `images` (every image if empty) not yet in a pack into one
/// new pack: the first image's in the order its blocks lie, then the next image's new
/// ones. Then removes the loose copies of packed objects that no running server leases, so
/// that a packed object takes its disk once (the others go at a later `store gc`). Writes
/// holding the store lock shared (gc waits), removes holding it exclusively.
pub fn pack(store: &Store, images: &[String]) -> Result<PackReport, ImageError> {
    let mut report = {
        let _lock = store.lock(false)?;
        let names = if images.is_empty() {
            store.list_images()?
        } else {
            images.to_vec()
        };
        let records = names
            .iter()
            .map(|name| image::load(store, name))
            .collect::<Result<Vec<_>, _>>()?;
        write(store, &records)?
    };
    (report.loose_copies, report.loose_copy_bytes) = prune(store)?;
    Ok(report)
}

/// Packs the small objects of the images `records` describe that are not yet in a pack into
/// one new pack, in the order the images read them. The caller holds the store lock
/// (shared), and calls [`prune`] after letting it go.
fn write(store: &Store, records: &[ImageRecord]) -> Result<PackReport, ImageError> {
    let mut order: Vec<ObjectId> = Vec::new();
    let mut named: HashSet<ObjectId> = HashSet::new();
    let mut report = PackReport::default();
    for record in records {
        let built = image::build(store, record)?;
        for id in image::read_order(&built.layout, &built.objects) {
            if named.insert(id) {
                order.push(id);
            }
        }
    }
    report.objects = order.len();
    let written = store.write_pack(&order)?;
    report.pack = written.index;
    report.missing = written.missing;
    Ok(report)
}

/// Removes the loose copies of packed objects that no running server leases (see
/// `gc::prune_loose_copies`); returns how many and their bytes. Takes the store lock
/// exclusively: do not hold it.
pub fn prune(store: &Store) -> Result<(usize, u64), ImageError> {
    let lock = store.lock(true)?;
    let leased = store.leased_trees(&lock)?;
    let leased = super::gc::objects_of(store, &leased)?;
    let mut pruned = super::GcReport::default();
    let packs = store.packs();
    let packs = packs.packs().iter().map(|p| &**p);
    let prunable = |id: &ObjectId| !leased.contains(id);
    super::gc::prune_loose_copies(store, &lock, packs, &prunable, false, &mut pruned)?;
    Ok((pruned.loose_copies, pruned.loose_copy_bytes))
}
