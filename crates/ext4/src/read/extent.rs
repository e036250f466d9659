//! Extent trees (`Documentation/filesystems/ext4/ifork.rst`): a 12-byte header, then leaf
//! entries (logical block, length, physical block) or, above depth 0, index entries naming
//! the block of the next level. Lengths over 32768 mark unwritten (preallocated) extents,
//! which read as zeros.

use super::{Filesystem, Inode, ReadAt, ReadError};
use crate::le::{get16, get32};

const MAGIC: u16 = 0xF30A;
const MAX_DEPTH: u16 = 5;
const INIT_MAX_LEN: u16 = 32768;

/// A run of a file's blocks: `len` blocks from logical block `logical` at `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileExtent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    /// Allocated but never written: reads as zeros.
    pub unwritten: bool,
}

impl<R: ReadAt> Filesystem<R> {
    /// Every extent of `inode`, in logical order.
    pub fn extents(&self, inode: &Inode) -> Result<Vec<FileExtent>, ReadError> {
        if !inode.uses_extents() {
            return Err(ReadError::InodeUnsupported {
                ino: inode.ino,
                why: "block-mapped (no extents flag)",
            });
        }
        let mut out = Vec::new();
        self.walk_node(inode.ino, &inode.i_block, None, &mut out)?;
        out.sort_by_key(|e| e.logical);
        if out
            .windows(2)
            .any(|w| w[0].logical + w[0].len > w[1].logical)
        {
            return Err(ReadError::corrupt(
                "extent tree",
                format!("inode {}: overlapping extents", inode.ino),
            ));
        }
        Ok(out)
    }

    fn walk_node(
        &self,
        ino: u32,
        node: &[u8],
        want_depth: Option<u16>,
        out: &mut Vec<FileExtent>,
    ) -> Result<(), ReadError> {
        let bad = |why: String| ReadError::corrupt("extent tree", format!("inode {ino}: {why}"));
        if get16(node, 0) != MAGIC {
            return Err(bad("bad extent header magic".into()));
        }
        let entries = get16(node, 2) as usize;
        let depth = get16(node, 6);
        if 12 + entries * 12 > node.len()
            || depth > MAX_DEPTH
            || want_depth.is_some_and(|d| d != depth)
        {
            return Err(bad(format!(
                "bad extent header ({entries} entries, depth {depth})"
            )));
        }
        for e in node[12..12 + entries * 12].chunks(12) {
            let logical = get32(e, 0) as u64;
            if depth == 0 {
                let raw = get16(e, 4);
                let (len, unwritten) = if raw > INIT_MAX_LEN {
                    (raw - INIT_MAX_LEN, true)
                } else {
                    (raw, false)
                };
                let physical = (get16(e, 6) as u64) << 32 | get32(e, 8) as u64;
                out.push(FileExtent {
                    logical,
                    physical,
                    len: len as u64,
                    unwritten,
                });
            } else {
                let child = get32(e, 4) as u64 | (get16(e, 8) as u64) << 32;
                let block = self.read_block(child, "extent tree block")?;
                self.walk_node(ino, &block, Some(depth - 1), out)?;
            }
        }
        Ok(())
    }

    /// Read `buf.len()` bytes of `inode`'s data at `offset` (holes and unwritten extents
    /// as zeros); reading past the size is an error.
    pub fn read_file(
        &self,
        inode: &Inode,
        extents: &[FileExtent],
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), ReadError> {
        if offset + buf.len() as u64 > inode.size {
            return Err(ReadError::corrupt(
                "file read",
                format!(
                    "inode {}: {} bytes at {offset} past size {}",
                    inode.ino,
                    buf.len(),
                    inode.size
                ),
            ));
        }
        buf.fill(0);
        let bs = self.sb.block_size;
        let end = offset + buf.len() as u64;
        for e in extents.iter().filter(|e| !e.unwritten) {
            let (from, to) = (
                (e.logical * bs).max(offset),
                ((e.logical + e.len) * bs).min(end),
            );
            if from >= to {
                continue;
            }
            let at = e.physical * bs + (from - e.logical * bs);
            if at.div_ceil(bs) > self.sb.blocks_count {
                return Err(ReadError::corrupt(
                    "extent",
                    format!("inode {}: block past the end", inode.ino),
                ));
            }
            self.read_bytes(
                &mut buf[(from - offset) as usize..(to - offset) as usize],
                at,
                "file data",
            )?;
        }
        Ok(())
    }

    /// The whole contents of a small file (directories, slow symlinks).
    pub(crate) fn read_all(&self, inode: &Inode, limit: u64) -> Result<Vec<u8>, ReadError> {
        if inode.size > limit {
            return Err(ReadError::corrupt(
                "inode",
                format!(
                    "inode {}: {} bytes is over the {limit}-byte limit",
                    inode.ino, inode.size
                ),
            ));
        }
        let extents = self.extents(inode)?;
        let mut buf = vec![0u8; inode.size as usize];
        self.read_file(inode, &extents, &mut buf, 0)?;
        Ok(buf)
    }
}
