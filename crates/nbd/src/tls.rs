//! X.509 credentials for NBD_OPT_STARTTLS: loading (and reloading) the
//! server's certificate and key, verifying client certificates against a CA,
//! and the identity a verified client presents.
//!
//! Crypto is `aws-lc-rs`, which takes what OpenSSL takes: RSA keys of any
//! size from 2048 bits (`ring` refuses sizes such as 2432), ECDSA P-256 and
//! P-384, Ed25519, in PKCS#1, PKCS#8 or SEC1 PEM.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::error::TlsConfigError;

/// Where the server's credentials live; kept so that they can be re-read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// With a CA bundle, clients must present a certificate that chains to
    /// it (nbdkit's `--tls-verify-peer`); without, none is asked for.
    pub client_ca: Option<PathBuf>,
}

/// The server side of TLS: a configuration that [`reload`](Self::reload)
/// replaces while the server runs. Connections already upgraded keep the
/// configuration they started with; new handshakes use the current one.
#[derive(Clone)]
pub struct TlsServer {
    files: Arc<TlsFiles>,
    current: Arc<RwLock<TlsAcceptor>>,
}

impl TlsServer {
    /// Loads the credentials named by `files`.
    pub fn load(files: TlsFiles) -> Result<TlsServer, TlsConfigError> {
        let config = server_config(&files)?;
        Ok(TlsServer {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(TlsAcceptor::from(config))),
        })
    }

    /// Re-reads the files. On error the running configuration stays.
    pub fn reload(&self) -> Result<(), TlsConfigError> {
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = TlsAcceptor::from(config);
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Clients must present a certificate signed by the configured CA.
    pub fn verifies_peer(&self) -> bool {
        self.files.client_ca.is_some()
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Builds a TLS acceptor from a PEM certificate chain and a PEM private key,
/// without client certificates (like nbdkit's default: access control is
/// the server certificate plus whatever guards the socket).
pub fn load_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsConfigError> {
    let files = TlsFiles {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        client_ca: None,
    };
    Ok(TlsAcceptor::from(server_config(&files)?))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file; an unparsable PEM block is an error
/// rather than skipped, so a damaged bundle is not half-loaded.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::BadCertificate(path.to_path_buf(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate(path.to_path_buf()));
    }
    for cert in &certs {
        webpki::EndEntityCert::try_from(cert)
            .map_err(|e| TlsConfigError::BadCertificate(path.to_path_buf(), e.to_string()))?;
    }
    Ok(certs)
}

/// Reads and checks all of `files` into a rustls server configuration.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let certs = read_certs(&files.cert)?;
    let key_pem = read(&files.key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsConfigError::NoKey(files.key.clone(), e.to_string()))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsConfigError::BadKey(files.key.clone(), e.to_string()))?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified
        .keys_match()
        .map_err(|e| TlsConfigError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        })?;

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, provider)?),
    };
    let config = builder.with_cert_resolver(Arc::new(SingleCert(Arc::new(certified))));
    Ok(Arc::new(config))
}

fn client_verifier(
    ca: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsConfigError::BadCertificate(ca.to_path_buf(), e.to_string()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| TlsConfigError::BadCertificate(ca.to_path_buf(), e.to_string()))
}

/// One certificate for every client (no SNI-based choice).
#[derive(Debug)]
struct SingleCert(Arc<CertifiedKey>);

impl tokio_rustls::rustls::server::ResolvesServerCert for SingleCert {
    fn resolve(
        &self,
        _hello: tokio_rustls::rustls::server::ClientHello<'_>,
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Who a verified client certificate names: its subject common name and its
/// subjectAltName DNS names. These are what a per-export allow-list
/// ([`ClientAllowList`](crate::config::ClientAllowList)) matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
}

impl PeerIdentity {
    /// The identity in an end-entity certificate; `None` if it does not
    /// parse (rustls verified it already, so only an unverified one could).
    pub fn from_cert(der: &CertificateDer<'_>) -> Option<PeerIdentity> {
        let cert = webpki::EndEntityCert::try_from(der).ok()?;
        Some(PeerIdentity {
            common_name: common_name(cert.subject()),
            dns_names: cert.valid_dns_names().map(str::to_owned).collect(),
        })
    }

    /// Whether `id` is this peer's common name or one of its DNS names.
    /// ASCII case is ignored, as for DNS names.
    pub fn matches(&self, id: &str) -> bool {
        self.common_name
            .iter()
            .chain(&self.dns_names)
            .any(|n| n.eq_ignore_ascii_case(id))
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.common_name {
            Some(cn) => write!(f, "CN={cn}")?,
            None => f.write_str("(no CN)")?,
        }
        for d in &self.dns_names {
            write!(f, " DNS:{d}")?;
        }
        Ok(())
    }
}

/// One DER element: (tag, contents, rest). Definite lengths only, as DER
/// requires.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The first commonName (OID 2.5.4.3) in the contents of an X.501 Name:
/// SEQUENCE OF SET OF SEQUENCE { OID, value }.
fn common_name(mut name: &[u8]) -> Option<String> {
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    while let Some((_, rdn, rest)) = der_element(name) {
        name = rest;
        let mut attrs = rdn;
        while let Some((_, atv, rest)) = der_element(attrs) {
            attrs = rest;
            let Some((0x06, oid, value)) = der_element(atv) else {
                continue;
            };
            if oid != CN_OID {
                continue;
            }
            // UTF8String, PrintableString, IA5String, T61String: the ASCII
            // subset is what identities use in practice.
            let (tag, bytes, _) = der_element(value)?;
            if matches!(tag, 0x0c | 0x13 | 0x16 | 0x14) {
                return std::str::from_utf8(bytes).ok().map(str::to_owned);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_name_from_name_der() {
        // SET { SEQ { OID 2.5.4.6 (C), PrintableString "DE" } },
        // SET { SEQ { OID 2.5.4.3 (CN), UTF8String "client-a" } }
        let mut name = vec![
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06, 0x13, 0x02,
        ];
        name.extend(b"DE");
        name.extend([
            0x31, 0x11, 0x30, 0x0f, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x08,
        ]);
        name.extend(b"client-a");
        assert_eq!(common_name(&name).as_deref(), Some("client-a"));
        assert_eq!(common_name(&name[..13]), None);
        // Truncated or garbage input yields nothing rather than panicking.
        for n in 0..name.len() {
            let _ = common_name(&name[..n]);
        }
        assert_eq!(common_name(&[0x31, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn identity_matching_ignores_ascii_case() {
        let id = PeerIdentity {
            common_name: Some("Client-A".into()),
            dns_names: vec!["host.example".into()],
        };
        assert!(id.matches("client-a"));
        assert!(id.matches("HOST.example"));
        assert!(!id.matches("client"));
        assert_eq!(id.to_string(), "CN=Client-A DNS:host.example");
    }
}
