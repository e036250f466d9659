//! `tessera serve`: the store's images over NBD.
//!
//! Each image is synthesized (its layout computed) the first time a client
//! opens it and then shared by all connections; nothing is written anywhere.
//! The protocol lives in the `tessera-nbd` crate; this module wires the store
//! to it: export lookup ([`exports`]), the device adapter ([`device`]) and
//! listen addresses ([`listen`]).

mod activation;
mod device;
mod exports;
mod listen;
mod spec;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tessera_nbd::{Config, TlsMode};

pub use device::ImageExport;
pub use exports::StoreExports;
pub use listen::ListenAddr;
pub use spec::{ExportSpec, WriteMode};

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
    /// Export only this image, read-only (NAME), with a fresh overlay per connection
    /// (NAME:ephemeral) or with a named overlay kept in the store
    /// (NAME:persistent=OVERLAY); repeatable [default: every image, read-only]
    #[arg(long, value_name = "NAME[:MODE]")]
    pub export: Vec<ExportSpec>,
    /// Connections served at once; more wait in the listen queue
    #[arg(long, default_value_t = 512, value_name = "N")]
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
    /// With an empty store, serve nothing instead of creating the demo image first
    #[arg(long)]
    pub no_demo: bool,
    /// Do not offer NBD extended headers (64-bit requests)
    #[arg(long)]
    pub no_extended_headers: bool,
    /// Check object bytes against their BLAKE3 names before serving them: a mismatch is
    /// EIO for that read and an error in the log, never wrong bytes
    #[arg(long)]
    pub verify: bool,
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(store: &Store, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let store = &store.clone().verifying_reads(args.verify);
    // Before anything can start a thread: this unsets the LISTEN_* variables.
    let mut listening = activation::Listening::new(
        &args.listen,
        ListenAddr::Unix(store.root().join("run").join("nbd.sock")),
    )?;
    let (tls, tls_allow) = tls::setup(&args)?;
    let tls_on = !matches!(tls, TlsMode::Off);

    let names = if args.export.is_empty() {
        let names = store
            .list_images()
            .context("cannot list the store's images")?;
        if names.is_empty() && !args.no_demo {
            vec![seed_demo(store)?]
        } else {
            names
        }
    } else {
        let mut seen = std::collections::HashSet::new();
        for spec in &args.export {
            let name = &spec.image;
            crate::image::load(store, name)
                .with_context(|| format!("cannot export image {name:?}"))?;
            anyhow::ensure!(
                seen.insert(name.clone()),
                "image {name:?} is exported twice"
            );
        }
        args.export.iter().map(|s| s.image.clone()).collect()
    };
    // With a single export, the empty name (`nbd+unix://?socket=…`) means it.
    let default = (names.len() == 1).then(|| names[0].clone());
    let only = (!args.export.is_empty()).then(|| args.export.clone());
    let exports = Arc::new(StoreExports::new(store.clone(), only, default));

    let listen = listening.addrs().to_vec();
    let config = Config {
        max_connections: args.max_connections,
        tls,
        tls_allow,
        extended_headers: !args.no_extended_headers,
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
    runtime.block_on(async {
        let listeners = listening.open().await?;
        print_banner(&listen, &names, tls_on);
        tls::reload_on_sighup(&config.tls);
        tessera_nbd::run_all(listeners, exports, config, shutdown_signal()).await;
        listening.cleanup();
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Ready-to-paste client commands, on stdout so scripts can pick them up.
fn print_banner(listen: &[ListenAddr], names: &[String], tls: bool) {
    for addr in listen {
        println!("listening on {addr}");
    }
    if names.is_empty() {
        println!("no images in the store yet: create one with `tessera image create`");
    }
    let addr = &listen[0];
    for name in names {
        let uri = addr.uri(name, tls);
        println!();
        println!("export {name}:");
        println!("  nbdinfo '{uri}'");
        println!("  nbdcopy '{uri}' {name}.img");
        println!(
            "  mkdir -p /tmp/{name}/fuse /tmp/{name}/mnt && (nbdfuse -r /tmp/{name}/fuse/disk.img '{uri}' &) \\"
        );
        println!(
            "      && sleep 1 && sudo mount -o loop,ro /tmp/{name}/fuse/disk.img /tmp/{name}/mnt"
        );
        println!("  # boot it: any kernel with virtio-blk and ext4 (vmtests/ fetches one), an init in the image");
        println!(
            "  qemu-system-x86_64 -m 256 -nographic -kernel VMLINUZ -append 'root=/dev/vda ro console=ttyS0' -drive 'file={uri},format=raw,if=virtio,readonly=on'"
        );
    }
}

/// A fresh store gets the built-in demo tree as image `demo`, so the first `tessera serve`
/// on a new machine has something to show.
fn seed_demo(store: &Store) -> anyhow::Result<String> {
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
    Ok(NAME.to_owned())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("shutting down");
}
