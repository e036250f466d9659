//! Extent trees (`Documentation/filesystems/ext4/ifork.rst`): up to 4 entries in the inode,
//! then leaf and index blocks of 340 entries each, as many levels as needed.

use crate::checksum;
use crate::le::{put16, put32};
use crate::BLOCK_SIZE;

const MAGIC: u16 = 0xF30A;
const HEADER: usize = 12;
const ENTRY: usize = 12;
const IN_INODE: usize = 4;
/// Entries per tree block: (4096 - header) / 12, leaving 4 bytes for the checksum tail.
pub(crate) const PER_BLOCK: usize = (BLOCK_SIZE as usize - HEADER) / ENTRY;
/// Longest initialized extent (`EXT_INIT_MAX_LEN`).
pub(crate) const MAX_LEN: u64 = 32768;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub logical: u32,
    pub len: u16,
    pub physical: u64,
}

/// Number of tree blocks (outside the inode) needed for `n` extents.
pub(crate) fn tree_blocks(n: usize) -> usize {
    let mut total = 0;
    let mut level = n;
    while level > IN_INODE {
        level = level.div_ceil(PER_BLOCK);
        total += level;
    }
    total
}

fn header(b: &mut [u8], entries: usize, max: usize, depth: u16) {
    put16(b, 0, MAGIC);
    put16(b, 2, entries as u16);
    put16(b, 4, max as u16);
    put16(b, 6, depth);
}

fn put_leaf(b: &mut [u8], e: &Extent) {
    put32(b, 0, e.logical);
    put16(b, 4, e.len);
    put16(b, 6, (e.physical >> 32) as u16);
    put32(b, 8, e.physical as u32);
}

fn put_index(b: &mut [u8], logical: u32, child: u64) {
    put32(b, 0, logical);
    put32(b, 4, child as u32);
    put16(b, 8, (child >> 32) as u16);
}

/// The tree for `extents` (sorted, non-overlapping): the inode's `i_block` and the tree
/// blocks, placed at `blocks` (exactly `tree_blocks(extents.len())` of them, leaves first).
pub(crate) fn build(
    extents: &[Extent],
    blocks: &[u64],
    inode_seed: u32,
) -> ([u8; 60], Vec<(u64, Vec<u8>)>) {
    let mut root = [0u8; 60];
    let mut out = Vec::new();
    // (first logical block, location) of each node at the current level.
    let mut children: Vec<(u32, u64)> = Vec::new();
    let mut depth = 0u16;
    let mut next_block = blocks.iter().copied();
    if extents.len() > IN_INODE {
        for chunk in extents.chunks(PER_BLOCK) {
            let at = next_block.next().expect("tree_blocks() blocks");
            let mut b = vec![0u8; BLOCK_SIZE as usize];
            header(&mut b, chunk.len(), PER_BLOCK, 0);
            for (i, e) in chunk.iter().enumerate() {
                put_leaf(&mut b[HEADER + i * ENTRY..], e);
            }
            children.push((chunk[0].logical, at));
            out.push((at, b));
        }
        depth = 1;
        while children.len() > IN_INODE {
            let mut parents = Vec::new();
            for chunk in children.chunks(PER_BLOCK) {
                let at = next_block.next().expect("tree_blocks() blocks");
                let mut b = vec![0u8; BLOCK_SIZE as usize];
                header(&mut b, chunk.len(), PER_BLOCK, depth);
                for (i, &(logical, child)) in chunk.iter().enumerate() {
                    put_index(&mut b[HEADER + i * ENTRY..], logical, child);
                }
                parents.push((chunk[0].0, at));
                out.push((at, b));
            }
            children = parents;
            depth += 1;
        }
    }
    if depth == 0 {
        header(&mut root, extents.len(), IN_INODE, 0);
        for (i, e) in extents.iter().enumerate() {
            put_leaf(&mut root[HEADER + i * ENTRY..], e);
        }
    } else {
        header(&mut root, children.len(), IN_INODE, depth);
        for (i, &(logical, child)) in children.iter().enumerate() {
            put_index(&mut root[HEADER + i * ENTRY..], logical, child);
        }
    }
    for (_, b) in &mut out {
        let tail = HEADER + PER_BLOCK * ENTRY;
        let csum = checksum::crc(inode_seed, &b[..tail]);
        put32(b, tail, csum);
    }
    (root, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_counts_per_depth() {
        assert_eq!(tree_blocks(0), 0);
        assert_eq!(tree_blocks(4), 0);
        assert_eq!(tree_blocks(5), 1);
        assert_eq!(tree_blocks(340 * 4), 4);
        assert_eq!(tree_blocks(340 * 4 + 1), 5 + 1);
        assert_eq!(tree_blocks(340 * 340 * 4 + 1), 340 * 4 + 1 + 5 + 1);
    }

    #[test]
    fn two_level_tree_shape() {
        let extents: Vec<Extent> = (0..2000)
            .map(|i| Extent {
                logical: i * 2,
                len: 1,
                physical: 1000 + i as u64,
            })
            .collect();
        let n = tree_blocks(extents.len());
        let blocks: Vec<u64> = (0..n as u64).map(|i| 10 + i).collect();
        let (root, nodes) = build(&extents, &blocks, 0);
        assert_eq!(nodes.len(), n);
        // root: depth 2 with one index block above six leaves.
        assert_eq!(u16::from_le_bytes([root[6], root[7]]), 2);
        assert_eq!(u16::from_le_bytes([root[2], root[3]]), 1);
        let top = &nodes.last().unwrap().1;
        assert_eq!(u16::from_le_bytes([top[2], top[3]]), 6);
    }
}
