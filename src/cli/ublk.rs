//! `tessera ublk`: manage the ublk devices of a running `tessera serve`.

use std::process::ExitCode;

use clap::Subcommand;

use crate::store::Store;
use crate::ublk::control::{request, Request};
use crate::ublk::describe;

#[derive(Debug, Subcommand)]
pub(super) enum UblkCmd {
    /// Make a device for EXPORT (IMAGE, IMAGE@OVERLAY or IMAGE+ephemeral) and print its path
    Add { export: String },
    /// List the server's devices
    List {
        /// Print one JSON object: {"devices": [{id, block, char, export, read_only, size,
        /// queues, depth}]}
        #[arg(long)]
        json: bool,
    },
    /// Stop and delete a device (/dev/ublkbN, ublkbN or N); refused while it is mounted
    Del { device: String },
}

pub(super) fn run(store: &Store, cmd: UblkCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        UblkCmd::Add { export } => {
            for d in request(store, &Request::Add { export })? {
                println!("{}", describe(&d));
            }
        }
        UblkCmd::List { json: true } => {
            let devices = request(store, &Request::List)?;
            println!("{}", serde_json::json!({ "devices": devices }));
        }
        UblkCmd::List { json: false } => {
            for d in request(store, &Request::List)? {
                println!("{}", describe(&d));
            }
        }
        UblkCmd::Del { device } => {
            for d in request(store, &Request::Del { device })? {
                println!("deleted {} ({})", d.block, d.export);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
