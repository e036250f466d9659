//! Geometry arithmetic and block allocation, separate from byte emission so it can be
//! tested directly.
//!
//! Placement: block 0 holds the superblock, then the group descriptor table; with
//! `flex_bg` every group's bitmaps and inode table follow right after, packed together at
//! the start of the device; then directory, symlink, file data, extent-tree and xattr blocks
//! in inode order. Superblock/GDT backups (`sparse_super`: groups 0, 1 and powers of 3, 5, 7)
//! are holes in that sequence that allocation steps over.

use crate::{Error, BLOCK_SIZE};

pub(crate) const BLOCKS_PER_GROUP: u64 = 8 * BLOCK_SIZE;
pub(crate) const INODE_SIZE: u64 = 256;
pub(crate) const INODES_PER_BLOCK: u64 = BLOCK_SIZE / INODE_SIZE;
pub(crate) const DESC_SIZE: u64 = 64;
/// 2^32 blocks of 4 KiB: beyond this we would need more than 32-bit block numbers in places
/// (and the issue does not need >16 TiB).
const MAX_BLOCKS: u64 = 1 << 32;
/// Leave a gap smaller than this in front of a superblock backup rather than split a file.
const MAX_SKIP_FOR_CONTIGUITY: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub blocks: u64,
    pub groups: u64,
    pub inodes_per_group: u64,
    pub gdt_blocks: u64,
    pub itable_blocks: u64,
    pub log_groups_per_flex: u8,
}

/// `sparse_super`: groups 0, 1 and powers of 3, 5 and 7 carry superblock + GDT backups.
pub(crate) fn has_super(group: u64) -> bool {
    fn power_of(mut g: u64, base: u64) -> bool {
        while g > 1 && g % base == 0 {
            g /= base;
        }
        g == 1
    }
    group <= 1 || power_of(group, 3) || power_of(group, 5) || power_of(group, 7)
}

impl Geometry {
    /// Geometry for a device of `size` bytes holding at least `inodes` inodes.
    pub fn new(size: u64, inodes: u64) -> Result<Geometry, Error> {
        let mut blocks = size / BLOCK_SIZE;
        if blocks > MAX_BLOCKS {
            return Err(Error::TooLarge { size });
        }
        let mut groups = blocks.div_ceil(BLOCKS_PER_GROUP).max(1);
        let gdt_blocks = |groups: u64| (groups * DESC_SIZE).div_ceil(BLOCK_SIZE);
        // A last group too small to hold its own superblock backup plus a little data is
        // dropped, as mke2fs does; the device keeps its size, the filesystem ignores the tail.
        let last = blocks - (groups - 1) * BLOCKS_PER_GROUP;
        if groups > 1 && last < 1 + gdt_blocks(groups) + 64 {
            groups -= 1;
            blocks = groups * BLOCKS_PER_GROUP;
        }
        let max_ipg = BLOCKS_PER_GROUP; // one bitmap block
        let ipg = inodes
            .div_ceil(groups)
            .next_multiple_of(INODES_PER_BLOCK)
            .max(INODES_PER_BLOCK);
        if ipg > max_ipg || ipg * groups > u32::MAX as u64 {
            return Err(Error::TooManyInodes {
                inodes,
                groups,
                max: (max_ipg * groups).min(u32::MAX as u64),
            });
        }
        let log_groups_per_flex = (64 - (groups - 1).leading_zeros()).max(4) as u8;
        Ok(Geometry {
            blocks,
            groups,
            inodes_per_group: ipg,
            gdt_blocks: gdt_blocks(groups),
            itable_blocks: ipg / INODES_PER_BLOCK,
            log_groups_per_flex,
        })
    }

    pub fn inodes(&self) -> u64 {
        self.inodes_per_group * self.groups
    }

    pub fn group_start(&self, g: u64) -> u64 {
        g * BLOCKS_PER_GROUP
    }

    pub fn group_len(&self, g: u64) -> u64 {
        (self.blocks - self.group_start(g)).min(BLOCKS_PER_GROUP)
    }

    /// Blocks at the start of each backup group taken by the superblock and GDT copy.
    pub fn super_ranges(&self) -> Vec<(u64, u64)> {
        (0..self.groups)
            .filter(|&g| has_super(g))
            .map(|g| (self.group_start(g), 1 + self.gdt_blocks))
            .collect()
    }
}

/// Hands out blocks in increasing order, stepping over the superblock backups.
#[derive(Debug)]
pub(crate) struct Allocator {
    next: u64,
    reserved: Vec<(u64, u64)>,
    /// Index of the first reserved range that ends after `next`.
    ri: usize,
}

impl Allocator {
    pub fn new(geo: &Geometry) -> Allocator {
        let reserved = geo.super_ranges();
        let mut a = Allocator {
            next: 0,
            reserved,
            ri: 0,
        };
        a.settle();
        a
    }

    /// First block not yet handed out; everything past it is free.
    pub fn end(&self) -> u64 {
        self.next
    }

    fn settle(&mut self) {
        while let Some(&(s, l)) = self.reserved.get(self.ri) {
            if self.next >= s + l {
                self.ri += 1;
            } else if self.next >= s {
                self.next = s + l;
                self.ri += 1;
            } else {
                break;
            }
        }
    }

    /// Blocks until the next reserved range (unbounded past the last one).
    fn room(&self) -> u64 {
        self.reserved
            .get(self.ri)
            .map_or(u64::MAX, |&(s, _)| s - self.next)
    }

    /// `n` contiguous blocks.
    pub fn contiguous(&mut self, n: u64) -> u64 {
        while self.room() < n {
            self.next += self.room();
            self.settle();
        }
        let at = self.next;
        self.next += n;
        self.settle();
        at
    }

    /// `n` blocks for file data: contiguous when that wastes little, else split in runs
    /// around superblock backups. Returns `(start, len)` runs in logical order.
    #[cfg(test)]
    pub fn runs(&mut self, n: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        self.runs_into(n, &mut out);
        out
    }

    /// [`Self::runs`] into `out` (cleared first), for callers that reuse one buffer.
    pub fn runs_into(&mut self, n: u64, out: &mut Vec<(u64, u64)>) {
        out.clear();
        if n == 0 {
            return;
        }
        if self.room() < n && self.room() < MAX_SKIP_FOR_CONTIGUITY && n <= BLOCKS_PER_GROUP / 2 {
            out.push((self.contiguous(n), n));
            return;
        }
        let mut left = n;
        while left > 0 {
            let take = left.min(self.room());
            if take > 0 {
                out.push((self.next, take));
                self.next += take;
                left -= take;
            }
            self.settle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let with: Vec<u64> = (0..100).filter(|&g| has_super(g)).collect();
        assert_eq!(with, vec![0, 1, 3, 5, 7, 9, 25, 27, 49, 81]);
    }

    #[test]
    fn geometry_small_image_is_one_group() {
        let g = Geometry::new(16 << 20, 100).unwrap();
        assert_eq!((g.blocks, g.groups, g.gdt_blocks), (4096, 1, 1));
        assert_eq!(g.inodes_per_group, 112);
        assert_eq!(g.itable_blocks, 7);
    }

    #[test]
    fn geometry_drops_a_tiny_last_group() {
        let g = Geometry::new((BLOCKS_PER_GROUP + 10) * BLOCK_SIZE, 16).unwrap();
        assert_eq!((g.groups, g.blocks), (1, BLOCKS_PER_GROUP));
        let g = Geometry::new((BLOCKS_PER_GROUP * 2 + 1000) * BLOCK_SIZE, 16).unwrap();
        assert_eq!((g.groups, g.blocks), (3, BLOCKS_PER_GROUP * 2 + 1000));
    }

    #[test]
    fn geometry_of_several_gib() {
        let g = Geometry::new(6 << 30, 10_000).unwrap();
        assert_eq!(g.groups, 48);
        assert_eq!(g.gdt_blocks, 1);
        assert_eq!(g.inodes_per_group, 224);
        assert_eq!(g.log_groups_per_flex, 6);
        assert_eq!(g.super_ranges().len(), 8); // 0 1 3 5 7 9 25 27
    }

    #[test]
    fn too_many_inodes_is_an_error() {
        assert!(matches!(
            Geometry::new(16 << 20, 40_000),
            Err(Error::TooManyInodes { .. })
        ));
    }

    #[test]
    fn allocator_steps_over_backups_and_splits_big_files() {
        let g = Geometry::new(BLOCKS_PER_GROUP * 4 * BLOCK_SIZE, 64).unwrap();
        let mut a = Allocator::new(&g);
        assert_eq!(a.contiguous(1), 2); // after superblock + 1 GDT block
                                        // Ends 100 blocks short of group 1's backup: a small file skips over it whole.
        let filler = BLOCKS_PER_GROUP - 100 - a.end();
        a.contiguous(filler);
        let runs = a.runs(500);
        assert_eq!(runs, vec![(BLOCKS_PER_GROUP + 2, 500)]);
        // A big file is split around group 3's backup instead of wasting space.
        let before = a.end();
        let room = 3 * BLOCKS_PER_GROUP - before;
        let runs = a.runs(room + 1000);
        assert_eq!(runs, vec![(before, room), (3 * BLOCKS_PER_GROUP + 2, 1000)]);
    }
}
