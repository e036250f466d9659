//! The metadata of a placed tree, block by block: a layout's block map, with every metadata
//! block given a slot in the [`MetaStore`], and the units that fill the slots.
//!
//! Superblocks, group descriptors and bitmaps are made with the block map (a few blocks per
//! group, and they need every group's counts). Everything else, which is most of an image's
//! metadata, is a unit that can be generated on its own, from the prepared tree alone: one
//! block of an inode table (16 inodes), one directory's or slow symlink's blocks, one
//! inode's extent-tree blocks or xattr block. [`crate::build`] generates every unit at once;
//! [`crate::build_on_demand`] generates a unit when a read first reaches one of its blocks,
//! so a server answers an image's first read after laying it out, not after writing all of
//! its inode tables and directories. Both write the same bytes to the same slots.

use crate::build::{bad_blocks_inode, set_bits, Content, Prepared, ROOT_INO};
use crate::checksum;
use crate::extent;
use crate::layout::{MetaStore, Region, RegionKind};
use crate::placement::Placement;
use crate::plan::{Geometry, BLOCKS_PER_GROUP, DESC_SIZE, INODE_SIZE};
use crate::regions::RegionTable;
use crate::superblock::{self, GroupDesc, Totals, FIRST_INO};
use crate::xattr;
use crate::{FsTree, Layout, Stats, BLOCK_SIZE};

const BS: usize = BLOCK_SIZE as usize;
const INODES_PER_BLOCK: u64 = BLOCK_SIZE / INODE_SIZE;

/// Metadata generated on its own; `u32`s are entries of `Prepared::inodes`.
#[derive(Debug, Clone, Copy)]
enum Unit {
    /// A directory's or slow symlink's blocks.
    Content(u32),
    ExtentTree(u32),
    Xattr(u32),
    /// Block `block` of group `group`'s inode table.
    InodeBlock {
        group: u32,
        block: u32,
    },
}

/// A run of metadata blocks on the device: made with the block map, or a unit's.
enum Span {
    Made(Vec<u8>),
    Unit(u32),
}

/// What generates the units of a laid out tree, and where their blocks go.
pub(crate) struct Generator {
    prep: Prepared,
    place: Placement,
    inodes_per_group: u64,
    units: Vec<Unit>,
    /// Unit `u`'s blocks, in the order it generates them, are in the slots
    /// `slots[slots_at[u]..slots_at[u + 1]]`.
    slots: Vec<u32>,
    slots_at: Vec<u32>,
    /// The unit of each slot; `MADE` for blocks made with the block map.
    unit_of: Vec<u32>,
}

const MADE: u32 = u32::MAX;

impl Generator {
    /// The block map of a placed tree, with superblocks, descriptors and bitmaps in its
    /// metadata store and a slot reserved for every other metadata block.
    pub(crate) fn new(
        prep: Prepared,
        geo: Geometry,
        place: Placement,
        size: u64,
        min_size: u64,
    ) -> (Layout, MetaStore, Generator) {
        let ipg = geo.inodes_per_group;
        let used_in = |g: u64| (prep.max_ino as u64).saturating_sub(g * ipg).min(ipg);
        let mut units = Vec::new();
        let mut spans: Vec<(u64, u64, Span)> = Vec::new();
        let mut regions: Vec<Region> = Vec::new();

        for (idx, ino) in prep.inodes.iter().enumerate() {
            let runs = place.runs(idx);
            match &ino.content {
                Content::Inline(_) => {}
                Content::Sized(_) => {
                    let u = units.len() as u32;
                    units.push(Unit::Content(idx as u32));
                    spans.extend(runs.iter().map(|&(s, l)| (s, l, Span::Unit(u))));
                }
                Content::Data {
                    handle, object_len, ..
                } => {
                    let mut object_block = 0u64;
                    for &(start, len) in runs {
                        let offset = object_block * BLOCK_SIZE;
                        let data_len = (len * BLOCK_SIZE).min(object_len - offset);
                        regions.extend(Region::split(
                            start,
                            len,
                            RegionKind::Data {
                                handle: *handle,
                                offset,
                                data_len,
                            },
                        ));
                        object_block += len;
                    }
                }
            }
            let (first, n) = place.tree_blocks[idx];
            if n > 0 {
                let u = units.len() as u32;
                units.push(Unit::ExtentTree(idx as u32));
                spans.push((first, n as u64, Span::Unit(u)));
            }
            if let (Some(_), Some(at)) = (ino.xattr_block(), place.xattr_blocks[idx]) {
                let u = units.len() as u32;
                units.push(Unit::Xattr(idx as u32));
                spans.push((at, 1, Span::Unit(u)));
            }
        }
        // Inode tables: only the blocks holding used inodes; the rest reads as zeros.
        for g in 0..geo.groups {
            let blocks = used_in(g).div_ceil(INODES_PER_BLOCK);
            for b in 0..blocks {
                let u = units.len() as u32;
                units.push(Unit::InodeBlock {
                    group: g as u32,
                    block: b as u32,
                });
                spans.push((place.inode_tables[g as usize] + b, 1, Span::Unit(u)));
            }
        }

        let totals = made_blocks(&prep, &geo, &place, &mut spans);

        // Slots in block order, so that neighbouring regions have neighbouring slots (the
        // region table stores each relative to the one before).
        spans.sort_unstable_by_key(|s| s.0);
        let mut slots_at = vec![0u32; units.len() + 1];
        for (u, unit) in units.iter().enumerate() {
            let n = match *unit {
                Unit::Content(idx) => prep.inodes[idx as usize].content.blocks(),
                Unit::ExtentTree(idx) => place.tree_blocks[idx as usize].1 as u64,
                Unit::Xattr(_) | Unit::InodeBlock { .. } => 1,
            };
            slots_at[u + 1] = slots_at[u] + n as u32;
        }
        let mut slots = vec![0u32; slots_at[units.len()] as usize];
        let mut filled = slots_at.clone();
        let mut meta = MetaStore::default();
        let mut unit_of = Vec::new();
        let mut generated = 0u64;
        for (start, len, span) in spans {
            let first = meta.reserve(len as usize);
            generated += len * BLOCK_SIZE;
            regions.extend(Region::split(start, len, RegionKind::Meta { first }));
            match span {
                Span::Made(bytes) => {
                    for (i, block) in bytes.chunks(BS).enumerate() {
                        meta.put(first + i, block);
                        unit_of.push(MADE);
                    }
                }
                Span::Unit(u) => {
                    for i in 0..len as usize {
                        slots[filled[u as usize] as usize] = (first + i) as u32;
                        filled[u as usize] += 1;
                        unit_of.push(u);
                    }
                }
            }
        }
        let data_blocks = regions
            .iter()
            .filter(|r| matches!(r.kind(), RegionKind::Data { .. }))
            .map(|r| r.len())
            .sum();
        regions.sort_unstable_by_key(|r| r.start());
        let layout = Layout {
            size: size / BLOCK_SIZE * BLOCK_SIZE,
            regions: RegionTable::new(&regions),
            meta: Default::default(),
            stats: Stats {
                blocks: geo.blocks,
                free_blocks: totals.free_blocks,
                inodes: geo.inodes(),
                free_inodes: totals.free_inodes,
                groups: geo.groups,
                metadata_bytes: generated,
                data_blocks,
                min_size,
            },
        };
        let generator = Generator {
            prep,
            place,
            inodes_per_group: ipg,
            units,
            slots,
            slots_at,
            unit_of,
        };
        (layout, meta, generator)
    }

    /// Generates every unit into `meta`.
    pub(crate) fn generate_all(&self, tree: &FsTree, meta: &mut MetaStore) {
        for u in 0..self.units.len() {
            self.generate(tree, u, meta);
        }
    }

    /// The unit of `slot`, or `None` if the block was made with the block map.
    pub(crate) fn unit_of(&self, slot: usize) -> Option<usize> {
        let u = self.unit_of[slot];
        (u != MADE).then_some(u as usize)
    }

    pub(crate) fn units(&self) -> usize {
        self.units.len()
    }

    /// The slots of unit `u`'s blocks.
    pub(crate) fn slots(&self, u: usize) -> &[u32] {
        &self.slots[self.slots_at[u] as usize..self.slots_at[u + 1] as usize]
    }

    /// Generates unit `u` into its slots of `meta`.
    pub(crate) fn generate(&self, tree: &FsTree, u: usize, meta: &mut MetaStore) {
        let slots = self.slots(u);
        let fs_seed = self.prep.opts.checksum_seed;
        match self.units[u] {
            Unit::Content(idx) => {
                let blocks = self.prep.content_blocks(tree, idx as usize);
                debug_assert_eq!(blocks.len(), slots.len());
                for (block, &slot) in blocks.iter().zip(slots) {
                    meta.put(slot as usize, block);
                }
            }
            Unit::ExtentTree(idx) => {
                let idx = idx as usize;
                let ino = &self.prep.inodes[idx];
                let seed = checksum::inode_seed(fs_seed, ino.ino, 0);
                let extents = self.prep.extents(idx, self.place.runs(idx));
                let (_, nodes) = extent::build(&extents, &self.place.tree_blocks(idx), seed);
                let first = self.place.tree_blocks[idx].0;
                for (at, block) in nodes {
                    meta.put(slots[(at - first) as usize] as usize, &block);
                }
            }
            Unit::Xattr(idx) => {
                let idx = idx as usize;
                let block = self.prep.inodes[idx]
                    .xattr_block()
                    .expect("a unit per block");
                let at = self.place.xattr_blocks[idx].expect("placed");
                let mut b = block.clone();
                xattr::seal_block(&mut b, at, fs_seed);
                meta.put(slots[0] as usize, &b);
            }
            Unit::InodeBlock { group, block } => {
                let mut out = [0u8; BS];
                let first = group as u64 * self.inodes_per_group + block as u64 * INODES_PER_BLOCK;
                for (i, slot) in out.chunks_exact_mut(INODE_SIZE as usize).enumerate() {
                    let n = (first + i as u64 + 1) as u32;
                    if let Some(bytes) = self.inode(tree, n) {
                        slot.copy_from_slice(&bytes);
                    }
                }
                meta.put(slots[0] as usize, &out);
            }
        }
    }

    /// Inode `n` as written to its table; `None` for an unused (all-zero) one.
    fn inode(&self, tree: &FsTree, n: u32) -> Option<[u8; INODE_SIZE as usize]> {
        let prep = &self.prep;
        let fs_seed = prep.opts.checksum_seed;
        let idx = match n {
            1 => return Some(bad_blocks_inode(prep.opts.timestamp, fs_seed)),
            ROOT_INO => 0,
            n if n >= FIRST_INO && n <= prep.max_ino => (n - FIRST_INO + 1) as usize,
            _ => return None,
        };
        let ino = &prep.inodes[idx];
        debug_assert_eq!(ino.ino, n);
        let mut f = prep.inode_fields(tree, ino);
        match &ino.content {
            Content::Inline(blk) => f.i_block = **blk,
            _ => {
                let seed = checksum::inode_seed(fs_seed, n, 0);
                let extents = prep.extents(idx, self.place.runs(idx));
                f.i_block = extent::build(&extents, &self.place.tree_blocks(idx), seed).0;
            }
        }
        let mut blocks = ino.content.blocks() + self.place.tree_blocks[idx].1 as u64;
        if let (Some(_), Some(at)) = (ino.xattr_block(), self.place.xattr_blocks[idx]) {
            f.file_acl = at;
            blocks += 1;
        }
        f.sectors = blocks * (BLOCK_SIZE / 512);
        Some(f.encode(n, fs_seed))
    }

    /// Heap bytes held, roughly: what keeping the generator beside the tree costs.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.prep.heap_bytes()
            + self.place.heap_bytes()
            + self.units.capacity() * std::mem::size_of::<Unit>()
            + (self.slots.capacity() + self.slots_at.capacity() + self.unit_of.capacity()) * 4
    }
}

/// The blocks made with the block map, added to `spans`: block and inode bitmaps (those not
/// all zeros), and the superblock with the group descriptors at each of their copies.
/// Returns the free block and inode totals.
fn made_blocks(
    prep: &Prepared,
    geo: &Geometry,
    place: &Placement,
    spans: &mut Vec<(u64, u64, Span)>,
) -> Totals {
    let fs_seed = prep.opts.checksum_seed;
    let ipg = geo.inodes_per_group;
    let used_in = |g: u64| (prep.max_ino as u64).saturating_sub(g * ipg).min(ipg);
    let mut made = |start: u64, bytes: Vec<u8>| {
        spans.push((start, (bytes.len() / BS) as u64, Span::Made(bytes)));
    };
    let mut used_ranges: Vec<(u64, u64)> = place.used.clone();
    used_ranges.extend(geo.super_ranges());
    used_ranges.sort_unstable();
    let mut ranges = used_ranges.iter().peekable();
    let mut descs = Vec::with_capacity(geo.groups as usize);
    let mut dirs_in = vec![0u32; geo.groups as usize];
    for ino in prep.inodes.iter().filter(|i| i.is_dir) {
        dirs_in[((ino.ino as u64 - 1) / ipg) as usize] += 1;
    }
    let (mut free_blocks, mut free_inodes) = (0u64, 0u64);
    for g in 0..geo.groups {
        let (gstart, glen) = (geo.group_start(g), geo.group_len(g));
        let mut bm = vec![0u8; BS];
        set_bits(&mut bm, glen, BLOCKS_PER_GROUP);
        let mut used = 0;
        while let Some(&&(s, l)) = ranges.peek() {
            if s >= gstart + glen {
                break;
            }
            let (from, to) = (s.max(gstart), (s + l).min(gstart + glen));
            if from < to {
                set_bits(&mut bm, from - gstart, to - gstart);
                used += to - from;
            }
            if s + l > gstart + glen {
                break; // continues into the next group
            }
            ranges.next();
        }
        let bb_csum = checksum::crc(fs_seed, &bm);
        // An all-zero bitmap needs no region: unmapped blocks read as zeros.
        if bm.iter().any(|&b| b != 0) {
            made(place.block_bitmaps[g as usize], bm);
        }

        let iused = used_in(g);
        let mut im = vec![0u8; BS];
        set_bits(&mut im, 0, iused);
        set_bits(&mut im, ipg, BLOCKS_PER_GROUP);
        let ib_csum = checksum::crc(fs_seed, &im[..(ipg / 8) as usize]);
        if im.iter().any(|&b| b != 0) {
            made(place.inode_bitmaps[g as usize], im);
        }

        descs.push(GroupDesc {
            block_bitmap: place.block_bitmaps[g as usize],
            inode_bitmap: place.inode_bitmaps[g as usize],
            inode_table: place.inode_tables[g as usize],
            free_blocks: (glen - used) as u32,
            free_inodes: (ipg - iused) as u32,
            used_dirs: dirs_in[g as usize],
            itable_unused: (ipg - iused) as u32,
            block_bitmap_csum: bb_csum,
            inode_bitmap_csum: ib_csum,
        });
        free_blocks += glen - used;
        free_inodes += ipg - iused;
    }
    let mut gdt = vec![0u8; (geo.gdt_blocks * BLOCK_SIZE) as usize];
    for (g, d) in descs.iter().enumerate() {
        d.encode(g as u32, fs_seed, &mut gdt[g * DESC_SIZE as usize..]);
    }
    let totals = Totals {
        free_blocks,
        free_inodes,
    };
    for (start, _) in geo.super_ranges() {
        let g = start / BLOCKS_PER_GROUP;
        let mut b = vec![0u8; BS + gdt.len()];
        let at = if g == 0 { 1024 } else { 0 };
        b[at..at + 1024].copy_from_slice(&superblock::encode(geo, &prep.opts, totals, g));
        b[BS..].copy_from_slice(&gdt);
        made(start, b);
    }
    totals
}
