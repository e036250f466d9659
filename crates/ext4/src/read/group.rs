//! Block group descriptors (`Documentation/filesystems/ext4/group_descr.rst`): only where
//! each group's inode table is. With `flex_bg` the tables may sit in another group; the
//! descriptor says where, so nothing else changes.

use super::{read, ReadAt, ReadError, Superblock};
use crate::le::get32;

#[derive(Debug)]
pub(crate) struct GroupDescs {
    inode_tables: Vec<u64>,
}

impl GroupDescs {
    /// The descriptor table follows the superblock's block (block 1 with 4 KiB blocks,
    /// block 2 with 1 KiB blocks, where the superblock is block 1).
    pub fn read<R: ReadAt + ?Sized>(dev: &R, sb: &Superblock) -> Result<GroupDescs, ReadError> {
        let count = sb.groups();
        let len = count
            .checked_mul(sb.desc_size as u64)
            .filter(|&l| l <= 1 << 30)
            .ok_or_else(|| ReadError::corrupt("superblock", format!("{count} block groups")))?;
        let mut table = vec![0u8; len as usize];
        let at = (sb.first_data_block + 1) * sb.block_size;
        read(dev, &mut table, at, "group descriptors")?;
        let wide = sb.desc_size >= 64;
        let inode_tables = table
            .chunks(sb.desc_size as usize)
            .map(|d| {
                get32(d, 0x8) as u64
                    | if wide {
                        (get32(d, 0x28) as u64) << 32
                    } else {
                        0
                    }
            })
            .collect();
        Ok(GroupDescs { inode_tables })
    }

    pub fn inode_table(&self, group: u64) -> Option<u64> {
        self.inode_tables.get(group as usize).copied()
    }
}
