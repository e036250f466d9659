//! A persistent overlay opened by a command rather than a client (`overlay commit`): the
//! same device a server would attach, taken under the same lock, so no client can attach
//! (and write) while the command reads it, and a command never reads an attached one.

use std::path::Path;
use std::sync::Arc;

use tessera_nbd::Device;

use super::named::{load_map, overlays_dir, read_record, Lock, OverlayError, OverlayRecord};
use super::{Overlay, State, BS};

/// Open the existing overlay `name` over `base`, which must be its image (`fingerprint`).
/// Refused while a client is attached ([`OverlayError::Busy`]); while the returned overlay
/// lives, no client can attach.
pub fn open(
    store_root: &Path,
    name: &str,
    fingerprint: &str,
    base: Arc<dyn Device>,
) -> Result<(Overlay, OverlayRecord), OverlayError> {
    let io_err = |source| OverlayError::Io {
        name: name.to_owned(),
        source,
    };
    let dir = overlays_dir(store_root).join(name);
    let record = read_record(&dir, name)?.ok_or_else(|| OverlayError::NotFound(name.to_owned()))?;
    let lock = Lock::try_exclusive(&dir.join("lock"))
        .map_err(io_err)?
        .ok_or_else(|| OverlayError::Busy(name.to_owned()))?;
    record.check_image(&record.image, fingerprint)?;
    let map = load_map(&dir, name, base.size().div_ceil(BS))?;
    let overlay = Overlay::open_in(base, &dir, map, true, None, Box::new(lock)).map_err(io_err)?;
    Ok((overlay, record))
}

impl Overlay {
    /// Whether bytes `offset..offset+len` still read from the base device, unwritten.
    pub fn reads_base(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let first = offset / BS;
        let n = (offset + len).div_ceil(BS) - first;
        let map = self.map.read().unwrap();
        if first + n > map.len() {
            return false;
        }
        let (state, run) = map.run(first, n);
        state == State::Base && run >= n
    }
}
