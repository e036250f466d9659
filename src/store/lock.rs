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
        let path = self.root().join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("open", &path, e))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc != 0 {
            return Err(StoreError::io("lock", &path, io::Error::last_os_error()));
        }
        Ok(StoreLock { _file: file })
    }
}
