//! What a ublk device is, as `tessera ublk list` and the control socket report it.

use serde::{Deserialize, Serialize};

/// What `tessera ublk list` shows of a device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceInfo {
    pub id: u32,
    /// `/dev/ublkbN`, the block device.
    pub block: String,
    /// `/dev/ublkcN`, the server's side.
    pub char: String,
    /// The export name it serves (`IMAGE`, `IMAGE@OVERLAY`, `IMAGE+ephemeral`).
    pub export: String,
    pub read_only: bool,
    pub size: u64,
    pub queues: u16,
    pub depth: u16,
}
