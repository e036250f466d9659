//! Persistent overlays kept in the store, by name.
//!
//! ```text
//! $STORE/overlays/NAME/
//!     overlay.json   {"format":1,"name","image","image_fingerprint","size","created"}
//!     data           sparse file: block i of the device at byte i*4096
//!     map            the block map (see `map.rs`), replaced atomically on flush
//!     lock           flock(LOCK_EX) held while a client is attached
//! ```
//!
//! An overlay belongs to the image it was created on: `image_fingerprint` hashes the
//! image's trees and synthesis options, and attaching to anything else is refused.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tessera_nbd::Device;
use thiserror::Error;

use super::{BlockMap, Overlay, BS};

const FORMAT: u32 = 1;

#[derive(Debug, Error)]
pub enum OverlayError {
    #[error("invalid overlay name {0:?}: use letters, digits, '.', '_' and '-'")]
    BadName(String),
    #[error("overlay {name:?} belongs to image {image:?} (fingerprint {fingerprint}), not {wanted:?} ({wanted_fingerprint})")]
    WrongImage {
        name: String,
        image: String,
        fingerprint: String,
        wanted: String,
        wanted_fingerprint: String,
    },
    #[error("overlay {0:?} is attached by another client")]
    Busy(String),
    #[error("overlay {0:?} does not exist")]
    NotFound(String),
    #[error("overlay {name:?}: {source}")]
    Io { name: String, source: io::Error },
}

impl From<OverlayError> for io::Error {
    fn from(e: OverlayError) -> io::Error {
        let kind = match e {
            OverlayError::Busy(_) => io::ErrorKind::ResourceBusy,
            OverlayError::NotFound(_) => io::ErrorKind::NotFound,
            // A refusal by policy (NBD_REP_ERR_POLICY), not a malformed request.
            OverlayError::WrongImage { .. } => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e.to_string())
    }
}

/// What `overlay.json` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayRecord {
    pub format: u32,
    pub name: String,
    pub image: String,
    pub image_fingerprint: String,
    pub size: u64,
    pub created: i64,
}

/// An overlay as listed by `tessera overlay list/show`.
#[derive(Debug, Clone)]
pub struct OverlayInfo {
    pub record: OverlayRecord,
    /// Blocks that differ from the image (per the last flushed map).
    pub changed_blocks: u64,
    /// Bytes the data file occupies on disk.
    pub data_bytes: u64,
    pub attached: bool,
}

pub fn overlays_dir(store_root: &Path) -> PathBuf {
    store_root.join("overlays")
}

fn check_name(name: &str) -> Result<(), OverlayError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(OverlayError::BadName(name.to_owned()))
    }
}

/// An overlay's `lock` file, flocked exclusively: held by whoever has the overlay open (a
/// server's client, `overlay commit`) for as long as the file stays open.
pub(super) struct Lock {
    _file: File,
}

impl Lock {
    /// The lock, or `None` if someone else holds it.
    pub(super) fn try_exclusive(path: &Path) -> io::Result<Option<Lock>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // SAFETY: flock on a descriptor we own; the lock lives as long as the File.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(Some(Lock { _file: f }));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(err)
        }
    }
}

impl OverlayRecord {
    /// Refuses attaching this overlay to anything but the image it was made on.
    pub(super) fn check_image(&self, image: &str, fingerprint: &str) -> Result<(), OverlayError> {
        if self.image == image && self.image_fingerprint == fingerprint {
            return Ok(());
        }
        Err(OverlayError::WrongImage {
            name: self.name.clone(),
            image: self.image.clone(),
            fingerprint: self.image_fingerprint.clone(),
            wanted: image.to_owned(),
            wanted_fingerprint: fingerprint.to_owned(),
        })
    }
}

/// The record of the overlay `name` in `dir`; `None` if it was never created.
pub(super) fn read_record(dir: &Path, name: &str) -> Result<Option<OverlayRecord>, OverlayError> {
    let io_err = |source| OverlayError::Io {
        name: name.to_owned(),
        source,
    };
    let bytes = match fs::read(dir.join("overlay.json")) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))
}

/// The overlay's last saved block map, or an empty one if it never saved one: created
/// but never flushed, so nothing was acknowledged as durable yet.
pub(super) fn load_map(dir: &Path, name: &str, blocks: u64) -> Result<BlockMap, OverlayError> {
    match BlockMap::load(&dir.join("map"), blocks) {
        Ok(m) => Ok(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BlockMap::new(blocks)),
        Err(source) => Err(OverlayError::Io {
            name: name.to_owned(),
            source,
        }),
    }
}

/// Whether the overlay `name` exists (has a record).
pub fn exists(store_root: &Path, name: &str) -> bool {
    check_name(name).is_ok()
        && overlays_dir(store_root)
            .join(name)
            .join("overlay.json")
            .exists()
}

/// The records of every overlay, read cheaply (no block maps), skipping unreadable ones.
pub fn records(store_root: &Path) -> Vec<OverlayRecord> {
    let Ok(dir) = fs::read_dir(overlays_dir(store_root)) else {
        return Vec::new();
    };
    let mut out: Vec<OverlayRecord> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| fs::read(e.path().join("overlay.json")).ok())
        .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Attach `name` over `base` (image `image` with `fingerprint`), creating it if new and
/// `create` allows.
pub fn attach(
    store_root: &Path,
    name: &str,
    image: &str,
    fingerprint: &str,
    base: Arc<dyn Device>,
    create: bool,
) -> Result<Overlay, OverlayError> {
    check_name(name)?;
    let io_err = |source| OverlayError::Io {
        name: name.to_owned(),
        source,
    };
    let dir = overlays_dir(store_root).join(name);
    // An overlay of another image is refused as such even while attached: that is the
    // more useful of the two reasons.
    match read_record(&dir, name)? {
        Some(record) => record.check_image(image, fingerprint)?,
        None if !create => return Err(OverlayError::NotFound(name.to_owned())),
        None => {}
    }
    fs::create_dir_all(&dir).map_err(io_err)?;
    let lock = Lock::try_exclusive(&dir.join("lock"))
        .map_err(io_err)?
        .ok_or_else(|| OverlayError::Busy(name.to_owned()))?;
    let blocks = base.size().div_ceil(BS);
    let record_path = dir.join("overlay.json");
    // Read again under the lock: another server may have created it meanwhile.
    let map = match read_record(&dir, name)? {
        Some(record) => {
            record.check_image(image, fingerprint)?;
            load_map(&dir, name, blocks)?
        }
        None => {
            let record = OverlayRecord {
                format: FORMAT,
                name: name.to_owned(),
                image: image.to_owned(),
                image_fingerprint: fingerprint.to_owned(),
                size: base.size(),
                created: now(),
            };
            let tmp = dir.join("overlay.json.tmp");
            fs::write(
                &tmp,
                serde_json::to_vec_pretty(&record).expect("serializable"),
            )
            .map_err(io_err)?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_err)?;
            fs::rename(&tmp, &record_path).map_err(io_err)?;
            File::open(&dir)
                .and_then(|f| f.sync_all())
                .map_err(io_err)?;
            BlockMap::new(blocks)
        }
    };
    let description = base
        .description()
        .map(|d| format!("{d} (persistent overlay {name:?})"));
    Overlay::open_in(base, &dir, map, true, description, Box::new(lock)).map_err(io_err)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub fn info(store_root: &Path, name: &str) -> Result<OverlayInfo, OverlayError> {
    check_name(name)?;
    let io_err = |source| OverlayError::Io {
        name: name.to_owned(),
        source,
    };
    let dir = overlays_dir(store_root).join(name);
    let record = read_record(&dir, name)?.ok_or_else(|| OverlayError::NotFound(name.to_owned()))?;
    let blocks = record.size.div_ceil(BS);
    let changed_blocks = match BlockMap::load(&dir.join("map"), blocks) {
        Ok(m) => m.changed_blocks(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err(e)),
    };
    use std::os::unix::fs::MetadataExt;
    let data_bytes = fs::metadata(dir.join("data")).map_or(0, |m| m.blocks() * 512);
    let attached = Lock::try_exclusive(&dir.join("lock"))
        .map_err(io_err)?
        .is_none();
    Ok(OverlayInfo {
        record,
        changed_blocks,
        data_bytes,
        attached,
    })
}

pub fn list(store_root: &Path) -> Result<Vec<OverlayInfo>, OverlayError> {
    let dir = overlays_dir(store_root);
    let mut names: Vec<String> = match fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(OverlayError::Io {
                name: String::new(),
                source: e,
            })
        }
    };
    names.sort();
    names
        .iter()
        .filter(|n| check_name(n).is_ok())
        .map(|n| info(store_root, n))
        .collect()
}

/// Delete an overlay; refused while a client is attached.
pub fn remove(store_root: &Path, name: &str) -> Result<(), OverlayError> {
    check_name(name)?;
    let io_err = |source| OverlayError::Io {
        name: name.to_owned(),
        source,
    };
    let dir = overlays_dir(store_root).join(name);
    if !dir.join("overlay.json").exists() {
        return Err(OverlayError::NotFound(name.to_owned()));
    }
    let _lock = Lock::try_exclusive(&dir.join("lock"))
        .map_err(io_err)?
        .ok_or_else(|| OverlayError::Busy(name.to_owned()))?;
    fs::remove_dir_all(&dir).map_err(io_err)
}
