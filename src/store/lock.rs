//! Store-wide advisory lock, so `gc` never deletes what a concurrent import just wrote.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

use super::{Store, StoreError};

/// Held while writing (shared) or collecting garbage (exclusive); released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

impl Store {
    /// Take the store lock, waiting for a conflicting holder to finish.
    pub fn lock(&self, exclusive: bool) -> Result<StoreLock, StoreError> {
        self.flock(exclusive, false)
            .map(|lock| lock.expect("a blocking flock returns a lock"))
    }

    /// Take the store lock unless a conflicting holder has it.
    pub fn try_lock(&self, exclusive: bool) -> Result<Option<StoreLock>, StoreError> {
        self.flock(exclusive, true)
    }

    fn flock(&self, exclusive: bool, nonblocking: bool) -> Result<Option<StoreLock>, StoreError> {
        let path = self.root().join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("open", &path, e))?;
        let mut op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        if nonblocking {
            op |= libc::LOCK_NB;
        }
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if nonblocking && err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(StoreError::io("lock", &path, err));
        }
        Ok(Some(StoreLock { _file: file }))
    }
}
