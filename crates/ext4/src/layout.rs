//! The output: a sorted list of non-overlapping block regions over the device. A region is
//! generated metadata (held here) or a slice of a file's data object; every block not
//! covered by a region reads as zeros. Lookups are a binary search, like nbdkit's floppy plugin.
//!
//! Metadata blocks are kept LZ4-compressed one by one, identical blocks once: most are
//! largely zeros (a directory of three entries still takes a 4 KiB block), so a served image
//! costs a fraction of its metadata size in memory, and any block decompresses on its own.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, RwLock};

use crate::generate::Generator;
use crate::{FsTree, NodeKind};

use crate::regions::{Cursor, RegionTable};
use crate::{DataHandle, BLOCK_SIZE};

const BS: usize = BLOCK_SIZE as usize;
/// Set in `MetaBlock::len` when the block is stored uncompressed (LZ4 did not help).
const RAW: u32 = 1 << 31;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RegionKind {
    /// `len` blocks of metadata: entries `first..first + len` of `Layout::meta_blocks`.
    Meta { first: usize },
    /// Object bytes `offset..offset + data_len`; the region's blocks past `data_len` read as zeros.
    Data {
        handle: DataHandle,
        offset: u64,
        data_len: u64,
    },
}

/// A region's kind as a [`RegionTable`](crate::regions::RegionTable) stores it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StoredKind {
    Meta {
        first: u64,
    },
    Data {
        handle: u32,
        object_block: u64,
        tail: u64,
    },
}

/// Bits of [`Region::packed`] that hold the length in blocks.
const LEN_BITS: u32 = 19;
/// Longest region; longer runs are stored as several.
const MAX_REGION_BLOCKS: u64 = (1 << LEN_BITS) - 1;
const TAIL_SHIFT: u32 = LEN_BITS;
/// Set in [`Region::packed`] for data regions.
const DATA: u32 = 1 << 31;

/// A run of blocks in 16 bytes, as the build collects them and reads walk them (a served
/// image stores them delta-coded: `regions.rs`). Images have at most 2^32 blocks (16 TiB,
/// see `plan::MAX_BLOCKS`) and handles are 32 bits, so block numbers, handles and object
/// offsets in blocks all fit in a `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    start: u32,
    /// Length in blocks (low [`LEN_BITS`]); for data regions [`DATA`], and the bytes of
    /// the object in the region's last block less one (12 bits above the length): every
    /// block of a file's data but the last is whole.
    packed: u32,
    /// Metadata: the first block's index in the `MetaStore`; data: the handle.
    target: u32,
    /// Data: where the region starts in the object, in blocks.
    object_block: u32,
}

impl Region {
    /// A region as stored by a [`RegionTable`](crate::regions::RegionTable): already
    /// split and checked when it was stored. `tail`: the object's bytes in the last block
    /// less one.
    #[inline]
    pub(crate) fn stored(start: u64, len: u64, kind: StoredKind) -> Region {
        debug_assert!(len <= MAX_REGION_BLOCKS && start + len <= 1 << 32);
        match kind {
            StoredKind::Meta { first } => Region {
                start: start as u32,
                packed: len as u32,
                target: first as u32,
                object_block: 0,
            },
            StoredKind::Data {
                handle,
                object_block,
                tail,
            } => Region {
                start: start as u32,
                packed: len as u32 | (tail as u32) << TAIL_SHIFT | DATA,
                target: handle,
                object_block: object_block as u32,
            },
        }
    }

    /// Regions for `len` blocks at `start` of `kind`, split at [`MAX_REGION_BLOCKS`].
    pub fn split(start: u64, len: u64, kind: RegionKind) -> impl Iterator<Item = Region> {
        let mut done = 0;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let n = (len - done).min(MAX_REGION_BLOCKS);
            let at = u32::try_from(start + done).expect("images have at most 2^32 blocks");
            let region = match kind {
                RegionKind::Meta { first } => Region {
                    start: at,
                    packed: n as u32,
                    target: u32::try_from(first + done as usize)
                        .expect("metadata blocks fit the image"),
                    object_block: 0,
                },
                RegionKind::Data {
                    handle,
                    offset,
                    data_len,
                } => {
                    debug_assert_eq!(offset % BLOCK_SIZE, 0);
                    let skip = done * BLOCK_SIZE;
                    // Bytes of the object in this piece's blocks: whole blocks but the last.
                    let bytes = data_len.saturating_sub(skip).min(n * BLOCK_SIZE);
                    assert!(
                        bytes > (n - 1) * BLOCK_SIZE,
                        "a data region's blocks hold object bytes up to its last block"
                    );
                    let tail = (bytes - (n - 1) * BLOCK_SIZE - 1) as u32;
                    Region {
                        start: at,
                        packed: n as u32 | tail << TAIL_SHIFT | DATA,
                        target: handle.0,
                        object_block: u32::try_from((offset + skip) / BLOCK_SIZE)
                            .expect("objects in an image are under 16 TiB"),
                    }
                }
            };
            done += n;
            Some(region)
        })
    }

    pub fn start(&self) -> u64 {
        self.start as u64
    }

    pub fn len(&self) -> u64 {
        (self.packed & MAX_REGION_BLOCKS as u32) as u64
    }

    pub fn end(&self) -> u64 {
        self.start() + self.len()
    }

    pub fn kind(&self) -> RegionKind {
        if self.packed & DATA == 0 {
            return RegionKind::Meta {
                first: self.target as usize,
            };
        }
        let tail = ((self.packed & !DATA) >> TAIL_SHIFT) as u64 + 1;
        RegionKind::Data {
            handle: DataHandle(self.target),
            offset: self.object_block as u64 * BLOCK_SIZE,
            data_len: (self.len() - 1) * BLOCK_SIZE + tail,
        }
    }
}

/// Counts describing a synthesized filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub blocks: u64,
    pub free_blocks: u64,
    pub inodes: u64,
    pub free_inodes: u64,
    pub groups: u64,
    /// Bytes of generated metadata held in memory.
    pub metadata_bytes: u64,
    /// Blocks mapped onto file data objects.
    pub data_blocks: u64,
    /// Smallest device size in bytes that holds this tree with these inodes.
    pub min_size: u64,
}

/// Where one metadata block's (compressed) bytes are in `MetaStore::blob`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MetaBlock {
    at: u32,
    /// Stored length, with `RAW` set for uncompressed blocks.
    len: u32,
}

/// Compressed metadata blocks, deduplicated.
#[derive(Debug, Clone, Default)]
pub(crate) struct MetaStore {
    pub blocks: Vec<MetaBlock>,
    blob: Vec<u8>,
    /// Stored blocks by the CRC32C and length of their stored bytes (a match is compared
    /// byte for byte before it is shared). Keyed by the bytes themselves, the index held a
    /// second copy of every block and hashed each one with SipHash.
    seen: HashMap<u64, MetaBlock>,
    /// Room for one compressed block, reused.
    scratch: Vec<u8>,
}

/// `MetaBlock::len` of a slot not generated yet.
const MISSING: u32 = u32::MAX;

impl MetaStore {
    /// Slots for `n` blocks not generated yet; returns the first one's index.
    pub(crate) fn reserve(&mut self, n: usize) -> usize {
        let first = self.blocks.len();
        self.blocks.resize(
            first + n,
            MetaBlock {
                at: 0,
                len: MISSING,
            },
        );
        first
    }

    /// Whether the block of slot `index` has been stored.
    pub(crate) fn has(&self, index: usize) -> bool {
        self.blocks[index].len != MISSING
    }

    /// Store one 4 KiB block in slot `index`.
    pub(crate) fn put(&mut self, index: usize, block: &[u8]) {
        debug_assert_eq!(block.len(), BS);
        if self.scratch.is_empty() {
            self.scratch = vec![0; lz4_flex::block::get_maximum_output_size(BS)];
        }
        let (bytes, raw) = match lz4_flex::block::compress_into(block, &mut self.scratch) {
            Ok(n) if n < BS => (&self.scratch[..n], 0),
            _ => (block, RAW),
        };
        let key = crc32c::crc32c(bytes) as u64 | (bytes.len() as u64 | raw as u64) << 32;
        let entry = match self.seen.get(&key) {
            Some(&e) if self.stored(e) == bytes => e,
            known => {
                let e = MetaBlock {
                    at: self.blob.len() as u32,
                    len: bytes.len() as u32 | raw,
                };
                self.blob.extend_from_slice(bytes);
                // On a (rare) CRC collision the first block keeps the key; this one is
                // stored, unshared.
                if known.is_none() {
                    self.seen.insert(key, e);
                }
                e
            }
        };
        self.blocks[index] = entry;
    }

    /// The stored (compressed or raw) bytes of `b`.
    fn stored(&self, b: MetaBlock) -> &[u8] {
        let len = (b.len & !RAW) as usize;
        &self.blob[b.at as usize..b.at as usize + len]
    }

    /// Drop the build-time index and spare capacity.
    pub(crate) fn finish(&mut self) {
        self.seen = HashMap::new();
        self.scratch = Vec::new();
        self.blob.shrink_to_fit();
        self.blocks.shrink_to_fit();
    }

    fn block_into(&self, index: usize, out: &mut [u8; BS]) {
        let b = self.blocks[index];
        debug_assert_ne!(b.len, MISSING, "slot {index} generated before it is read");
        let len = (b.len & !RAW) as usize;
        let src = &self.blob[b.at as usize..b.at as usize + len];
        if b.len & RAW != 0 {
            out.copy_from_slice(src);
        } else {
            let n = lz4_flex::block::decompress_into(src, out)
                .expect("metadata compressed by MetaStore::push");
            debug_assert_eq!(n, BS);
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.blob.capacity() + self.blocks.capacity() * std::mem::size_of::<MetaBlock>()
    }
}

/// The generated metadata blocks of a layout, taken out of it by
/// [`Layout::take_metadata`] so that a server can drop them under memory pressure and
/// generate them again, while it keeps the block map; or, from
/// [`build_on_demand`](crate::build_on_demand), generated as reads reach them.
#[derive(Debug, Default)]
pub struct MetadataBlocks(Meta);

#[derive(Debug)]
pub(crate) enum Meta {
    Held(MetaStore),
    OnDemand(Box<OnDemand>),
}

impl Default for Meta {
    fn default() -> Self {
        Meta::Held(MetaStore::default())
    }
}

impl Meta {
    fn heap_bytes(&self) -> usize {
        match self {
            Meta::Held(store) => store.heap_bytes(),
            Meta::OnDemand(d) => {
                let source = lock(&d.source).as_ref().map_or(0, Source::heap_bytes);
                d.with_store(MetaStore::heap_bytes) + source
            }
        }
    }
}

impl MetadataBlocks {
    pub(crate) fn on_demand(store: MetaStore, tree: FsTree, generator: Generator) -> Self {
        MetadataBlocks(Meta::OnDemand(Box::new(OnDemand {
            store: RwLock::new(store),
            source: Mutex::new(Some(Source { tree, generator })),
            done: OnceLock::new(),
        })))
    }

    /// Heap bytes held: the blocks, and until all are generated, the tree and what
    /// generates them (roughly).
    pub fn memory_bytes(&self) -> usize {
        self.0.heap_bytes()
    }

    /// Whether every block has been generated (always, but for
    /// [`build_on_demand`](crate::build_on_demand)'s before [`generate_all`](Self::generate_all)).
    pub fn is_complete(&self) -> bool {
        match &self.0 {
            Meta::Held(_) => true,
            Meta::OnDemand(d) => d.done.get().is_some(),
        }
    }

    /// Generates every block not generated yet, then drops the tree and what generated
    /// them: afterwards this holds what [`crate::build`]'s layout holds.
    pub fn generate_all(&self) {
        let Meta::OnDemand(d) = &self.0 else { return };
        let units = match lock(&d.source).as_ref() {
            Some(s) => s.generator.units(),
            None => return,
        };
        // The source is locked per unit, not for the whole walk: a read reaching a unit
        // this has not reached waits for one unit, not for all of them.
        for u in 0..units {
            let source = lock(&d.source);
            let Some(s) = source.as_ref() else { return };
            let first = s.generator.slots(u).first().copied();
            if first.is_some_and(|slot| !read(&d.store).has(slot as usize)) {
                s.generator.generate(&s.tree, u, &mut write(&d.store));
            }
        }
        // Under the source's lock, as `ensure` generates under it into `store`.
        let mut source = lock(&d.source);
        if source.take().is_some() {
            let mut store = write(&d.store);
            store.finish();
            let _ = d.done.set(std::mem::take(&mut *store));
        }
    }
}

/// Metadata generated unit by unit as reads reach it (see `generate.rs`).
pub(crate) struct OnDemand {
    /// The blocks generated so far; moved to `done` once all are.
    store: RwLock<MetaStore>,
    /// `None` once every block is generated.
    source: Mutex<Option<Source>>,
    /// Every block, once all are generated: read without a lock.
    done: OnceLock<MetaStore>,
}

impl std::fmt::Debug for OnDemand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemand").finish_non_exhaustive()
    }
}

struct Source {
    tree: FsTree,
    generator: Generator,
}

impl Source {
    fn heap_bytes(&self) -> usize {
        // Nodes and their entries; names and xattrs are not counted.
        let nodes = self.tree.nodes();
        let entries: usize = nodes
            .iter()
            .map(|n| match &n.kind {
                NodeKind::Dir(e) => e.len(),
                _ => 0,
            })
            .sum();
        std::mem::size_of_val(nodes)
            + entries * std::mem::size_of::<crate::DirEntry>()
            + self.generator.heap_bytes()
    }
}

impl OnDemand {
    /// `f` of the blocks generated: all of them once complete, else those so far. `done`
    /// is set while `store` is write-locked, so under the read lock it is authoritative.
    fn with_store<R>(&self, f: impl FnOnce(&MetaStore) -> R) -> R {
        if let Some(done) = self.done.get() {
            return f(done);
        }
        let store = read(&self.store);
        f(self.done.get().unwrap_or(&store))
    }

    fn has_all(&self, first: usize, n: usize) -> bool {
        self.with_store(|s| (first..first + n).all(|i| s.has(i)))
    }

    /// Generates the units of slots `first..first + n` that are not generated yet.
    fn ensure(&self, first: usize, n: usize) {
        if self.has_all(first, n) {
            return;
        }
        let source = lock(&self.source);
        // `None`: completed meanwhile. While it is held, `store` is not moved.
        let Some(s) = source.as_ref() else { return };
        for slot in first..first + n {
            if read(&self.store).has(slot) {
                continue;
            }
            let u = s
                .generator
                .unit_of(slot)
                .expect("blocks made with the map are stored");
            s.generator.generate(&s.tree, u, &mut write(&self.store));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// The block map of a synthesized ext4 image.
#[derive(Debug)]
pub struct Layout {
    pub(crate) size: u64,
    pub(crate) regions: RegionTable,
    pub(crate) meta: Meta,
    pub(crate) stats: Stats,
}

/// Generated metadata: `len` bytes starting `skip` bytes into metadata block `first`.
#[derive(Debug, Clone, Copy)]
pub struct MetaSlice<'a> {
    store: &'a Meta,
    first: usize,
    skip: usize,
    len: usize,
}

impl MetaSlice<'_> {
    /// The same blocks of `meta`, for pieces walked without their metadata (see
    /// [`Layout::take_metadata`]).
    pub fn with<'b>(&self, meta: &'b MetadataBlocks) -> MetaSlice<'b> {
        MetaSlice {
            store: &meta.0,
            first: self.first,
            skip: self.skip,
            len: self.len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the bytes are generated, so that [`copy_to`](Self::copy_to) only copies
    /// (false for on-demand metadata a read has not reached yet).
    pub fn is_generated(&self) -> bool {
        match self.store {
            Meta::Held(_) => true,
            Meta::OnDemand(d) => d.has_all(self.first, self.blocks()),
        }
    }

    /// Write the bytes into `dst` (exactly `len()` bytes long).
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len);
        match self.store {
            Meta::Held(store) => self.copy_from(store, dst),
            Meta::OnDemand(d) => {
                d.ensure(self.first, self.blocks());
                d.with_store(|store| self.copy_from(store, dst))
            }
        }
    }

    /// How many metadata blocks the bytes span.
    fn blocks(&self) -> usize {
        (self.skip + self.len).div_ceil(BS)
    }

    fn copy_from(&self, store: &MetaStore, dst: &mut [u8]) {
        let mut block = [0u8; BS];
        let (mut index, mut skip, mut done) = (self.first, self.skip, 0);
        while done < self.len {
            let n = (BS - skip).min(self.len - done);
            match <&mut [u8; BS]>::try_from(&mut dst[done..done + n]) {
                // A whole block: decompress in place.
                Ok(whole) => store.block_into(index, whole),
                Err(_) => {
                    store.block_into(index, &mut block);
                    dst[done..done + n].copy_from_slice(&block[skip..skip + n]);
                }
            }
            done += n;
            skip = 0;
            index += 1;
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to(&mut v);
        v
    }
}

/// One contiguous part of a byte range of the device.
#[derive(Debug, Clone, Copy)]
pub enum Piece<'a> {
    /// Generated metadata.
    Meta(MetaSlice<'a>),
    /// `len` bytes of the object behind `handle`, starting at `offset`.
    Data {
        handle: DataHandle,
        offset: u64,
        len: u64,
    },
    /// `len` zero bytes.
    Zero(u64),
}

impl Piece<'_> {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Meta(m) => m.len as u64,
            Piece::Data { len, .. } | Piece::Zero(len) => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Layout {
    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The pieces that make up bytes `offset..offset + len`, clipped to the device size.
    ///
    /// After [`take_metadata`](Self::take_metadata), a metadata piece's bytes can only be
    /// read through [`pieces_with`](Self::pieces_with).
    pub fn pieces(&self, offset: u64, len: u64) -> Pieces<'_> {
        self.pieces_from(&self.meta, offset, len)
    }

    /// Like [`pieces`](Self::pieces), with metadata bytes from `meta`, which
    /// [`take_metadata`](Self::take_metadata) took from this layout or from one built from
    /// the same tree and options.
    pub fn pieces_with<'a>(
        &'a self,
        meta: &'a MetadataBlocks,
        offset: u64,
        len: u64,
    ) -> Pieces<'a> {
        self.pieces_from(&meta.0, offset, len)
    }

    fn pieces_from<'a>(&'a self, meta: &'a Meta, offset: u64, len: u64) -> Pieces<'a> {
        let end = offset.saturating_add(len).min(self.size);
        Pieces {
            regions: self.regions.at_block(offset / BLOCK_SIZE),
            meta,
            pos: offset.min(end),
            end,
        }
    }

    /// Moves the generated metadata out of this layout, which keeps the block map.
    pub fn take_metadata(&mut self) -> MetadataBlocks {
        MetadataBlocks(std::mem::take(&mut self.meta))
    }

    /// Heap bytes of the block map alone: what the layout holds after
    /// [`take_metadata`](Self::take_metadata).
    pub fn block_map_bytes(&self) -> usize {
        self.regions.heap_bytes()
    }

    /// Heap bytes held by this layout (compressed metadata, unless taken, plus the region
    /// table).
    pub fn memory_bytes(&self) -> usize {
        self.meta.heap_bytes() + self.regions.heap_bytes()
    }
}

/// Iterator returned by [`Layout::pieces`].
pub struct Pieces<'a> {
    regions: Cursor<'a>,
    meta: &'a Meta,
    pos: u64,
    end: u64,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = Piece<'a>;

    fn next(&mut self) -> Option<Piece<'a>> {
        if self.pos >= self.end {
            return None;
        }
        let Some(region) = self.regions.peek() else {
            let len = self.end - self.pos;
            self.pos = self.end;
            return Some(Piece::Zero(len));
        };
        let rstart = region.start() * BLOCK_SIZE;
        let rend = region.end() * BLOCK_SIZE;
        if self.pos < rstart {
            let len = rstart.min(self.end) - self.pos;
            self.pos += len;
            return Some(Piece::Zero(len));
        }
        let within = self.pos - rstart;
        let upto = rend.min(self.end);
        let piece = match region.kind() {
            RegionKind::Meta { first } => Piece::Meta(MetaSlice {
                store: self.meta,
                first: first + (within / BLOCK_SIZE) as usize,
                skip: (within % BLOCK_SIZE) as usize,
                len: (upto - self.pos) as usize,
            }),
            RegionKind::Data {
                handle,
                offset,
                data_len,
            } => {
                if within < data_len {
                    let len = (upto - self.pos).min(data_len - within);
                    Piece::Data {
                        handle,
                        offset: offset + within,
                        len,
                    }
                } else {
                    Piece::Zero(upto - self.pos)
                }
            }
        };
        self.pos += piece.len();
        if self.pos >= rend {
            self.regions.advance();
        }
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_is_16_bytes() {
        assert_eq!(std::mem::size_of::<Region>(), 16);
    }

    #[test]
    fn regions_keep_what_they_were_given() {
        for (len, data_len) in [
            (1, 1),
            (1, 4096),
            (3, 8193),
            (3, 12288),
            (70, 70 * 4096 - 5),
        ] {
            let kind = RegionKind::Data {
                handle: DataHandle(u32::MAX),
                offset: (u32::MAX as u64) * BLOCK_SIZE - 4096 * 100,
                data_len,
            };
            let r: Vec<_> = Region::split((1 << 32) - 1 - len, len, kind).collect();
            assert_eq!(r.len(), 1);
            assert_eq!((r[0].start(), r[0].len()), ((1 << 32) - 1 - len, len));
            assert_eq!(r[0].kind(), kind);
        }
        let meta = RegionKind::Meta { first: 12345 };
        let r: Vec<_> = Region::split(7, 9, meta).collect();
        assert_eq!((r[0].start(), r[0].len(), r[0].kind()), (7, 9, meta));
    }

    /// A file of more than 2 GiB in one run becomes several regions that read as one.
    #[test]
    fn long_runs_split_and_read_as_one() {
        let len = MAX_REGION_BLOCKS * 2 + 10;
        let data_len = (len - 1) * BLOCK_SIZE + 100;
        let kind = RegionKind::Data {
            handle: DataHandle(3),
            offset: 8 * BLOCK_SIZE,
            data_len,
        };
        let regions: Vec<_> = Region::split(50, len, kind).collect();
        assert_eq!(regions.len(), 3);
        assert_eq!(regions[2].end(), 50 + len);
        let layout = Layout {
            size: (60 + len) * BLOCK_SIZE,
            regions: RegionTable::new(&regions),
            meta: Meta::default(),
            stats: Stats::default(),
        };
        let mut data = 0;
        let mut zeros = 0;
        let mut expect_offset = 8 * BLOCK_SIZE;
        for piece in layout.pieces(0, layout.size()) {
            match piece {
                Piece::Data {
                    handle,
                    offset,
                    len,
                } => {
                    assert_eq!(handle, DataHandle(3));
                    assert_eq!(offset, expect_offset);
                    expect_offset += len;
                    data += len;
                }
                Piece::Zero(n) => zeros += n,
                Piece::Meta(_) => unreachable!(),
            }
        }
        assert_eq!(data, data_len);
        assert_eq!(data + zeros, layout.size());
    }
}
