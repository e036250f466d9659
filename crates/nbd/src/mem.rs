//! An in-memory device: the reference backend for tests.

use std::io;
use std::sync::RwLock;

use crate::device::{Device, Extent, ZeroFlags};

/// Granularity at which [`MemDevice`] reports all-zero runs as holes.
const ZERO_GRAIN: u64 = 4096;

/// A byte vector served as a disk, optionally writable. All-zero 4 KiB blocks
/// are reported as holes, so it exercises the sparse paths of the server.
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    writable: bool,
    description: Option<String>,
}

impl MemDevice {
    pub fn new(data: Vec<u8>, writable: bool) -> Self {
        MemDevice {
            data: RwLock::new(data),
            writable,
            description: None,
        }
    }

    pub fn with_description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn range(offset: u64, len: usize) -> std::ops::Range<usize> {
        // The server validated offset+len against size(), which is a usize.
        offset as usize..offset as usize + len
    }
}

impl Device for MemDevice {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        buf.copy_from_slice(&data[Self::range(offset, buf.len())]);
        Ok(())
    }

    fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        Some(self.read_at(buf, offset))
    }

    fn description(&self) -> Option<String> {
        self.description.clone()
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

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        data[Self::range(offset, buf.len())].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        // Trimmed data reads back as zeroes, which the spec allows.
        self.write_zeroes(offset, len, ZeroFlags::default())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        data[Self::range(offset, len as usize)].fill(0);
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, Extent)>> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let end = (offset + len).min(data.len() as u64);
        let mut runs: Vec<(u64, Extent)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            // Blocks are aligned to the grain so answers do not depend on
            // where a query starts.
            let next = ((pos / ZERO_GRAIN + 1) * ZERO_GRAIN).min(end);
            let kind = if data[pos as usize..next as usize].iter().all(|&b| b == 0) {
                Extent::Hole
            } else {
                Extent::Data
            };
            match runs.last_mut() {
                Some((l, k)) if *k == kind => *l += next - pos,
                _ => runs.push((next - pos, kind)),
            }
            pos = next;
        }
        Ok(runs)
    }
}
