//! The read path every frontend shares: a synthesized image as a block device.
//!
//! Metadata comes from the [`Layout`]; file data from store objects (see `object.rs`);
//! everything else is zeros.

mod check;
mod device;
mod export;
mod object;
pub mod overlay;

use std::io;
use std::sync::Arc;

use tessera_ext4::{Layout, Piece};

pub use device::ImageExport;
pub use export::export;
use object::Object;

use crate::image::{self, ImageError};
use crate::store::{ObjectId, Store};

/// A read-only block device over a synthesized image.
#[derive(Debug)]
pub struct ImageDevice {
    layout: Arc<Layout>,
    objects: Vec<Arc<Object>>,
    /// Check object bytes against their names before returning them.
    verify: bool,
}

/// A range of the device that is either backed by data (metadata or file contents) or zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub zero: bool,
}

impl ImageDevice {
    /// `layout` with `objects[i]` behind `DataHandle(i)`; object bytes are checked against
    /// their names if `store` [verifies reads](Store::verifies_reads).
    pub fn new(store: &Store, layout: Arc<Layout>, objects: &[ObjectId]) -> Self {
        let objects = objects
            .iter()
            .map(|id| object::shared(*id, store.object_path(id), store.remote_cache()))
            .collect();
        ImageDevice {
            layout,
            objects,
            verify: store.verifies_reads(),
        }
    }

    /// Synthesize the image `name` from `store`.
    pub fn open(store: &Store, name: &str) -> Result<Self, ImageError> {
        let record = image::load(store, name)?;
        let built = image::build(store, &record)?;
        Ok(Self::new(store, Arc::new(built.layout), &built.objects))
    }

    pub fn size(&self) -> u64 {
        self.layout.size()
    }

    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Like [`ImageDevice::read_at`], but only if nothing has to come from disk: metadata
    /// and zeros always qualify, file data only when its pages are resident. `None` means
    /// "might block" (the server then reads on an I/O thread); `buf` may be partly written.
    pub fn read_at_resident(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        match self.fill(buf, offset, |object, out, at| {
            object.read_resident(out, at, self.verify)?.ok()
        }) {
            Ok(done) => done.then_some(Ok(())),
            Err(e) => Some(Err(e)),
        }
    }

    /// Fill `buf` with the device bytes at `offset`. Reading past the end is an error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut failed = None;
        self.fill(buf, offset, |object, out, at| {
            object
                .read(out, at, self.verify)
                .map_err(|e| failed = Some(e))
                .ok()
        })?;
        failed.map_or(Ok(()), Err)
    }

    /// Walk the pieces of `buf`'s range: metadata and zeros are filled here, file data by
    /// `data(object, out, object_offset)`, whose `None` stops the walk (`Ok(false)`).
    fn fill(
        &self,
        buf: &mut [u8],
        offset: u64,
        mut data: impl FnMut(&Object, &mut [u8], u64) -> Option<()>,
    ) -> io::Result<bool> {
        self.check_range(offset, buf.len() as u64)?;
        let mut at = 0usize;
        for piece in self.layout.pieces(offset, buf.len() as u64) {
            let n = piece.len() as usize;
            let out = &mut buf[at..at + n];
            match piece {
                Piece::Meta(meta) => meta.copy_to(out),
                Piece::Zero(_) => out.fill(0),
                Piece::Data {
                    handle,
                    offset: obj_offset,
                    ..
                } => {
                    let object = self.objects.get(handle.0 as usize).ok_or_else(|| {
                        io::Error::other(format!("layout names unknown data handle {}", handle.0))
                    })?;
                    if data(object, out, obj_offset).is_none() {
                        return Ok(false);
                    }
                }
            }
            at += n;
        }
        Ok(true)
    }

    /// The data and zero ranges of `offset..offset + len`, adjacent ranges of one sort merged.
    pub fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        for piece in self.layout.pieces(offset, len) {
            let zero = matches!(piece, Piece::Zero(_));
            match out.last_mut() {
                Some(last) if last.zero == zero => last.len += piece.len(),
                _ => out.push(Extent {
                    offset: pos,
                    len: piece.len(),
                    zero,
                }),
            }
            pos += piece.len();
        }
        Ok(out)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is past the end of the {}-byte device",
                    self.size()
                ),
            )),
        }
    }
}
