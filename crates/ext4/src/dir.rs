//! Directory blocks (`Documentation/filesystems/ext4/directory.rst`): a single linear block
//! when everything fits, otherwise an htree (`dir_index`, half-MD4): a root block, at most one
//! level of index blocks, and leaf blocks of entries sorted by hash. Every leaf ends with the
//! 12-byte checksum tail; index blocks end with a `dx_tail`.

use crate::checksum;
use crate::hash::half_md4;
use crate::le::{put16, put32};
use crate::BLOCK_SIZE;

const BS: usize = BLOCK_SIZE as usize;
const TAIL: usize = 12;
/// Room for entries in a leaf block.
const LEAF_SPACE: usize = BS - TAIL;
/// dx entries in the root: after `.`, `..` (24 bytes) and `dx_root_info` (8), minus the tail.
const ROOT_LIMIT: usize = (BS - 32 - 8) / 8;
/// dx entries in an index block: after the 8-byte fake dirent, minus the tail.
const NODE_LIMIT: usize = (BS - 8 - 8) / 8;

pub(crate) const FT_REG: u8 = 1;
pub(crate) const FT_DIR: u8 = 2;
pub(crate) const FT_CHR: u8 = 3;
pub(crate) const FT_BLK: u8 = 4;
pub(crate) const FT_FIFO: u8 = 5;
pub(crate) const FT_SOCK: u8 = 6;
pub(crate) const FT_LNK: u8 = 7;

#[derive(Debug, Clone)]
pub(crate) struct Dirent<'a> {
    pub name: &'a [u8],
    pub ino: u32,
    pub ftype: u8,
}

fn rec_len(name_len: usize) -> usize {
    (8 + name_len).next_multiple_of(4)
}

fn put_dirent(b: &mut [u8], at: usize, ino: u32, rec: usize, name: &[u8], ftype: u8) {
    put32(b, at, ino);
    put16(b, at + 4, rec as u16);
    b[at + 6] = name.len() as u8;
    b[at + 7] = ftype;
    b[at + 8..at + 8 + name.len()].copy_from_slice(name);
}

fn seal_leaf(b: &mut [u8], inode_seed: u32) {
    put16(b, LEAF_SPACE + 4, TAIL as u16);
    b[LEAF_SPACE + 7] = 0xDE;
    let csum = checksum::crc(inode_seed, &b[..LEAF_SPACE]);
    put32(b, LEAF_SPACE + 8, csum);
}

/// Pack entries into leaf blocks in order; the last entry of a block spans to the tail.
/// `start` entries (`.` and `..`) go first in the first block. Returns the blocks and, for
/// each block, the index of its first entry.
fn pack_leaves(entries: &[Dirent], inode_seed: u32) -> (Vec<Vec<u8>>, Vec<usize>) {
    let firsts = leaf_firsts(entries, |e| e.name.len());
    let mut blocks = Vec::with_capacity(firsts.len());
    for (k, &first) in firsts.iter().enumerate() {
        let end = firsts.get(k + 1).copied().unwrap_or(entries.len());
        let mut b = vec![0u8; BS];
        let mut at = 0;
        let mut last = None;
        for e in &entries[first..end] {
            put_dirent(&mut b, at, e.ino, rec_len(e.name.len()), e.name, e.ftype);
            last = Some(at);
            at += rec_len(e.name.len());
        }
        match last {
            Some(l) => put16(&mut b, l + 4, (LEAF_SPACE - l) as u16),
            None => put_dirent(&mut b, 0, 0, LEAF_SPACE, b"", 0),
        }
        seal_leaf(&mut b, inode_seed);
        blocks.push(b);
    }
    (blocks, firsts)
}

/// Where [`pack_leaves`] starts each leaf block: the index of its first entry. The one
/// packing rule, shared by emitting and by [`shape`] so the two cannot disagree.
fn leaf_firsts<T>(entries: &[T], name_len: impl Fn(&T) -> usize) -> Vec<usize> {
    let mut firsts = Vec::new();
    let mut i = 0;
    while i < entries.len() || firsts.is_empty() {
        firsts.push(i);
        let mut at = 0;
        while i < entries.len() && at + rec_len(name_len(&entries[i])) <= LEAF_SPACE {
            at += rec_len(name_len(&entries[i]));
            i += 1;
        }
    }
    firsts
}

/// Entries of `.`, `..` and `children` in the order [`build`] stores them, and whether
/// that is an htree: name order in one linear block when everything fits, else hash order.
/// The `u32` pairs are each entry's (hash, minor hash), present for an htree.
fn ordered<'a>(
    ino: u32,
    parent: u32,
    children: &[Dirent<'a>],
    hash_seed: &[u32; 4],
) -> (Vec<Dirent<'a>>, Option<Vec<(u32, u32)>>) {
    let dot = [
        Dirent {
            name: b".",
            ino,
            ftype: FT_DIR,
        },
        Dirent {
            name: b"..",
            ino: parent,
            ftype: FT_DIR,
        },
    ];
    let linear_len: usize = dot
        .iter()
        .chain(children)
        .map(|e| rec_len(e.name.len()))
        .sum();
    if linear_len <= LEAF_SPACE {
        let mut all = dot.to_vec();
        all.extend(children.iter().cloned());
        all[2..].sort_by(|a, b| a.name.cmp(b.name));
        return (all, None);
    }
    let keys = hash_order(children.iter().map(|e| e.name), |n| half_md4(n, hash_seed));
    (
        keys.iter()
            .map(|&k| children[position(k)].clone())
            .collect(),
        Some(keys.into_iter().map(hashes).collect()),
    )
}

/// Index blocks an htree of `leaves` leaf blocks needs below its root.
fn index_nodes(leaves: usize) -> usize {
    let nodes = if leaves > ROOT_LIMIT {
        leaves.div_ceil(NODE_LIMIT)
    } else {
        0
    };
    assert!(
        nodes <= ROOT_LIMIT,
        "directory too large for a two-level htree"
    );
    nodes
}

/// What [`build`] would return for a directory whose children have `names` (in any
/// order), without writing a block: the number of blocks and whether it is an htree. For
/// sizing an image without emitting it, so it allocates nothing for a directory that fits
/// one linear block, as most do.
pub(crate) fn shape<'a, I>(names: I, hash_seed: &[u32; 4]) -> (usize, bool)
where
    I: Iterator<Item = &'a [u8]> + Clone,
{
    let linear_len =
        rec_len(1) + rec_len(2) + names.clone().map(|n| rec_len(n.len())).sum::<usize>();
    if linear_len <= LEAF_SPACE {
        return (1, false);
    }
    let order = hash_order(names, |n| half_md4(n, hash_seed));
    let leaves = leaf_firsts(&order, |&k| name_len(k)).len();
    (1 + index_nodes(leaves) + leaves, true)
}

/// `names` in the order [`ordered`] gives an htree's entries, by (hash, minor, name), as
/// one integer per name: (hash, minor, name length, position in `names`), far cheaper to
/// compare and move than tuples holding the name. Names equal in both hashes (not seen in
/// practice) are put in name order after.
fn hash_order<'a, I>(names: I, hash: impl Fn(&[u8]) -> (u32, u32)) -> Vec<u128>
where
    I: Iterator<Item = &'a [u8]> + Clone,
{
    let mut keys: Vec<u128> = names
        .clone()
        .enumerate()
        .map(|(i, n)| {
            let (h, minor) = hash(n);
            (h as u128) << 96 | (minor as u128) << 64 | (n.len() as u128) << 32 | i as u128
        })
        .collect();
    keys.sort_unstable();
    let mut at = 0;
    while at < keys.len() {
        let run = keys[at..]
            .iter()
            .take_while(|&&k| hashes(k) == hashes(keys[at]))
            .count();
        if run > 1 {
            let name = |k: u128| names.clone().nth(position(k)).expect("a position of names");
            keys[at..at + run].sort_unstable_by(|&a, &b| name(a).cmp(name(b)));
        }
        at += run;
    }
    keys
}

/// Where the name of a [`hash_order`] key is in its `names`.
fn position(key: u128) -> usize {
    key as u32 as usize
}

/// The length of the name of a [`hash_order`] key.
fn name_len(key: u128) -> usize {
    (key >> 32) as u32 as usize
}

/// The (hash, minor) of a [`hash_order`] key.
fn hashes(key: u128) -> (u32, u32) {
    ((key >> 96) as u32, (key >> 64) as u32)
}

/// An empty leaf block (no live entries), as in lost+found's spare blocks.
pub(crate) fn empty_block(inode_seed: u32) -> Vec<u8> {
    pack_leaves(&[], inode_seed).0.remove(0)
}

/// The directory's blocks in logical order, and whether it is an htree (`EXT4_INDEX_FL`).
pub(crate) fn build(
    ino: u32,
    parent: u32,
    children: &[Dirent],
    hash_seed: &[u32; 4],
    inode_seed: u32,
) -> (Vec<Vec<u8>>, bool) {
    let (sorted, hashes) = ordered(ino, parent, children, hash_seed);
    let Some(hashes) = hashes else {
        return (pack_leaves(&sorted, inode_seed).0, false);
    };
    let (leaves, firsts) = pack_leaves(&sorted, inode_seed);
    // Index hash of each leaf: its first hash, with the low bit set when the previous leaf
    // ends with the same hash (a collision chain continues across the split).
    let leaf_hash: Vec<u32> = firsts
        .iter()
        .map(|&f| {
            let h = hashes[f].0;
            if f > 0 && hashes[f - 1].0 == h {
                h | 1
            } else {
                h
            }
        })
        .collect();

    let nodes = index_nodes(leaves.len());
    let first_leaf = 1 + nodes;
    let mut out = Vec::with_capacity(first_leaf + leaves.len());

    let mut root = vec![0u8; BS];
    put_dirent(&mut root, 0, ino, 12, b".", FT_DIR);
    put_dirent(&mut root, 12, parent, BS - 12, b"..", FT_DIR);
    // dx_root_info: reserved_zero, hash_version = half_md4, info_length = 8, indirect_levels.
    root[24 + 4] = 1;
    root[24 + 5] = 8;
    root[24 + 6] = (nodes > 0) as u8;
    if nodes == 0 {
        let entries: Vec<(u32, u32)> = (0..leaves.len())
            .map(|i| (leaf_hash[i], (first_leaf + i) as u32))
            .collect();
        write_dx(&mut root, 32, ROOT_LIMIT, &entries, inode_seed);
        out.push(root);
    } else {
        let groups: Vec<Vec<(u32, u32)>> = (0..leaves.len())
            .map(|i| (leaf_hash[i], (first_leaf + i) as u32))
            .collect::<Vec<_>>()
            .chunks(NODE_LIMIT)
            .map(|c| c.to_vec())
            .collect();
        let root_entries: Vec<(u32, u32)> = groups
            .iter()
            .enumerate()
            .map(|(n, g)| (g[0].0, 1 + n as u32))
            .collect();
        write_dx(&mut root, 32, ROOT_LIMIT, &root_entries, inode_seed);
        out.push(root);
        for g in &groups {
            let mut node = vec![0u8; BS];
            put16(&mut node, 4, BS as u16); // fake dirent: inode 0 spanning the block
            write_dx(&mut node, 8, NODE_LIMIT, g, inode_seed);
            out.push(node);
        }
    }
    out.extend(leaves);
    (out, true)
}

/// dx entries at `at`: the first slot holds limit/count and the first child block (its hash
/// is implied); then (hash, block) pairs; then the `dx_tail` checksum.
fn write_dx(b: &mut [u8], at: usize, limit: usize, entries: &[(u32, u32)], inode_seed: u32) {
    put16(b, at, limit as u16);
    put16(b, at + 2, entries.len() as u16);
    put32(b, at + 4, entries[0].1);
    for (i, &(hash, block)) in entries.iter().enumerate().skip(1) {
        put32(b, at + i * 8, hash);
        put32(b, at + i * 8 + 4, block);
    }
    // ext4_dx_csum: entries in use, then dt_reserved, then a zero checksum.
    let tail = at + limit * 8;
    let c = checksum::crc(inode_seed, &b[..at + entries.len() * 8]);
    let c = checksum::crc(c, &b[tail..tail + 4]);
    let c = checksum::crc(c, &[0; 4]);
    put32(b, tail + 4, c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_directory_is_one_linear_block() {
        let kids = [
            Dirent {
                name: b"b",
                ino: 13,
                ftype: FT_REG,
            },
            Dirent {
                name: b"a",
                ino: 12,
                ftype: FT_REG,
            },
        ];
        let (blocks, indexed) = build(2, 2, &kids, &[0; 4], 0);
        assert_eq!((blocks.len(), indexed), (1, false));
        // "." "..", then "a" before "b"; the last record spans to the tail.
        assert_eq!(&blocks[0][24 + 8..24 + 9], b"a");
        assert_eq!(
            u16::from_le_bytes([blocks[0][36 + 4], blocks[0][36 + 5]]) as usize,
            LEAF_SPACE - 36
        );
        assert_eq!(blocks[0][LEAF_SPACE + 7], 0xDE);
    }

    #[test]
    fn shape_counts_the_blocks_build_writes() {
        // Around the linear/htree boundary, a one-level htree, and one with index blocks.
        let names: Vec<Vec<u8>> = (0..40_000)
            .map(|i| format!("n{i}-{}", "x".repeat(20 + i % 50)).into_bytes())
            .collect();
        for n in [0, 1, 60, 70, 80, 90, 100, 2000, 40_000] {
            let kids: Vec<Dirent> = names[..n]
                .iter()
                .map(|name| Dirent {
                    name,
                    ino: 12,
                    ftype: FT_REG,
                })
                .collect();
            let seed = [5, 6, 7, 8];
            let (blocks, indexed) = build(2, 2, &kids, &seed, 0);
            assert_eq!(
                shape(kids.iter().rev().map(|k| k.name), &seed),
                (blocks.len(), indexed),
                "{n} entries"
            );
            assert_eq!(
                shape(kids.iter().map(|k| k.name), &seed),
                (blocks.len(), indexed),
                "{n} entries"
            );
            if n == 40_000 {
                assert_eq!(blocks[0][24 + 6], 1, "an index level");
            }
        }
    }

    #[test]
    fn hash_order_breaks_ties_by_name() {
        // A hash with many collisions, against the tuple order `ordered` sorts by.
        let names: Vec<Vec<u8>> = (0..500)
            .map(|i| format!("{}{}", "n".repeat(i % 7), (i * 7919) % 500).into_bytes())
            .collect();
        let names: Vec<&[u8]> = names.iter().map(|n| &n[..]).collect();
        let hash = |n: &[u8]| ((n.len() % 3) as u32, (n[n.len() - 1] % 2) as u32);
        let mut want: Vec<(u32, u32, &[u8])> = names
            .iter()
            .map(|&n| {
                let (h, m) = hash(n);
                (h, m, n)
            })
            .collect();
        want.sort();
        let got: Vec<&[u8]> = hash_order(names.iter().copied(), hash)
            .into_iter()
            .map(|k| names[position(k)])
            .collect();
        assert_eq!(got, want.iter().map(|w| w.2).collect::<Vec<_>>());
    }

    #[test]
    fn big_directories_get_an_index_level_when_the_root_overflows() {
        let names: Vec<Vec<u8>> = (0..60_000)
            .map(|i| format!("file-with-a-long-name-{i:08}").into_bytes())
            .collect();
        let kids: Vec<Dirent> = names
            .iter()
            .map(|n| Dirent {
                name: n,
                ino: 12,
                ftype: FT_REG,
            })
            .collect();
        let (blocks, indexed) = build(2, 2, &kids, &[1, 2, 3, 4], 0);
        assert!(indexed);
        let leaves = 60_000usize.div_ceil(LEAF_SPACE / rec_len(30));
        assert_eq!(blocks[0][24 + 6], 1, "two levels for {leaves} leaves");
    }
}
