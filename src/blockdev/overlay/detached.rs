//! A persistent overlay opened by a command rather than a client (`overlay commit`): the
//! same device a server would attach, taken under the same lock, so no client can attach
//! (and write) while the command reads it, and a command never reads an attached one.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use tessera_nbd::Device;

use super::named::{overlays_dir, Lock, OverlayError, OverlayRecord};
use super::{BlockMap, Overlay, State, BS};

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
    let bytes = match fs::read(dir.join("overlay.json")) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(OverlayError::NotFound(name.to_owned()))
        }
        Err(e) => return Err(io_err(e)),
    };
    let record: OverlayRecord = serde_json::from_slice(&bytes)
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    let lock = Lock::try_exclusive(&dir.join("lock"))
        .map_err(io_err)?
        .ok_or_else(|| OverlayError::Busy(name.to_owned()))?;
    if record.image_fingerprint != fingerprint {
        return Err(OverlayError::WrongImage {
            name: name.to_owned(),
            image: record.image.clone(),
            fingerprint: record.image_fingerprint.clone(),
            wanted: record.image.clone(),
            wanted_fingerprint: fingerprint.to_owned(),
        });
    }
    let blocks = base.size().div_ceil(BS);
    let map = match BlockMap::load(&dir.join("map"), blocks) {
        Ok(m) => m,
        // Created, but never flushed: nothing acknowledged as durable.
        Err(e) if e.kind() == io::ErrorKind::NotFound => BlockMap::new(blocks),
        Err(e) => return Err(io_err(e)),
    };
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
