//! Hashing a file's data and storing it as an object.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::readdir::open_noatime;
use super::{sparse, ImportError};
use crate::store::{ObjectId, Staged, Store};
use crate::tree::Segment;

const BUF: usize = 1 << 20;

/// What storing a file produced.
pub(crate) struct Stored {
    pub object: ObjectId,
    pub segments: Option<Vec<Segment>>,
    /// The new object, to be committed; `None` when the store has it or `claim` said
    /// another file of this import is writing it.
    pub staged: Option<Staged>,
    /// Bytes written to the store.
    pub new_bytes: u64,
}

/// Stage the data of the regular file `path` of size `size` (from the walk's lstat): hash
/// it, and copy it into the store only if the object is new and `claim(id)` returns true
/// (first claim wins). The copy is hashed again, so a file modified meanwhile is an error,
/// never a misnamed object.
pub(crate) fn store_file(
    store: &Store,
    path: &Path,
    size: u64,
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
        return Err(ImportError::Changed {
            path: path.to_path_buf(),
        });
    }
    let segments =
        sparse::segments(&file, size).map_err(|e| ImportError::io("find holes in", path, e))?;
    let ranges = segments.clone().unwrap_or_else(|| vec![Segment(0, size)]);
    let mut buf = vec![0u8; BUF];
    let object = copy(&file, path, &ranges, &mut buf, &mut io::sink(), progress)?;
    if store.has_object(&object) || !claim(object) {
        return Ok(Stored {
            object,
            segments,
            staged: None,
            new_bytes: 0,
        });
    }
    let mut failure = None;
    let written = store.stage_object(object, |out| {
        copy(&file, path, &ranges, &mut buf, out, &|_| {}).map_err(|e| {
            failure = Some(e);
            io::Error::other("reading the source failed")
        })
    });
    if let Some(e) = failure {
        return Err(e);
    }
    match written {
        Ok(staged) => Ok(Stored {
            object,
            segments,
            staged: Some(staged),
            new_bytes: ranges.iter().map(|r| r.1).sum(),
        }),
        Err(crate::store::StoreError::HashMismatch { .. }) => Err(ImportError::Changed {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Copy `ranges` of `file` back to back into `out`, returning their BLAKE3.
fn copy(
    file: &File,
    path: &Path,
    ranges: &[Segment],
    buf: &mut [u8],
    out: &mut dyn Write,
    progress: &dyn Fn(u64),
) -> Result<ObjectId, ImportError> {
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
                return Err(ImportError::Changed {
                    path: path.to_path_buf(),
                });
            }
            // Big files hash on all cores; below ~128 KiB threads cost more than they give.
            if n >= 128 << 10 {
                hasher.update_rayon(&buf[..n]);
            } else {
                hasher.update(&buf[..n]);
            }
            out.write_all(&buf[..n])
                .map_err(|e| ImportError::io("write the store object for", path, e))?;
            progress(n as u64);
            pos += n as u64;
        }
    }
    Ok(hasher.finalize().into())
}
