//! Reads a frontend completes itself: what the device holds in memory is filled in place,
//! and file ranges are handed back for the caller to read (ublk submits them to its
//! io_uring, so a read that waits on the disk does not hold up the requests behind it).

use std::os::fd::AsFd;
use std::sync::Arc;

/// One range of a read that comes from a file: `len` bytes at `offset` of `file` belong at
/// `at` in the caller's buffer.
pub struct FileRead {
    pub at: usize,
    pub len: usize,
    pub offset: u64,
    /// Keeps the descriptor open until the caller's read of it has completed.
    pub file: Arc<dyn AsFd + Send + Sync>,
}

impl std::fmt::Debug for FileRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::os::fd::AsRawFd;
        f.debug_struct("FileRead")
            .field("at", &self.at)
            .field("len", &self.len)
            .field("offset", &self.offset)
            .field("fd", &self.file.as_fd().as_raw_fd())
            .finish()
    }
}
