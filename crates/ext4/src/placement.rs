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

/// What an allocated range is for; `usize`s are entries of `Prepared::inodes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    BlockBitmap,
    InodeBitmap,
    InodeTable,
    Content(usize),
    ExtentTree(usize),
    Xattr(usize),
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

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        (self.block_bitmaps.capacity()
            + self.inode_bitmaps.capacity()
            + self.inode_tables.capacity())
            * 8
            + self.runs.capacity() * 16
            + self.run_at.capacity() * 4
            + self.tree_blocks.capacity() * 16
            + self.xattr_blocks.capacity() * 16
            + self.used.capacity() * 16
    }

    /// The extent-tree blocks of entry `idx` of `Prepared::inodes`.
    pub fn tree_blocks(&self, idx: usize) -> Vec<u64> {
        let (first, n) = self.tree_blocks[idx];
        (first..first + n as u64).collect()
    }
}

impl Prepared {
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
            c @ Content::Sized(_) => {
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
        self.tally(geo, |_, _, _| {}).end
    }

    /// Allocates every block in `geo`, in the one order [`Self::allocate`], sizing and
    /// [`crate::plan`] share, handing each range `(start, len)` and what it is for to `used`.
    pub(crate) fn tally(&self, geo: &Geometry, mut used: impl FnMut(Use, u64, u64)) -> Tally {
        let mut a = Allocator::new(geo);
        let mut take = |a: &mut Allocator, what: Use, n: u64| used(what, a.contiguous(n), n);
        for what in [Use::BlockBitmap, Use::InodeBitmap] {
            for _ in 0..geo.groups {
                take(&mut a, what, 1);
            }
        }
        for _ in 0..geo.groups {
            take(&mut a, Use::InodeTable, geo.itable_blocks);
        }
        let mut tree_blocks = Vec::new();
        let mut runs = Vec::new();
        for (idx, ino) in self.inodes.iter().enumerate() {
            a.runs_into(ino.content.blocks(), &mut runs);
            for &(start, len) in &runs {
                used(Use::Content(idx), start, len);
            }
            if !matches!(ino.content, Content::Inline(_)) {
                let mut count = 0;
                self.each_extent(idx, &runs, |_| count += 1);
                let n = extent::tree_blocks(count) as u64;
                if n > 0 {
                    tree_blocks.push((idx, n));
                }
            }
        }
        let mut take = |a: &mut Allocator, what: Use, n: u64| used(what, a.contiguous(n), n);
        for &(idx, n) in &tree_blocks {
            take(&mut a, Use::ExtentTree(idx), n);
        }
        for (idx, _) in self
            .inodes
            .iter()
            .enumerate()
            .filter(|(_, i)| i.xattr_block().is_some())
        {
            take(&mut a, Use::Xattr(idx), 1);
        }
        Tally {
            end: a.end(),
            tree_blocks: tree_blocks.iter().map(|&(_, n)| n).sum(),
        }
    }

    pub(crate) fn allocate(&self, geo: &Geometry) -> Placement {
        let n = self.inodes.len();
        let groups = geo.groups as usize;
        let mut p = Placement {
            block_bitmaps: Vec::with_capacity(groups),
            inode_bitmaps: Vec::with_capacity(groups),
            inode_tables: Vec::with_capacity(groups),
            runs: Vec::with_capacity(n),
            run_at: vec![0; n + 1],
            tree_blocks: vec![(0, 0); n],
            xattr_blocks: vec![None; n],
            used: Vec::new(),
            end: 0,
        };
        p.end = self
            .tally(geo, |what, start, len| {
                p.used.push((start, len));
                match what {
                    Use::BlockBitmap => p.block_bitmaps.push(start),
                    Use::InodeBitmap => p.inode_bitmaps.push(start),
                    Use::InodeTable => p.inode_tables.push(start),
                    Use::Content(idx) => {
                        p.runs.push((start, len));
                        p.run_at[idx + 1] += 1;
                    }
                    Use::ExtentTree(idx) => p.tree_blocks[idx] = (start, len as u32),
                    Use::Xattr(idx) => p.xattr_blocks[idx] = Some(start),
                }
            })
            .end;
        // Run counts per inode to where each inode's runs start.
        for i in 1..=n {
            p.run_at[i] += p.run_at[i - 1];
        }
        // The allocator only moves forward: `used` is in block order as pushed.
        debug_assert!(p.used.is_sorted());
        p
    }
}
