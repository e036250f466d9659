//! `tessera serve`: the store's images over NBD.
//!
//! Each image is synthesized (its layout computed) the first time a client
//! opens it and then shared by all connections and modes; writes go to
//! overlays. The protocol lives in the `tessera-nbd` crate; this module wires
//! the store to it: export names (`spec`), their resolution and policy
//! (`exports`), the device adapter (`device`), leases that keep `gc` away
//! from served data (`leased`) and listen addresses (`listen`).

mod activation;
mod banner;
mod exports;
mod leased;
mod limits;
mod listen;
mod remote;
mod spec;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tessera_nbd::{Config, TlsMode};

pub use crate::blockdev::ImageExport;
pub use exports::{OverlayPolicy, Policy, StoreExports};
pub use listen::ListenAddr;
pub use spec::{ExportName, ExportSpec, WriteMode};

use crate::blockdev::metadata::MetadataBudget;
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsArg {
    /// No TLS: STARTTLS is refused.
    Off,
    /// TLS offered; plain-text clients are still served.
    On,
    /// Clients must upgrade with STARTTLS before anything else.
    Require,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen: unix:PATH or tcp:ADDR:PORT; repeatable [default: the sockets
    /// passed by systemd socket activation (LISTEN_FDS), else unix:STORE/run/nbd.sock]
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<ListenAddr>,
    /// Serve only this export: IMAGE (read-only), IMAGE@OVERLAY (the persistent overlay
    /// OVERLAY, created on first connect) or IMAGE+ephemeral (a fresh overlay per
    /// connection); repeatable. The old spellings IMAGE:ephemeral and
    /// IMAGE:persistent=OVERLAY also make the plain name IMAGE mean that mode
    /// [default: every image, as --overlays and --ephemeral allow]
    #[arg(long, value_name = "EXPORT")]
    pub export: Vec<ExportSpec>,
    /// Without --export: which IMAGE@OVERLAY names clients may open
    #[arg(long, value_enum, default_value_t = OverlayPolicy::None, value_name = "POLICY")]
    pub overlays: OverlayPolicy,
    /// Without --export: let clients open IMAGE+ephemeral (a fresh overlay per connection)
    #[arg(long)]
    pub ephemeral: bool,
    /// Connections that may attach one persistent overlay at once; more than 1 shares it
    /// among them and offers multi-conn (qemu, nbdcopy use several connections)
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub overlay_connections: u32,
    /// Connections served at once; more wait in the listen queue (lowered, with a warning,
    /// to what the descriptor limit allows; the soft limit is raised to the hard one)
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_connections: usize,
    /// TLS policy (like nbdkit --tls)
    #[arg(long, value_enum, default_value_t = TlsArg::Off)]
    pub tls: TlsArg,
    /// PEM certificate chain for TLS
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS (RSA ≥ 2048 bits, ECDSA P-256/P-384, Ed25519;
    /// PKCS#8, PKCS#1 or SEC1). SIGHUP re-reads the certificate, key and CA
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Require a client certificate that chains to --tls-ca (like nbdkit
    /// --tls-verify-peer); clients without one fail the TLS handshake
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// PEM CA certificate(s) that client certificates must chain to
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Serve EXPORT only to clients whose certificate's subject CN or a DNS
    /// subjectAltName is one of the IDs; others do not see it listed and get
    /// NBD_REP_ERR_POLICY. Exports without such a list are open to every
    /// verified client; repeatable
    #[arg(long, value_name = "EXPORT=ID[,ID…]")]
    pub tls_allow: Vec<tls::AllowArg>,
    #[command(flatten)]
    pub ublk: crate::ublk::UblkArgs,
    /// With an empty store, serve nothing instead of creating the demo image first
    #[arg(long)]
    pub no_demo: bool,
    /// Do not offer NBD extended headers (64-bit requests)
    #[arg(long)]
    pub no_extended_headers: bool,
    /// After answering every request of a connection with one request at a time in
    /// flight, poll its socket for up to this many microseconds before sleeping: a CPU
    /// that idles must be woken for the next request, which roughly doubled a lone
    /// 4 KiB read's latency on virtual machines. Costs CPU while polling; 0 never polls
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 50)]
    pub busy_poll: u64,
    /// Copy every reply into the socket. By default, on plain (not TLS) connections, file
    /// data in the page cache is handed to the socket by reference (vmsplice and splice),
    /// which saves the server a copy of every large read
    #[arg(long)]
    pub no_splice: bool,
    /// Check object bytes against their BLAKE3 names before serving them: a mismatch is
    /// EIO for that read and an error in the log, never wrong bytes
    #[arg(long)]
    pub verify: bool,
    /// Serve the images of this remote store (s3://BUCKET/PREFIX or file:///DIR), fetching
    /// object bytes into the local store as they are read, verified against their names
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// S3 endpoint for servers other than AWS [default: $AWS_ENDPOINT_URL, $AWS_ENDPOINT]
    #[arg(long, value_name = "URL", requires = "remote")]
    pub endpoint: Option<String>,
    /// With --remote: keep at most SIZE (512M, 2G…) of fetched object bytes in the local
    /// store, evicting the least recently used objects not being read [default: no bound]
    #[arg(long, value_name = "SIZE", requires = "remote", value_parser = crate::image::parse_size)]
    pub cache_size: Option<u64>,
    /// Keep at most SIZE of generated metadata (inode tables, directories) of read images;
    /// beyond it, the least recently read images' metadata is dropped and generated again
    /// when next read (a few ms per thousand files). An image's block map stays
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = crate::image::parse_size)]
    pub metadata_memory: u64,
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(store: &Store, args: ServeArgs) -> anyhow::Result<ExitCode> {
    // Images synthesized on first reads fault their large tables in at once and reuse
    // those of images synthesized before; images of one tree share its view.
    crate::alloc::populate_large(true);
    crate::image::views::keep(true);
    let store = &store.clone().verifying_reads(args.verify);
    let store = &match &args.remote {
        Some(url) => remote::attach(store, url, args.endpoint.as_deref(), args.cache_size)?,
        None => store.clone(),
    };
    // Before anything can start a thread: this unsets the LISTEN_* variables.
    let mut listening = activation::Listening::new(
        &args.listen,
        ListenAddr::Unix(store.root().join("run").join("nbd.sock")),
    )?;
    let (tls, tls_allow) = tls::setup(&args)?;
    let tls_on = !matches!(tls, TlsMode::Off);

    if args.export.is_empty() && store.list_images()?.is_empty() && !args.no_demo {
        seed_demo(store)?;
    }
    let mut seen = std::collections::HashSet::new();
    for spec in &args.export {
        let image = &spec.name.image;
        crate::image::load(store, image)
            .with_context(|| format!("cannot export image {image:?}"))?;
        anyhow::ensure!(
            seen.insert(spec.name.to_string()),
            "export {} is given twice",
            spec.name
        );
        // The old spelling claims the plain image name, so only one such export per image.
        anyhow::ensure!(
            !spec.legacy || seen.insert(format!("{image}:")),
            "image {image:?} is exported twice in the IMAGE:MODE spelling; use IMAGE@OVERLAY names"
        );
    }
    let policy = Policy {
        only: (!args.export.is_empty()).then(|| args.export.clone()),
        overlays: args.overlays,
        ephemeral: args.ephemeral,
        overlay_connections: args.overlay_connections as usize,
    };
    let exports = StoreExports::new(store.clone(), policy.clone(), None)?
        .with_metadata_budget(MetadataBudget::new(args.metadata_memory));
    let listed = tessera_nbd::Exports::list(&exports);
    // With a single export, the empty name (`nbd+unix://?socket=…`) means it.
    let exports =
        Arc::new(exports.with_default((listed.len() == 1).then(|| listed[0].name.clone())));
    // ublk devices first: a refusal (an unknown image, an overlay in use) stops the start.
    let ublk = args
        .ublk
        .wanted()
        .then(|| crate::ublk::UblkServer::start(store, &exports, &args.ublk, &policy))
        .transpose()?;
    // A misspelt name in an allow-list would leave the intended export open to every
    // verified client: say so at start (names are resolved live, so this is a warning).
    for allow in &args.tls_allow {
        if let Err(e) = exports.resolve(&allow.export) {
            tracing::warn!(export = %allow.export, reason = %e, "--tls-allow names an export this server does not serve now");
        }
    }

    let listen = listening.addrs().to_vec();
    let config = Config {
        max_connections: limits::connections_that_fit(args.max_connections),
        tls,
        tls_allow,
        extended_headers: !args.no_extended_headers,
        poll: std::time::Duration::from_micros(args.busy_poll),
        splice: !args.no_splice,
        ..Config::default()
    };

    // At least four async threads even on two cores: cached reads are
    // copied on these threads, and with only two the reply writers queued
    // behind the copies (nbdcopy with 4 connections: 3.0 → 3.7 GiB/s).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.max(4))
        .enable_all()
        .thread_name("tessera-serve")
        .build()
        .context("cannot start the async runtime")?;
    let served = runtime.block_on(async {
        let shutdown = shutdown_signal();
        let listeners = listening.open().await?;
        banner::print(&listen, &listed, &exports, &policy, tls_on);
        tls::reload_on_sighup(&config.tls);
        tessera_nbd::run_all(listeners, exports, config, shutdown).await;
        listening.cleanup();
        anyhow::Ok(())
    });
    if let Some(ublk) = ublk {
        ublk.shutdown();
    }
    served?;
    remote::report(store);
    Ok(ExitCode::SUCCESS)
}

/// A fresh store gets the built-in demo tree as image `demo`, so the first `tessera serve`
/// on a new machine has something to show.
fn seed_demo(store: &Store) -> anyhow::Result<()> {
    const NAME: &str = "demo";
    let tree = crate::demo::store_demo_tree(store).context("cannot store the demo tree")?;
    crate::image::create(
        store,
        NAME,
        &[tree],
        &crate::image::CreateOptions::default(),
    )
    .context("cannot create the demo image")?;
    eprintln!(
        "the store at {} had no images: created `{NAME}` from the built-in demo tree",
        store.root().display()
    );
    Ok(())
}

/// A future that resolves on SIGINT or SIGTERM. The handlers are installed by this call,
/// not when the future is first polled: the caller makes it before the sockets exist, so a
/// client that has seen the socket can always stop the server with a signal (a test that
/// did, under load, killed a server whose handler was not yet installed).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let watch = |kind: SignalKind, name: &str| {
        signal(kind)
            .map_err(|e| tracing::warn!(error = %e, "cannot watch {name}"))
            .ok()
    };
    let mut term = watch(SignalKind::terminate(), "SIGTERM");
    let mut int = watch(SignalKind::interrupt(), "SIGINT");
    async move {
        tokio::select! {
            _ = delivered(&mut int) => {}
            _ = delivered(&mut term) => {}
        }
        eprintln!("shutting down");
    }
}

/// Resolves when `signal` is delivered; never if it is not watched.
async fn delivered(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
