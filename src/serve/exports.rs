//! The store's images as NBD exports: names resolved live against the store (see
//! [`super::spec`] for the grammar), images synthesized once and shared by every
//! connection and mode, and every opened export leased so `gc` leaves its data alone.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, Weak};

use tessera_nbd::{Device, Export, ExportInfo, Exports};

use super::leased::Leased;
use super::spec::{ExportName, ExportSpec, WriteMode};
use crate::blockdev::metadata::MetadataBudget;
use crate::blockdev::overlay::{named, Overlay};
use crate::blockdev::ImageExport;
use crate::store::{Leases, Store};

/// Which writable exports a server hands out, beyond read-only images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverlayPolicy {
    /// No persistent overlays (`IMAGE@OVERLAY` is refused)
    None,
    /// Persistent overlays that exist already
    Existing,
    /// Existing ones, and new ones created on first connect
    Create,
}

/// What clients may ask for.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `--export`: only these exports (and with them, only their images).
    pub only: Option<Vec<ExportSpec>>,
    pub overlays: OverlayPolicy,
    pub ephemeral: bool,
    /// Connections of this server that may attach one persistent overlay at once (they
    /// share it, and it is offered with NBD_FLAG_CAN_MULTI_CONN when more than one).
    pub overlay_connections: usize,
}

type Slot = Arc<Mutex<Option<Arc<ImageExport>>>>;
/// One slot per image name: a connection that finds it empty builds the image while
/// holding the slot's lock, so concurrent first opens of one image wait for a single build
/// and other images are not held up. Failures are not cached; the next open tries again.
pub(super) type Cache = Arc<Mutex<HashMap<String, Slot>>>;

pub struct StoreExports {
    store: Store,
    policy: Policy,
    /// What the empty export name means, if anything.
    default: Option<String>,
    leases: Arc<Leases>,
    cache: Cache,
    /// What the synthesized images' metadata may hold, together.
    budget: MetadataBudget,
    /// Persistent overlays attached by this server, by overlay name, for sharing among
    /// connections. Held while attaching, so two first connections do not race.
    attached: Mutex<HashMap<String, Weak<Overlay>>>,
}

/// Why a name is not served; the `io::ErrorKind` tells the NBD layer which error to send
/// (see [`tessera_nbd::Exports::open`]).
fn unknown(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, msg)
}

fn policy(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

impl StoreExports {
    /// Makes the empty export name (`nbd+unix://?socket=…`) mean `name`.
    pub fn with_default(mut self, name: Option<String>) -> Self {
        self.default = name;
        self
    }

    /// Holds the metadata of the images these exports synthesize under `budget` (default:
    /// no bound).
    pub fn with_metadata_budget(mut self, budget: MetadataBudget) -> Self {
        self.budget = budget;
        self
    }

    pub fn new(store: Store, policy: Policy, default: Option<String>) -> anyhow::Result<Self> {
        let leases = Leases::create(&store)?;
        Ok(StoreExports {
            store,
            policy,
            default,
            leases,
            cache: Arc::default(),
            budget: MetadataBudget::unbounded(),
            attached: Mutex::default(),
        })
    }

    /// Another set of exports under `policy` that shares this one's synthesized images and
    /// leases: a second frontend (ublk) of the same server synthesizes an image once, not
    /// once per frontend. Persistent overlays are attached per frontend (a second attach
    /// of one overlay is refused as busy).
    pub fn sharing(&self, policy: Policy) -> StoreExports {
        StoreExports {
            store: self.store.clone(),
            policy,
            default: None,
            leases: self.leases.clone(),
            cache: self.cache.clone(),
            budget: self.budget.clone(),
            attached: Mutex::default(),
        }
    }

    /// What `name` means here, or why it is refused (nothing is opened or created).
    pub fn resolve(&self, name: &str) -> io::Result<ExportName> {
        let name = match (name, &self.default) {
            ("", Some(d)) => d.as_str(),
            _ => name,
        };
        if let Some(specs) = &self.policy.only {
            let found = specs
                .iter()
                .find(|s| s.name.to_string() == name || (s.legacy && s.name.image == name));
            return match found {
                Some(spec) => Ok(spec.name.clone()),
                None => Err(unknown(format!("this server has no export named {name:?}"))),
            };
        }
        let export = ExportName::parse(name).ok_or_else(|| {
            unknown(format!(
                "{name:?} is not an export name: use IMAGE, IMAGE@OVERLAY or IMAGE+ephemeral"
            ))
        })?;
        if crate::image::validate_name(&export.image).is_err()
            || !self.store.image_path(&export.image).exists()
        {
            return Err(unknown(format!("no image named {:?}", export.image)));
        }
        match &export.mode {
            WriteMode::ReadOnly => {}
            WriteMode::Ephemeral if self.policy.ephemeral => {}
            WriteMode::Ephemeral => {
                return Err(policy(format!(
                    "{name:?}: this server does not serve ephemeral overlays (start it with --ephemeral)"
                )))
            }
            WriteMode::Persistent { overlay } => match self.policy.overlays {
                OverlayPolicy::Create => {}
                OverlayPolicy::Existing if named::exists(self.store.root(), overlay) => {}
                OverlayPolicy::Existing => {
                    return Err(policy(format!(
                        "{name:?}: overlay {overlay:?} does not exist and this server does not create overlays (--overlays create)"
                    )))
                }
                OverlayPolicy::None => {
                    return Err(policy(format!(
                        "{name:?}: this server does not serve persistent overlays (start it with --overlays existing or --overlays create)"
                    )))
                }
            },
        }
        Ok(export)
    }

    fn slot(&self, image: &str) -> Slot {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry(image.to_string()).or_default().clone()
    }

    /// The synthesized image `image`, built now unless a build of the same record is
    /// cached. Returns it with a lease on its trees, taken before the store lock is let go
    /// so a concurrent `image rm` + `gc` cannot remove them in between.
    fn image(&self, image: &str) -> io::Result<(Arc<ImageExport>, crate::store::LeaseGuard)> {
        let lock = self.store.lock(false).map_err(io::Error::other)?;
        let record = match crate::image::load(&self.store, image) {
            Ok(r) => r,
            Err(crate::image::ImageError::Store(crate::store::StoreError::MissingImage {
                ..
            })) => return Err(unknown(format!("no image named {image:?}"))),
            Err(e) => return Err(io::Error::other(format!("{e:#}"))),
        };
        // An image removed and re-created under the same name while we serve must not be
        // answered from the old layout: its record's fingerprint tells them apart.
        let current = record.fingerprint();
        let slot = self.slot(image);
        let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        let device = match &*guard {
            Some(dev) if dev.fingerprint() == current => dev.clone(),
            _ => {
                let started = std::time::Instant::now();
                let dev = ImageExport::open(&self.store, image, &self.budget)
                    .map_err(|e| io::Error::other(format!("{e:#}")))?;
                tracing::info!(
                    image,
                    size = dev.size(),
                    ms = started.elapsed().as_millis() as u64,
                    "image synthesized"
                );
                let dev = Arc::new(dev);
                *guard = Some(dev.clone());
                dev
            }
        };
        drop(guard);
        let lease = self
            .leases
            .hold(&record.trees, &lock)
            .map_err(io::Error::other)?;
        Ok((device, lease))
    }

    fn open_export(&self, name: &str) -> io::Result<Export> {
        let export = self.resolve(name)?;
        let (image, lease) = self.image(&export.image)?;
        let base = image.clone() as Arc<dyn Device>;
        let device: Arc<dyn Device> = match &export.mode {
            WriteMode::ReadOnly => base,
            WriteMode::Ephemeral => Arc::new(Overlay::ephemeral(
                base,
                &self.store.root().join("run").join("ephemeral"),
            )?),
            WriteMode::Persistent { overlay } => self.persistent(overlay, &export.image, &image)?,
        };
        let device = Leased::new(device, lease, self.cache.clone(), &self.store, &image);
        Ok(Export {
            name: export.to_string(),
            device: Arc::new(device),
        })
    }

    /// The persistent overlay `name` on `image`: the one this server has attached already,
    /// if it admits another connection, else a new attachment.
    fn persistent(
        &self,
        name: &str,
        image_name: &str,
        image: &Arc<ImageExport>,
    ) -> io::Result<Arc<dyn Device>> {
        let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(overlay) = attached.get(name).and_then(Weak::upgrade) {
            // Every holder but this `overlay` is a connection.
            let users = Arc::strong_count(&overlay) - 1;
            if overlay.base_is(image) && users < self.policy.overlay_connections {
                return Ok(overlay);
            }
            if overlay.base_is(image) {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "overlay {name:?} is attached by another client ({users} connection(s); this server allows {} per overlay: --overlay-connections)",
                        self.policy.overlay_connections
                    ),
                ));
            }
        }
        let create = self.policy.overlays == OverlayPolicy::Create || self.policy.only.is_some();
        // This server's last connection to the overlay may be closing right now: its last
        // reference is gone but its drop is still saving the block map, holding the
        // overlay's lock. A client that reconnects at once (nbdcopy reading back what it
        // wrote) waits for that instead of being told another client holds the overlay.
        let closing_here = attached.get(name).is_some_and(|w| w.strong_count() == 0);
        let started = std::time::Instant::now();
        let overlay = loop {
            let base = image.clone() as Arc<dyn Device>;
            match named::attach(
                self.store.root(),
                name,
                image_name,
                image.fingerprint(),
                base,
                create,
            ) {
                Err(named::OverlayError::Busy(_))
                    if closing_here && started.elapsed() < CLOSING_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => break other?,
            }
        };
        let overlay = Arc::new(if self.policy.overlay_connections > 1 {
            overlay.share()
        } else {
            overlay
        });
        attached.retain(|_, w| w.strong_count() > 0);
        attached.insert(name.to_owned(), Arc::downgrade(&overlay));
        Ok(overlay)
    }

    fn info(&self, export: ExportName) -> ExportInfo {
        let description =
            crate::image::load(&self.store, &export.image)
                .ok()
                .map(|r| match &export.mode {
                    WriteMode::ReadOnly => r.describe(),
                    WriteMode::Ephemeral => format!("{} (ephemeral overlay)", r.describe()),
                    WriteMode::Persistent { overlay } => {
                        format!("{} (persistent overlay {overlay:?})", r.describe())
                    }
                });
        ExportInfo {
            name: export.to_string(),
            description,
        }
    }
}

/// How long an open waits for this server's own closing attachment of an overlay to let
/// go of it (see [`StoreExports::persistent`]).
const CLOSING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Exports for StoreExports {
    /// Every name a client can ask for: with `--export`, those; otherwise each image, its
    /// `+ephemeral` form if allowed, and its existing persistent overlays if allowed (new
    /// ones, under `--overlays create`, can be asked for but not listed).
    fn list(&self) -> Vec<ExportInfo> {
        if let Some(specs) = &self.policy.only {
            return specs
                .iter()
                .map(|s| {
                    let mut info = self.info(s.name.clone());
                    if s.legacy {
                        info.name = s.name.image.clone();
                    }
                    info
                })
                .collect();
        }
        let images = self.store.list_images().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list images");
            Vec::new()
        });
        let mut overlays: HashMap<String, Vec<String>> = HashMap::new();
        if self.policy.overlays != OverlayPolicy::None {
            for r in named::records(self.store.root()) {
                overlays.entry(r.image).or_default().push(r.name);
            }
        }
        let mut out = Vec::new();
        for image in images {
            out.push(self.info(ExportName::read_only(&image)));
            if self.policy.ephemeral {
                out.push(self.info(ExportName {
                    image: image.clone(),
                    mode: WriteMode::Ephemeral,
                }));
            }
            for overlay in overlays.remove(&image).unwrap_or_default() {
                out.push(self.info(ExportName {
                    image: image.clone(),
                    mode: WriteMode::Persistent { overlay },
                }));
            }
        }
        out
    }

    fn open(&self, name: &str) -> io::Result<Option<Export>> {
        match self.open_export(name) {
            Ok(export) => Ok(Some(export)),
            Err(e) => {
                tracing::warn!(export = name, reason = %e, "export refused");
                Err(e)
            }
        }
    }

    fn exists(&self, name: &str) -> io::Result<bool> {
        match self.resolve(name) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}
