//! Directory blocks (`Documentation/filesystems/ext4/directory.rst`), walked linearly:
//! htree interior blocks hold one empty entry spanning the block (and the root's index
//! hides inside `..`'s record), and checksum tails have inode 0, so skipping inode-0
//! entries sees exactly the live names.

use super::{Filesystem, Inode, InodeKind, ReadAt, ReadError};
use crate::le::{get16, get32};

/// Directories bigger than this are refused as corrupt rather than read into memory.
const MAX_DIR_BYTES: u64 = 1 << 30;

/// One live directory entry other than `.` and `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDirEntry {
    pub name: Vec<u8>,
    pub ino: u32,
}

impl<R: ReadAt> Filesystem<R> {
    /// The entries of directory `dir`, in on-disk order, without `.` and `..`.
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<RawDirEntry>, ReadError> {
        if dir.kind != InodeKind::Dir {
            return Err(ReadError::corrupt(
                "directory",
                format!("inode {} is not a directory", dir.ino),
            ));
        }
        let data = self.read_all(dir, MAX_DIR_BYTES)?;
        let bs = self.sb.block_size as usize;
        let mut out = Vec::new();
        for block in data.chunks(bs) {
            let mut at = 0;
            while at + 8 <= block.len() {
                let ino = get32(block, at);
                let rec_len = get16(block, at + 4) as usize;
                let name_len = block[at + 6] as usize;
                if rec_len < 8
                    || rec_len % 4 != 0
                    || at + rec_len > block.len()
                    || 8 + name_len > rec_len
                {
                    return Err(ReadError::corrupt(
                        "directory",
                        format!("inode {}: bad entry at byte {at} of a block", dir.ino),
                    ));
                }
                let name = &block[at + 8..at + 8 + name_len];
                if ino != 0 && name != b"." && name != b".." {
                    out.push(RawDirEntry {
                        name: name.to_vec(),
                        ino,
                    });
                }
                at += rec_len;
            }
        }
        Ok(out)
    }

    /// A symlink's target: in `i_block` (fast) or in its data block (slow).
    pub fn symlink_target(&self, link: &Inode) -> Result<Vec<u8>, ReadError> {
        if link.kind != InodeKind::Symlink {
            return Err(ReadError::corrupt(
                "symlink",
                format!("inode {} is not a symlink", link.ino),
            ));
        }
        if !link.uses_extents() && link.size < 60 {
            return Ok(link.i_block[..link.size as usize].to_vec());
        }
        self.read_all(link, crate::MAX_SYMLINK_LEN as u64)
    }
}
