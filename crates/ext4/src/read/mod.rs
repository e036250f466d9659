//! Reading an ext4 filesystem: the inverse of the synthesizer, for images a guest kernel
//! has written to (not only ours).
//!
//! Modules follow the on-disk structures of the kernel's `Documentation/filesystems/ext4/`:
//! `superblock` (and the feature check), `group` descriptors (32- and 64-byte), `inode`s
//! (times with their `_extra` fields, device numbers, flags), `extent` trees of any depth,
//! linear `dir`ectory blocks (htree interior blocks look like empty entries, so a linear
//! walk sees every name), `xattr`s in the inode and in an external block, and a `walk`
//! of the whole tree. Everything reads through [`ReadAt`], so the crate stays free of files
//! and sockets.
//!
//! Refused, with a [`ReadError`] naming the feature: inline data, encryption, casefolding,
//! xattr values in inodes (`ea_inode`), `meta_bg`, compression, a journal that still needs
//! recovery, and block-mapped (non-extent) regular files and directories.

mod dir;
mod error;
mod extent;
mod group;
mod inode;
mod superblock;
mod walk;
mod xattr;

pub use dir::RawDirEntry;
pub use error::ReadError;
pub use extent::FileExtent;
pub use inode::{Inode, InodeKind};
pub use superblock::Superblock;
pub use walk::WalkEntry;

use group::GroupDescs;

/// Random-access reads of a device or image. Reading past the end is an error.
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len() as u64)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&self[offset as usize..end as usize]);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// An opened filesystem: the superblock and group descriptors, read once.
pub struct Filesystem<R> {
    dev: R,
    sb: Superblock,
    groups: GroupDescs,
}

impl<R: ReadAt> Filesystem<R> {
    /// Read the superblock and group descriptors; refuse unsupported features.
    pub fn open(dev: R) -> Result<Self, ReadError> {
        let mut raw = [0u8; 1024];
        read(&dev, &mut raw, 1024, "superblock")?;
        let sb = Superblock::parse(&raw)?;
        let groups = GroupDescs::read(&dev, &sb)?;
        Ok(Filesystem { dev, sb, groups })
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Read `buf.len()` bytes at byte `offset` of the device.
    pub fn read_bytes(
        &self,
        buf: &mut [u8],
        offset: u64,
        what: &'static str,
    ) -> Result<(), ReadError> {
        read(&self.dev, buf, offset, what)
    }

    /// Read whole block `block`.
    fn read_block(&self, block: u64, what: &'static str) -> Result<Vec<u8>, ReadError> {
        if block >= self.sb.blocks_count {
            return Err(ReadError::Corrupt {
                what,
                why: format!(
                    "block {block} is past the end ({} blocks)",
                    self.sb.blocks_count
                ),
            });
        }
        let mut buf = vec![0u8; self.sb.block_size as usize];
        read(&self.dev, &mut buf, block * self.sb.block_size, what)?;
        Ok(buf)
    }
}

fn read<R: ReadAt + ?Sized>(
    dev: &R,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<(), ReadError> {
    dev.read_exact_at(buf, offset)
        .map_err(|source| ReadError::Io {
            what,
            offset,
            source,
        })
}
