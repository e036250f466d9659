//! A plain file (raw image) served as a device: the baseline that synthesized
//! images are compared against, in tests and in benchmarks against nbdkit's
//! `file` plugin.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::device::{Device, Extent, ZeroFlags};

pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    writable: bool,
}

impl FileDevice {
    pub fn open(path: impl AsRef<Path>, writable: bool) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new().read(true).write(writable).open(&path)?;
        let size = file.metadata()?.len();
        Ok(FileDevice {
            file,
            path,
            size,
            writable,
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate only reads its integer arguments; the fd is owned
        // by `self.file` and stays open for the duration of the call.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `lseek(SEEK_DATA/SEEK_HOLE)`; `None` when there is no such position
    /// before EOF (ENXIO).
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek takes integers only. It moves the shared file offset,
        // which nothing here uses: all I/O goes through pread/pwrite.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
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
}

impl Device for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        pread_nowait(&self.file, buf, offset)
    }

    fn description(&self) -> Option<String> {
        Some(format!("raw file {}", self.path.display()))
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }
    fn can_flush(&self) -> bool {
        self.writable
    }
    fn can_trim(&self) -> bool {
        self.writable
    }
    fn can_zero(&self) -> bool {
        self.writable
    }
    fn can_fast_zero(&self) -> bool {
        self.writable
    }
    fn can_cache(&self) -> bool {
        true
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let fast = if flags.may_trim {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        } else {
            self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if fast.is_err() {
            if flags.fast {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            // Slow path: write real zeroes in bounded chunks.
            let zeroes = vec![0u8; len.min(1 << 20) as usize];
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(zeroes.len() as u64) as usize;
                self.file.write_all_at(&zeroes[..n], pos)?;
                pos += n as u64;
            }
        }
        if flags.fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: integer-only syscall on an fd we own.
        let r = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(r))
        }
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, Extent)>> {
        let end = (offset + len).min(self.size);
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match self.seek(pos, libc::SEEK_DATA)? {
                Some(d) => d.min(end),
                None => end,
            };
            if data > pos {
                runs.push((data - pos, Extent::Hole));
                pos = data;
                continue;
            }
            let hole = match self.seek(pos, libc::SEEK_HOLE)? {
                Some(h) => h.min(end),
                None => end,
            };
            // A filesystem without SEEK_HOLE support reports the whole file
            // as data, which is always correct.
            let hole = hole.max(pos + 1).min(end);
            runs.push((hole - pos, Extent::Data));
            pos = hole;
        }
        Ok(runs)
    }
}

/// `pread` of `buf.len()` bytes at `offset` that gives up (`None`) rather than wait for the
/// disk: `RWF_NOWAIT` returns what the page cache holds, and `EAGAIN` once it holds none.
/// What a file-backed [`Device::read_at_cached`] needs; any error is left to the blocking
/// read that follows, which reports it with its context.
pub fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: the iovec points into `buf`, which is live and exclusively borrowed for
        // the duration of the call; the descriptor is owned by `file`.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        match n {
            // End of file before the range's end: let the blocking read report it.
            0 => return None,
            n if n > 0 => done += n as usize,
            _ if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => continue,
            // Not cached, RWF_NOWAIT unsupported here, or a real error.
            _ => return None,
        }
    }
    Some(Ok(()))
}
