use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::human;
use super::json::{print as print_json, OverlayView};
use crate::blockdev::overlay::named::{self, OverlayInfo};
use crate::store::Store;

#[derive(Debug, Subcommand)]
pub(super) enum OverlayCmd {
    /// List persistent overlays with their image and size
    List {
        /// Print a JSON array of overlays (fields: src/cli/json.rs)
        #[arg(long)]
        json: bool,
    },
    /// Show one overlay in detail
    Show {
        name: String,
        /// Print one JSON object (fields: src/cli/json.rs)
        #[arg(long)]
        json: bool,
    },
    /// Delete an overlay (refused while a client is attached)
    Rm { name: String },
    /// Turn what a guest wrote into a new image: the overlay's image's trees plus a tree of
    /// the changes (refused while a client is attached)
    Commit {
        overlay: String,
        /// Name of the new image
        #[arg(long)]
        name: String,
    },
}

pub(super) fn run(store: &Store, cmd: OverlayCmd) -> anyhow::Result<ExitCode> {
    let root = store.root();
    match cmd {
        OverlayCmd::List { json: true } => {
            let overlays = named::list(root).context("cannot list overlays")?;
            let views: Vec<OverlayView> = overlays.iter().map(OverlayView::from).collect();
            print_json(&views)?;
        }
        OverlayCmd::List { json: false } => {
            for o in named::list(root).context("cannot list overlays")? {
                println!(
                    "{}\timage {}\t{} changed\t{} on disk{}",
                    o.record.name,
                    o.record.image,
                    human(o.changed_blocks * 4096),
                    human(o.data_bytes),
                    if o.attached { "\tattached" } else { "" }
                );
            }
        }
        OverlayCmd::Show { name, json } => {
            let o = named::info(root, &name)
                .with_context(|| format!("cannot show overlay {name:?}"))?;
            if json {
                print_json(&OverlayView::from(&o))?;
            } else {
                print_info(&o);
            }
        }
        OverlayCmd::Commit { overlay, name } => {
            let r = crate::commit::commit(store, &overlay, &name)
                .with_context(|| format!("cannot commit overlay {overlay:?} as image {name:?}"))?;
            println!(
                "image {}: the base's {} tree(s) + changes tree {}",
                r.image.name,
                r.image.trees.len() - 1,
                r.tree
            );
            println!(
                "{} new, {} changed, {} deleted; stored {} objects, {}",
                r.added,
                r.changed,
                r.deleted,
                r.new_objects,
                human(r.new_bytes)
            );
        }
        OverlayCmd::Rm { name } => {
            named::remove(root, &name)
                .with_context(|| format!("cannot remove overlay {name:?}"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_info(o: &OverlayInfo) {
    let r = &o.record;
    println!("name:        {}", r.name);
    println!(
        "image:       {} (fingerprint {})",
        r.image, r.image_fingerprint
    );
    println!("device size: {} ({} bytes)", human(r.size), r.size);
    println!(
        "changed:     {} ({} blocks)",
        human(o.changed_blocks * 4096),
        o.changed_blocks
    );
    println!("on disk:     {}", human(o.data_bytes));
    println!("created:     {}", r.created);
    println!("attached:    {}", if o.attached { "yes" } else { "no" });
}
