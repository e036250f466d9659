//! `tessera store gc`: remove what no image and no running server references.

use std::collections::HashSet;
use std::fs;

use crate::image::{self, ImageError};
use crate::store::pack::PackIndex;
use crate::store::{Area, ObjectId, Store, StoreError};

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
    /// Packs removed (one of their objects is garbage, or their index is unusable), and
    /// the disk they took.
    pub packs: usize,
    pub pack_bytes: u64,
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
    live_trees.extend(store.leased_trees(&lock)?);
    let mut live_objects: HashSet<ObjectId> = HashSet::new();
    for id in &live_trees {
        let manifest = image::load_tree(store, id)?;
        live_objects.extend(manifest.entries.iter().filter_map(|e| e.object));
    }

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

/// Packs are copies: one that holds an object no image needs any more goes whole (the live
/// objects in it stay loose; `store pack` packs them again), as do packs whose index is
/// unusable and pack files no index names. A running server keeps its mapping of a removed
/// pack, so it goes on reading it.
fn packs(
    store: &Store,
    live: &HashSet<ObjectId>,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<(), StoreError> {
    let dir = store.pack_dir();
    for name in store.pack_names()? {
        let keep = PackIndex::open(&dir, &name)
            .is_ok_and(|index| index.entries().all(|(id, _, _)| live.contains(&id)));
        if keep {
            continue;
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
