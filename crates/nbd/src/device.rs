//! The block-device trait the server is generic over.
//!
//! Modelled on nbdkit's plugin interface: a backend answers a handful of calls
//! and declares its capabilities; the server owns sockets, negotiation and
//! request validation, so a device never sees an out-of-range request.
//!
//! Calls are synchronous because the devices we serve are backed by `pread`
//! or mmap; the server runs them on blocking threads.

use std::io;

use bytes::Bytes;

/// Allocation state of a range, as reported by NBD_CMD_BLOCK_STATUS
/// (`base:allocation`) and used to send holes in structured reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Extent {
    /// Allocated, contents unknown: read it.
    Data,
    /// Allocated and reads as zeroes (`NBD_STATE_ZERO`).
    Zero,
    /// Not allocated and reads as zeroes (`NBD_STATE_HOLE | NBD_STATE_ZERO`).
    Hole,
}

impl Extent {
    /// `base:allocation` status flags for this extent.
    pub fn status_flags(self) -> u32 {
        use crate::proto::{STATE_HOLE, STATE_ZERO};
        match self {
            Extent::Data => 0,
            Extent::Zero => STATE_ZERO,
            Extent::Hole => STATE_HOLE | STATE_ZERO,
        }
    }

    /// True if the range reads as zeroes without looking at it.
    pub fn is_zero(self) -> bool {
        !matches!(self, Extent::Data)
    }
}

/// Flags of NBD_CMD_WRITE_ZEROES, translated out of wire bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The device may deallocate (the client did not send NO_HOLE).
    pub may_trim: bool,
    /// Fail with `ErrorKind::Unsupported` unless zeroing is faster than writing.
    pub fast: bool,
    /// Persist before returning.
    pub fua: bool,
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

fn unsupported() -> io::Error {
    io::Error::from_raw_os_error(libc::EOPNOTSUPP)
}

/// A slice of a read reply that a device hands out without copying it
/// ([`Device::read_cached_shared`]).
#[derive(Debug, Clone)]
pub struct Shared {
    bytes: Bytes,
    pages: bool,
}

impl Shared {
    /// Memory that may change or be reused once `bytes` is dropped (a heap buffer): the
    /// server copies it into the socket.
    pub fn copied(bytes: Bytes) -> Shared {
        Shared {
            bytes,
            pages: false,
        }
    }

    /// Pages whose contents never change, even after `bytes` is dropped: a mapping of a
    /// file nobody writes, or static memory. On a plain socket the server may hand them to
    /// the kernel by reference (`vmsplice`), which can hold them past the reply's send.
    pub fn pages(bytes: Bytes) -> Shared {
        Shared { bytes, pages: true }
    }

    /// Whether the slice may be sent by reference ([`Shared::pages`]).
    pub fn is_pages(&self) -> bool {
        self.pages
    }
}

impl std::ops::Deref for Shared {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::borrow::Borrow<[u8]> for Shared {
    fn borrow(&self) -> &[u8] {
        &self.bytes
    }
}

/// A block device exported over NBD.
///
/// Only `size` and `read_at` are required; the defaults describe a read-only
/// device without flush/trim/zero/cache whose contents are all data. A device
/// that overrides a `can_*` capability must also override the matching call.
pub trait Device: Send + Sync + 'static {
    /// Size in bytes. Constant for the life of a connection.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`. The server guarantees
    /// `offset + buf.len() <= size()`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Like `read_at`, but only if it can complete without waiting for
    /// storage (the data is in memory or in the page cache); `None` means
    /// "would block". The server tries this on its async threads first and
    /// hands the read to an I/O thread only when it returns `None`: for
    /// cached data a thread hand-off costs more than the copy.
    fn read_at_cached(&self, _buf: &mut [u8], _offset: u64) -> Option<io::Result<()>> {
        None
    }

    /// For frontends that do their own file I/O (ublk over io_uring): fills into `buf` what
    /// needs no waiting (metadata, zeros, data in the page cache) and returns the file
    /// reads that complete it, in any order. `None` means the device cannot say (it has no
    /// files behind it, or this range needs more than a file read): use `read_at`.
    fn plan_read(&self, _buf: &mut [u8], _offset: u64) -> Option<io::Result<Vec<crate::FileRead>>> {
        None
    }

    /// Like `read_at_cached`, but instead of copying the bytes into a buffer, appends them
    /// to `out` as shared slices of memory the device holds (a mapped file's resident
    /// pages), which the server writes to the socket directly: one copy fewer per read.
    /// `None` means "would block, or not available this way": the server falls back to
    /// `read_at_cached`, then `read_at`; `out` may then hold a partial result, which the
    /// server drops. The slices must hold only resident memory: they are written from an
    /// async thread, where a page fault that waits on the disk would stall every client.
    /// Slices marked [`Shared::pages`] may reach the socket by reference, without any copy.
    fn read_cached_shared(
        &self,
        _offset: u64,
        _len: u64,
        _out: &mut Vec<Shared>,
    ) -> Option<io::Result<()>> {
        None
    }

    /// Free text shown to clients (NBD_INFO_DESCRIPTION, `nbdinfo`).
    fn description(&self) -> Option<String> {
        None
    }

    fn is_read_only(&self) -> bool {
        true
    }
    fn can_flush(&self) -> bool {
        false
    }
    /// FUA on writes; only meaningful for writable devices.
    fn can_fua(&self) -> bool {
        self.can_flush()
    }
    fn can_trim(&self) -> bool {
        false
    }
    fn can_zero(&self) -> bool {
        false
    }
    fn can_fast_zero(&self) -> bool {
        false
    }
    /// True if every connection sees the same data and flushes are global,
    /// which holds for any device without a per-connection cache. The kernel
    /// client refuses multiple connections without it.
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn can_cache(&self) -> bool {
        false
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }
    fn flush(&self) -> io::Result<()> {
        Err(unsupported())
    }
    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
        Err(unsupported())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> io::Result<()> {
        Err(unsupported())
    }
    /// Prefetch hint (NBD_CMD_CACHE).
    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Allocation map of `[offset, offset+len)` as consecutive `(length,
    /// state)` runs starting at `offset`. The runs must be non-empty and may
    /// stop short of `len` (the client asks again) or run past it; the
    /// server clips them.
    fn extents(&self, _offset: u64, len: u64) -> io::Result<Vec<(u64, Extent)>> {
        Ok(vec![(len, Extent::Data)])
    }
}
