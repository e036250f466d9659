//! Superblock and group descriptors (`Documentation/filesystems/ext4/super.rst`,
//! `group_descr.rst`). Field offsets are given in the comments' hex as in the docs.

use crate::checksum;
use crate::le::{put16, put32, put64};
use crate::plan::{Geometry, BLOCKS_PER_GROUP, DESC_SIZE, INODE_SIZE};
use crate::Options;

pub(crate) const FIRST_INO: u32 = 11;

const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// `EXT4_BG_INODE_ZEROED`: without it the kernel's lazyinit thread rewrites inode tables.
const BG_INODE_ZEROED: u16 = 0x4;

/// Per-group values that go into a descriptor.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GroupDesc {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub free_blocks: u32,
    pub free_inodes: u32,
    pub used_dirs: u32,
    pub itable_unused: u32,
    pub block_bitmap_csum: u32,
    pub inode_bitmap_csum: u32,
}

impl GroupDesc {
    pub fn encode(&self, group: u32, fs_seed: u32, out: &mut [u8]) {
        let d = &mut out[..DESC_SIZE as usize];
        put32(d, 0x00, self.block_bitmap as u32);
        put32(d, 0x04, self.inode_bitmap as u32);
        put32(d, 0x08, self.inode_table as u32);
        put16(d, 0x0C, self.free_blocks as u16);
        put16(d, 0x0E, self.free_inodes as u16);
        put16(d, 0x10, self.used_dirs as u16);
        put16(d, 0x12, BG_INODE_ZEROED);
        put16(d, 0x18, self.block_bitmap_csum as u16);
        put16(d, 0x1A, self.inode_bitmap_csum as u16);
        put16(d, 0x1C, self.itable_unused as u16);
        put32(d, 0x20, (self.block_bitmap >> 32) as u32);
        put32(d, 0x24, (self.inode_bitmap >> 32) as u32);
        put32(d, 0x28, (self.inode_table >> 32) as u32);
        put16(d, 0x2C, (self.free_blocks >> 16) as u16);
        put16(d, 0x2E, (self.free_inodes >> 16) as u16);
        put16(d, 0x30, (self.used_dirs >> 16) as u16);
        put16(d, 0x32, (self.itable_unused >> 16) as u16);
        put16(d, 0x38, (self.block_bitmap_csum >> 16) as u16);
        put16(d, 0x3A, (self.inode_bitmap_csum >> 16) as u16);
        let csum = checksum::group_desc(fs_seed, group, d);
        put16(d, 0x1E, csum);
    }
}

/// Filesystem-wide counts for the superblock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Totals {
    pub free_blocks: u64,
    pub free_inodes: u64,
}

/// The 1024-byte superblock as stored in group `group` (0 for the primary copy).
pub(crate) fn encode(geo: &Geometry, opts: &Options, totals: Totals, group: u64) -> [u8; 1024] {
    let mut s = [0u8; 1024];
    let t = opts.timestamp as u32;
    let t_hi = (opts.timestamp >> 32) as u8;
    put32(&mut s, 0x00, geo.inodes() as u32);
    put32(&mut s, 0x04, geo.blocks as u32);
    put32(&mut s, 0x0C, totals.free_blocks as u32);
    put32(&mut s, 0x10, totals.free_inodes as u32);
    put32(&mut s, 0x14, 0); // s_first_data_block: 0 with 4 KiB blocks
    put32(&mut s, 0x18, 2); // s_log_block_size: 1024 << 2
    put32(&mut s, 0x1C, 2); // s_log_cluster_size
    put32(&mut s, 0x20, BLOCKS_PER_GROUP as u32);
    put32(&mut s, 0x24, BLOCKS_PER_GROUP as u32);
    put32(&mut s, 0x28, geo.inodes_per_group as u32);
    put32(&mut s, 0x30, t); // s_wtime
    put16(&mut s, 0x36, 0xFFFF); // s_max_mnt_count = -1: no forced checks
    put16(&mut s, 0x38, 0xEF53);
    put16(&mut s, 0x3A, 1); // s_state: cleanly unmounted
    put16(&mut s, 0x3C, 1); // s_errors: continue
    put32(&mut s, 0x40, t); // s_lastcheck
    put32(&mut s, 0x4C, 1); // s_rev_level: dynamic
    put32(&mut s, 0x54, FIRST_INO);
    put16(&mut s, 0x58, INODE_SIZE as u16);
    put16(&mut s, 0x5A, group as u16);
    put32(&mut s, 0x5C, COMPAT_EXT_ATTR | COMPAT_DIR_INDEX);
    put32(
        &mut s,
        0x60,
        INCOMPAT_FILETYPE
            | INCOMPAT_EXTENTS
            | INCOMPAT_64BIT
            | INCOMPAT_FLEX_BG
            | INCOMPAT_CSUM_SEED,
    );
    put32(
        &mut s,
        0x64,
        RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE
            | RO_COMPAT_METADATA_CSUM,
    );
    s[0x68..0x78].copy_from_slice(&opts.uuid);
    s[0x78..0x78 + opts.label.len()].copy_from_slice(&opts.label);
    s[0xEC..0xFC].copy_from_slice(&opts.hash_seed);
    s[0xFC] = 1; // s_def_hash_version: half_md4
    put16(&mut s, 0xFE, DESC_SIZE as u16);
    put32(&mut s, 0x100, 0x0004 | 0x0008); // s_default_mount_opts: user_xattr, acl
    put32(&mut s, 0x108, t); // s_mkfs_time
    put32(&mut s, 0x150, (geo.blocks >> 32) as u32);
    put32(&mut s, 0x158, (totals.free_blocks >> 32) as u32);
    put16(&mut s, 0x15C, crate::inode::EXTRA_ISIZE as u16); // s_min_extra_isize
    put16(&mut s, 0x15E, crate::inode::EXTRA_ISIZE as u16); // s_want_extra_isize
    put32(&mut s, 0x160, 0x2); // s_flags: unsigned directory hash
    s[0x174] = geo.log_groups_per_flex;
    s[0x175] = 1; // s_checksum_type: crc32c
    put64(&mut s, 0x178, 0); // s_kbytes_written
    put32(&mut s, 0x270, opts.checksum_seed);
    s[0x274] = t_hi; // s_wtime_hi
    s[0x276] = t_hi; // s_mkfs_time_hi
    s[0x277] = t_hi; // s_lastcheck_hi
    let csum = checksum::superblock(&s);
    put32(&mut s, 0x3FC, csum);
    s
}
