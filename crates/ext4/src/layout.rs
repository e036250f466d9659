//! The output: a sorted list of non-overlapping block regions over the device. A region is
//! generated metadata (held here) or a slice of a file's data object; every block not
//! covered by a region reads as zeros. Lookups are a binary search, like nbdkit's floppy plugin.
//!
//! Metadata blocks are kept LZ4-compressed one by one, identical blocks once: most are
//! largely zeros (a directory of three entries still takes a 4 KiB block), so a served image
//! costs a fraction of its metadata size in memory, and any block decompresses on its own.

use std::collections::HashMap;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    pub start: u64,
    pub len: u64,
    pub kind: RegionKind,
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
    seen: HashMap<Vec<u8>, MetaBlock>,
}

impl MetaStore {
    /// Store one 4 KiB block; returns its index in `blocks`.
    pub fn push(&mut self, block: &[u8]) -> usize {
        debug_assert_eq!(block.len(), BS);
        let packed = lz4_flex::block::compress(block);
        let (bytes, raw) = if packed.len() < BS {
            (packed, 0)
        } else {
            (block.to_vec(), RAW)
        };
        let entry = match self.seen.get(&bytes) {
            Some(&e) => e,
            None => {
                let e = MetaBlock {
                    at: self.blob.len() as u32,
                    len: bytes.len() as u32 | raw,
                };
                self.blob.extend_from_slice(&bytes);
                self.seen.insert(bytes, e);
                e
            }
        };
        self.blocks.push(entry);
        self.blocks.len() - 1
    }

    /// Drop the build-time index and spare capacity.
    pub fn finish(&mut self) {
        self.seen = HashMap::new();
        self.blob.shrink_to_fit();
        self.blocks.shrink_to_fit();
    }

    fn block_into(&self, index: usize, out: &mut [u8; BS]) {
        let b = self.blocks[index];
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

    pub fn heap_bytes(&self) -> usize {
        self.blob.capacity() + self.blocks.capacity() * std::mem::size_of::<MetaBlock>()
    }
}

/// The block map of a synthesized ext4 image.
#[derive(Debug, Clone)]
pub struct Layout {
    pub(crate) size: u64,
    pub(crate) regions: Vec<Region>,
    pub(crate) meta: MetaStore,
    pub(crate) stats: Stats,
}

/// Generated metadata: `len` bytes starting `skip` bytes into metadata block `first`.
#[derive(Debug, Clone, Copy)]
pub struct MetaSlice<'a> {
    store: &'a MetaStore,
    first: usize,
    skip: usize,
    len: usize,
}

impl MetaSlice<'_> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write the bytes into `dst` (exactly `len()` bytes long).
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len);
        let mut block = [0u8; BS];
        let (mut index, mut skip, mut done) = (self.first, self.skip, 0);
        while done < self.len {
            let n = (BS - skip).min(self.len - done);
            match <&mut [u8; BS]>::try_from(&mut dst[done..done + n]) {
                // A whole block: decompress in place.
                Ok(whole) => self.store.block_into(index, whole),
                Err(_) => {
                    self.store.block_into(index, &mut block);
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
    pub fn pieces(&self, offset: u64, len: u64) -> Pieces<'_> {
        let end = offset.saturating_add(len).min(self.size);
        let block = offset / BLOCK_SIZE;
        // First region that ends after `block`.
        let idx = self.regions.partition_point(|r| r.start + r.len <= block);
        Pieces {
            layout: self,
            pos: offset.min(end),
            end,
            idx,
        }
    }

    /// Heap bytes held by this layout (compressed metadata plus the region table).
    pub fn memory_bytes(&self) -> usize {
        self.meta.heap_bytes() + self.regions.capacity() * std::mem::size_of::<Region>()
    }
}

/// Iterator returned by [`Layout::pieces`].
pub struct Pieces<'a> {
    layout: &'a Layout,
    pos: u64,
    end: u64,
    idx: usize,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = Piece<'a>;

    fn next(&mut self) -> Option<Piece<'a>> {
        if self.pos >= self.end {
            return None;
        }
        let Some(region) = self.layout.regions.get(self.idx) else {
            let len = self.end - self.pos;
            self.pos = self.end;
            return Some(Piece::Zero(len));
        };
        let rstart = region.start * BLOCK_SIZE;
        let rend = (region.start + region.len) * BLOCK_SIZE;
        if self.pos < rstart {
            let len = rstart.min(self.end) - self.pos;
            self.pos += len;
            return Some(Piece::Zero(len));
        }
        let within = self.pos - rstart;
        let upto = rend.min(self.end);
        let piece = match region.kind {
            RegionKind::Meta { first } => Piece::Meta(MetaSlice {
                store: &self.layout.meta,
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
            self.idx += 1;
        }
        Some(piece)
    }
}
