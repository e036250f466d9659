//! Accepting connections: listeners, the connection limit, per-connection
//! logging, and graceful shutdown (mini-redis style: the caller binds the
//! listeners and decides when to stop).

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{info, warn};

use crate::config::Config;
use crate::error::SessionError;
use crate::exports::Exports;
use crate::handshake::{self, Outcome};
use crate::io::BoxIo;
use crate::transmission::{self, Counters};
use crate::workers::Workers;

/// A bound socket the server accepts clients on.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix(l)
    }
}

/// Send buffer asked for on Unix sockets (the kernel caps it at `net.core.wmem_max`).
const UNIX_SNDBUF: libc::c_int = 1 << 20;

/// A Unix socket's default send buffer (`net.core.wmem_default`, 208 KiB) holds less than one
/// 256 KiB read reply: the writer filled it, slept in `epoll_wait` until the client drained
/// it, and was woken again several times per reply.
fn larger_send_buffer(s: &tokio::net::UnixStream) {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local; the socket is
    // owned by `s` for the duration of the call. Failure only leaves the default size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&UNIX_SNDBUF as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Listener {
    /// The stream, the peer's name and the socket's descriptor (for polling).
    async fn accept(&self) -> io::Result<(BoxIo, String, RawFd)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // Replies are written whole; Nagle would only delay them.
                s.set_nodelay(true)?;
                let fd = s.as_raw_fd();
                Ok((Box::new(s), peer.to_string(), fd))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                larger_send_buffer(&s);
                let peer = match s.peer_cred() {
                    Ok(c) => format!("unix:pid={}", c.pid().unwrap_or(-1)),
                    Err(_) => "unix".to_string(),
                };
                let fd = s.as_raw_fd();
                Ok((Box::new(s), peer, fd))
            }
        }
    }
}

/// Serves `exports` on one listener until `shutdown` resolves.
pub async fn run(
    listener: impl Into<Listener>,
    exports: Arc<dyn Exports>,
    config: Config,
    shutdown: impl Future,
) {
    run_all(vec![listener.into()], exports, config, shutdown).await
}

/// Serves `exports` on several listeners until `shutdown` resolves, then
/// stops accepting, lets connections finish their in-flight requests (up to
/// `config.shutdown_grace`), and returns.
pub async fn run_all(
    listeners: Vec<Listener>,
    exports: Arc<dyn Exports>,
    config: Config,
    shutdown: impl Future,
) {
    crate::buffers::fix_mmap_threshold();
    let (notify_tx, notify_rx) = watch::channel(false);
    // Each connection holds a sender; recv() returning None means all ended.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let threads = if config.io_threads == 0 {
        crate::workers::default_threads()
    } else {
        config.io_threads
    };
    let total = config
        .max_total_in_flight_bytes
        .max(config.block_size.max as usize + transmission::REQUEST_COST);
    let workers = Arc::new(Workers::new(threads, total));
    let config = Arc::new(config);

    let accepting = async {
        let mut loops = tokio::task::JoinSet::new();
        for l in listeners {
            loops.spawn(accept_loop(
                l,
                exports.clone(),
                config.clone(),
                limit.clone(),
                workers.clone(),
                notify_rx.clone(),
                done_tx.clone(),
            ));
        }
        while loops.join_next().await.is_some() {}
    };
    tokio::select! {
        _ = accepting => {}
        _ = shutdown => info!("shutting down"),
    }
    let _ = notify_tx.send(true);
    drop(done_tx);
    if tokio::time::timeout(config.shutdown_grace, done_rx.recv())
        .await
        .is_err()
    {
        warn!("connections still open after the shutdown grace period; dropping them");
    }
}

async fn accept_loop(
    listener: Listener,
    exports: Arc<dyn Exports>,
    config: Arc<Config>,
    limit: Arc<Semaphore>,
    workers: Arc<Workers>,
    shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .expect("connection semaphore is never closed");
        let (stream, peer, fd) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends are transient: back off instead of
                // spinning or giving up.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let exports = exports.clone();
        let config = config.clone();
        let mut shutdown = shutdown.clone();
        let done = done.clone();
        let workers = workers.clone();
        tokio::spawn(async move {
            workers.live.fetch_add(1, Ordering::Relaxed);
            connection(stream, peer, fd, &exports, &config, &workers, &mut shutdown).await;
            let live = workers.live.fetch_sub(1, Ordering::Relaxed) - 1;
            // Give back what this client's requests left behind: idle pooled
            // buffers beyond what the remaining clients may reuse, and the
            // allocator's free pages (within a quarter second, not per client).
            workers
                .pool
                .trim(live * crate::buffers::KEEP_PER_CONNECTION);
            crate::buffers::release_free_memory_soon();
            drop(permit);
            drop(done);
        });
    }
}

/// One client, from greeting to close, logged as one line when it enters
/// transmission and one when it ends.
async fn connection(
    stream: BoxIo,
    peer: String,
    fd: RawFd,
    exports: &Arc<dyn Exports>,
    config: &Config,
    workers: &Workers,
    shutdown: &mut watch::Receiver<bool>,
) {
    let negotiated = tokio::time::timeout(
        config.handshake_timeout,
        handshake::negotiate(stream, exports, config, shutdown),
    )
    .await;
    let n = match negotiated {
        Err(_) => {
            info!(%peer, "connection closed: handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            log_handshake_failure(&peer, &e);
            return;
        }
        Ok(Ok(Outcome::Aborted)) => {
            info!(%peer, "connection closed: client aborted the handshake");
            return;
        }
        Ok(Ok(Outcome::Transmission(n))) => n,
    };
    let export = n.export.name.clone();
    let client = n.client.as_ref().map(|c| c.to_string());
    info!(
        %peer, %export, tls = n.tls, client, mode = ?n.mode, flags = format_args!("{:#x}", n.eflags),
        "connection open"
    );
    let counters = Arc::new(Counters::default());
    let result = transmission::serve(*n, fd, config, shutdown, counters.clone(), workers).await;
    let received = counters.received.load(Ordering::Relaxed);
    let sent = counters.sent.load(Ordering::Relaxed);
    let requests = counters.requests.load(Ordering::Relaxed);
    let spliced = counters.spliced.load(Ordering::Relaxed);
    let polls = format_args!(
        "{}/{}",
        counters.polls_hit.load(Ordering::Relaxed),
        counters.polls_missed.load(Ordering::Relaxed)
    );
    match result {
        Ok(reason) => {
            info!(%peer, %export, %reason, requests, received, sent, spliced, %polls, "connection closed")
        }
        Err(e) => {
            warn!(%peer, %export, error = %e, requests, received, sent, spliced, %polls, "connection closed")
        }
    }
}

fn log_handshake_failure(peer: &str, e: &SessionError) {
    match e {
        SessionError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            info!(%peer, "connection closed during handshake")
        }
        SessionError::Shutdown => info!(%peer, "connection closed: server shutdown"),
        _ => warn!(%peer, error = %e, "connection closed: handshake failed"),
    }
}
