//! Extended attributes (`Documentation/filesystems/ext4/attributes.rst`) in the inode's
//! spare space and in one external block; the inverse of `crate::xattr`, including the ACL
//! conversion back to the VFS format that `getxattr` returns.

use super::{Filesystem, Inode, ReadAt, ReadError};
use crate::le::{get16, get32};
use crate::Xattr;

const MAGIC: u32 = 0xEA02_0000;
const BLOCK_HEADER: usize = 32;
const ENTRY_HEADER: usize = 16;

/// `ext4_xattr_handler_map`: name index → prefix. Index 2 and 3 are whole names.
fn prefix(index: u8) -> Option<&'static [u8]> {
    Some(match index {
        1 => b"user.",
        2 => b"system.posix_acl_access",
        3 => b"system.posix_acl_default",
        4 => b"trusted.",
        6 => b"security.",
        7 => b"system.",
        8 => b"system.richacl",
        _ => return None,
    })
}

/// ext4's on-disk ACL (version 1, 4-byte entries for owner/group/mask/other) → the VFS
/// format (version 2, 8-byte entries, `ACL_UNDEFINED_ID` where there is no id).
fn acl_from_disk(ino: u32, v: &[u8]) -> Result<Vec<u8>, ReadError> {
    let bad = || ReadError::corrupt("ACL", format!("inode {ino}: malformed ext4 ACL"));
    if v.len() < 4 || get32(v, 0) != 1 {
        return Err(bad());
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut at = 4;
    while at < v.len() {
        let tag = get16(v, at);
        match tag {
            0x01 | 0x04 | 0x10 | 0x20 if at + 4 <= v.len() => {
                out.extend_from_slice(&v[at..at + 4]);
                out.extend_from_slice(&u32::MAX.to_le_bytes());
                at += 4;
            }
            0x02 | 0x08 if at + 8 <= v.len() => {
                out.extend_from_slice(&v[at..at + 8]);
                at += 8;
            }
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

/// Entries from `table` on (up to a 4-byte zero terminator or the end); value offsets are
/// relative to `values`.
fn parse_entries(
    ino: u32,
    area: &[u8],
    table: usize,
    values: usize,
    out: &mut Vec<Xattr>,
) -> Result<(), ReadError> {
    let bad = |why: &str| ReadError::corrupt("xattrs", format!("inode {ino}: {why}"));
    let mut at = table;
    while at + 4 <= area.len() && get32(area, at) != 0 {
        if at + ENTRY_HEADER > area.len() {
            return Err(bad("entry past the end of its area"));
        }
        let name_len = area[at] as usize;
        let index = area[at + 1];
        let offs = get16(area, at + 2) as usize;
        let value_inum = get32(area, at + 4);
        let size = get32(area, at + 8) as usize;
        if value_inum != 0 {
            return Err(ReadError::InodeUnsupported {
                ino,
                why: "xattr value stored in an inode (ea_inode)",
            });
        }
        let name_end = at + ENTRY_HEADER + name_len;
        let value_at = values + offs;
        if name_end > area.len() || value_at + size > area.len() {
            return Err(bad("name or value past the end of its area"));
        }
        let suffix = &area[at + ENTRY_HEADER..name_end];
        let prefix = prefix(index).ok_or_else(|| bad("unknown name index"))?;
        let raw = &area[value_at..value_at + size];
        let value = if index == 2 || index == 3 {
            acl_from_disk(ino, raw)?
        } else {
            raw.to_vec()
        };
        out.push(Xattr {
            name: [prefix, suffix].concat(),
            value,
        });
        at = (name_end).next_multiple_of(4);
    }
    Ok(())
}

impl<R: ReadAt> Filesystem<R> {
    /// Every xattr of `inode`, in-inode ones first, then the external block's, sorted by name.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>, ReadError> {
        let mut out = Vec::new();
        let inline = &inode.inline_xattrs;
        if inline.len() >= 4 && get32(inline, 0) == MAGIC {
            parse_entries(inode.ino, inline, 4, 4, &mut out)?;
        }
        if inode.file_acl != 0 {
            let block = self.read_block(inode.file_acl, "xattr block")?;
            if get32(&block, 0) != MAGIC {
                return Err(ReadError::corrupt(
                    "xattr block",
                    format!("inode {}: bad magic", inode.ino),
                ));
            }
            parse_entries(inode.ino, &block, BLOCK_HEADER, 0, &mut out)?;
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_round_trips_through_the_disk_format() {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        let disk = crate::xattr::acl_to_disk(&v).unwrap();
        assert_eq!(acl_from_disk(1, &disk).unwrap(), v);
    }
}
