//! `tessera serve --ublk`: the store's images as local block devices (`/dev/ublkbN`).
//!
//! The second frontend beside NBD, over the same devices: an export name (`IMAGE`,
//! `IMAGE@OVERLAY`, `IMAGE+ephemeral`) is opened through [`StoreExports`] exactly as an
//! NBD client's would be, so leases, overlays and their FLUSH/FUA durability come with it.
//! Each device has its own control thread and queue threads outside tokio (`device`);
//! requests become [`tessera_nbd::Device`] calls (`target`); a Unix socket in the
//! store's `run/` directory lets `tessera ublk add/list/del` manage devices of the running
//! server ([`control`]).

pub mod control;
#[cfg(feature = "ublk")]
mod device;
#[cfg(not(feature = "ublk"))]
#[path = "absent.rs"]
mod device;
mod info;
#[cfg(feature = "ublk")]
mod reads;
#[cfg(feature = "ublk")]
mod recover;
#[cfg(feature = "ublk")]
mod target;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tessera_nbd::Exports;

use device::{Start, UblkDevice};
pub use info::DeviceInfo;

use crate::serve::{ExportName, OverlayPolicy, Policy, StoreExports, WriteMode};
use crate::store::Store;

/// The kernel's ublk control device, there once `ublk_drv` is loaded.
const CONTROL_DEV: &str = "/dev/ublk-control";

/// Why this machine cannot make ublk devices, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error(
        "this tessera was built without ublk: build it with `cargo build --release --features ublk` (libublk's bindgen needs libclang-dev)"
    )]
    NotBuilt,
    #[error("ublk devices need root (CAP_SYS_ADMIN to create block devices): run tessera as root")]
    NotRoot,
    #[error(
        "the ublk_drv kernel module is not loaded ({CONTROL_DEV} does not exist): run `modprobe ublk_drv` as root (Linux 6.0 or later, CONFIG_BLK_DEV_UBLK)"
    )]
    NoDriver,
    #[error("cannot open {CONTROL_DEV}: {0}")]
    Control(std::io::Error),
}

/// Checks, before anything is opened, that devices can be made here.
pub fn check_available() -> Result<(), Unavailable> {
    if cfg!(not(feature = "ublk")) {
        return Err(Unavailable::NotBuilt);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Unavailable::NotRoot);
    }
    if !Path::new(CONTROL_DEV).exists() {
        return Err(Unavailable::NoDriver);
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL_DEV)
        .map(drop)
        .map_err(Unavailable::Control)
}

/// Devices a dead server left behind (its process gone, the device stopped, so no recovery
/// can pick it up) keep their id and `/dev/ublkcN` until someone deletes them: delete them.
/// On a thread of its own, since DEL_DEV waits while a filesystem on one is still mounted.
#[cfg(feature = "ublk")]
fn sweep_dead_devices() {
    let ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if ids.is_empty() {
        return;
    }
    let sweep = move || {
        for id in ids {
            let Ok(ctrl) = libublk::ctrl::UblkCtrl::new_simple(id as i32) else {
                continue;
            };
            let info = ctrl.dev_info();
            let pid = info.ublksrv_pid;
            // STOP_DEV (ours, or the driver's once a server is gone) leaves -1; a pid of 0 is
            // a device some server is still setting up: not ours to judge.
            // SAFETY: signal 0 only asks whether the process exists.
            let gone = pid == -1 || (pid > 0 && unsafe { libc::kill(pid, 0) } != 0);
            if u32::from(info.state) == libublk::sys::UBLK_S_DEV_DEAD && gone {
                eprintln!("ublk: deleting /dev/ublkc{id}, left stopped by a server that is gone");
                if let Err(e) = ctrl.del_dev() {
                    tracing::warn!(id, error = %e, "cannot delete a dead ublk device");
                }
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("tessera-ublk-sweep".into())
        .spawn(sweep)
    {
        tracing::warn!(error = %e, "cannot start the sweep of dead ublk devices");
    }
}

/// `tessera serve`'s ublk options.
#[derive(Debug, clap::Args)]
pub struct UblkArgs {
    /// Also serve EXPORT as a local block device /dev/ublkbN, created at start: IMAGE
    /// (read-only), IMAGE@OVERLAY (persistent overlay, created if new) or IMAGE+ephemeral;
    /// repeatable. Needs root and the ublk_drv module. Opens the control socket
    /// STORE/run/ublk.sock for `tessera ublk add|list|del`
    #[arg(long = "ublk", value_name = "EXPORT", value_parser = parse_export)]
    pub exports: Vec<String>,
    /// Open the ublk control socket even without --ublk, for `tessera ublk add` later
    #[arg(long)]
    pub ublk_control: bool,
    /// Queues per ublk device, each served by its own thread (the driver allows no more
    /// than the machine has CPUs)
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=2))]
    pub ublk_queues: u16,
    /// Devices of read-only exports (IMAGE) outlive a crash of this server: their I/O
    /// waits, and a mounted filesystem stays mounted, until the next `tessera serve
    /// --ublk-recovery` on this store takes them over (at start). Without it a dead
    /// server's devices are removed and their I/O fails
    #[arg(long)]
    pub ublk_recovery: bool,
}

impl UblkArgs {
    /// True if the server has a ublk side at all.
    pub fn wanted(&self) -> bool {
        !self.exports.is_empty() || self.ublk_control
    }
}

fn parse_export(s: &str) -> Result<String, String> {
    ExportName::parse(s)
        .map(|n| n.to_string())
        .ok_or_else(|| format!("invalid export {s:?}: use IMAGE, IMAGE@OVERLAY or IMAGE+ephemeral"))
}

/// The devices of one server.
pub struct Ublk {
    exports: StoreExports,
    /// The store's root, absolute: recorded with each device so that only a server of
    /// this store recovers it.
    store: PathBuf,
    devices: Mutex<BTreeMap<u32, UblkDevice>>,
    queues: u16,
    recovery: bool,
}

impl Ublk {
    /// A frontend for `store`; `queues` per device (1 or 2). The operator names exports
    /// explicitly, so every mode is allowed and persistent overlays are created on first
    /// use, as with `serve --export`; the rest of the server's `policy` applies.
    pub fn new(
        store: &Path,
        nbd: &StoreExports,
        queues: u16,
        recovery: bool,
        policy: &Policy,
    ) -> anyhow::Result<Ublk> {
        check_available()?;
        #[cfg(feature = "ublk")]
        sweep_dead_devices();
        let policy = Policy {
            only: None,
            overlays: OverlayPolicy::Create,
            ephemeral: true,
            ..policy.clone()
        };
        let store = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_owned());
        Ok(Ublk {
            exports: nbd.sharing(policy),
            store,
            devices: Mutex::default(),
            queues,
            recovery,
        })
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, UblkDevice>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens `export` and makes a device for it.
    pub fn add(&self, export: &str) -> Result<DeviceInfo, String> {
        let Some(name) = ExportName::parse(export) else {
            return Err(format!(
                "{export:?} is not an export name: use IMAGE, IMAGE@OVERLAY or IMAGE+ephemeral"
            ));
        };
        // Only read-only devices: an overlay keeps its block map in memory until FLUSH, so a
        // recovered writable device could silently lose acknowledged writes under a
        // filesystem that stayed mounted.
        let recoverable = self.recovery && name.mode == WriteMode::ReadOnly;
        self.make(export, Start::New { recoverable }, None)
            .map_err(|(Made::NoExport(e) | Made::NotAdded(e))| e)
    }

    /// Takes over device `id`, quiesced since its server died, serving `export` again if
    /// it is still the image `was` (its `identity`, when the device recorded one).
    /// A device no server of this store can serve (its export is gone, is now another
    /// image, or is writable) is
    /// stopped, so that its waiting I/O fails instead of waiting forever; one this server
    /// could not take over now (another server holds it, the export cannot be opened) is
    /// left waiting.
    pub fn recover(&self, id: u32, export: &str, was: Option<&str>) -> Result<DeviceInfo, String> {
        let why = match ExportName::parse(export) {
            Some(n) if n.mode == WriteMode::ReadOnly => {
                match self.make(export, Start::Recover(id), was) {
                    Ok(info) => return Ok(info),
                    Err(Made::NotAdded(e)) => {
                        return Err(format!("{e}; the device is left waiting"))
                    }
                    Err(Made::NoExport(e)) => e,
                }
            }
            _ => format!("{export:?} is not a read-only export: not recoverable"),
        };
        Err(match device::stop_waiting(id) {
            Ok(()) => format!("{why}; stopped the device: its waiting I/O fails"),
            Err(e) => format!("{why}; cannot stop the device either ({e}): its I/O still waits"),
        })
    }

    /// Opens `export` and makes a device for it; with `was`, only if the export is still
    /// that image.
    fn make(&self, export: &str, start: Start, was: Option<&str>) -> Result<DeviceInfo, Made> {
        let opened = match self.exports.open(export) {
            Ok(Some(e)) => e,
            Ok(None) => return Err(Made::NoExport(format!("no export named {export:?}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Made::NoExport(format!("cannot open {export}: {e}")))
            }
            // Perhaps passing (a remote store out of reach): a recovery may still succeed.
            Err(e) => return Err(Made::NotAdded(format!("cannot open {export}: {e}"))),
        };
        let now = identity(&*opened.device);
        if let Some(was) = was.filter(|&was| was != now) {
            // The filesystem still mounted on the device is of the image it served: another
            // one under it would be read as corrupt metadata and wrong file contents.
            return Err(Made::NoExport(format!(
                "{export} is now another image ({now}), not the one the device served ({was})"
            )));
        }
        let dev = UblkDevice::add(&opened.name, &self.store, opened.device, self.queues, start)
            .map_err(|e| Made::NotAdded(e.to_string()))?;
        let info = dev.info.clone();
        tracing::info!(device = info.block, export, "ublk device added");
        self.devices().insert(info.id, dev);
        Ok(info)
    }

    pub fn list(&self) -> Vec<DeviceInfo> {
        self.devices().values().map(|d| d.info.clone()).collect()
    }

    /// Stops and deletes the device named `which` (`/dev/ublkbN`, `ublkbN` or `N`), unless
    /// it is mounted or otherwise held open exclusively.
    pub fn del(&self, which: &str) -> Result<DeviceInfo, String> {
        let id = parse_device(which).ok_or_else(|| {
            format!("{which:?} is not a ublk device: use /dev/ublkbN, ublkbN or N")
        })?;
        let mut devices = self.devices();
        let dev = devices.get(&id).ok_or_else(|| {
            format!("this server has no device /dev/ublkb{id} (see `tessera ublk list`)")
        })?;
        if dev.in_use() {
            return Err(format!(
                "/dev/ublkb{id} ({}) is mounted or held open: unmount it first; the device is left as it was",
                dev.info.export
            ));
        }
        let dev = devices.remove(&id).expect("looked up above");
        drop(devices);
        let info = dev.info.clone();
        dev.stop();
        Ok(info)
    }

    /// Stops and deletes every device that nothing holds; devices still mounted are left
    /// to the kernel and reported, one line each, rather than waited for.
    pub fn shutdown(&self) -> Vec<String> {
        let devices = std::mem::take(&mut *self.devices());
        let mut report = Vec::new();
        for (_, dev) in devices {
            if dev.in_use() {
                report.push(format!(
                    "{} ({}) is still mounted or open: left in place; once this server is gone the kernel removes its disk (I/O fails, the filesystem shuts down), and the next tessera serve --ublk deletes the rest",
                    dev.info.block, dev.info.export
                ));
                dev.abandon();
            } else {
                dev.stop();
            }
        }
        report
    }
}

/// What a device served, as its JSON records it for recovery: the image's description
/// (name, trees, filesystem UUID) and the device's size.
pub(crate) fn identity(dev: &dyn tessera_nbd::Device) -> String {
    format!(
        "{}, {} bytes",
        dev.description().unwrap_or_default(),
        dev.size()
    )
}

/// Why [`Ublk::make`] made no device.
enum Made {
    /// The store has no such export (or, recovering, no longer the same image): nothing
    /// was sent to the driver.
    NoExport(String),
    /// The export could not be opened, the driver refused, or the device's threads failed.
    NotAdded(String),
}

/// `/dev/ublkb3`, `ublkb3`, `3` → 3.
pub fn parse_device(s: &str) -> Option<u32> {
    let s = s.strip_prefix("/dev/").unwrap_or(s);
    let s = s.strip_prefix("ublkb").unwrap_or(s);
    s.parse().ok()
}

/// A server's ublk side: its devices and the control socket. Dropping it stops the
/// devices (see [`Ublk::shutdown`]) and removes the socket.
pub struct UblkServer {
    ublk: Arc<Ublk>,
    control: Option<control::Listener>,
}

impl UblkServer {
    /// Makes a device for each of `args.exports` (printing its path), then opens the
    /// control socket. Fails, with every device made so far deleted, on the first refusal.
    pub fn start(
        store: &Store,
        nbd: &StoreExports,
        args: &UblkArgs,
        policy: &Policy,
    ) -> anyhow::Result<UblkServer> {
        let mut server = UblkServer {
            ublk: Arc::new(Ublk::new(
                store.root(),
                nbd,
                args.ublk_queues,
                args.ublk_recovery,
                policy,
            )?),
            control: None,
        };
        #[cfg(feature = "ublk")]
        if args.ublk_recovery {
            for (id, export, was) in recover::quiesced(&server.ublk.store) {
                match server.ublk.recover(id, &export, was.as_deref()) {
                    Ok(info) => println!("recovered {}", describe(&info)),
                    Err(e) => eprintln!("ublk: cannot recover /dev/ublkb{id} ({export}): {e}"),
                }
            }
            // Deletes the devices stopped above once nothing holds them.
            sweep_dead_devices();
        }
        for export in &args.exports {
            let info = server.ublk.add(export).map_err(anyhow::Error::msg)?;
            println!("{}", describe(&info));
        }
        let control = control::Listener::bind(&control::socket_path(store), server.ublk.clone())?;
        println!(
            "ublk control socket: {} (tessera ublk add|list|del)",
            control.path().display()
        );
        server.control = Some(control);
        Ok(server)
    }

    /// Stops the devices and removes the socket, reporting devices left mounted.
    pub fn shutdown(self) {}
}

impl Drop for UblkServer {
    fn drop(&mut self) {
        if let Some(control) = self.control.take() {
            control.close();
        }
        for line in self.ublk.shutdown() {
            eprintln!("ublk: {line}");
        }
    }
}

/// One line per device, as `serve` and `ublk add` print it.
pub fn describe(info: &DeviceInfo) -> String {
    format!(
        "{}: {} ({}, {} MiB, {} queue(s) x {})",
        info.block,
        info.export,
        if info.read_only {
            "read-only"
        } else {
            "writable"
        },
        info.size >> 20,
        info.queues,
        info.depth
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_take_the_three_spellings() {
        assert_eq!(parse_device("/dev/ublkb3"), Some(3));
        assert_eq!(parse_device("ublkb12"), Some(12));
        assert_eq!(parse_device("0"), Some(0));
        assert_eq!(parse_device("/dev/sda"), None);
        assert_eq!(parse_device("ublkc1"), None);
    }
}
