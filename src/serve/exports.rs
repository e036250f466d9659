//! The store's images as NBD exports: listed live from the store, opened
//! lazily, and cached so the layout is computed once per image.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use tessera_nbd::{Export, ExportInfo, Exports};

use super::device::{describe, fingerprint, ImageExport};
use super::spec::{ExportSpec, WriteMode};
use crate::blockdev::overlay::{named, Overlay};
use crate::store::Store;

type Slot = Arc<Mutex<Option<Arc<ImageExport>>>>;

pub struct StoreExports {
    store: Store,
    /// Only these images, with their write modes, if given (`--export`); otherwise every
    /// image, read-only.
    only: Option<Vec<ExportSpec>>,
    /// What the empty export name means, if anything.
    default: Option<String>,
    /// One slot per name: a connection that finds it empty builds the image
    /// while holding the slot's lock, so concurrent first opens of one image
    /// wait for a single build and other images are not held up. Failures
    /// are not cached; the next open tries again.
    cache: Mutex<HashMap<String, Slot>>,
}

impl StoreExports {
    pub fn new(store: Store, only: Option<Vec<ExportSpec>>, default: Option<String>) -> Self {
        StoreExports {
            store,
            only,
            default,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn names(&self) -> io::Result<Vec<String>> {
        match &self.only {
            Some(specs) => Ok(specs.iter().map(|s| s.image.clone()).collect()),
            None => self.store.list_images().map_err(io::Error::other),
        }
    }

    fn slot(&self, name: &str) -> Slot {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry(name.to_string()).or_default().clone()
    }
}

impl Exports for StoreExports {
    fn list(&self) -> Vec<ExportInfo> {
        let names = self.names().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list images");
            Vec::new()
        });
        names
            .into_iter()
            .map(|name| ExportInfo {
                description: crate::image::load(&self.store, &name)
                    .ok()
                    .map(|r| describe(&r)),
                name,
            })
            .collect()
    }

    fn open(&self, name: &str) -> io::Result<Option<Export>> {
        let name = match (name, &self.default) {
            ("", Some(d)) => d.as_str(),
            _ => name,
        };
        let mode = match &self.only {
            Some(specs) => match specs.iter().find(|s| s.image == name) {
                Some(spec) => spec.mode.clone(),
                None => return Ok(None),
            },
            None if crate::image::validate_name(name).is_ok()
                && self.store.image_path(name).exists() =>
            {
                WriteMode::ReadOnly
            }
            None => return Ok(None),
        };
        let slot = self.slot(name);
        // An image removed and re-created under the same name while we serve must not
        // be answered from the old layout: its record's fingerprint tells them apart.
        let record = crate::image::load(&self.store, name)
            .map_err(|e| io::Error::other(format!("{e:#}")))?;
        let current = fingerprint(&record);
        let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        let device = match &*guard {
            Some(dev) if dev.fingerprint() == current => dev.clone(),
            _ => {
                let started = std::time::Instant::now();
                let dev = ImageExport::open(&self.store, name)
                    .map_err(|e| io::Error::other(format!("{e:#}")))?;
                tracing::info!(
                    export = name,
                    size = tessera_nbd::Device::size(&dev),
                    ms = started.elapsed().as_millis() as u64,
                    "image synthesized"
                );
                let dev = Arc::new(dev);
                *guard = Some(dev.clone());
                dev
            }
        };
        drop(guard);
        let base = device.clone() as Arc<dyn tessera_nbd::Device>;
        let device: Arc<dyn tessera_nbd::Device> = match mode {
            WriteMode::ReadOnly => base,
            WriteMode::Ephemeral => Arc::new(Overlay::ephemeral(
                base,
                &self.store.root().join("run").join("ephemeral"),
            )?),
            WriteMode::Persistent { overlay } => {
                let fingerprint = device.fingerprint().to_owned();
                let root = self.store.root();
                Arc::new(named::attach(root, &overlay, name, &fingerprint, base)?)
            }
        };
        Ok(Some(Export {
            name: name.to_string(),
            device,
        }))
    }
}
