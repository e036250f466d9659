//! `tessera store pack`: copy the small objects of images into a pack, in the order the
//! image reads them (`store::pack` says why). Above the store: it must lay images out to
//! know that order.

use std::collections::HashSet;

use tessera_ext4::Piece;

use crate::image::{self, ImageError};
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
    let mut report = write(store, images)?;
    let lock = store.lock(true)?;
    let leased = store.leased_trees(&lock)?;
    let leased = super::gc::objects_of(store, &leased)?;
    let mut pruned = super::GcReport::default();
    super::gc::prune_loose_copies(store, &lock, &leased, false, &mut pruned)?;
    report.loose_copies = pruned.loose_copies;
    report.loose_copy_bytes = pruned.loose_copy_bytes;
    Ok(report)
}

fn write(store: &Store, images: &[String]) -> Result<PackReport, ImageError> {
    let _lock = store.lock(false)?;
    let names = if images.is_empty() {
        store.list_images()?
    } else {
        images.to_vec()
    };
    let mut order: Vec<ObjectId> = Vec::new();
    let mut named: HashSet<ObjectId> = HashSet::new();
    let mut report = PackReport::default();
    for name in &names {
        let record = image::load(store, name)?;
        let built = image::build(store, &record)?;
        let layout = &built.layout;
        for piece in layout.pieces(0, layout.size()) {
            if let Piece::Data { handle, .. } = piece {
                let id = built.objects[handle.0 as usize];
                if named.insert(id) {
                    order.push(id);
                }
            }
        }
    }
    report.objects = order.len();
    let written = store.write_pack(&order)?;
    report.pack = written.index;
    report.missing = written.missing;
    Ok(report)
}
