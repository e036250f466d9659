use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::human;
use super::json::{print as print_json, GcView, StatsView, VerifyView};
use crate::store::Store;

#[derive(Debug, Subcommand)]
pub(super) enum StoreCmd {
    /// Re-hash every object and check every tree and image; exits 1 on any problem
    Verify {
        /// Report as one JSON object, problems included (fields: src/cli/json.rs)
        #[arg(long)]
        json: bool,
    },
    /// Remove trees and objects no image references, and stale temporary files
    Gc {
        /// Only report what would be removed
        #[arg(long)]
        dry_run: bool,
        /// Report as one JSON object (fields: src/cli/json.rs)
        #[arg(long)]
        json: bool,
    },
    /// Show counts, sizes and the deduplication ratio
    Stats {
        /// Print one JSON object (fields: src/cli/json.rs)
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn run(store: &Store, cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    let root = store.root().display();
    match cmd {
        StoreCmd::Verify { json } => {
            let report = store
                .verify()
                .with_context(|| format!("cannot verify the store at {root}"))?;
            if json {
                print_json(&VerifyView::from(&report))?;
            } else {
                for p in &report.problems {
                    println!("{p}");
                }
            }
            eprintln!(
                "checked {} objects ({}), {} trees, {} images: {} problems",
                report.objects,
                human(report.object_bytes),
                report.trees,
                report.images,
                report.problems.len()
            );
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        StoreCmd::Gc { dry_run, json } => {
            let r = store
                .gc(dry_run)
                .with_context(|| format!("cannot collect garbage in {root}"))?;
            if json {
                print_json(&GcView::new(dry_run, &r))?;
                return Ok(ExitCode::SUCCESS);
            }
            let verb = if dry_run { "would remove" } else { "removed" };
            println!(
                "{verb} {} objects ({}), {} trees, {} temporary files",
                r.objects,
                human(r.object_bytes),
                r.trees,
                r.tmp_files
            );
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Stats { json } => {
            let s = store
                .stats()
                .with_context(|| format!("cannot read the store at {root}"))?;
            if json {
                print_json(&StatsView::new(store.root(), &s))?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("store:        {root}");
            println!("objects:      {} ({})", s.objects, human(s.object_bytes));
            println!("trees:        {}", s.trees);
            println!("images:       {}", s.images);
            println!(
                "image data:   {} without deduplication",
                human(s.image_bytes)
            );
            match s.dedup_ratio() {
                Some(r) => println!("dedup ratio:  {r:.2}"),
                None => println!("dedup ratio:  -"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
