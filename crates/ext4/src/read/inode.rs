//! Inodes (`Documentation/filesystems/ext4/inodes.rst`): type and permissions, owner,
//! 64-bit size, times with their `_extra` fields, flags, and `i_block` (extent root, fast
//! symlink target or device number).

use super::{Filesystem, ReadAt, ReadError};
use crate::le::{get16, get32};
use crate::{Metadata, Timestamp};

const EXTENTS_FL: u32 = 0x80000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const ENCRYPT_FL: u32 = 0x800;
const CASEFOLD_FL: u32 = 0x4000_0000;

/// What kind of file an inode is, with what its `i_block` holds for devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InodeKind {
    File,
    Dir,
    Symlink,
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
    Fifo,
    Socket,
}

/// A parsed inode. `meta.xattrs` is empty here: see [`Filesystem::xattrs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub ino: u32,
    pub kind: InodeKind,
    pub meta: Metadata,
    pub size: u64,
    pub links: u16,
    pub flags: u32,
    /// Whether the times' `_extra` fields and `i_crtime` are present (large inodes).
    pub has_crtime: bool,
    pub(crate) i_block: [u8; 60],
    pub(crate) file_acl: u64,
    /// The in-inode xattr area (after `i_extra_isize`), possibly empty.
    pub(crate) inline_xattrs: Vec<u8>,
}

impl Inode {
    pub fn uses_extents(&self) -> bool {
        self.flags & EXTENTS_FL != 0
    }
}

/// Seconds from the 32-bit field and the epoch bits of `_extra`, nanoseconds from the rest
/// (`ext4_decode_extra_time`).
fn decode_time(sec: u32, extra: Option<u32>) -> Timestamp {
    let base = sec as i32 as i64;
    match extra {
        Some(x) => Timestamp {
            sec: base + (((x & 3) as i64) << 32),
            nsec: (x >> 2).min(999_999_999),
        },
        None => Timestamp { sec: base, nsec: 0 },
    }
}

/// `old_decode_dev` when `i_block[0]` is set, else `new_decode_dev(i_block[1])`.
fn decode_dev(i_block: &[u8]) -> (u32, u32) {
    let old = get32(i_block, 0);
    if old != 0 {
        return ((old >> 8) & 0xff, old & 0xff);
    }
    let new = get32(i_block, 4);
    ((new & 0xfff00) >> 8, (new & 0xff) | ((new >> 12) & 0xfff00))
}

pub(crate) fn parse(ino: u32, b: &[u8]) -> Result<Inode, ReadError> {
    let mode = get16(b, 0x0);
    let flags = get32(b, 0x20);
    let unsupported = |why| Err(ReadError::InodeUnsupported { ino, why });
    if flags & INLINE_DATA_FL != 0 {
        return unsupported("inline data");
    }
    if flags & ENCRYPT_FL != 0 {
        return unsupported("encrypted");
    }
    if flags & CASEFOLD_FL != 0 {
        return unsupported("case-folded directory");
    }
    let mut i_block = [0u8; 60];
    i_block.copy_from_slice(&b[0x28..0x64]);
    let kind = match mode & 0xF000 {
        0x8000 => InodeKind::File,
        0x4000 => InodeKind::Dir,
        0xA000 => InodeKind::Symlink,
        0x2000 => {
            let (major, minor) = decode_dev(&i_block);
            InodeKind::CharDev { major, minor }
        }
        0x6000 => {
            let (major, minor) = decode_dev(&i_block);
            InodeKind::BlockDev { major, minor }
        }
        0x1000 => InodeKind::Fifo,
        0xC000 => InodeKind::Socket,
        _ => {
            return Err(ReadError::corrupt(
                "inode",
                format!("inode {ino} has file type {:#o}", mode & 0xF000),
            ))
        }
    };
    // Fields past 128 bytes exist when i_extra_isize covers them.
    let extra_isize = if b.len() > 128 {
        get16(b, 0x80) as usize
    } else {
        0
    };
    let inode_end = 128 + extra_isize;
    if inode_end > b.len() || extra_isize % 4 != 0 {
        return Err(ReadError::corrupt(
            "inode",
            format!("inode {ino}: i_extra_isize {extra_isize}"),
        ));
    }
    let field = |off: usize| (off + 4 <= inode_end).then(|| get32(b, off));
    let crtime = field(0x90).map(|s| decode_time(s, field(0x94)));
    let meta = Metadata {
        mode: mode & 0o7777,
        uid: get16(b, 0x2) as u32 | (get16(b, 0x78) as u32) << 16,
        gid: get16(b, 0x18) as u32 | (get16(b, 0x7A) as u32) << 16,
        atime: decode_time(get32(b, 0x8), field(0x8C)),
        ctime: decode_time(get32(b, 0xC), field(0x84)),
        mtime: decode_time(get32(b, 0x10), field(0x88)),
        crtime: crtime.unwrap_or_default(),
        xattrs: Vec::new(),
    };
    let inline_xattrs = if inode_end + 4 <= b.len() {
        b[inode_end..].to_vec()
    } else {
        Vec::new()
    };
    Ok(Inode {
        ino,
        kind,
        meta,
        size: get32(b, 0x4) as u64 | (get32(b, 0x6C) as u64) << 32,
        links: get16(b, 0x1A),
        flags,
        has_crtime: crtime.is_some(),
        i_block,
        file_acl: get32(b, 0x68) as u64 | (get16(b, 0x76) as u64) << 32,
        inline_xattrs,
    })
}

impl<R: ReadAt> Filesystem<R> {
    /// Read inode `ino` (1-based). Its xattrs are not read here.
    pub fn inode(&self, ino: u32) -> Result<Inode, ReadError> {
        let sb = &self.sb;
        if ino == 0 || ino > sb.inodes_count {
            return Err(ReadError::corrupt(
                "directory entry",
                format!("inode number {ino} out of range"),
            ));
        }
        let group = ((ino - 1) / sb.inodes_per_group) as u64;
        let index = ((ino - 1) % sb.inodes_per_group) as u64;
        let table = self
            .groups
            .inode_table(group)
            .ok_or_else(|| ReadError::corrupt("inode", format!("inode {ino} is in no group")))?;
        let mut b = vec![0u8; sb.inode_size as usize];
        let at = table * sb.block_size + index * sb.inode_size as u64;
        self.read_bytes(&mut b, at, "inode")?;
        parse(ino, &b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_decode_epoch_bits_and_nanoseconds() {
        // 2100-01-01: past 2^31, so the 32-bit field wraps negative and epoch bit 1 is set.
        let t = decode_time(4_102_444_800u64 as u32, Some(1 | (999_999_999 << 2)));
        assert_eq!(
            t,
            Timestamp {
                sec: 4_102_444_800,
                nsec: 999_999_999
            }
        );
        assert_eq!(decode_time(-86_400i32 as u32, Some(1 << 2)).sec, -86_400);
        assert_eq!(decode_time(5, None), Timestamp { sec: 5, nsec: 0 });
    }

    #[test]
    fn device_numbers_in_both_encodings() {
        let mut blk = crate::inode::device_block(1, 3);
        assert_eq!(decode_dev(&blk), (1, 3));
        blk = crate::inode::device_block(259, 70000);
        assert_eq!(decode_dev(&blk), (259, 70000));
    }
}
