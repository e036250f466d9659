//! Hashing a file's data and storing it as an object.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use super::readdir::open_noatime;
use super::{sparse, ImportError};
use crate::store::{ObjectId, Spool, Staged, Store, StoreError};
use crate::tree::Segment;

/// Data up to this size is read once and written from memory; larger data is streamed.
const BUF: usize = 1 << 20;

/// What storing a file produced.
pub(crate) struct Stored {
    pub object: ObjectId,
    pub segments: Option<Vec<Segment>>,
    /// The new object, to be committed; `None` when the store has it, `claim` said another
    /// file of this import is writing it, or it went to the spool.
    pub staged: Option<Staged>,
    /// Bytes written to the store.
    pub new_bytes: u64,
}

/// Stage the data of the regular file `path` of size `size` (from the walk's lstat): hash
/// it, and copy it into the store only if the object is new and `claim(id)` returns true
/// (first claim wins): into `spool` if there is one and it takes objects of that size, else
/// as a staged loose file. Small data is read once and written from memory; larger data is
/// hashed, then hashed again while copied, so a file modified meanwhile is an error, never
/// a misnamed object.
pub(crate) fn store_file(
    store: &Store,
    path: &Path,
    size: u64,
    spool: Option<&Spool>,
    claim: &dyn Fn(ObjectId) -> bool,
    progress: &dyn Fn(u64),
) -> Result<Stored, ImportError> {
    let fd = open_noatime(path, libc::O_RDONLY).map_err(|e| ImportError::io("open", path, e))?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    let now = file
        .metadata()
        .map_err(|e| ImportError::io("stat", path, e))?;
    if now.len() != size {
        return Err(changed(path));
    }
    // A file with a block for every byte has no holes: skip the two lseeks.
    let segments = if now.blocks().saturating_mul(512) >= size {
        None
    } else {
        sparse::segments(&file, size).map_err(|e| ImportError::io("find holes in", path, e))?
    };
    let ranges = segments.clone().unwrap_or_else(|| vec![Segment(0, size)]);
    let data_len: u64 = ranges.iter().map(|r| r.1).sum();
    let is_new = |id: ObjectId| !store.has_kept_object(&id) && claim(id);

    let (object, staged) = if data_len <= BUF as u64 {
        let mut data = vec![0u8; data_len as usize];
        let mut filled = 0;
        let object = copy(&file, path, &ranges, &mut |chunk: &[u8]| {
            data[filled..filled + chunk.len()].copy_from_slice(chunk);
            filled += chunk.len();
            Ok(())
        })?;
        progress(data_len);
        let staged = if !is_new(object) {
            Fresh::No
        } else if let Some(spool) = spool.filter(|_| Spool::takes(data_len)) {
            spool
                .append(object, &data)
                .map_err(|e| ImportError::io("spool the data of", path, e))?;
            Fresh::Spooled
        } else {
            Fresh::Staged(store.stage_object(object, |out| {
                out.write_all(&data)?;
                Ok(object)
            })?)
        };
        (object, staged)
    } else {
        let object = copy(&file, path, &ranges, &mut |chunk: &[u8]| {
            progress(chunk.len() as u64);
            Ok(())
        })?;
        let staged = if is_new(object) {
            Fresh::Staged(stage_copy(store, &file, path, &ranges, object)?)
        } else {
            Fresh::No
        };
        (object, staged)
    };
    let new_bytes = if matches!(staged, Fresh::No) {
        0
    } else {
        data_len
    };
    Ok(Stored {
        object,
        segments,
        new_bytes,
        staged: match staged {
            Fresh::Staged(s) => Some(s),
            _ => None,
        },
    })
}

/// Whether a file's object is new to the store, and where it went.
enum Fresh {
    No,
    Spooled,
    Staged(Staged),
}

/// Copy `ranges` of `file` into a new staged object, which must hash to `object`.
fn stage_copy(
    store: &Store,
    file: &File,
    path: &Path,
    ranges: &[Segment],
    object: ObjectId,
) -> Result<Staged, ImportError> {
    let mut failure = None;
    let written = store.stage_object(object, |out| {
        copy(file, path, ranges, &mut |chunk| out.write_all(chunk)).map_err(|e| {
            failure = Some(e);
            io::Error::other("reading the source failed")
        })
    });
    if let Some(e) = failure {
        return Err(e);
    }
    match written {
        Ok(staged) => Ok(staged),
        Err(StoreError::HashMismatch { .. }) => Err(changed(path)),
        Err(e) => Err(e.into()),
    }
}

fn changed(path: &Path) -> ImportError {
    ImportError::Changed {
        path: path.to_path_buf(),
    }
}

/// Read `ranges` of `file` in order, passing each chunk to `sink`; returns their BLAKE3.
/// A file shorter than its ranges has changed since it was measured.
fn copy(
    file: &File,
    path: &Path,
    ranges: &[Segment],
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<ObjectId, ImportError> {
    let longest = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    let mut buf = vec![0u8; usize::try_from(longest).map_or(BUF, |l| l.clamp(1, BUF))];
    let mut hasher = blake3::Hasher::new();
    for &Segment(start, len) in ranges {
        let mut pos = start;
        let end = start + len;
        while pos < end {
            let want = (end - pos).min(buf.len() as u64) as usize;
            let n = file
                .read_at(&mut buf[..want], pos)
                .map_err(|e| ImportError::io("read", path, e))?;
            if n == 0 {
                return Err(changed(path));
            }
            let chunk = &buf[..n];
            // Big files hash on all cores; below ~128 KiB threads cost more than they give.
            if n >= 128 << 10 {
                hasher.update_rayon(chunk);
            } else {
                hasher.update(chunk);
            }
            sink(chunk).map_err(|e| ImportError::io("write the store object for", path, e))?;
            pos += n as u64;
        }
    }
    Ok(hasher.finalize().into())
}
