//! metadata_csum checksums (kernel `fs/ext4/*.c`, `Documentation/filesystems/ext4/checksums.rst`).
//!
//! ext4 uses CRC32C *without* the final inversion, chained from a seed: `ext4_chksum(seed, data)`.
//! The `crc32c` crate computes the standard (inverted) form, so we undo both inversions.

/// `ext4_chksum`: raw CRC32C of `data` continuing from `seed`.
pub(crate) fn crc(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// Per-inode seed used by inode, extent, directory and htree checksums.
pub(crate) fn inode_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    let c = crc(fs_seed, &ino.to_le_bytes());
    crc(c, &generation.to_le_bytes())
}

/// Superblock: CRC over the first 1020 bytes, seeded with ~0 (never the checksum seed).
pub(crate) fn superblock(sb: &[u8]) -> u32 {
    crc(!0, &sb[..0x3FC])
}

/// Group descriptor: seed, group number, descriptor with `bg_checksum` (0x1E) treated as zero.
pub(crate) fn group_desc(fs_seed: u32, group: u32, desc: &[u8]) -> u16 {
    let c = crc(fs_seed, &group.to_le_bytes());
    let c = crc(c, &desc[..0x1E]);
    let c = crc(c, &[0, 0]);
    (crc(c, &desc[0x20..]) & 0xFFFF) as u16
}

/// Inode: seeded per inode, over the whole on-disk inode with `i_checksum_lo` (0x7C) and
/// `i_checksum_hi` (0x82) treated as zero.
pub(crate) fn inode(fs_seed: u32, ino: u32, generation: u32, raw: &[u8]) -> u32 {
    let c = inode_seed(fs_seed, ino, generation);
    let c = crc(c, &raw[..0x7C]);
    let c = crc(c, &[0, 0]);
    let c = crc(c, &raw[0x7E..0x82]);
    let c = crc(c, &[0, 0]);
    crc(c, &raw[0x84..])
}

/// Extended attribute block: seed, the block's number, the block with `h_checksum` (0x10) zero.
pub(crate) fn xattr_block(fs_seed: u32, block_nr: u64, block: &[u8]) -> u32 {
    let c = crc(fs_seed, &block_nr.to_le_bytes());
    let c = crc(c, &block[..0x10]);
    let c = crc(c, &[0; 4]);
    crc(c, &block[0x14..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_crc_matches_standard_crc32c_when_inverted() {
        // The standard CRC32C check value of "123456789" is 0xE3069283.
        assert_eq!(!crc(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn chaining_equals_one_pass() {
        let whole = crc(7, b"hello world");
        let parts = crc(crc(7, b"hello "), b"world");
        assert_eq!(whole, parts);
    }
}
