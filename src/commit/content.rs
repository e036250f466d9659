//! A file of the overlay's filesystem as a store object: its data segments, hashed, and
//! stored unless the store already has them.

use blake3::Hasher;
use tessera_ext4::read::{FileExtent, Filesystem, Inode, ReadAt, ReadError};

use crate::store::{ObjectId, Spool, Staged, Store, StoreError};
use crate::tree::Segment;

const CHUNK: u64 = 1 << 20;
const BS: u64 = 4096;

/// What a file's data became.
pub(crate) struct Content {
    pub object: ObjectId,
    pub segments: Option<Vec<Segment>>,
    /// The new object to commit, when the store lacked it and it did not go to the spool.
    pub staged: Option<Staged>,
    /// Whether the object is new: staged, or gone to the spool.
    pub new: bool,
    pub new_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("copying file data into the store")]
    Copy(#[source] std::io::Error),
}

/// The file's data ranges in the tree's terms: written extents clipped to the size, runs
/// merged; `None` when one range covers the whole file (a dense file). Unwritten
/// (preallocated) extents and holes read as zeros and are left out, as a sparse import does.
pub(crate) fn segments(extents: &[FileExtent], size: u64, block_size: u64) -> Option<Vec<Segment>> {
    if block_size != BS {
        // Tree segments are 4 KiB aligned; store other filesystems' files dense.
        return None;
    }
    let mut out: Vec<Segment> = Vec::new();
    for e in extents.iter().filter(|e| !e.unwritten) {
        let start = e.logical * BS;
        let end = ((e.logical + e.len) * BS).min(size);
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += end - start,
            _ => out.push(Segment(start, end - start)),
        }
    }
    match out.as_slice() {
        [only] if only.0 == 0 && only.1 == size => None,
        [] if size == 0 => None,
        _ => Some(out),
    }
}

/// Feed the bytes of `ranges` of the file to `sink`, a chunk at a time.
fn each_chunk<R: ReadAt>(
    fs: &Filesystem<R>,
    inode: &Inode,
    extents: &[FileExtent],
    ranges: &[Segment],
    sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<(), ContentError> {
    let mut buf = vec![0u8; CHUNK.min(inode.size) as usize];
    for r in ranges {
        let mut at = r.0;
        while at < r.0 + r.1 {
            let n = CHUNK.min(r.0 + r.1 - at) as usize;
            fs.read_file(inode, extents, &mut buf[..n], at)?;
            sink(&buf[..n]).map_err(ContentError::Copy)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Hash the file's data and store it as an object if the store lacks it and `pending`
/// (objects already stored by this commit) does not hold it: into `spool` if there is one
/// and it takes objects of this size, else as a staged loose file. The data is read twice
/// when new (hash, then copy while hashing again): the overlay is locked, so both passes
/// see the same bytes, and the second hash is checked against the first.
pub(crate) fn store_file<R: ReadAt>(
    store: &Store,
    fs: &Filesystem<R>,
    inode: &Inode,
    spool: Option<&Spool>,
    pending: &dyn Fn(&ObjectId) -> bool,
) -> Result<Content, ContentError> {
    let extents = fs.extents(inode)?;
    let segments = segments(&extents, inode.size, fs.superblock().block_size);
    let ranges = segments
        .clone()
        .unwrap_or_else(|| vec![Segment(0, inode.size)]);
    let mut hasher = Hasher::new();
    each_chunk(fs, inode, &extents, &ranges, &mut |c| {
        hasher.update(c);
        Ok(())
    })?;
    let object = ObjectId(*hasher.finalize().as_bytes());
    if pending(&object) || store.has_kept_object(&object) {
        return Ok(Content {
            object,
            segments,
            staged: None,
            new: false,
            new_bytes: 0,
        });
    }
    let new_bytes = ranges.iter().map(|r| r.1).sum();
    if let Some(spool) = spool.filter(|_| Spool::takes(new_bytes)) {
        let mut bytes = Vec::with_capacity(new_bytes as usize);
        each_chunk(fs, inode, &extents, &ranges, &mut |c| {
            bytes.extend_from_slice(c);
            Ok(())
        })?;
        let actual = ObjectId::of(&bytes);
        if actual != object {
            return Err(StoreError::HashMismatch {
                expected: object,
                actual,
            }
            .into());
        }
        spool.append(object, &bytes).map_err(ContentError::Copy)?;
        return Ok(Content {
            object,
            segments,
            staged: None,
            new: true,
            new_bytes,
        });
    }
    let mut failed = None;
    let staged = store.stage_object(object, |out| {
        let mut again = Hasher::new();
        let r = each_chunk(fs, inode, &extents, &ranges, &mut |c| {
            again.update(c);
            std::io::Write::write_all(out, c)
        });
        if let Err(e) = r {
            let msg = e.to_string();
            failed = Some(e);
            return Err(std::io::Error::other(msg));
        }
        Ok(ObjectId(*again.finalize().as_bytes()))
    });
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(Content {
        object,
        segments,
        staged: Some(staged?),
        new: true,
        new_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, len: u64, unwritten: bool) -> FileExtent {
        FileExtent {
            logical,
            physical: 1000 + logical,
            len,
            unwritten,
        }
    }

    #[test]
    fn dense_files_have_no_segments() {
        assert_eq!(segments(&[ext(0, 2, false)], 5000, BS), None);
        assert_eq!(
            segments(&[ext(0, 1, false), ext(1, 1, false)], 8192, BS),
            None
        );
        assert_eq!(segments(&[], 0, BS), None);
    }

    #[test]
    fn holes_unwritten_and_past_eof_extents_are_not_data() {
        let e = [ext(0, 1, false), ext(1, 1, true), ext(4, 4, false)];
        assert_eq!(
            segments(&e, 5 * BS + 10, BS),
            Some(vec![Segment(0, BS), Segment(4 * BS, BS + 10)])
        );
        assert_eq!(segments(&[], 3 * BS, BS), Some(vec![]));
    }
}
