//! `store push` and `store pull`: whole images between the local store and a remote one.
//!
//! Push uploads in dependency order, objects (with their outboards), then trees, then image
//! records, so a remote image record never names content the remote lacks, and an
//! interrupted push leaves nothing a later one redoes: each run lists what the remote has and
//! uploads only the rest, create-only. Pull fetches in the same order backwards from the
//! image record, hashing every object before it is stored. Trees and image records are
//! moved as opaque bytes; only the names inside them are read (through `image`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use rayon::prelude::*;

use super::{Kind, Remote, RemoteError};
use crate::image::{self, ImageError};
use crate::store::outboard::OUTBOARD_MIN;
use crate::store::{ObjectId, Outboard, Store, StoreError};

/// Uploads or downloads at once.
const PARALLEL: usize = 8;

/// Why a push or pull failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("object {id} fetched from the remote store does not match its name")]
    Mismatch { id: ObjectId },
}

/// What a push or pull did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub images: usize,
    pub trees: usize,
    /// Objects moved by this run.
    pub objects: usize,
    /// Objects the other side already had.
    pub objects_skipped: usize,
    pub outboards: usize,
    pub bytes: u64,
}

/// The trees and objects of `images`.
fn contents(
    store: &Store,
    images: &[String],
) -> Result<(Vec<ObjectId>, Vec<ObjectId>), ImageError> {
    let mut trees = Vec::new();
    let mut seen = HashSet::new();
    for name in images {
        for t in image::load(store, name)?.trees {
            if seen.insert(t) {
                trees.push(t);
            }
        }
    }
    let mut objects = Vec::new();
    let mut seen = HashSet::new();
    for t in &trees {
        for e in image::load_tree(store, t)?.entries {
            if let Some(o) = e.object.filter(|o| seen.insert(*o)) {
                objects.push(o);
            }
        }
    }
    Ok((trees, objects))
}

/// Upload `images` (every image if empty) and what they need. `progress(total, done)` is
/// called with object bytes as they go; `uploaded(id)` once per object this run created.
pub fn push(
    store: &Store,
    remote: &Remote,
    images: &[String],
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<SyncReport, SyncError> {
    let images = if images.is_empty() {
        store.list_images()?
    } else {
        images.to_vec()
    };
    let (trees, objects) = contents(store, &images)?;
    let have_objects: HashSet<_> = remote.list_content(Kind::Object)?.into_iter().collect();
    let have_outboards: HashSet<_> = remote.list_content(Kind::Outboard)?.into_iter().collect();
    let have_trees: HashSet<_> = remote.list_content(Kind::Tree)?.into_iter().collect();

    let sizes: Vec<(ObjectId, u64)> = objects
        .iter()
        .map(|id| Ok((*id, store.object_len(id)?)))
        .collect::<Result<_, StoreError>>()?;
    let total: u64 = sizes.iter().map(|(_, l)| l).sum();
    let done = AtomicU64::new(0);
    let uploaded = AtomicUsize::new(0);
    let outboards = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    progress(total, 0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(PARALLEL)
        .build()
        .expect("a thread pool");
    pool.install(|| {
        sizes.par_iter().try_for_each(|&(id, len)| {
            if !have_objects.contains(&id) {
                let data = read_object(store, &id)?;
                if remote.put_content(Kind::Object, &id, data)? {
                    uploaded.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(len, Ordering::Relaxed);
                    tracing::info!(object = %id, len, "uploaded object");
                }
            }
            if len > OUTBOARD_MIN && !have_outboards.contains(&id) {
                let outboard = match store.read_outboard(&id)? {
                    Some(o) => o,
                    None => {
                        let data = read_object(store, &id)?;
                        Outboard::compute(&data).expect("longer than one group")
                    }
                };
                if remote.put_content(Kind::Outboard, &id, Bytes::from(outboard.encode()))? {
                    outboards.fetch_add(1, Ordering::Relaxed);
                }
            }
            let d = done.fetch_add(len, Ordering::Relaxed) + len;
            progress(total, d);
            Ok::<_, SyncError>(())
        })
    })?;
    let mut report = SyncReport {
        objects: uploaded.into_inner(),
        outboards: outboards.into_inner(),
        bytes: bytes.into_inner(),
        ..SyncReport::default()
    };
    report.objects_skipped = objects.len() - report.objects;
    for t in trees.iter().filter(|t| !have_trees.contains(t)) {
        let data = store.read_tree_bytes(t)?;
        if remote.put_content(Kind::Tree, t, Bytes::from(data))? {
            report.trees += 1;
        }
    }
    for name in &images {
        let data = store.read_image_bytes(name)?;
        let same = match remote.get_image(name) {
            Ok(there) => there.as_ref() == data.as_slice(),
            Err(e) if e.is_not_found() => false,
            Err(e) => return Err(e.into()),
        };
        if !same {
            remote.put_image(name, Bytes::from(data))?;
            report.images += 1;
        }
    }
    Ok(report)
}

fn read_object(store: &Store, id: &ObjectId) -> Result<Bytes, StoreError> {
    store.read_object(id).map(Bytes::from)
}

/// Fetch the records of `images` and the trees they name (no object bytes): enough to serve
/// them lazily. Every remote image if `images` is empty. Returns the image names.
pub fn pull_metadata(
    store: &Store,
    remote: &Remote,
    images: &[String],
) -> Result<Vec<String>, SyncError> {
    let images = if images.is_empty() {
        remote.list_images()?
    } else {
        images.to_vec()
    };
    for name in &images {
        image::validate_name(name)?;
        let record = remote.get_image(name)?;
        // The record is written first: a crash leaves an image whose missing content a
        // rerun (or a lazy read) fetches.
        let old = store.read_image_bytes(name).ok();
        if old.as_deref() != Some(record.as_ref()) {
            store.write_image_bytes(name, &record)?;
        }
        for t in image::load(store, name)?.trees {
            if !store.has_tree(&t) {
                let bytes = remote.get_content(Kind::Tree, &t)?;
                if ObjectId::of(&bytes) != t {
                    return Err(SyncError::Mismatch { id: t });
                }
                store.put_tree_bytes(&bytes)?;
            }
        }
    }
    Ok(images)
}

/// Fetch `images` whole: records, trees, every object (hashed before it is stored).
pub fn pull(
    store: &Store,
    remote: &Remote,
    images: &[String],
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<SyncReport, SyncError> {
    let images = pull_metadata(store, remote, images)?;
    let (trees, objects) = contents(store, &images)?;
    let missing: Vec<_> = objects.iter().filter(|o| !store.has_object(o)).collect();
    let done = AtomicU64::new(0);
    let fetched = AtomicUsize::new(0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(PARALLEL)
        .build()
        .expect("a thread pool");
    pool.install(|| {
        missing.par_iter().try_for_each(|id| {
            let bytes = remote.get_content(Kind::Object, id)?;
            if ObjectId::of(&bytes) != **id {
                return Err(SyncError::Mismatch { id: **id });
            }
            store.put_fetched_object(&bytes, remote.url())?;
            fetched.fetch_add(1, Ordering::Relaxed);
            let d = done.fetch_add(bytes.len() as u64, Ordering::Relaxed) + bytes.len() as u64;
            progress(0, d);
            Ok(())
        })
    })?;
    Ok(SyncReport {
        images: images.len(),
        trees: trees.len(),
        objects: fetched.into_inner(),
        objects_skipped: objects.len() - missing.len(),
        outboards: 0,
        bytes: done.into_inner(),
    })
}
