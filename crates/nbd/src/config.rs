//! Server configuration.

use std::time::Duration;

use tokio_rustls::TlsAcceptor;

/// TLS policy, with nbdkit's `--tls` semantics.
#[derive(Clone, Default)]
pub enum TlsMode {
    /// NOTLS: NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY.
    #[default]
    Off,
    /// TLS is offered; clients may stay in plain text.
    On(TlsAcceptor),
    /// FORCEDTLS: every option but STARTTLS and ABORT gets
    /// NBD_REP_ERR_TLS_REQD until the client upgrades.
    Require(TlsAcceptor),
}

impl TlsMode {
    pub(crate) fn acceptor(&self) -> Option<&TlsAcceptor> {
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
        // Any alignment works for pread-backed devices; 32 MiB is the size
        // every client is required to handle ("2^25 SHOULD NOT be considered
        // a denial of service").
        BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
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
    pub block_size: BlockSize,
    /// Threads running device calls, shared by all connections; 0 picks
    /// 16, or two per core if more.
    pub io_threads: usize,
    pub tls: TlsMode,
    /// Offer NBD_OPT_EXTENDED_HEADERS (64-bit requests, qemu ≥ 8.2, libnbd ≥ 1.20).
    pub extended_headers: bool,
    /// Clients must finish option haggling within this time.
    pub handshake_timeout: Duration,
    /// On shutdown, how long in-flight requests get before connections are
    /// dropped.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: 512,
            max_in_flight_bytes: 64 << 20,
            block_size: BlockSize::default(),
            io_threads: std::env::var("NBD_IO_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            tls: TlsMode::Off,
            extended_headers: true,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}
