//! An NBD (Network Block Device) server, generic over a block device.
//!
//! The protocol is `doc/proto.md` of NetworkBlockDevice/nbd: fixed newstyle
//! negotiation with INFO/GO, structured replies, `base:allocation` block
//! status, STARTTLS and extended headers.
//!
//! Layout, one concept per file:
//! - [`proto`]: wire constants; [`option`] and [`request`]: pure decoders
//!   (no I/O, tested and fuzzed on byte slices); [`reply`]: encoders.
//! - `handshake` and `transmission`: the two protocol phases over a stream;
//!   [`server`]: listeners, connection limit, shutdown; [`tls`]: credentials.
//! - [`device`]: the trait a backend implements; [`exports`]: name lookup;
//!   [`MemDevice`] and [`FileDevice`]: reference backends.
//!
//! Threads: the protocol runs on tokio; device calls run on a small fixed
//! pool (`Config::io_threads`), except reads a device can serve from memory
//! or page cache without blocking (`Device::read_at_cached`), which are
//! answered inline. Reply buffers are recycled server-wide.
//!
//! Limitations:
//! - One metadata context, `base:allocation`; no `qemu:` contexts, no
//!   NBD_OPT_EXTENDED_HEADERS block-status payloads
//!   (`NBD_FLAG_BLOCK_STAT_PAYLOAD`), no RESIZE.
//! - TLS is X.509 only (optionally verifying client certificates against a
//!   CA, with per-export allow-lists of client names): no PSK (nbdkit's
//!   `--tls-psk`), no CRLs.
//! - No oldstyle negotiation (the spec's reference server dropped it too).
//! - Requests are executed out of order; FLUSH waits only for the device's
//!   own ordering, which is what the spec requires ("writes the server
//!   completed").
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use tessera_nbd::{run, Config, ExportMap, FileDevice};
//! let mut exports = ExportMap::new();
//! exports.insert("disk", Arc::new(FileDevice::open("disk.img", false)?));
//! let listener = tokio::net::UnixListener::bind("/tmp/nbd.sock")?;
//! run(listener, Arc::new(exports), Config::default(), tokio::signal::ctrl_c()).await;
//! # Ok(()) }
//! ```

mod buffers;
pub mod config;
pub mod device;
pub mod error;
pub mod exports;
mod file;
mod handshake;
mod io;
mod mem;
pub mod option;
mod planned;
mod poll;
pub mod proto;
pub mod reply;
pub mod request;
pub mod server;
mod splice;
pub mod tls;
mod transmission;
mod workers;

pub use config::{BlockSize, ClientAllowList, Config, TlsMode};
pub use device::{Device, Extent, Shared, ZeroFlags};
pub use error::{OptionError, RequestError, SessionError, TlsConfigError};
pub use exports::{Export, ExportInfo, ExportMap, Exports};
pub use file::{pread_nowait, FileDevice};
pub use mem::MemDevice;
pub use planned::FileRead;
pub use server::{run, run_all, Listener};
pub use splice::spliced_bytes;
pub use tls::{PeerIdentity, TlsFiles, TlsServer};
pub use transmission::EndReason;
