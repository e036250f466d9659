//! The output: a sorted list of non-overlapping block regions over the device. A region is
//! generated metadata (bytes held here) or a slice of a file's data object; every block not
//! covered by a region reads as zeros. Lookups are a binary search, like nbdkit's floppy plugin.

use crate::{DataHandle, BLOCK_SIZE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RegionKind {
    /// `len` blocks of metadata starting at byte `at` of `Layout::meta`.
    Meta { at: usize },
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

/// The block map of a synthesized ext4 image.
#[derive(Debug, Clone)]
pub struct Layout {
    pub(crate) size: u64,
    pub(crate) regions: Vec<Region>,
    pub(crate) meta: Vec<u8>,
    pub(crate) stats: Stats,
}

/// One contiguous part of a byte range of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Generated metadata bytes.
    Meta(&'a [u8]),
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
            Piece::Meta(b) => b.len() as u64,
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

    /// Heap bytes held by this layout (metadata plus the region table).
    pub fn memory_bytes(&self) -> usize {
        self.meta.capacity() + self.regions.capacity() * std::mem::size_of::<Region>()
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
            RegionKind::Meta { at } => {
                let from = at + within as usize;
                Piece::Meta(&self.layout.meta[from..from + (upto - self.pos) as usize])
            }
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
