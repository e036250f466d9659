//! `tessera store verify --repair`: drop the copies of objects that do not hash to their
//! names, so that the store stops serving them and an import (or `store pull`) can write
//! them anew.
//!
//! An import writes only the objects a store lacks, and the store counts an object present
//! whatever its bytes, so a corrupt copy blocked its own replacement: re-importing the
//! source wrote nothing, and `store gc` stopped when it had to copy a corrupt packed object
//! into a rewritten pack. Repair removes a corrupt loose file (and its outboard), and
//! rewrites a pack that holds a corrupt copy without it, the good objects in their order.
//! Where no good copy is left the object is missing: `store verify` then names the trees
//! that need it, and importing their source again (or pulling from a remote) restores it.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::sync::Arc;

use super::verify::Problem;
use crate::store::pack::{PackIndex, Packed};
use crate::store::{ObjectId, Store, StoreError};

/// What [`repair`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepairReport {
    /// Corrupt loose files removed.
    pub loose: usize,
    /// Packs written anew without their corrupt copies, and the copies left out.
    pub packs: usize,
    pub packed: usize,
    /// Objects of those with no good copy left (loose or in another pack).
    pub missing: Vec<ObjectId>,
}

/// Removes the corrupt copies `problems` (from [`super::verify`]) name, after checking each
/// again under the store lock, held exclusively (no import or server fetch writes
/// meanwhile). Servers that already mapped a rewritten pack keep reading their mapping.
pub fn repair(store: &Store, problems: &[Problem]) -> Result<RepairReport, StoreError> {
    let _lock = store.lock(true)?;
    let mut report = RepairReport::default();
    let mut dropped = HashSet::new();
    for problem in problems {
        let Problem::CorruptObject { id, .. } = problem else {
            continue;
        };
        let path = store.object_path(id);
        let still_corrupt = match fs::read(&path) {
            Ok(bytes) => ObjectId::of(&bytes) != *id,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(StoreError::io("read", &path, e)),
        };
        if still_corrupt {
            remove_if_present(&path)?;
            remove_if_present(&store.outboard_path(id))?;
            report.loose += 1;
            dropped.insert(*id);
        }
    }
    let mut by_pack: BTreeMap<&str, HashSet<ObjectId>> = BTreeMap::new();
    for problem in problems {
        if let Problem::CorruptPackedObject { pack, id, .. } = problem {
            by_pack.entry(pack).or_default().insert(*id);
        }
    }
    for (name, named) in by_pack {
        let index = Arc::new(PackIndex::open(&store.pack_dir(), name)?);
        let corrupt: Vec<ObjectId> = index
            .entries()
            .filter(|&(id, offset, len)| {
                let packed = || Packed {
                    index: index.clone(),
                    offset,
                    len,
                };
                named.contains(&id)
                    && matches!(
                        packed().read_checked(&id),
                        Err(StoreError::CorruptPackedObject { .. })
                    )
            })
            .map(|(id, _, _)| id)
            .collect();
        if corrupt.is_empty() {
            continue;
        }
        let written = store.rewrite_pack(&index, |id| !corrupt.contains(id))?;
        if written.missing > 0 {
            tracing::warn!(pack = %name, missing = written.missing, "keeping a pack whose good objects could not all be copied");
            continue;
        }
        store.remove_pack(name)?;
        report.packs += 1;
        report.packed += corrupt.len();
        dropped.extend(corrupt);
    }
    report.missing = dropped
        .into_iter()
        .filter(|id| !store.has_object(id))
        .collect();
    report.missing.sort_unstable_by_key(|id| id.0);
    Ok(report)
}

fn remove_if_present(path: &std::path::Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("remove", path, e)),
    }
}
