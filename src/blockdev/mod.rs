//! The read path every frontend shares: a synthesized image as a block device.
//!
//! Metadata comes from the [`Layout`]; file data from store objects (see `object.rs`);
//! everything else is zeros.

mod background;
mod check;
mod device;
mod export;
mod fds;
mod handles;
pub mod metadata;
mod object;
pub mod overlay;
mod planned;
mod readahead;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use tessera_ext4::{Layout, MetadataBlocks, Piece};
use tessera_nbd::Shared;

pub use device::ImageExport;
pub use export::export;
use handles::Handles;
use metadata::{MetaSlot, MetadataBudget, Regenerate};
use object::Object;
use readahead::Readahead;

use crate::image::{self, ImageError};
use crate::store::{ObjectId, Store};

/// A read-only block device over a synthesized image.
#[derive(Debug)]
pub struct ImageDevice {
    /// The block map; its metadata blocks are in `meta`.
    layout: Arc<Layout>,
    meta: Arc<MetaSlot>,
    objects: Arc<Handles>,
    /// Check object bytes against their names before returning them.
    verify: bool,
    /// Where recent blocking reads ended, to recognize sequential readers (see `prefetch`).
    recent_ends: [AtomicU64; RECENT],
    next_end: AtomicUsize,
    /// The objects read ahead of a sequential reader (see `readahead.rs`).
    readahead: Readahead,
}

/// What reads walk the layout with: metadata bytes are fetched at a read's first
/// metadata piece ([`ReadMeta`]), so most reads (file data) never touch the budget's lock.
static NO_METADATA: LazyLock<MetadataBlocks> = LazyLock::new(Default::default);

/// `TESSERA_NO_PREFETCH` set: no readahead across objects (to measure what it does).
static NO_PREFETCH: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("TESSERA_NO_PREFETCH").is_some());

/// The metadata of one read, fetched at its first metadata piece and kept by the read
/// even if the budget drops it meanwhile.
struct ReadMeta<'a> {
    slot: &'a Arc<MetaSlot>,
    /// Whether it may generate dropped metadata again (on a thread that may block).
    may_block: bool,
    held: Option<Arc<MetadataBlocks>>,
}

impl ReadMeta<'_> {
    /// `Ok(None)`: dropped, and this read may not block.
    fn get(&mut self) -> io::Result<Option<&MetadataBlocks>> {
        if self.held.is_none() {
            self.held = if self.may_block {
                Some(self.slot.get()?)
            } else {
                self.slot.if_held()
            };
        }
        Ok(self.held.as_deref())
    }
}

/// Blocking reads remembered to recognize a sequential reader: enough for a few clients'
/// worth of interleaved streams (nbdcopy reads with 4 connections).
const RECENT: usize = 16;

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
    pub fn new(store: &Store, mut layout: Layout, objects: &[ObjectId]) -> Self {
        let meta = MetaSlot::pinned(layout.take_metadata());
        Self::with_meta(store, layout, meta, Handles::now(store, objects))
    }

    /// Like [`new`](Self::new), with the metadata held under `budget` and generated again
    /// by `regenerate` when it was dropped.
    /// `meta` is `layout`'s metadata, taken out of it or generated on demand. The objects
    /// are looked up by the background thread or the first read of file data.
    pub fn budgeted(
        store: &Store,
        layout: Layout,
        meta: MetadataBlocks,
        objects: Vec<ObjectId>,
        budget: &MetadataBudget,
        regenerate: Regenerate,
    ) -> Self {
        let meta = MetaSlot::budgeted(meta, budget, regenerate);
        Self::with_meta(store, layout, meta, Handles::later(store, objects))
    }

    /// The slot of this image's metadata.
    pub(crate) fn metadata_slot(&self) -> &Arc<MetaSlot> {
        &self.meta
    }

    fn with_meta(
        store: &Store,
        layout: Layout,
        meta: Arc<MetaSlot>,
        objects: Arc<Handles>,
    ) -> Self {
        ImageDevice {
            layout: Arc::new(layout),
            meta,
            objects,
            verify: store.verifies_reads(),
            recent_ends: Default::default(),
            next_end: AtomicUsize::new(0),
            readahead: Readahead::default(),
        }
    }

    /// Synthesize the image `name` from `store`.
    pub fn open(store: &Store, name: &str) -> Result<Self, ImageError> {
        let record = image::load(store, name)?;
        let built = image::build(store, &record)?;
        Ok(Self::new(store, built.layout, &built.objects))
    }

    pub fn size(&self) -> u64 {
        self.layout.size()
    }

    /// The block map (its metadata blocks are fetched per read from the budget's slot).
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    fn read_meta(&self, may_block: bool) -> ReadMeta<'_> {
        ReadMeta {
            slot: &self.meta,
            may_block,
            held: None,
        }
    }

    /// Like [`ImageDevice::read_at`], but only if nothing has to come from disk: metadata
    /// and zeros always qualify, file data only when its pages are resident. `None` means
    /// "might block" (the server then reads on an I/O thread); `buf` may be partly written.
    pub fn read_at_resident(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        match self.fill(buf, offset, false, |object, out, at| {
            object.read_resident(out, at, self.verify)?.ok()
        }) {
            Ok(true) => {
                self.reached(offset, buf.len() as u64);
                Some(Ok(()))
            }
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Like [`ImageDevice::read_at_resident`], but file data is appended to `out` as slices
    /// of the objects' mappings rather than copied (the NBD server writes them to the
    /// socket as they are: one copy of each byte instead of two). Metadata and zeros
    /// between them are copied into owned chunks. Same pieces, same conditions: `None`
    /// when some data is not resident or not yet verified; `out` may then be partly filled.
    pub fn read_resident_shared(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Shared>,
    ) -> Option<io::Result<()>> {
        if let Err(e) = self.check_range(offset, len) {
            return Some(Err(e));
        }
        let mut meta = self.read_meta(false);
        let mut owned: Vec<u8> = Vec::new();
        for piece in self.layout.pieces_with(&NO_METADATA, offset, len) {
            let n = piece.len() as usize;
            match piece {
                Piece::Meta(slice) => {
                    let held = match meta.get() {
                        Ok(Some(held)) => held,
                        Ok(None) => return None,
                        Err(e) => return Some(Err(e)),
                    };
                    let slice = slice.with(held);
                    if !slice.is_generated() {
                        return None;
                    }
                    let at = owned.len();
                    owned.resize(at + n, 0);
                    slice.copy_to(&mut owned[at..]);
                }
                // Zeros after file data (nothing copied is pending) are slices of static
                // memory: no allocation, and, never changing, they may be spliced. Zeros
                // after metadata join its copied chunk.
                Piece::Zero(_) if owned.is_empty() => push_zeros(out, n),
                Piece::Zero(_) => owned.resize(owned.len() + n, 0),
                Piece::Data {
                    handle,
                    offset: obj_offset,
                    ..
                } => {
                    let object = match self.objects.if_looked_up()?.get(handle.0 as usize) {
                        Some(object) => object,
                        None => return Some(Err(unknown_handle(handle.0))),
                    };
                    let slice = match object.read_shared(obj_offset, n as u64, self.verify)? {
                        Ok(slice) => slice,
                        Err(e) => return Some(Err(e)),
                    };
                    if !owned.is_empty() {
                        out.push(Shared::copied(std::mem::take(&mut owned).into()));
                    }
                    // Objects are immutable files: their pages may be sent by reference.
                    out.push(Shared::pages(slice));
                }
            }
        }
        if !owned.is_empty() {
            out.push(Shared::copied(owned.into()));
        }
        self.reached(offset, len);
        Some(Ok(()))
    }

    /// Fill `buf` with the device bytes at `offset`. Reading past the end is an error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.prefetch(offset, buf.len() as u64);
        let mut failed = None;
        self.fill(buf, offset, true, |object, out, at| {
            object
                .read(out, at, self.verify)
                .map_err(|e| failed = Some(e))
                .ok()
        })?;
        failed.map_or(Ok(()), Err)
    }

    /// Walk the pieces of `buf`'s range: metadata and zeros are filled here, file data by
    /// `data(object, out, object_offset)`, whose `None` stops the walk (`Ok(false)`), as
    /// does metadata that was dropped unless the caller `may_block` (then it is generated
    /// again).
    fn fill(
        &self,
        buf: &mut [u8],
        offset: u64,
        may_block: bool,
        mut data: impl FnMut(&Object, &mut [u8], u64) -> Option<()>,
    ) -> io::Result<bool> {
        self.check_range(offset, buf.len() as u64)?;
        let mut meta = self.read_meta(may_block);
        let mut at = 0usize;
        for piece in self
            .layout
            .pieces_with(&NO_METADATA, offset, buf.len() as u64)
        {
            let n = piece.len() as usize;
            let out = &mut buf[at..at + n];
            match piece {
                Piece::Meta(slice) => match meta.get()? {
                    // Generating on-demand metadata may take a while: not on the caller's
                    // thread unless it may block.
                    Some(held) if may_block || slice.with(held).is_generated() => {
                        slice.with(held).copy_to(out)
                    }
                    _ => return Ok(false),
                },
                Piece::Zero(_) => out.fill(0),
                Piece::Data {
                    handle,
                    offset: obj_offset,
                    ..
                } => {
                    let objects = if may_block {
                        self.objects.get()
                    } else if let Some(objects) = self.objects.if_looked_up() {
                        objects
                    } else {
                        return Ok(false);
                    };
                    let object = objects
                        .get(handle.0 as usize)
                        .ok_or_else(|| unknown_handle(handle.0))?;
                    if data(object, out, obj_offset).is_none() {
                        return Ok(false);
                    }
                }
            }
            at += n;
        }
        Ok(true)
    }

    /// Before a blocking read of `offset..offset + len`: ask the kernel to read the objects
    /// it touches all at once (a 256 KiB read of a root filesystem spans several small files,
    /// otherwise read from disk one after another) and, when the read continues where an
    /// earlier one ended, start reading ahead of it (`readahead.rs`).
    fn prefetch(&self, offset: u64, len: u64) {
        if *NO_PREFETCH {
            return;
        }
        let end = offset.saturating_add(len).min(self.size());
        let sequential = self
            .recent_ends
            .iter()
            .any(|e| e.load(Ordering::Relaxed) == offset && offset != 0);
        let slot = self.next_end.fetch_add(1, Ordering::Relaxed) % RECENT;
        self.recent_ends[slot].store(end, Ordering::Relaxed);
        if sequential {
            self.readahead.start(end, &self.layout, self.objects.get());
        } else if let Some(objects) = self.objects.if_looked_up() {
            // Not looked up yet: no window was started either.
            self.readahead.reached(end, &self.layout, objects);
        }
        let mut data = self
            .layout
            .pieces_with(&NO_METADATA, offset, end.saturating_sub(offset))
            .filter(|p| matches!(p, Piece::Data { .. }))
            .peekable();
        let Some(first) = data.next() else {
            return;
        };
        // One data piece: the read itself is all the kernel needs to know.
        if data.peek().is_none() {
            return;
        }
        readahead::prefetch_pieces(self.objects.get(), std::iter::once(first).chain(data));
    }

    /// Every read that was answered without blocking: moves a running readahead window on.
    fn reached(&self, offset: u64, len: u64) {
        // Not looked up yet: this read found no file data, and no window was started.
        if let Some(objects) = self.objects.if_looked_up() {
            self.readahead
                .reached(offset.saturating_add(len), &self.layout, objects);
        }
    }

    /// The data and zero ranges of `offset..offset + len`, adjacent ranges of one sort merged.
    pub fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        // Only the pieces' kinds: no metadata bytes are read.
        for piece in self.layout.pieces_with(&NO_METADATA, offset, len) {
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

fn unknown_handle(handle: u32) -> io::Error {
    io::Error::other(format!("layout names unknown data handle {handle}"))
}

/// Appends `n` zero bytes as slices of static memory.
fn push_zeros(out: &mut Vec<Shared>, mut n: usize) {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while n > 0 {
        let take = n.min(ZEROS.len());
        out.push(Shared::pages(bytes::Bytes::from_static(&ZEROS[..take])));
        n -= take;
    }
}
