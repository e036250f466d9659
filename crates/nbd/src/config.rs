//! Server configuration.

use std::collections::HashMap;
use std::time::Duration;

use crate::tls::{PeerIdentity, TlsServer};

/// TLS policy, with nbdkit's `--tls` semantics.
#[derive(Clone, Default)]
pub enum TlsMode {
    /// NOTLS: NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY.
    #[default]
    Off,
    /// TLS is offered; clients may stay in plain text.
    On(TlsServer),
    /// FORCEDTLS: every option but STARTTLS and ABORT gets
    /// NBD_REP_ERR_TLS_REQD until the client upgrades.
    Require(TlsServer),
}

impl TlsMode {
    pub fn server(&self) -> Option<&TlsServer> {
        match self {
            TlsMode::Off => None,
            TlsMode::On(a) | TlsMode::Require(a) => Some(a),
        }
    }

    pub(crate) fn required(&self) -> bool {
        matches!(self, TlsMode::Require(_))
    }
}

impl std::fmt::Debug for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On(_) => "on",
            TlsMode::Require(_) => "require",
        })
    }
}

/// Block size constraints advertised with NBD_INFO_BLOCK_SIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    /// Largest READ/WRITE accepted; also the largest buffer one request pins.
    pub max: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        // Any alignment works for pread-backed devices. The maximum is twice
        // the 32 MiB every client must handle ("2^25 SHOULD NOT be considered
        // a denial of service"): the reference server accepts requests that
        // large, and its own test traces send reads and writes of ~48 MiB.
        // Payloads are read in bounded chunks and charged to the in-flight
        // budgets, so the size costs memory only while such a request runs.
        BlockSize {
            min: 1,
            preferred: 4096,
            max: 64 << 20,
        }
    }
}

/// Which verified TLS client identities may use which exports, in the
/// spirit of qemu-nbd's `--tls-authz`, per export. An export with no entry
/// is open to every client the TLS policy admits; an export with one is
/// open only to clients whose certificate's subject CN or a subjectAltName
/// DNS name equals (ASCII case ignored) one of the listed identities, and
/// never to plain-text clients or clients without a certificate. Denied
/// exports are left out of NBD_OPT_LIST and refused with
/// NBD_REP_ERR_POLICY. Names are matched against the resolved export name,
/// so the empty "default export" name does not bypass the list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientAllowList {
    exports: HashMap<String, Vec<String>>,
}

impl ClientAllowList {
    /// Admits `ids` to `export` (added to any identities already listed).
    pub fn allow<I, S>(&mut self, export: impl Into<String>, ids: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.exports
            .entry(export.into())
            .or_default()
            .extend(ids.into_iter().map(Into::into));
    }

    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
    }

    /// Exports that have a list.
    pub fn exports(&self) -> impl Iterator<Item = &str> {
        self.exports.keys().map(String::as_str)
    }

    /// Whether a client (its identity, if it presented a verified
    /// certificate) may use `export`.
    pub fn permits(&self, export: &str, peer: Option<&PeerIdentity>) -> bool {
        match self.exports.get(export) {
            None => true,
            Some(ids) => peer.is_some_and(|p| ids.iter().any(|id| p.matches(id))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Connections served at once; further clients wait in the listen queue.
    pub max_connections: usize,
    /// Per-connection bound on bytes held by requests in flight (read
    /// buffers and write payloads); the reader stops taking requests when it
    /// is exhausted. Raised to at least one maximum-size request.
    pub max_in_flight_bytes: usize,
    /// Server-wide bound on the same bytes, over all connections. Raised to
    /// at least one maximum-size request.
    pub max_total_in_flight_bytes: usize,
    pub block_size: BlockSize,
    /// Threads running device calls, shared by all connections; 0 picks
    /// 16, or two per core if more.
    pub io_threads: usize,
    pub tls: TlsMode,
    /// Per-export allow-lists of TLS client identities.
    pub tls_allow: ClientAllowList,
    /// Offer NBD_OPT_EXTENDED_HEADERS (64-bit requests, qemu ≥ 8.2, libnbd ≥ 1.20).
    pub extended_headers: bool,
    /// Clients must finish option haggling within this time.
    pub handshake_timeout: Duration,
    /// On shutdown, how long in-flight requests get before connections are
    /// dropped.
    pub shutdown_grace: Duration,
    /// How long a connection's writer polls its socket for the next request after its
    /// last reply, instead of sleeping (see `poll.rs`); zero never polls.
    pub poll: Duration,
    /// Send pages of device memory that never changes ([`crate::Shared::pages`]) to plain
    /// sockets by reference (`vmsplice` and `splice`) rather than copy them.
    pub splice: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: 512,
            max_in_flight_bytes: 64 << 20,
            max_total_in_flight_bytes: 256 << 20,
            block_size: BlockSize::default(),
            io_threads: std::env::var("NBD_IO_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            tls: TlsMode::Off,
            tls_allow: ClientAllowList::default(),
            extended_headers: true,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            poll: Duration::from_micros(50),
            splice: true,
        }
    }
}
