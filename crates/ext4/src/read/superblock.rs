//! The superblock (`Documentation/filesystems/ext4/super.rst`): geometry, and the feature
//! flags that decide whether this reader can read the rest.

use super::ReadError;
use crate::le::{get16, get32};

const MAGIC: u16 = 0xEF53;

// s_feature_incompat bits this reader understands (everything else is refused).
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;

/// Refused incompat bits, with the name `mke2fs`/`tune2fs` use for them.
const REFUSED: &[(u32, &str)] = &[
    (0x1, "compression"),
    (0x8, "journal_dev (an external journal device)"),
    (0x10, "meta_bg"),
    (0x400, "ea_inode (xattr values in inodes)"),
    (0x1000, "dirdata"),
    (0x8000, "inline_data"),
    (0x10000, "encrypt"),
    (0x20000, "casefold"),
];

/// What the reader needs from the superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub block_size: u64,
    pub blocks_count: u64,
    pub first_data_block: u64,
    pub blocks_per_group: u32,
    pub inodes_per_group: u32,
    pub inodes_count: u32,
    pub inode_size: u16,
    /// Group descriptor size: 32 without `64bit`, else `s_desc_size`.
    pub desc_size: u16,
    pub feature_incompat: u32,
    pub feature_ro_compat: u32,
}

impl Superblock {
    /// Parse the 1024 bytes at byte 1024 of the device.
    pub fn parse(b: &[u8]) -> Result<Superblock, ReadError> {
        let magic = get16(b, 0x38);
        if magic != MAGIC {
            return Err(ReadError::NotExt4 { magic });
        }
        let incompat = get32(b, 0x60);
        if incompat & INCOMPAT_RECOVER != 0 {
            return Err(ReadError::NeedsRecovery);
        }
        if let Some(&(_, feature)) = REFUSED.iter().find(|(bit, _)| incompat & bit != 0) {
            return Err(ReadError::Unsupported { feature });
        }
        let known = INCOMPAT_FILETYPE
            | INCOMPAT_EXTENTS
            | INCOMPAT_64BIT
            | INCOMPAT_MMP
            | INCOMPAT_FLEX_BG
            | INCOMPAT_CSUM_SEED
            | INCOMPAT_LARGEDIR;
        if incompat & !known != 0 {
            return Err(ReadError::Unsupported {
                feature: "an unknown incompatible feature",
            });
        }
        let log = get32(b, 0x18);
        if log > 6 {
            return Err(ReadError::corrupt(
                "superblock",
                format!("s_log_block_size {log}"),
            ));
        }
        let block_size = 1024u64 << log;
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let blocks_hi = if is64 { get32(b, 0x150) as u64 } else { 0 };
        let rev = get32(b, 0x4C);
        let inode_size = if rev == 0 { 128 } else { get16(b, 0x58) };
        let desc_size = if is64 { get16(b, 0xFE) } else { 32 };
        let sb = Superblock {
            block_size,
            blocks_count: get32(b, 0x4) as u64 | blocks_hi << 32,
            first_data_block: get32(b, 0x14) as u64,
            blocks_per_group: get32(b, 0x20),
            inodes_per_group: get32(b, 0x28),
            inodes_count: get32(b, 0x0),
            inode_size,
            desc_size,
            feature_incompat: incompat,
            feature_ro_compat: get32(b, 0x64),
        };
        let bad = |why: &str| Err(ReadError::corrupt("superblock", why));
        if sb.blocks_per_group == 0 || sb.inodes_per_group == 0 {
            return bad("zero blocks or inodes per group");
        }
        if sb.inode_size < 128
            || !sb.inode_size.is_power_of_two()
            || sb.inode_size as u64 > block_size
        {
            return bad("inode size is not a power of two between 128 and the block size");
        }
        if sb.desc_size < 32 || !sb.desc_size.is_power_of_two() {
            return bad("group descriptor size is not a power of two of at least 32");
        }
        Ok(sb)
    }

    /// Number of block groups.
    pub fn groups(&self) -> u64 {
        (self.blocks_count - self.first_data_block).div_ceil(self.blocks_per_group as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::le::{put16, put32};

    fn minimal() -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        put16(&mut b, 0x38, MAGIC);
        put32(&mut b, 0x18, 2);
        put32(&mut b, 0x4, 1000);
        put32(&mut b, 0x20, 32768);
        put32(&mut b, 0x28, 8192);
        put32(&mut b, 0x4C, 1);
        put16(&mut b, 0x58, 256);
        b
    }

    #[test]
    fn refuses_needs_recovery_and_inline_data_by_name() {
        let mut b = minimal();
        assert_eq!(Superblock::parse(&b).unwrap().block_size, 4096);
        put32(&mut b, 0x60, INCOMPAT_RECOVER | INCOMPAT_EXTENTS);
        assert!(matches!(
            Superblock::parse(&b),
            Err(ReadError::NeedsRecovery)
        ));
        put32(&mut b, 0x60, 0x8000 | INCOMPAT_EXTENTS);
        let err = Superblock::parse(&b).unwrap_err();
        assert!(err.to_string().contains("inline_data"), "{err}");
        put32(&mut b, 0x60, 0x20000);
        assert!(Superblock::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("casefold"));
    }

    #[test]
    fn non_64bit_descriptors_are_32_bytes() {
        let mut b = minimal();
        put16(&mut b, 0xFE, 64);
        assert_eq!(Superblock::parse(&b).unwrap().desc_size, 32);
        put32(&mut b, 0x60, INCOMPAT_64BIT);
        put32(&mut b, 0x150, 1);
        let sb = Superblock::parse(&b).unwrap();
        assert_eq!((sb.desc_size, sb.blocks_count), (64, (1 << 32) + 1000));
    }

    #[test]
    fn wrong_magic_is_not_ext4() {
        let mut b = minimal();
        put16(&mut b, 0x38, 0x1234);
        assert!(matches!(
            Superblock::parse(&b),
            Err(ReadError::NotExt4 { magic: 0x1234 })
        ));
    }
}
