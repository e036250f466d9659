//! One ublk device: a control thread that creates it, runs its queue threads and deletes it.
//!
//! libublk's control ring belongs to the thread that made it (`UblkCtrl` panics when used
//! from another), so every control command of a device is sent from that device's own
//! thread: it adds the device, starts it, then waits for a stop message, stops it and, as
//! the `UblkCtrl` drops, deletes it. None of this runs on tokio.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use libublk::ctrl::UblkCtrlBuilder;
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use tessera_nbd::Device;

use super::target;
use super::DeviceInfo;

/// Queue depth: enough for the kernel to keep a random-read workload busy; each tag has a
/// buffer of [`IO_BUF_BYTES`].
const DEPTH: u16 = 128;
/// Largest request, which becomes the device's `max_sectors`.
const IO_BUF_BYTES: u32 = 512 << 10;
const BLOCK_SHIFT: u8 = 12;

/// How a device comes to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new device; with `recoverable`, a dead server's device waits (quiesced, its I/O
    /// queued) for a new server to take it over instead of being removed.
    New { recoverable: bool },
    /// Take over device `id`, quiesced since its server died.
    Recover(u32),
}

/// A running device; [`UblkDevice::stop`] (or dropping it) stops and deletes it.
pub struct UblkDevice {
    pub info: DeviceInfo,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Why a device is not made.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("cannot create a ublk device for {export}: {detail}")]
    Create { export: String, detail: String },
    #[error("cannot start the ublk control thread: {0}")]
    Thread(io::Error),
}

fn ublk_error(e: libublk::UblkError) -> String {
    match e {
        libublk::UblkError::OtherError(n) | libublk::UblkError::UringIOError(n) if n < 0 => {
            io::Error::from_raw_os_error(-n).to_string()
        }
        libublk::UblkError::IOError(e) => e.to_string(),
        e => e.to_string(),
    }
}

fn set_params(udev: &mut UblkDev, dev: &dyn Device, export: &str, store: &Path) {
    // Read back by the server that recovers the device (`super::recover`): only a server
    // of the same store may take it over, since another store's image of that name is
    // another filesystem under the one still mounted.
    udev.set_target_json(serde_json::json!({
        "export": export,
        "store": store,
        "image": super::identity(dev),
    }));
    let size = dev.size();
    let mut attrs = 0;
    if dev.is_read_only() {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    if dev.can_flush() {
        // Writes are acknowledged before they are durable until FLUSH or FUA, as over NBD.
        attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
        if dev.can_fua() {
            attrs |= sys::UBLK_ATTR_FUA;
        }
    }
    let max_sectors = udev.dev_info.max_io_buf_bytes >> 9;
    // A READ may become many file reads (one per object it spans) on the queue's ring.
    udev.tgt.sq_depth = 2 * DEPTH;
    udev.tgt.cq_depth = 4 * DEPTH;
    udev.tgt.dev_size = size;
    udev.tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: BLOCK_SHIFT,
            physical_bs_shift: BLOCK_SHIFT,
            io_opt_shift: BLOCK_SHIFT,
            io_min_shift: BLOCK_SHIFT,
            max_sectors,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if !dev.is_read_only() && (dev.can_trim() || dev.can_zero()) {
        udev.tgt.params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        udev.tgt.params.discard = sys::ublk_param_discard {
            discard_granularity: 1 << BLOCK_SHIFT,
            max_discard_sectors: if dev.can_trim() { u32::MAX >> 9 } else { 0 },
            max_write_zeroes_sectors: if dev.can_zero() { u32::MAX >> 9 } else { 0 },
            max_discard_segments: 1,
            ..Default::default()
        };
    }
}

impl UblkDevice {
    /// Creates and starts a device serving `dev` as `export`, with `queues` queues.
    /// Returns once `/dev/ublkbN` exists.
    pub fn add(
        export: &str,
        store: &Path,
        dev: Arc<dyn Device>,
        queues: u16,
        start: Start,
    ) -> Result<UblkDevice, AddError> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(u32, u16), String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let read_only = dev.is_read_only();
        let size = dev.size();
        let name = export.to_owned();
        let store = store.to_owned();
        let thread = std::thread::Builder::new()
            .name("tessera-ublk".into())
            .spawn(move || control_thread(name, store, dev, queues, start, ready_tx, stop_rx))
            .map_err(AddError::Thread)?;
        // The driver may give fewer queues than asked (no more than CPUs).
        let (id, queues) = match ready_rx.recv() {
            Ok(Ok(started)) => started,
            Ok(Err(detail)) => {
                let _ = thread.join();
                return Err(AddError::Create {
                    export: export.to_owned(),
                    detail,
                });
            }
            Err(_) => {
                let _ = thread.join();
                return Err(AddError::Create {
                    export: export.to_owned(),
                    detail: "the control thread ended before the device started".into(),
                });
            }
        };
        Ok(UblkDevice {
            info: DeviceInfo {
                id,
                block: format!("/dev/ublkb{id}"),
                char: format!("/dev/ublkc{id}"),
                export: export.to_owned(),
                read_only,
                size,
                queues,
                depth: DEPTH,
            },
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// True if something holds the block device open exclusively: a mounted filesystem,
    /// a device-mapper or md holder. Stopping then would take the disk from under it, and
    /// deleting would wait for the unmount.
    pub fn in_use(&self) -> bool {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&self.info.block)
        {
            Ok(_) => false,
            Err(e) => e.raw_os_error() == Some(libc::EBUSY),
        }
    }

    /// Stops and deletes the device, waiting for its threads.
    pub fn stop(mut self) {
        self.stop_now();
    }

    /// Leaves the device to the kernel: nothing more is sent on its control ring, and it
    /// fails its I/O once this process exits (see kernel-notes/ublk.md).
    pub fn abandon(mut self) {
        // Dropping the sender would read as a stop: keep it alive for the process's life.
        std::mem::forget(self.stop.take());
        self.thread = None;
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn control_thread(
    export: String,
    store: PathBuf,
    dev: Arc<dyn Device>,
    queues: u16,
    start: Start,
    ready: mpsc::Sender<Result<(u32, u16), String>>,
    stop: mpsc::Receiver<()>,
) {
    let builder = UblkCtrlBuilder::default()
        .name("tessera")
        .nr_queues(queues)
        .depth(DEPTH)
        .io_buf_bytes(IO_BUF_BYTES);
    let builder =
        match start {
            Start::New { recoverable } => builder
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .ctrl_flags(if recoverable {
                    // REISSUE: requests the dead server had taken are queued again too, so a
                    // reader sees a pause, not an error.
                    u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE)
                } else {
                    0
                }),
            Start::Recover(id) => {
                // libublk retries EBUSY (another server holds or is taking over the device)
                // for 30 s, then returns it as Ok(-EBUSY): that is a refusal too.
                let begun = libublk::ctrl::UblkCtrl::new_simple(id as i32)
                    .and_then(|c| c.start_user_recover())
                    .and_then(|r| match r {
                        r if r < 0 => Err(libublk::UblkError::OtherError(r)),
                        r => Ok(r),
                    });
                if let Err(e) = begun {
                    let _ = ready.send(Err(format!(
                        "cannot start recovering /dev/ublkb{id}: {}",
                        ublk_error(e)
                    )));
                    return;
                }
                builder
                    .id(id as i32)
                    .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            }
        };
    let ctrl = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(ublk_error(e)));
            return;
        }
    };
    let id = ctrl.dev_info().dev_id;
    let queues = ctrl.dev_info().nr_hw_queues;
    let params_dev = dev.clone();
    let params_export = export.clone();
    let started = ready.clone();
    // run_target wants a Sync closure; only this thread ever locks it.
    let stop = std::sync::Mutex::new(stop);
    let result = ctrl.run_target(
        |udev: &mut UblkDev| {
            set_params(udev, &*params_dev, &params_export, &store);
            Ok(())
        },
        move |qid, udev: &UblkDev| target::serve_queue(qid, udev, dev.clone()),
        move |ctrl| {
            let _ = started.send(Ok((id, queues)));
            // A dropped sender (the server going away without a stop) stops the device too.
            let _ = stop.lock().map(|rx| rx.recv());
            if let Err(e) = ctrl.kill_dev() {
                tracing::warn!(id, error = %ublk_error(e), "cannot stop the ublk device");
            }
        },
    );
    match result {
        Err(e) => {
            let _ = ready.send(Err(ublk_error(e)));
        }
        // libublk deletes on drop only the devices it added: a recovered one would stay,
        // stopped, its id and /dev/ublkcN taken until the next server's sweep. Its queues
        // have closed /dev/ublkcN by now, so DEL_DEV does not wait on this process.
        Ok(_) if matches!(start, Start::Recover(_)) => {
            if let Err(e) = ctrl.del_dev() {
                tracing::warn!(id, error = %ublk_error(e), "cannot delete the recovered ublk device");
            }
        }
        Ok(_) => {}
    }
    drop(ctrl);
    tracing::info!(id, export, "ublk device deleted");
}

/// Stops device `id`, quiesced and waiting for a server this one cannot be: the driver
/// then fails the I/O it holds and what comes after, and removes the disk (a filesystem on
/// it shuts down, as after a crash without recovery). The stopped device is deleted by a
/// sweep ([`super::sweep_dead_devices`]).
pub fn stop_waiting(id: u32) -> Result<(), String> {
    let ctrl = libublk::ctrl::UblkCtrl::new_simple(id as i32).map_err(ublk_error)?;
    match ctrl.kill_dev().map_err(ublk_error)? {
        r if r < 0 => Err(io::Error::from_raw_os_error(-r).to_string()),
        _ => Ok(()),
    }
}
