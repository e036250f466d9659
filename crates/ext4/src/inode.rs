//! The on-disk inode (`Documentation/filesystems/ext4/inodes.rst`), 256 bytes with
//! `i_extra_isize` = 32, leaving 96 bytes for in-inode extended attributes.

use crate::checksum;
use crate::le::{put16, put32};
use crate::plan::INODE_SIZE;
use crate::Timestamp;

pub(crate) const EXTRA_ISIZE: usize = 32;
/// Where in-inode xattrs start (after the 128-byte base inode and the extra fields).
pub(crate) const INLINE_XATTR_OFFSET: usize = 128 + EXTRA_ISIZE;
pub(crate) const INLINE_XATTR_SPACE: usize = INODE_SIZE as usize - INLINE_XATTR_OFFSET;

pub(crate) const S_IFIFO: u16 = 0x1000;
pub(crate) const S_IFCHR: u16 = 0x2000;
pub(crate) const S_IFDIR: u16 = 0x4000;
pub(crate) const S_IFBLK: u16 = 0x6000;
pub(crate) const S_IFREG: u16 = 0x8000;
pub(crate) const S_IFLNK: u16 = 0xA000;
pub(crate) const S_IFSOCK: u16 = 0xC000;

pub(crate) const EXT4_INDEX_FL: u32 = 0x1000;
pub(crate) const EXT4_EXTENTS_FL: u32 = 0x80000;

/// Everything we set in an inode; the rest of the 256 bytes stays zero.
#[derive(Debug, Clone)]
pub(crate) struct InodeFields {
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub ctime: Timestamp,
    pub mtime: Timestamp,
    pub crtime: Timestamp,
    pub links: u16,
    /// Allocated space in 512-byte sectors, including extent-tree and xattr blocks.
    pub sectors: u64,
    pub flags: u32,
    pub i_block: [u8; 60],
    pub file_acl: u64,
    /// In-inode xattr area (magic + entries + values), at most `INLINE_XATTR_SPACE` bytes.
    pub inline_xattrs: Vec<u8>,
}

impl Default for InodeFields {
    fn default() -> Self {
        InodeFields {
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            atime: Timestamp::default(),
            ctime: Timestamp::default(),
            mtime: Timestamp::default(),
            crtime: Timestamp::default(),
            links: 0,
            sectors: 0,
            flags: 0,
            i_block: [0; 60],
            file_acl: 0,
            inline_xattrs: Vec::new(),
        }
    }
}

/// Split a time into the 32-bit seconds field and the `_extra` field: two epoch bits that
/// extend the range to 2446, and 30 bits of nanoseconds (`ext4_encode_extra_time`).
fn encode_time(t: Timestamp) -> (u32, u32) {
    // Representable: -2^31 ..= 2^34 - 2^31 - 1 seconds.
    let sec = t.sec.clamp(-(1 << 31), (1 << 34) - (1 << 31) - 1);
    let epoch = ((sec - (sec as i32) as i64) >> 32) as u32 & 3;
    (sec as u32, epoch | (t.nsec.min(999_999_999) << 2))
}

impl InodeFields {
    pub fn encode(&self, ino: u32, fs_seed: u32) -> [u8; INODE_SIZE as usize] {
        let mut b = [0u8; INODE_SIZE as usize];
        put16(&mut b, 0x00, self.mode);
        put16(&mut b, 0x02, self.uid as u16);
        put32(&mut b, 0x04, self.size as u32);
        let (atime, atime_x) = encode_time(self.atime);
        let (ctime, ctime_x) = encode_time(self.ctime);
        let (mtime, mtime_x) = encode_time(self.mtime);
        let (crtime, crtime_x) = encode_time(self.crtime);
        put32(&mut b, 0x08, atime);
        put32(&mut b, 0x0C, ctime);
        put32(&mut b, 0x10, mtime);
        put16(&mut b, 0x18, self.gid as u16);
        put16(&mut b, 0x1A, self.links);
        put32(&mut b, 0x1C, self.sectors as u32);
        put32(&mut b, 0x20, self.flags);
        b[0x28..0x64].copy_from_slice(&self.i_block);
        put32(&mut b, 0x68, self.file_acl as u32);
        put32(&mut b, 0x6C, (self.size >> 32) as u32);
        put16(&mut b, 0x74, (self.sectors >> 32) as u16);
        put16(&mut b, 0x76, (self.file_acl >> 32) as u16);
        put16(&mut b, 0x78, (self.uid >> 16) as u16);
        put16(&mut b, 0x7A, (self.gid >> 16) as u16);
        put16(&mut b, 0x80, EXTRA_ISIZE as u16);
        put32(&mut b, 0x84, ctime_x);
        put32(&mut b, 0x88, mtime_x);
        put32(&mut b, 0x8C, atime_x);
        put32(&mut b, 0x90, crtime);
        put32(&mut b, 0x94, crtime_x);
        b[INLINE_XATTR_OFFSET..INLINE_XATTR_OFFSET + self.inline_xattrs.len()]
            .copy_from_slice(&self.inline_xattrs);
        let csum = checksum::inode(fs_seed, ino, 0, &b);
        put16(&mut b, 0x7C, csum as u16);
        put16(&mut b, 0x82, (csum >> 16) as u16);
        b
    }
}

/// `i_block` of a device node: old 16-bit encoding when both numbers fit in a byte, else the
/// new encoding in the second word (kernel `ext4_do_update_inode`).
pub(crate) fn device_block(major: u32, minor: u32) -> [u8; 60] {
    let mut blk = [0u8; 60];
    if major < 256 && minor < 256 {
        put32(&mut blk, 0, (major << 8) | minor);
    } else {
        put32(
            &mut blk,
            4,
            (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12),
        );
    }
    blk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_encoding_covers_pre_1970_and_post_2038() {
        assert_eq!(encode_time(Timestamp { sec: 0, nsec: 5 }), (0, 5 << 2));
        assert_eq!(encode_time(Timestamp { sec: -1, nsec: 0 }), (u32::MAX, 0));
        // 2040-01-01 is past i32::MAX: low 32 bits plus epoch bit 1.
        let t = 2_208_988_800i64;
        assert_eq!(encode_time(Timestamp { sec: t, nsec: 0 }), (t as u32, 1));
        // 2446 and beyond clamp to the last representable second.
        let (s, x) = encode_time(Timestamp {
            sec: 1 << 40,
            nsec: 0,
        });
        assert_eq!(
            (s as i32 as i64) + (((x & 3) as i64) << 32),
            (1 << 34) - (1 << 31) - 1
        );
    }

    #[test]
    fn device_numbers() {
        assert_eq!(&device_block(8, 1)[..8], &[1, 8, 0, 0, 0, 0, 0, 0]);
        let big = device_block(259, 300);
        assert_eq!(
            u32::from_le_bytes(big[4..8].try_into().unwrap()),
            (300 & 0xff) | (259 << 8) | ((300 & !0xff) << 12)
        );
    }
}
