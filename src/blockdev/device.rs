//! A synthesized image as the block device every frontend serves (NBD, ublk) and that
//! overlays and `overlay commit` stack on.

use std::io;

use tessera_nbd::{Device, Extent};

use super::ImageDevice;
use crate::store::Store;

/// An [`ImageDevice`] plus what clients are told about it.
pub struct ImageExport {
    name: String,
    dev: ImageDevice,
    description: String,
    fingerprint: String,
}

impl ImageExport {
    /// Synthesizes `name` (computes its layout): the expensive step, done
    /// once per image and shared by every connection.
    pub fn open(store: &Store, name: &str) -> anyhow::Result<Self> {
        let record = crate::image::load(store, name)?;
        let dev = ImageDevice::open(store, name)?;
        Ok(ImageExport {
            name: name.to_owned(),
            description: record.describe(),
            fingerprint: record.fingerprint(),
            dev,
        })
    }

    /// The image's name (as it was when synthesized).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Identity of the image's bytes, which overlays are bound to.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

impl Device for ImageExport {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.dev.read_at(buf, offset)
    }

    /// Metadata and zeroes are in memory, so reads touching only those are
    /// answered inline; file data is mmapped store objects that may need the
    /// disk, so any data piece sends the read to an I/O thread.
    fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        self.dev.read_at_resident(buf, offset)
    }

    fn description(&self) -> Option<String> {
        Some(self.description.clone())
    }

    // Read-only, no cache of our own: every connection sees the same bytes,
    // so multi-conn is safe (the kernel client needs it for >1 connection).
    fn can_multi_conn(&self) -> bool {
        true
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, Extent)>> {
        Ok(self
            .dev
            .extents(offset, len)?
            .into_iter()
            .map(|e| (e.len, if e.zero { Extent::Hole } else { Extent::Data }))
            .collect())
    }
}
