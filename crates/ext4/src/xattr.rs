//! Extended attributes (`Documentation/filesystems/ext4/attributes.rst`): in the inode's
//! spare 96 bytes when they fit, else in one external block.

use crate::checksum;
use crate::inode::INLINE_XATTR_SPACE;
use crate::le::{get16, get32, put16, put32};
use crate::{Error, Xattr, BLOCK_SIZE};

const MAGIC: u32 = 0xEA02_0000;
const BLOCK_HEADER: usize = 32;
const ENTRY_HEADER: usize = 16;

/// Name prefixes and their on-disk index (`fs/ext4/xattr.c` `ext4_xattr_handler_map`).
/// Longest match first: the ACL names are whole names with an empty suffix.
const PREFIXES: &[(&[u8], u8)] = &[
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
    (b"system.", 7),
];

struct Entry {
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
}

fn pad4(n: usize) -> usize {
    n.next_multiple_of(4)
}

fn entry_len(e: &Entry) -> usize {
    pad4(ENTRY_HEADER + e.name.len())
}

/// `ext4_xattr_hash_entry` (unsigned chars, as e2fsprogs and kernels since 6.2 use).
fn entry_hash(e: &Entry) -> u32 {
    let mut h: u32 = 0;
    for &c in &e.name {
        h = (h << 5) ^ (h >> 27) ^ c as u32;
    }
    let mut padded = e.value.clone();
    padded.resize(pad4(padded.len()), 0);
    for w in padded.chunks(4) {
        h = (h << 16) ^ (h >> 16) ^ u32::from_le_bytes(w.try_into().unwrap());
    }
    h
}

/// VFS POSIX ACL xattr (version 2, 8-byte entries) → ext4's on-disk ACL (version 1, short
/// 4-byte entries for the owner/group/mask/other tags), `fs/ext4/acl.c`.
pub(crate) fn acl_to_disk(value: &[u8]) -> Option<Vec<u8>> {
    if value.len() < 4 || (value.len() - 4) % 8 != 0 || get32(value, 0) != 2 {
        return None;
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in value[4..].chunks(8) {
        let tag = get16(e, 0);
        match tag {
            0x01 | 0x04 | 0x10 | 0x20 => out.extend_from_slice(&e[..4]),
            0x02 | 0x08 => out.extend_from_slice(e),
            _ => return None,
        }
    }
    Some(out)
}

fn to_entries(xattrs: &[Xattr], path: &dyn Fn() -> String) -> Result<Vec<Entry>, Error> {
    let mut entries = Vec::with_capacity(xattrs.len());
    for x in xattrs {
        let bad = || Error::XattrName {
            path: path(),
            name: String::from_utf8_lossy(&x.name).into_owned(),
        };
        let &(prefix, index) = PREFIXES
            .iter()
            .find(|(p, _)| x.name.starts_with(p))
            .ok_or_else(bad)?;
        let name = x.name[prefix.len()..].to_vec();
        let value = if index == 2 || index == 3 {
            if !name.is_empty() {
                return Err(bad());
            }
            acl_to_disk(&x.value).ok_or_else(bad)?
        } else {
            if name.is_empty() || name.len() > 255 {
                return Err(bad());
            }
            x.value.clone()
        };
        entries.push(Entry { index, name, value });
    }
    // Blocks must be sorted (`ext4_xattr_find_entry` stops early); keep the inode the same.
    entries.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    Ok(entries)
}

/// Write entries at `table` and values growing down from `end`; value offsets are relative
/// to `base`. Returns false when they do not fit.
fn lay_out(buf: &mut [u8], table: usize, end: usize, base: usize, entries: &[Entry]) -> bool {
    let table_len: usize = entries.iter().map(entry_len).sum::<usize>() + 4;
    let values_len: usize = entries.iter().map(|e| pad4(e.value.len())).sum();
    if table + table_len + values_len > end {
        return false;
    }
    let mut at = table;
    let mut value_at = end;
    for e in entries {
        let offs = if e.value.is_empty() {
            0
        } else {
            value_at -= pad4(e.value.len());
            buf[value_at..value_at + e.value.len()].copy_from_slice(&e.value);
            value_at - base
        };
        buf[at] = e.name.len() as u8;
        buf[at + 1] = e.index;
        put16(buf, at + 2, offs as u16);
        put32(buf, at + 8, e.value.len() as u32);
        put32(buf, at + 12, entry_hash(e));
        buf[at + ENTRY_HEADER..at + ENTRY_HEADER + e.name.len()].copy_from_slice(&e.name);
        at += entry_len(e);
    }
    true
}

/// Encoded xattrs of one inode.
#[derive(Debug, Default)]
pub(crate) struct Encoded {
    /// The in-inode area (magic, entries, values), or empty.
    pub inline: Vec<u8>,
    /// An external block still lacking its checksum (see [`seal_block`]).
    pub block: Option<Vec<u8>>,
}

pub(crate) fn encode(xattrs: &[Xattr], path: &dyn Fn() -> String) -> Result<Encoded, Error> {
    if xattrs.is_empty() {
        return Ok(Encoded::default());
    }
    let entries = to_entries(xattrs, path)?;
    let mut inline = vec![0u8; INLINE_XATTR_SPACE];
    put32(&mut inline, 0, MAGIC);
    if lay_out(&mut inline, 4, INLINE_XATTR_SPACE, 4, &entries) {
        return Ok(Encoded {
            inline,
            block: None,
        });
    }
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    if !lay_out(&mut block, BLOCK_HEADER, BLOCK_SIZE as usize, 0, &entries) {
        return Err(Error::XattrTooLarge { path: path() });
    }
    put32(&mut block, 0, MAGIC);
    put32(&mut block, 4, 1); // h_refcount
    put32(&mut block, 8, 1); // h_blocks
                             // h_hash (`ext4_xattr_rehash`): fold of the entry hashes.
    let mut hash: u32 = 0;
    for e in &entries {
        hash = (hash << 16) ^ (hash >> 16) ^ entry_hash(e);
    }
    put32(&mut block, 12, hash);
    Ok(Encoded {
        inline: Vec::new(),
        block: Some(block),
    })
}

/// Fill in the checksum of an xattr block once its location is known.
pub(crate) fn seal_block(block: &mut [u8], block_nr: u64, fs_seed: u32) {
    let csum = checksum::xattr_block(fs_seed, block_nr, block);
    put32(block, 0x10, csum);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(name: &str, value: &[u8]) -> Xattr {
        Xattr {
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn small_xattrs_stay_in_the_inode() {
        let enc = encode(&[x("user.a", b"1")], &|| "f".into()).unwrap();
        assert_eq!(enc.inline.len(), INLINE_XATTR_SPACE);
        assert!(enc.block.is_none());
    }

    #[test]
    fn large_xattrs_go_to_a_block_and_huge_ones_fail() {
        let enc = encode(&[x("user.big", &[7; 200])], &|| "f".into()).unwrap();
        assert!(enc.inline.is_empty() && enc.block.is_some());
        let err = encode(&[x("user.huge", &[7; 5000])], &|| "f".into()).unwrap_err();
        assert_eq!(err, Error::XattrTooLarge { path: "f".into() });
    }

    #[test]
    fn unknown_namespace_is_rejected() {
        assert!(matches!(
            encode(&[x("bogus.a", b"")], &|| "f".into()),
            Err(Error::XattrName { .. })
        ));
    }

    #[test]
    fn acl_conversion_shortens_owner_entries() {
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
        let d = acl_to_disk(&v).unwrap();
        assert_eq!(d.len(), 4 + 4 + 8 + 4 + 4 + 4);
    }
}
