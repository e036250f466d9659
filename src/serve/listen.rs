//! `--listen` addresses: parsing, binding, and the URIs clients use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tessera_nbd::Listener;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    /// `host:port` as given (IPv6 hosts in brackets).
    Tcp(String),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(format!("tcp:{addr}: expected tcp:ADDR:PORT"));
            }
            return Ok(ListenAddr::Tcp(addr.to_string()));
        }
        Err(format!("{s}: expected unix:PATH or tcp:ADDR:PORT"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl ListenAddr {
    /// Binds the socket. A leftover Unix socket file is replaced unless a
    /// server still answers on it.
    pub async fn bind(&self) -> anyhow::Result<Listener> {
        match self {
            ListenAddr::Unix(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                }
                remove_stale_socket(path)?;
                let l = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("cannot listen on {self}"))?;
                Ok(l.into())
            }
            ListenAddr::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr.as_str())
                    .await
                    .with_context(|| format!("cannot listen on {self}"))?;
                Ok(l.into())
            }
        }
    }

    /// NBD URI (libnbd / qemu syntax) of `export` at this address.
    pub fn uri(&self, export: &str, tls: bool) -> String {
        let s = if tls { "s" } else { "" };
        match self {
            ListenAddr::Unix(p) => format!("nbd{s}+unix:///{export}?socket={}", p.display()),
            ListenAddr::Tcp(a) => {
                let host = match a.rsplit_once(':') {
                    Some(("0.0.0.0", port)) | Some(("[::]", port)) => format!("localhost:{port}"),
                    _ => a.clone(),
                };
                format!("nbd{s}://{host}/{export}")
            }
        }
    }

    /// Removes our Unix socket file on shutdown.
    pub fn cleanup(&self) {
        if let ListenAddr::Unix(p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "{} is in use by a running server; stop it or pick another --listen",
            path.display()
        );
    }
    std::fs::remove_file(path).with_context(|| format!("cannot remove stale {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(
            "unix:/tmp/s".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/tmp/s".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:10809".into())
        );
        assert_eq!(
            "tcp:[::1]:10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("[::1]:10809".into())
        );
        assert!("tcp:localhost".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("/tmp/s".parse::<ListenAddr>().is_err());
    }

    #[test]
    fn uris() {
        let u = ListenAddr::Unix("/r/nbd.sock".into());
        assert_eq!(u.uri("img", false), "nbd+unix:///img?socket=/r/nbd.sock");
        assert_eq!(u.uri("img", true), "nbds+unix:///img?socket=/r/nbd.sock");
        let t = ListenAddr::Tcp("0.0.0.0:10809".into());
        assert_eq!(t.uri("img", false), "nbd://localhost:10809/img");
    }
}
