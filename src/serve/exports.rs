//! The store's images as NBD exports: listed live from the store, opened
//! lazily, and cached so the layout is computed once per image.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use tessera_nbd::{Export, ExportInfo, Exports};

use super::device::{describe, ImageExport};
use crate::store::Store;

type Slot = Arc<Mutex<Option<Arc<ImageExport>>>>;

pub struct StoreExports {
    store: Store,
    /// Only these names, if given (`--export`); otherwise every image.
    only: Option<Vec<String>>,
    /// What the empty export name means, if anything.
    default: Option<String>,
    /// One slot per name: a connection that finds it empty builds the image
    /// while holding the slot's lock, so concurrent first opens of one image
    /// wait for a single build and other images are not held up. Failures
    /// are not cached; the next open tries again.
    cache: Mutex<HashMap<String, Slot>>,
}

impl StoreExports {
    pub fn new(store: Store, only: Option<Vec<String>>, default: Option<String>) -> Self {
        StoreExports {
            store,
            only,
            default,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn names(&self) -> io::Result<Vec<String>> {
        match &self.only {
            Some(names) => Ok(names.clone()),
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
        let known = match &self.only {
            Some(names) => names.iter().any(|n| n == name),
            None => {
                crate::image::validate_name(name).is_ok() && self.store.image_path(name).exists()
            }
        };
        if !known {
            return Ok(None);
        }
        let slot = self.slot(name);
        let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        let device = match &*guard {
            Some(dev) => dev.clone(),
            None => {
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
        Ok(Some(Export {
            name: name.to_string(),
            device: device as Arc<dyn tessera_nbd::Device>,
        }))
    }
}
