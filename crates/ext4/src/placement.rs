//! Where a prepared tree's blocks go: the minimum device size, the allocation of bitmaps,
//! inode tables, content, extent-tree and xattr blocks ([`crate::plan`] steps over the
//! superblock copies), and each inode's extents over its runs.

use crate::build::{Content, Prepared, Segs};
use crate::extent::{self, Extent};
use crate::plan::{Allocator, Geometry, BLOCKS_PER_GROUP, INODE_SIZE};
use crate::{Error, BLOCK_SIZE};

/// Where everything went.
pub(crate) struct Placement {
    pub block_bitmaps: Vec<u64>,
    pub inode_bitmaps: Vec<u64>,
    pub inode_tables: Vec<u64>,
    /// Every inode's content runs, back to back: entry `idx` of `Prepared::inodes` has
    /// `runs[run_at[idx]..run_at[idx + 1]]` (one table, not a `Vec` per inode).
    runs: Vec<(u64, u64)>,
    run_at: Vec<u32>,
    /// Per entry of `Prepared::inodes`: its extent-tree blocks, which are consecutive, as
    /// (first, count), and its xattr block.
    pub tree_blocks: Vec<(u64, u32)>,
    pub xattr_blocks: Vec<Option<u64>>,
    /// Every allocated range, in increasing order (superblock backups excluded).
    pub used: Vec<(u64, u64)>,
    pub end: u64,
}

/// What [`Prepared::tally`] counts.
pub(crate) struct Tally {
    /// First block past everything allocated.
    pub end: u64,
    /// Extent-tree blocks of all inodes.
    pub tree_blocks: u64,
}

impl Placement {
    /// The content runs of entry `idx` of `Prepared::inodes`.
    pub fn runs(&self, idx: usize) -> &[(u64, u64)] {
        &self.runs[self.run_at[idx] as usize..self.run_at[idx + 1] as usize]
    }

    /// The extent-tree blocks of entry `idx` of `Prepared::inodes`.
    pub fn tree_blocks(&self, idx: usize) -> Vec<u64> {
        let (first, n) = self.tree_blocks[idx];
        (first..first + n as u64).collect()
    }
}

impl Prepared<'_> {
    /// Smallest device size that holds the tree, with inode counts from `geometry_for`.
    pub(crate) fn min_size(
        &self,
        geometry_for: &dyn Fn(u64) -> Result<Geometry, Error>,
    ) -> Result<u64, Error> {
        let content: u64 = self
            .inodes
            .iter()
            .map(|i| i.content.blocks() + i.xattr_block().is_some() as u64)
            .sum();
        let mut blocks = 2 + content + (self.max_ino as u64 * INODE_SIZE).div_ceil(BLOCK_SIZE) + 2;
        loop {
            let size = blocks * BLOCK_SIZE;
            let geo = match geometry_for(size) {
                Ok(g) => g,
                Err(Error::TooManyInodes { inodes, .. }) if blocks < (1 << 32) => {
                    // Too few groups for the inodes: grow by whole groups.
                    blocks = blocks.max(inodes.div_ceil(BLOCKS_PER_GROUP) * BLOCKS_PER_GROUP)
                        + BLOCKS_PER_GROUP;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let end = self.allocated_end(&geo);
            if end <= geo.blocks {
                return Ok(size);
            }
            // Grow past the shortfall and past a last group too small to keep.
            blocks = blocks.max(end) + 66 + geo.gdt_blocks;
        }
    }

    pub(crate) fn extents(&self, idx: usize, runs: &[(u64, u64)]) -> Vec<Extent> {
        let mut out = Vec::new();
        self.each_extent(idx, runs, |e| out.push(e));
        out
    }

    /// The inode's extents, in logical order, mapping its content onto `runs`.
    pub(crate) fn each_extent(&self, idx: usize, runs: &[(u64, u64)], mut f: impl FnMut(Extent)) {
        let generated;
        let segs = match &self.inodes[idx].content {
            Content::Inline(_) => return,
            c @ (Content::Meta(_) | Content::Sized(_)) => {
                generated = Segs::Dense(c.blocks());
                &generated
            }
            Content::Data { segs, .. } => segs,
        };
        let mut runs = runs.iter().copied();
        let (mut phys, mut left_in_run) = (0, 0);
        for (mut logical, mut n) in segs.iter() {
            while n > 0 {
                if left_in_run == 0 {
                    (phys, left_in_run) = runs.next().expect("runs cover the content");
                }
                let len = n.min(left_in_run).min(extent::MAX_LEN);
                f(Extent {
                    logical: logical as u32,
                    len: len as u16,
                    physical: phys,
                });
                logical += len;
                phys += len;
                n -= len;
                left_in_run -= len;
            }
        }
    }

    /// `allocate(geo).end` without keeping where anything went: the minimum-size search
    /// tries geometries with it.
    pub(crate) fn allocated_end(&self, geo: &Geometry) -> u64 {
        self.tally(geo, |_, _| {}).end
    }

    /// The steps of [`Self::allocate`] in the same order, handing each allocated range
    /// `(start, len)` to `used` instead of keeping it.
    pub(crate) fn tally(&self, geo: &Geometry, mut used: impl FnMut(u64, u64)) -> Tally {
        let mut a = Allocator::new(geo);
        let mut take = |a: &mut Allocator, n: u64| used(a.contiguous(n), n);
        for _ in 0..2 * geo.groups {
            take(&mut a, 1);
        }
        for _ in 0..geo.groups {
            take(&mut a, geo.itable_blocks);
        }
        let mut tree_blocks = Vec::with_capacity(self.inodes.len());
        let mut runs = Vec::new();
        for (idx, ino) in self.inodes.iter().enumerate() {
            a.runs_into(ino.content.blocks(), &mut runs);
            for &(start, len) in &runs {
                used(start, len);
            }
            tree_blocks.push(match ino.content {
                Content::Inline(_) => 0,
                _ => {
                    let mut count = 0;
                    self.each_extent(idx, &runs, |_| count += 1);
                    extent::tree_blocks(count)
                }
            });
        }
        let mut take = |a: &mut Allocator, n: u64| used(a.contiguous(n), n);
        for &n in tree_blocks.iter().filter(|&&n| n > 0) {
            take(&mut a, n as u64);
        }
        for _ in self.inodes.iter().filter(|i| i.xattr_block().is_some()) {
            take(&mut a, 1);
        }
        Tally {
            end: a.end(),
            tree_blocks: tree_blocks.iter().map(|&n| n as u64).sum(),
        }
    }

    pub(crate) fn allocate(&self, geo: &Geometry) -> Placement {
        let mut a = Allocator::new(geo);
        let mut used = Vec::new();
        fn take(a: &mut Allocator, used: &mut Vec<(u64, u64)>, n: u64) -> u64 {
            let at = a.contiguous(n);
            used.push((at, n));
            at
        }
        let block_bitmaps: Vec<u64> = (0..geo.groups)
            .map(|_| take(&mut a, &mut used, 1))
            .collect();
        let inode_bitmaps: Vec<u64> = (0..geo.groups)
            .map(|_| take(&mut a, &mut used, 1))
            .collect();
        let inode_tables: Vec<u64> = (0..geo.groups)
            .map(|_| take(&mut a, &mut used, geo.itable_blocks))
            .collect();
        let mut runs = Vec::with_capacity(self.inodes.len());
        let mut run_at = Vec::with_capacity(self.inodes.len() + 1);
        let mut r = Vec::new();
        for ino in &self.inodes {
            run_at.push(runs.len() as u32);
            a.runs_into(ino.content.blocks(), &mut r);
            used.extend_from_slice(&r);
            runs.extend_from_slice(&r);
        }
        run_at.push(runs.len() as u32);
        let mut tree_blocks = Vec::with_capacity(self.inodes.len());
        for idx in 0..self.inodes.len() {
            let n = match self.inodes[idx].content {
                Content::Inline(_) => 0,
                _ => {
                    let mut count = 0;
                    let r = &runs[run_at[idx] as usize..run_at[idx + 1] as usize];
                    self.each_extent(idx, r, |_| count += 1);
                    extent::tree_blocks(count)
                }
            };
            let at = if n > 0 {
                take(&mut a, &mut used, n as u64)
            } else {
                0
            };
            tree_blocks.push((at, n as u32));
        }
        let xattr_blocks = self
            .inodes
            .iter()
            .map(|i| i.xattr_block().map(|_| take(&mut a, &mut used, 1)))
            .collect();
        // The allocator only moves forward: `used` is in block order as pushed.
        debug_assert!(used.is_sorted());
        Placement {
            block_bitmaps,
            inode_bitmaps,
            inode_tables,
            runs,
            run_at,
            tree_blocks,
            xattr_blocks,
            used,
            end: a.end(),
        }
    }
}
