//! Finding the data segments of a sparse file with `lseek(SEEK_DATA / SEEK_HOLE)`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::tree::Segment;

const BLOCK: u64 = 4096;

/// The file's data segments, widened to 4 KiB boundaries (the end clipped to `size`), or
/// `None` when the file has no holes. Filesystems without hole reporting look dense.
pub(crate) fn segments(file: &File, size: u64) -> io::Result<Option<Vec<Segment>>> {
    let mut segs: Vec<Segment> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= size {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        let start = data / BLOCK * BLOCK;
        let end = hole.div_ceil(BLOCK).saturating_mul(BLOCK).min(size);
        match segs.last_mut() {
            Some(last) if last.0 + last.1 >= start => last.1 = end.max(last.0 + last.1) - last.0,
            _ => segs.push(Segment(start, end - start)),
        }
        pos = hole.max(pos + 1);
    }
    let dense = size == 0 || segs.as_slice() == [Segment(0, size)];
    Ok((!dense).then_some(segs))
}

/// `lseek(fd, pos, whence)`; `None` when there is no further data (`ENXIO`).
fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor owned by `file`; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn dense_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::create(&path).unwrap();
        f.write_all_at(&[1; 5000], 0).unwrap();
        assert_eq!(segments(&f, 5000).unwrap(), None);

        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[2; 10], 512 << 10).unwrap();
        let segs = segments(&f, 1 << 20).unwrap().expect("sparse");
        assert_eq!(segs[0], Segment(0, 8192));
        assert_eq!(segs[1], Segment(512 << 10, 4096));

        let hole = File::create(dir.path().join("h")).unwrap();
        hole.set_len(12345).unwrap();
        assert_eq!(segments(&hole, 12345).unwrap(), Some(vec![]));
    }
}
