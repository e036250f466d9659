//! `overlay commit`: what a guest wrote to a persistent overlay, as a new image that shares
//! every unchanged file with the base.
//!
//! The overlay's device (base image + overlay, read-only, under the overlay's lock so no
//! client attaches meanwhile) is read as ext4 by `tessera_ext4::read`; `diff` compares it
//! with the base image's merged tree and yields a tree of changes (new and changed entries,
//! whiteouts for deletions); new file data is stored as objects (`content`); the new image
//! is the base image's trees plus that tree, with the base's size and inode count.
//!
//! A file whose extents are the base's and whose blocks the overlay never wrote is known
//! unchanged without reading it; any other file is read and hashed, so a file rewritten
//! with the same bytes still names the same object and stores nothing.

mod content;
mod diff;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tessera_ext4::read::{Filesystem, ReadAt, ReadError, WalkEntry};
use tessera_nbd::Device;

use crate::blockdev::overlay::detached;
use crate::blockdev::overlay::named::{self, OverlayError};
use crate::blockdev::overlay::Overlay;
use crate::image::{self, CreateOptions, ImageError, ImageRecord};
use crate::import::intake::Intake;
use crate::import::Packing;
use crate::store::{ObjectId, Store, StoreError};
use crate::tree::{Entry, Kind, Manifest, Segment, TreeError};
pub use content::ContentError;

/// Why a commit failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot open image {image:?}, the base of overlay {overlay:?}")]
    Base {
        overlay: String,
        image: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading the filesystem of overlay {overlay:?}")]
    Read {
        overlay: String,
        #[source]
        source: ReadError,
    },
    #[error("reading the filesystem of image {image:?}")]
    ReadBase {
        image: String,
        #[source]
        source: ReadError,
    },
    #[error("overlay {overlay:?}: storing {path:?}")]
    Content {
        overlay: String,
        path: String,
        #[source]
        source: Box<ContentError>,
    },
    #[error("overlay {overlay:?}: the tree of changes is invalid")]
    Tree {
        overlay: String,
        #[source]
        source: TreeError,
    },
}

/// What a commit made.
#[derive(Debug)]
pub struct CommitReport {
    pub image: ImageRecord,
    /// The tree of changes, the new image's last tree.
    pub tree: ObjectId,
    /// Paths new in the overlay.
    pub added: usize,
    /// Paths whose content or metadata changed (see `diff` for what counts).
    pub changed: usize,
    /// Whiteouts: topmost paths of the base that the overlay deleted.
    pub deleted: usize,
    /// Objects and bytes the store did not have.
    pub new_objects: usize,
    pub new_bytes: u64,
}

/// A device as the reader's input.
struct DeviceReader<'a>(&'a dyn Device);

impl ReadAt for DeviceReader<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.0.size() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.0.read_at(buf, offset)
    }
}

/// Commit the persistent overlay `overlay` as the new image `name`.
pub fn commit(store: &Store, overlay: &str, name: &str) -> Result<CommitReport, CommitError> {
    image::validate_name(name)?;
    if store.image_path(name).exists() {
        return Err(ImageError::Exists {
            name: name.to_owned(),
        }
        .into());
    }
    let info = named::info(store.root(), overlay)?;
    if info.attached {
        return Err(OverlayError::Busy(overlay.to_owned()).into());
    }
    let image_name = info.record.image.clone();
    let record = image::load(store, &image_name)?;
    let base_err = |source: Box<dyn std::error::Error + Send + Sync>| CommitError::Base {
        overlay: overlay.to_owned(),
        image: image_name.clone(),
        source,
    };
    // Read once, start to end: nothing to drop.
    let budget = crate::blockdev::metadata::MetadataBudget::unbounded();
    let export = crate::blockdev::ImageExport::open(store, &image_name, &budget)
        .map_err(|e| base_err(e.into()))?;
    let fingerprint = export.fingerprint().to_owned();
    let base: Arc<dyn Device> = Arc::new(export);
    let (ov, _) = detached::open(store.root(), overlay, &fingerprint, base.clone())?;

    let read_err = |source| CommitError::Read {
        overlay: overlay.to_owned(),
        source,
    };
    let base_read_err = |source| CommitError::ReadBase {
        image: image_name.clone(),
        source,
    };
    let over_fs = Filesystem::open(DeviceReader(&ov)).map_err(read_err)?;
    let over_walk = over_fs.walk().map_err(read_err)?;
    let base_fs = Filesystem::open(DeviceReader(base.as_ref())).map_err(base_read_err)?;
    let base_walk: HashMap<Vec<u8>, WalkEntry> = base_fs
        .walk()
        .map_err(base_read_err)?
        .into_iter()
        .map(|w| (w.path.clone(), w))
        .collect();
    let base_inos = base_walk
        .iter()
        .map(|(p, w)| (p.clone(), w.inode.ino))
        .collect();
    let merged = image::merged_entries(store, &record)?;

    // Objects are stored (small ones into a pack in the new image's order), then named,
    // then the tree and image that use them: the store lock (shared) keeps `store gc` from
    // removing them in between.
    let _lock = store.lock(false)?;
    let packing = Packing::AsImage {
        name: name.to_owned(),
        below: record.trees.clone(),
    };
    let mut source = OverlaySource {
        store,
        overlay,
        ov: &ov,
        fs: &over_fs,
        base_fs: &base_fs,
        base_walk: &base_walk,
        intake: Intake::new(store, packing)?,
        pending: HashSet::new(),
        new_objects: 0,
        new_bytes: 0,
    };
    let changes = diff::changes(&over_walk, &merged, &base_inos, &mut source)?;
    let OverlaySource {
        intake,
        new_objects,
        new_bytes,
        ..
    } = source;
    let manifest = Manifest::new(changes.entries);
    manifest.validate().map_err(|source| CommitError::Tree {
        overlay: overlay.to_owned(),
        source,
    })?;
    let tree = intake.finish(&[&manifest])?.trees[0];
    let mut trees = record.trees.clone();
    trees.push(tree);
    let opts = CreateOptions {
        size: Some(base.size()),
        inodes: record.inodes,
        label: Some(record.label.clone()),
    };
    drop(ov);
    let (image, _) = image::create(store, name, &trees, &opts)?;
    Ok(CommitReport {
        image,
        tree,
        added: changes.added,
        changed: changes.changed,
        deleted: changes.deleted,
        new_objects,
        new_bytes,
    })
}

/// Contents and targets of the overlay's files, for [`diff::changes`].
struct OverlaySource<'a> {
    store: &'a Store,
    overlay: &'a str,
    ov: &'a Overlay,
    fs: &'a Filesystem<DeviceReader<'a>>,
    base_fs: &'a Filesystem<DeviceReader<'a>>,
    base_walk: &'a HashMap<Vec<u8>, WalkEntry>,
    intake: Intake<'a>,
    /// Ids of the objects stored so far, so two new files with equal data store one object.
    pending: HashSet<ObjectId>,
    new_objects: usize,
    new_bytes: u64,
}

impl OverlaySource<'_> {
    fn err(&self, w: &WalkEntry, source: ContentError) -> CommitError {
        CommitError::Content {
            overlay: self.overlay.to_owned(),
            path: String::from_utf8_lossy(&w.path).into_owned(),
            source: Box::new(source),
        }
    }

    /// The base entry's data, if the overlay's file at the same path is provably the base
    /// file's data: same size, same extents, and none of their blocks written.
    fn unchanged(&self, w: &WalkEntry, base: &Entry) -> Result<bool, ReadError> {
        let Some(b) = self.base_walk.get(&w.path) else {
            return Ok(false);
        };
        if base.kind != Kind::File || b.inode.size != w.inode.size {
            return Ok(false);
        }
        let ours = self.fs.extents(&w.inode)?;
        if ours != self.base_fs.extents(&b.inode)? {
            return Ok(false);
        }
        let bs = self.fs.superblock().block_size;
        Ok(ours
            .iter()
            .all(|e| self.ov.reads_base(e.physical * bs, e.len * bs)))
    }
}

impl diff::Source for OverlaySource<'_> {
    type Error = CommitError;

    fn content(
        &mut self,
        w: &WalkEntry,
        base: Option<&Entry>,
    ) -> Result<(ObjectId, Option<Vec<Segment>>), CommitError> {
        if let Some(base) = base {
            let same = self.unchanged(w, base).map_err(|e| self.err(w, e.into()))?;
            if let (true, Some(object)) = (same, base.object) {
                return Ok((object, base.segments.clone()));
            }
        }
        let pending = &self.pending;
        let spool = self.intake.spool();
        let c = content::store_file(self.store, self.fs, &w.inode, spool, &|id| {
            pending.contains(id)
        })
        .map_err(|e| self.err(w, e))?;
        if c.new {
            self.pending.insert(c.object);
            self.intake.staged.extend(c.staged);
            self.new_objects += 1;
            self.new_bytes += c.new_bytes;
        }
        Ok((c.object, c.segments))
    }

    fn target(&mut self, w: &WalkEntry) -> Result<Vec<u8>, CommitError> {
        self.fs
            .symlink_target(&w.inode)
            .map_err(|e| self.err(w, e.into()))
    }
}
