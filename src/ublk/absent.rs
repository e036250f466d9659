//! This tessera was built without the `ublk` feature (libublk, whose bindgen needs
//! libclang): no device can be made, and [`super::check_available`] says so before
//! anything is opened. The type keeps the rest of the frontend (control socket, CLI)
//! compiling; no value of it can exist.

use std::sync::Arc;

use tessera_nbd::Device;

use super::DeviceInfo;

/// As in `device.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    New { recoverable: bool },
    Recover(u32),
}

pub struct UblkDevice {
    pub info: DeviceInfo,
    never: std::convert::Infallible,
}

impl UblkDevice {
    pub fn add(
        _export: &str,
        _store: &std::path::Path,
        _dev: Arc<dyn Device>,
        _queues: u16,
        _start: Start,
    ) -> Result<UblkDevice, String> {
        Err(super::Unavailable::NotBuilt.to_string())
    }

    pub fn in_use(&self) -> bool {
        match self.never {}
    }

    pub fn stop(self) {
        match self.never {}
    }

    pub fn abandon(self) {
        match self.never {}
    }
}

pub fn stop_waiting(_id: u32) -> Result<(), String> {
    Err(super::Unavailable::NotBuilt.to_string())
}
