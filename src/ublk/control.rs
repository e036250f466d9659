//! The control socket, `STORE/run/ublk.sock`: one JSON request line, one JSON reply line.
//!
//! ```text
//! {"cmd":"add","export":"web@vm1"}   → {"ok":true,"devices":[{"id":0,"block":"/dev/ublkb0",…}]}
//! {"cmd":"list"}                     → {"ok":true,"devices":[…]}
//! {"cmd":"del","device":"/dev/ublkb0"} → {"ok":true,"devices":[the deleted one]}
//! any refusal                        → {"ok":false,"error":"…"}
//! ```
//!
//! The socket is mode 0600: only root (the server's user) manages devices. It is served
//! on a plain thread, one connection at a time, since each command is a few control-ring
//! round trips.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{DeviceInfo, Ublk};
use crate::store::Store;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Add { export: String },
    List,
    Del { device: String },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
}

pub fn socket_path(store: &Store) -> PathBuf {
    store.root().join("run").join("ublk.sock")
}

/// The server's end of the socket.
pub struct Listener {
    path: PathBuf,
}

impl Listener {
    /// Binds `path` (refusing one that another live server answers on) and serves it on a
    /// thread until the process ends.
    pub fn bind(path: &Path, ublk: Arc<Ublk>) -> anyhow::Result<Listener> {
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another tessera serve already manages ublk devices of this store on {}: use `tessera ublk add` against it, or stop it first",
                path.display()
            );
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot chmod {}", path.display()))?;
        std::thread::Builder::new()
            .name("tessera-ublkctl".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            if let Err(e) = serve_one(stream, &ublk) {
                                tracing::warn!(error = %e, "ublk control connection failed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "ublk control socket accept failed"),
                    }
                }
            })
            .context("cannot start the ublk control thread")?;
        Ok(Listener {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket, so clients are told no server runs.
    pub fn close(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_one(stream: UnixStream, ublk: &Ublk) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        // A liveness probe (another server checking the socket): nothing to answer.
        return Ok(());
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply {
            error: Some(format!("bad request: {e}")),
            ..Reply::default()
        },
        Ok(req) => {
            let result = match &req {
                Request::Add { export } => ublk.add(export).map(|d| vec![d]),
                Request::List => Ok(ublk.list()),
                Request::Del { device } => ublk.del(device).map(|d| vec![d]),
            };
            match result {
                Ok(devices) => Reply {
                    ok: true,
                    error: None,
                    devices,
                },
                Err(e) => {
                    tracing::warn!(request = ?req, reason = %e, "ublk request refused");
                    Reply {
                        error: Some(e),
                        ..Reply::default()
                    }
                }
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

/// Sends `req` to the server of `store` and returns the devices of its reply, or the
/// server's refusal as the error.
pub fn request(store: &Store, req: &Request) -> anyhow::Result<Vec<DeviceInfo>> {
    let path = socket_path(store);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::bail!(
            "permission denied on {}: ublk devices are managed by root; run this as root",
            path.display()
        ),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            anyhow::bail!(
                "no tessera serve manages ublk devices of the store {} (nothing answers on {}): start one with `tessera serve --ublk EXPORT` or `tessera serve --ublk-control`",
                store.root().display(),
                path.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot connect to {}", path.display())),
    };
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("no reply on {}", path.display()))?;
    let reply: Reply = serde_json::from_str(&answer)
        .with_context(|| format!("bad reply on {}: {answer:?}", path.display()))?;
    if !reply.ok {
        anyhow::bail!(
            "{}",
            reply
                .error
                .unwrap_or_else(|| "refused without a reason".into())
        );
    }
    Ok(reply.devices)
}
