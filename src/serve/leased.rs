//! The device a connection holds: any export's device plus the lease on its image's trees,
//! released when the connection lets go of it.

use std::io;
use std::sync::Arc;

use tessera_nbd::{Device, Extent, ZeroFlags};

use super::exports::Cache;
use crate::blockdev::ImageExport;
use crate::store::{LeaseGuard, Store};

pub struct Leased {
    /// `Some` until dropped; taken first so the image's last user is gone before the
    /// cache is checked.
    inner: Option<Arc<dyn Device>>,
    lease: Option<LeaseGuard>,
    cache: Cache,
    store: Store,
    image: String,
    fingerprint: String,
}

impl Leased {
    pub fn new(
        inner: Arc<dyn Device>,
        lease: LeaseGuard,
        cache: Cache,
        store: &Store,
        image: &ImageExport,
    ) -> Leased {
        Leased {
            inner: Some(inner),
            lease: Some(lease),
            cache,
            store: store.clone(),
            image: image.name().to_owned(),
            fingerprint: image.fingerprint().to_owned(),
        }
    }

    fn dev(&self) -> &dyn Device {
        self.inner.as_deref().expect("present until dropped")
    }
}

impl Drop for Leased {
    /// A synthesized image stays cached for the next connection while its record still
    /// names it; once removed or re-created and unused, it is dropped so its mappings go
    /// and `gc` can give the space back.
    fn drop(&mut self) {
        self.inner = None;
        let slot = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.get(&self.image).cloned()
        };
        if let Some(slot) = slot {
            let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
            let ours_unused = guard
                .as_ref()
                .is_some_and(|d| d.fingerprint() == self.fingerprint && Arc::strong_count(d) == 1);
            if ours_unused {
                let current = crate::image::load(&self.store, &self.image)
                    .ok()
                    .map(|r| r.fingerprint());
                if current.as_deref() != Some(self.fingerprint.as_str()) {
                    *guard = None;
                }
            }
        }
        self.lease = None;
    }
}

impl Device for Leased {
    fn size(&self) -> u64 {
        self.dev().size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.dev().read_at(buf, offset)
    }
    fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        self.dev().read_at_cached(buf, offset)
    }
    fn read_cached_shared(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<tessera_nbd::Shared>,
    ) -> Option<io::Result<()>> {
        self.dev().read_cached_shared(offset, len, out)
    }
    fn plan_read(
        &self,
        buf: &mut [u8],
        offset: u64,
    ) -> Option<io::Result<Vec<tessera_nbd::FileRead>>> {
        self.dev().plan_read(buf, offset)
    }
    fn description(&self) -> Option<String> {
        self.dev().description()
    }
    fn is_read_only(&self) -> bool {
        self.dev().is_read_only()
    }
    fn can_flush(&self) -> bool {
        self.dev().can_flush()
    }
    fn can_fua(&self) -> bool {
        self.dev().can_fua()
    }
    fn can_trim(&self) -> bool {
        self.dev().can_trim()
    }
    fn can_zero(&self) -> bool {
        self.dev().can_zero()
    }
    fn can_fast_zero(&self) -> bool {
        self.dev().can_fast_zero()
    }
    fn can_multi_conn(&self) -> bool {
        self.dev().can_multi_conn()
    }
    fn can_cache(&self) -> bool {
        self.dev().can_cache()
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.dev().write_at(buf, offset, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.dev().flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.dev().trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.dev().write_zeroes(offset, len, flags)
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.dev().cache(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, Extent)>> {
        self.dev().extents(offset, len)
    }
}
