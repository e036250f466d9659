//! Serves raw files over NBD on a Unix socket: the protocol crate without the
//! rest of tessera, for trying clients and for benchmarks.
//!
//! `cargo run --release -p tessera-nbd --example serve_file -- SOCK NAME=FILE [NAME=FILE]... [--rw]`

use std::sync::Arc;

use tessera_nbd::{Config, ExportMap, FileDevice};

// Four async threads at least, as `tessera serve` uses (see src/serve).
#[tokio::main(worker_threads = 4)]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let writable = args.iter().any(|a| a == "--rw");
    let mut args = args.into_iter().filter(|a| a != "--rw");
    let sock = args.next().expect("usage: SOCK NAME=FILE...");
    let mut exports = ExportMap::new();
    for spec in args {
        let (name, path) = spec.split_once('=').expect("NAME=FILE");
        exports.insert(name, Arc::new(FileDevice::open(path, writable)?));
    }
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)?;
    eprintln!("listening on {sock}");
    tessera_nbd::run(
        listener,
        Arc::new(exports),
        Config::default(),
        tokio::signal::ctrl_c(),
    )
    .await;
    Ok(())
}
