//! Typed errors. Decoding errors say which rule of the protocol the peer
//! broke; session errors say why a connection ended.

use std::io;

use thiserror::Error;

/// A handshake message that could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OptionError {
    /// Fatal: the stream is not NBD (or is desynchronised).
    #[error("bad option magic {0:#018x}")]
    BadMagic(u64),
    /// Fatal: "the server MUST drop the TCP connection if the client sets an
    /// unknown flag".
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// Answered with NBD_REP_ERR_INVALID; the session continues.
    #[error("invalid {} option: {reason}", crate::proto::option_name(*code))]
    Invalid { code: u32, reason: &'static str },
}

/// A transmission request header that could not be decoded. Always fatal:
/// after a bad header we no longer know where the next request starts.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    #[error("{command} request carries a {len}-byte payload, over the {limit}-byte limit")]
    PayloadTooLarge {
        command: &'static str,
        len: u64,
        limit: u64,
    },
}

/// Why a connection ended abnormally.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("handshake: {0}")]
    Option(#[from] OptionError),
    #[error("transmission: {0}")]
    Request(#[from] RequestError),
    #[error("client option data of {len} bytes is too large")]
    OptionTooLarge { len: u32 },
    #[error("client asked for unknown export {name:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport { name: String },
    #[error("client did not start TLS but the server requires it")]
    TlsRequired,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("export {name:?} refused to client {client}: not on its TLS allow-list")]
    ExportDenied { name: String, client: String },
    #[error("opening export {name:?}: {source}")]
    OpenExport { name: String, source: io::Error },
    #[error("server is shutting down")]
    Shutdown,
}

/// Errors loading the TLS configuration.
#[derive(Debug, Error)]
pub enum TlsConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("no certificate in {0}")]
    NoCertificate(std::path::PathBuf),
    #[error("{0}: not a usable X.509 certificate: {1}")]
    BadCertificate(std::path::PathBuf, String),
    #[error("no private key in {0}: {1}")]
    NoKey(std::path::PathBuf, String),
    /// The key decoded but the crypto provider cannot sign with it (for
    /// example RSA under 2048 bits, or an unsupported curve).
    #[error("{0}: unsupported private key: {1}")]
    BadKey(std::path::PathBuf, String),
    #[error("the key in {key} does not belong to the certificate in {cert}: {reason}")]
    KeyMismatch {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] tokio_rustls::rustls::Error),
}
