//! `tessera store gc`: remove what no image and no running server references.

use std::collections::HashSet;
use std::fs;

use crate::image::{self, ImageError};
use crate::store::pack::PackIndex;
use crate::store::{Area, ObjectId, Store, StoreError, StoreLock};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub objects: usize,
    pub object_bytes: u64,
    pub trees: usize,
    /// Outboards whose object is gone (their bytes are not in `object_bytes`).
    pub outboards: usize,
    pub tmp_files: usize,
    /// Objects being fetched from a remote (`partial/`) that nothing references, or that
    /// are complete in `objects/` by now, and the disk their chunks took.
    pub partial_objects: usize,
    pub partial_bytes: u64,
    /// Packs removed (all of their objects are garbage, or they were rewritten without
    /// the garbage, or no index names them), and the disk they took.
    pub packs: usize,
    pub pack_bytes: u64,
    /// Packs written anew with the live objects of packs that also held garbage.
    pub repacked: usize,
    /// Loose copies of packed objects removed (their packed copy checked first), and their
    /// bytes. Objects of trees a running server leases keep theirs.
    pub loose_copies: usize,
    pub loose_copy_bytes: u64,
    /// Packs holding garbage that were kept because a live object in them is corrupt and
    /// has no good copy elsewhere (`store verify --repair`).
    pub kept_corrupt: usize,
}

/// Remove every tree no image or running server's lease names, every object no remaining
/// tree names, every partial object (`partial/`, with its chunk map) of such an object,
/// every stray file there, and every file in `tmp/`. Holds the store lock exclusively, so
/// no import and no fetch from a remote (both hold it shared while they write) is writing
/// meanwhile. Stops without removing anything if an image or a referenced tree cannot be
/// read: deleting on partial knowledge could destroy live data. With `dry_run`, only counts.
pub fn gc(store: &Store, dry_run: bool) -> Result<GcReport, ImageError> {
    let lock = store.lock(true)?;
    let mut live_trees = HashSet::new();
    for name in store.list_images()? {
        live_trees.extend(image::load(store, &name)?.trees);
    }
    // What running servers serve, even if its image is gone or was re-created.
    let leased_trees = store.leased_trees(&lock)?;
    let leased_objects = objects_of(store, &leased_trees)?;
    live_trees.extend(leased_trees);
    let live_objects = objects_of(store, &live_trees)?;

    let mut report = GcReport::default();
    let (trees, _) = store.list(Area::Tree)?;
    for id in trees.iter().filter(|id| !live_trees.contains(id)) {
        remove(&store.tree_path(id), dry_run)?;
        report.trees += 1;
    }
    // Caches of removed trees, and any that are not named like a tree.
    let (caches, stray_caches) = store.list(Area::TreeCache)?;
    for id in caches.iter().filter(|id| !live_trees.contains(id)) {
        remove(&store.tree_cache_path(id), dry_run)?;
    }
    for path in &stray_caches {
        remove(path, dry_run)?;
    }
    let (objects, _) = store.list(Area::Object)?;
    for id in objects.iter().filter(|id| !live_objects.contains(id)) {
        let path = store.object_path(id);
        report.object_bytes += fs::symlink_metadata(&path)
            .map_err(|e| StoreError::io("stat", &path, e))?
            .len();
        remove(&path, dry_run)?;
        report.objects += 1;
    }
    partial(store, &live_objects, dry_run, &mut report)?;
    packs(store, &live_objects, dry_run, &mut report)?;
    let packs = store.packs();
    let packs = packs.packs().iter().map(|p| &**p);
    // Garbage went with the loose objects above (or would have, in a dry run).
    let prunable = |id: &ObjectId| live_objects.contains(id) && !leased_objects.contains(id);
    prune_loose_copies(store, &lock, packs, &prunable, dry_run, &mut report)?;
    // A live object being fetched keeps its outboard: its kept chunks are checked
    // against it after a restart.
    let fetching = |id: &ObjectId| {
        let hex = id.to_hex();
        store
            .root()
            .join("partial")
            .join(&hex[..2])
            .join(&hex[2..])
            .exists()
    };
    let (outboards, _) = store.list(Area::Outboard)?;
    for id in outboards
        .iter()
        .filter(|id| !live_objects.contains(id) || !(store.has_object(id) || fetching(id)))
    {
        remove(&store.outboard_path(id), dry_run)?;
        report.outboards += 1;
    }
    let tmp = store.tmp_dir();
    for entry in fs::read_dir(&tmp).map_err(|e| StoreError::io("list", &tmp, e))? {
        let entry = entry.map_err(|e| StoreError::io("list", &tmp, e))?;
        remove(&entry.path(), dry_run)?;
        report.tmp_files += 1;
    }
    Ok(report)
}

/// The objects the manifests of `trees` name.
pub(super) fn objects_of<'a>(
    store: &Store,
    trees: impl IntoIterator<Item = &'a ObjectId>,
) -> Result<HashSet<ObjectId>, ImageError> {
    let mut objects = HashSet::new();
    for id in trees {
        let manifest = image::load_tree(store, id)?;
        objects.extend(manifest.entries.iter().filter_map(|e| e.object));
    }
    Ok(objects)
}

/// A pack whose objects are all garbage goes whole; one holding live objects and garbage is
/// written anew with the live ones (in its order) before it goes, since they may have no
/// loose copy left. A second copy of an object, in a pack after the one readers use, is
/// garbage. Pack files no index names (a crash between a pack and its index) go.
/// A pack whose index is unusable stays: what it holds cannot be known, and it may be the
/// only copy (`store verify` reports it). A running server keeps its mapping of a removed
/// pack, so it goes on reading it.
fn packs(
    store: &Store,
    live: &HashSet<ObjectId>,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<(), StoreError> {
    let dir = store.pack_dir();
    let set = store.packs();
    for name in store.pack_names()? {
        let index = match PackIndex::open(&dir, &name) {
            Ok(index) => index,
            Err(e) => {
                tracing::warn!(pack = %name, error = %crate::store::error_chain(&e), "keeping a pack whose index is unusable");
                continue;
            }
        };
        // A copy of an object that an earlier pack (by name) holds too is garbage: readers
        // use the first (two imports that ran at once may both have packed it).
        let kept_here = |id: &ObjectId| {
            live.contains(id) && set.find(id).is_none_or(|p| p.index.name() == name)
        };
        let kept = index.entries().filter(|(id, _, _)| kept_here(id)).count();
        if kept == index.len() {
            continue;
        }
        if kept > 0 {
            if !dry_run {
                let written = match store.rewrite_pack(&index, kept_here) {
                    Ok(written) => written,
                    Err(e @ StoreError::CorruptPackedObject { .. }) => {
                        // Its garbage stays too; repair first.
                        tracing::warn!(pack = %name, error = %crate::store::error_chain(&e), "keeping a pack holding a corrupt copy of a live object (`store verify --repair` drops it)");
                        report.kept_corrupt += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if written.missing > 0 {
                    // Never drop the only copy of a live object.
                    tracing::warn!(pack = %name, missing = written.missing, "keeping a pack whose live objects could not all be copied");
                    continue;
                }
            }
            report.repacked += 1;
        }
        for ext in ["pack", "idx"] {
            let path = dir.join(format!("{name}.{ext}"));
            report.pack_bytes += fs::symlink_metadata(&path).map_or(0, |m| m.len());
        }
        report.packs += 1;
        if !dry_run {
            store.remove_pack(&name)?;
        }
    }
    for path in store.orphan_pack_files()? {
        report.pack_bytes += fs::symlink_metadata(&path).map_or(0, |m| m.len());
        remove(&path, dry_run)?;
        report.packs += 1;
    }
    Ok(())
}

/// Removes the loose copy of every object of `packs` that `prunable` accepts and whose
/// packed copy hashes to its name. Callers leave out the objects of trees running servers
/// lease: a server that found such an object loose may open its file again later (its
/// descriptor is one of a bounded few, `blockdev/fds.rs`; it would then find the packed
/// copy, but the lease keeps it from having to). Needs the store lock exclusively, as the
/// leases were read under it.
pub(super) fn prune_loose_copies<'a>(
    store: &Store,
    _exclusive: &StoreLock,
    packs: impl IntoIterator<Item = &'a PackIndex>,
    prunable: &dyn Fn(&ObjectId) -> bool,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<(), StoreError> {
    use std::os::unix::fs::FileExt;
    for index in packs {
        let path = index.pack_path();
        let pack = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StoreError::io("open pack", path, e)),
        };
        let mut buf = Vec::new();
        for (id, offset, len) in index.entries() {
            if !prunable(&id) {
                continue;
            }
            let loose = store.object_path(&id);
            let Ok(meta) = fs::symlink_metadata(&loose) else {
                continue;
            };
            buf.resize(len as usize, 0);
            pack.read_exact_at(&mut buf, offset)
                .map_err(|e| StoreError::io("read pack", path, e))?;
            if ObjectId::of(&buf) != id || meta.len() != len {
                tracing::warn!(pack = %index.name(), object = %id, "keeping the loose copy of an object whose packed copy is corrupt");
                continue;
            }
            remove(&loose, dry_run)?;
            report.loose_copies += 1;
            report.loose_copy_bytes += meta.len();
        }
    }
    Ok(())
}

/// Partial objects: a server fetching one holds a lease on a tree naming it (it serves an
/// image of that tree), so the object is live; the others are leftovers of removed images
/// or of servers gone. Stray names (not an id, with or without `.chunks`) go too.
fn partial(
    store: &Store,
    live: &HashSet<ObjectId>,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let top = store.root().join("partial");
    let fans = match fs::read_dir(&top) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io("list", &top, e)),
    };
    for fan in fans {
        let fan = fan.map_err(|e| StoreError::io("list", &top, e))?;
        let fan_path = fan.path();
        let fan_name = fan.file_name().to_string_lossy().into_owned();
        if !fan_path.is_dir() {
            remove(&fan_path, dry_run)?;
            report.tmp_files += 1;
            continue;
        }
        for entry in fs::read_dir(&fan_path).map_err(|e| StoreError::io("list", &fan_path, e))? {
            let entry = entry.map_err(|e| StoreError::io("list", &fan_path, e))?;
            let path = entry.path();
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let (base, is_map) = match file_name.strip_suffix(".chunks") {
                Some(b) => (b, true),
                None => (file_name.as_str(), false),
            };
            let id = format!("{fan_name}{base}").parse::<ObjectId>().ok();
            let keep = id.is_some_and(|id| live.contains(&id) && !store.has_object(&id));
            if keep {
                continue;
            }
            // Fetches and evictions change `partial/` only under the store lock, but a
            // file removed by hand since the listing is no reason to stop.
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("stat", &path, e)),
            };
            match remove(&path, dry_run) {
                Err(StoreError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue
                }
                r => r?,
            }
            match id {
                Some(_) => {
                    report.partial_bytes += meta.blocks() * 512;
                    report.partial_objects += usize::from(!is_map);
                }
                None => report.tmp_files += 1,
            }
        }
    }
    Ok(())
}

fn remove(path: &std::path::Path, dry_run: bool) -> Result<(), StoreError> {
    if dry_run {
        return Ok(());
    }
    fs::remove_file(path).map_err(|e| StoreError::io("remove", path, e))
}
