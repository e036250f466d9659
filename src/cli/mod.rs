//! The command line. Each subcommand group lives in its own file; library modules do the
//! work, this layer parses, adds context to errors and prints.

mod demo;
mod image;
mod import;
mod json;
mod overlay;
mod store;
mod ublk;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::store::{location, Store};

#[derive(Debug, Parser)]
#[command(
    name = "tessera",
    version,
    about = "Serve ext4 block devices synthesized on the fly from a content-addressed store"
)]
pub struct Cli {
    /// Store directory [default: $TESSERA_STORE, else $XDG_DATA_HOME/tessera, else ~/.local/share/tessera]
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import files into the store as a tree
    #[command(subcommand)]
    Import(import::ImportCmd),
    /// Create, inspect, remove and export named images
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Check, clean up and measure the store
    #[command(subcommand)]
    Store(store::StoreCmd),
    /// Create a small demo image in the store and export it to a raw file
    Demo(demo::DemoArgs),
    /// List, show and remove the persistent overlays of writable exports
    #[command(subcommand)]
    Overlay(overlay::OverlayCmd),
    /// Serve images over NBD (Unix socket and/or TCP) until SIGINT/SIGTERM
    Serve(crate::serve::ServeArgs),
    /// Add, list and delete the ublk block devices of a running `tessera serve`
    #[command(subcommand)]
    Ublk(ublk::UblkCmd),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server's refusals and warnings are its operator's only clue, so `serve` logs them
    // unless RUST_LOG says otherwise; other commands report through their exit status.
    let default = if matches!(cli.command, Command::Serve(_)) {
        "warn"
    } else {
        "error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let store = open_store(cli.store)?;
    match cli.command {
        Command::Import(cmd) => import::run(&store, cmd),
        Command::Image(cmd) => image::run(&store, cmd),
        Command::Store(cmd) => store::run(&store, cmd),
        Command::Demo(args) => demo::run(&store, args),
        Command::Serve(args) => crate::serve::run(&store, args),
        Command::Overlay(cmd) => overlay::run(&store, cmd),
        Command::Ublk(cmd) => ublk::run(&store, cmd),
    }
}

fn open_store(flag: Option<PathBuf>) -> anyhow::Result<Store> {
    let dir = location::resolve(flag)?;
    Store::open(&dir).with_context(|| format!("cannot open the store at {}", dir.display()))
}

/// A byte-counting progress bar on stderr, or a hidden one when stderr is not a terminal.
fn progress_bar(message: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0).with_message(message);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// `1.5 GiB`-style sizes for humans.
fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < units.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[unit])
    }
}
