//! The block map as a served image keeps it: regions delta-coded in chunks.
//!
//! A server keeps an image's block map for as long as it serves the image, one region per
//! file extent, directory and group table: with thousands of images this table, not the
//! files' bytes, is what an image costs. Neighbouring regions are alike (the next starts
//! where the previous ended, handles count up, almost every file is one extent from the
//! start of its object), so each is stored as varints relative to the one before: about
//! seven bytes with the chunk index, instead of [`Region`]'s sixteen. Every [`CHUNK`]
//! regions start afresh, and a lookup is a binary search over the chunks followed by
//! decoding at most a chunk.

use crate::layout::{Region, RegionKind, StoredKind};

/// Regions per independently decodable chunk: a lookup decodes up to this many. On a
/// loaded machine, finding the pieces of a 4 KiB read took 116 ns in a plain array of
/// 48-byte regions, 400 ns with chunks of 16 (5 bytes per region) and 190 ns with chunks of
/// 4 (7 bytes per region); quiet, 89-96 ns and 110-123 ns (`examples/lookup.rs`).
const CHUNK: usize = 4;

/// Bits of a region's header varint (below its length).
const IS_DATA: u64 = 1;
const HAS_OBJECT_BLOCK: u64 = 2;
const HEADER_BITS: u32 = 2;

/// Sorted, non-overlapping regions, compactly.
#[derive(Debug, Clone, Default)]
pub(crate) struct RegionTable {
    /// Per chunk: its first region's start block, and where its bytes begin.
    chunks: Vec<(u32, u32)>,
    bytes: Vec<u8>,
}

/// What the varints of one region are relative to: reset at every chunk.
#[derive(Debug, Clone, Copy, Default)]
struct Prev {
    end: u64,
    meta: u64,
    handle: u64,
}

impl RegionTable {
    /// `regions` sorted by start, not overlapping.
    pub fn new(regions: &[Region]) -> Self {
        let mut table = RegionTable::default();
        let mut prev = Prev::default();
        for (i, r) in regions.iter().enumerate() {
            if i % CHUNK == 0 {
                let at = u32::try_from(table.bytes.len()).expect("a block map under 4 GiB");
                table.chunks.push((r.start() as u32, at));
                prev = Prev {
                    end: r.start(),
                    ..Prev::default()
                };
            }
            debug_assert!(r.start() >= prev.end, "sorted and not overlapping");
            let out = &mut table.bytes;
            match r.kind() {
                RegionKind::Meta { first } => {
                    put(out, r.len() << HEADER_BITS);
                    put(out, r.start() - prev.end);
                    put(out, zigzag(first as u64, prev.meta));
                    prev.meta = first as u64;
                }
                RegionKind::Data {
                    handle,
                    offset,
                    data_len,
                } => {
                    let object_block = offset / crate::BLOCK_SIZE;
                    let flags = IS_DATA
                        | if object_block > 0 {
                            HAS_OBJECT_BLOCK
                        } else {
                            0
                        };
                    put(out, r.len() << HEADER_BITS | flags);
                    put(out, r.start() - prev.end);
                    put(out, zigzag(handle.0 as u64, prev.handle));
                    prev.handle = handle.0 as u64;
                    // Bytes of the object in the last block, less one (0..4096).
                    put(out, data_len - (r.len() - 1) * crate::BLOCK_SIZE - 1);
                    if object_block > 0 {
                        put(out, object_block);
                    }
                }
            }
            prev.end = r.end();
        }
        table.chunks.shrink_to_fit();
        table.bytes.shrink_to_fit();
        table
    }

    pub fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<(u32, u32)>() + self.bytes.capacity()
    }

    /// Regions from the first one that ends after `block`, in order.
    pub fn at_block(&self, block: u64) -> Cursor<'_> {
        // The last chunk that starts at or before `block`; its regions may all end before
        // it, and the cursor then goes on into the next chunks.
        let chunk = self
            .chunks
            .partition_point(|c| c.0 as u64 <= block)
            .saturating_sub(1);
        let mut cursor = self.cursor_at(chunk);
        while cursor.peek().is_some_and(|r| r.end() <= block) {
            cursor.advance();
        }
        cursor
    }

    fn cursor_at(&self, chunk: usize) -> Cursor<'_> {
        let mut cursor = Cursor {
            table: self,
            chunk,
            in_chunk: 0,
            pos: self
                .chunks
                .get(chunk)
                .map_or(self.bytes.len(), |c| c.1 as usize),
            prev: Prev {
                end: self.chunks.get(chunk).map_or(0, |c| c.0 as u64),
                ..Prev::default()
            },
            current: None,
        };
        cursor.current = cursor.decode();
        cursor
    }
}

/// Walks a [`RegionTable`] in order.
#[derive(Debug, Clone)]
pub(crate) struct Cursor<'a> {
    table: &'a RegionTable,
    chunk: usize,
    /// Index within the chunk of the region after `current`.
    in_chunk: usize,
    /// Where the region after `current` is encoded.
    pos: usize,
    prev: Prev,
    current: Option<Region>,
}

impl Cursor<'_> {
    /// The region the cursor is at, if any.
    pub fn peek(&self) -> Option<Region> {
        self.current
    }

    pub fn advance(&mut self) {
        self.current = self.decode();
    }

    fn decode(&mut self) -> Option<Region> {
        if self.in_chunk == CHUNK {
            self.chunk += 1;
            self.in_chunk = 0;
            let &(start, at) = self.table.chunks.get(self.chunk)?;
            self.pos = at as usize;
            self.prev = Prev {
                end: start as u64,
                ..Prev::default()
            };
        }
        if self.pos >= self.table.bytes.len() {
            return None;
        }
        let bytes = &self.table.bytes;
        let header = get(bytes, &mut self.pos);
        let len = header >> HEADER_BITS;
        let start = self.prev.end + get(bytes, &mut self.pos);
        let delta = get(bytes, &mut self.pos);
        let kind = if header & IS_DATA == 0 {
            self.prev.meta = unzigzag(delta, self.prev.meta);
            StoredKind::Meta {
                first: self.prev.meta,
            }
        } else {
            self.prev.handle = unzigzag(delta, self.prev.handle);
            let tail = get(bytes, &mut self.pos);
            let object_block = if header & HAS_OBJECT_BLOCK != 0 {
                get(bytes, &mut self.pos)
            } else {
                0
            };
            StoredKind::Data {
                handle: self.prev.handle as u32,
                object_block,
                tail,
            }
        };
        self.in_chunk += 1;
        self.prev.end = start + len;
        Some(Region::stored(start, len, kind))
    }
}

fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline]
fn get(bytes: &[u8], pos: &mut usize) -> u64 {
    // Most values are one byte.
    let b = bytes[*pos];
    if b < 0x80 {
        *pos += 1;
        return b as u64;
    }
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let b = bytes[*pos];
        *pos += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// `v - prev` as an unsigned varint-friendly value (small either way round).
fn zigzag(v: u64, prev: u64) -> u64 {
    let d = v.wrapping_sub(prev) as i64;
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag(z: u64, prev: u64) -> u64 {
    let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
    prev.wrapping_add(d as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DataHandle;

    fn sample(n: usize, seed: u64) -> Vec<Region> {
        let mut state = seed;
        let mut rand = move |m: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % m
        };
        let mut out = Vec::new();
        let mut at = rand(50);
        for i in 0..n {
            let len = 1 + rand(if i % 7 == 0 { 40_000 } else { 4 });
            let kind = if rand(4) == 0 {
                RegionKind::Meta {
                    first: (i * 3 + rand(5) as usize),
                }
            } else {
                RegionKind::Data {
                    handle: DataHandle((i as u32).wrapping_add(rand(9) as u32) % 100_000),
                    offset: if rand(5) == 0 {
                        rand(1 << 20) * 4096
                    } else {
                        0
                    },
                    data_len: (len - 1) * 4096 + 1 + rand(4096),
                }
            };
            out.extend(Region::split(at, len, kind));
            at += len + if rand(3) == 0 { rand(100_000) } else { 0 };
        }
        out
    }

    #[test]
    fn decodes_what_it_encoded() {
        for (n, seed) in [(0, 1), (1, 2), (15, 3), (16, 4), (17, 5), (1000, 6)] {
            let regions = sample(n, seed);
            let table = RegionTable::new(&regions);
            let mut cursor = table.at_block(0);
            let mut got = Vec::new();
            while let Some(r) = cursor.peek() {
                got.push(r);
                cursor.advance();
            }
            assert_eq!(got, regions, "n = {n}");
            if n >= 100 {
                assert!(table.heap_bytes() < n * 9, "{} bytes", table.heap_bytes());
            }
        }
    }

    /// Every lookup lands where a linear search does: inside regions, in gaps, before the
    /// first and after the last.
    #[test]
    fn lookups_agree_with_a_linear_search() {
        let regions = sample(300, 7);
        let table = RegionTable::new(&regions);
        let last = regions.last().unwrap().end();
        let mut blocks: Vec<u64> = regions
            .iter()
            .flat_map(|r| [r.start().saturating_sub(1), r.start(), r.end() - 1, r.end()])
            .collect();
        blocks.extend([0, last + 5, u32::MAX as u64]);
        for block in blocks {
            let want = regions.iter().position(|r| r.end() > block);
            let got = table.at_block(block).peek();
            assert_eq!(got, want.map(|i| regions[i]), "block {block}");
        }
    }
}
