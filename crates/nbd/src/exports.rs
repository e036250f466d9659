//! Export lookup: which names a client may ask for, and what they resolve to.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use crate::device::Device;

/// One entry of NBD_OPT_LIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
}

/// An opened export: its canonical name and the device behind it.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub device: Arc<dyn Device>,
}

/// The set of exports a server offers.
///
/// `open` may be slow (a synthesized image computes its layout on first use),
/// so the server calls it from a blocking thread. Implementations should
/// cache: every connection opens its export.
pub trait Exports: Send + Sync + 'static {
    /// Names (and descriptions) for NBD_OPT_LIST.
    fn list(&self) -> Vec<ExportInfo>;

    /// Resolves a client-supplied name. The empty name means "the default
    /// export", if the implementation has one. `Ok(None)` means unknown.
    ///
    /// An error's message goes to the client; its kind picks the NBD error:
    /// `PermissionDenied` and `ResourceBusy` (refused by policy, or in use)
    /// send `NBD_REP_ERR_POLICY`, `Unsupported` sends `NBD_REP_ERR_UNSUP`, and
    /// anything else `NBD_REP_ERR_UNKNOWN`.
    fn open(&self, name: &str) -> io::Result<Option<Export>>;

    /// Whether `name` would resolve, without opening it: used where the spec
    /// only asks whether an export exists (NBD_OPT_*_META_CONTEXT), so that
    /// opening has no side effects there (attaching an overlay, say).
    fn exists(&self, name: &str) -> io::Result<bool> {
        self.open(name).map(|e| e.is_some())
    }
}

/// A fixed map of names to devices.
#[derive(Default, Clone)]
pub struct ExportMap {
    devices: BTreeMap<String, Arc<dyn Device>>,
    default: Option<String>,
}

impl ExportMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, device: Arc<dyn Device>) -> &mut Self {
        self.devices.insert(name.into(), device);
        self
    }

    /// Makes the empty export name resolve to `name`.
    pub fn set_default(&mut self, name: impl Into<String>) -> &mut Self {
        self.default = Some(name.into());
        self
    }
}

impl Exports for ExportMap {
    fn list(&self) -> Vec<ExportInfo> {
        self.devices
            .iter()
            .map(|(name, dev)| ExportInfo {
                name: name.clone(),
                description: dev.description(),
            })
            .collect()
    }

    fn open(&self, name: &str) -> io::Result<Option<Export>> {
        let name = match (name, &self.default) {
            ("", Some(default)) => default.as_str(),
            _ => name,
        };
        Ok(self.devices.get(name).map(|device| Export {
            name: name.to_string(),
            device: device.clone(),
        }))
    }
}
