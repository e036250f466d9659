use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::json::{print as print_json, GcView, StatsView, VerifyView};
use super::{human, progress_bar};
use crate::store::remote::{sync, Remote};
use crate::store::Store;

#[derive(Debug, Subcommand)]
pub(super) enum StoreCmd {
    /// Re-hash every object and check every tree and image; exits 1 on any problem
    Verify {
        /// Report as one JSON object, problems included (fields: src/cli/json.rs)
        #[arg(long)]
        json: bool,
        /// Then remove the corrupt copies found (loose files, and copies in packs, which
        /// are rewritten without them), so that importing the source again or `store pull`
        /// can restore the objects; lists those left with no good copy
        #[arg(long)]
        repair: bool,
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
    /// Copy the small objects of images (every image if none is named) into a pack, in the
    /// order the images read them, so that a cold image reads one file in order; objects
    /// already packed are skipped. Then remove the loose copies of packed objects (those
    /// of images a running server holds go at a later `store gc`)
    Pack { images: Vec<String> },
    /// Upload images (every image if none is named) with their trees and objects to a
    /// remote store; skips what it has, so an interrupted push is finished by running it again
    Push {
        images: Vec<String>,
        /// s3://BUCKET/PREFIX (AWS_* environment variables) or file:///DIR
        #[arg(long, value_name = "URL")]
        to: String,
        /// S3 endpoint for servers other than AWS [default: $AWS_ENDPOINT_URL, $AWS_ENDPOINT]
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
    },
    /// Download whole images from a remote store, every object checked against its name
    Pull {
        #[arg(required = true)]
        images: Vec<String>,
        /// s3://BUCKET/PREFIX (AWS_* environment variables) or file:///DIR
        #[arg(long, value_name = "URL")]
        from: String,
        /// S3 endpoint for servers other than AWS [default: $AWS_ENDPOINT_URL, $AWS_ENDPOINT]
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
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
        StoreCmd::Verify { json, repair } => {
            let report = crate::upkeep::verify(store)
                .with_context(|| format!("cannot verify the store at {root}"))?;
            let repaired = match repair {
                true => Some(
                    crate::upkeep::repair(store, &report.problems)
                        .with_context(|| format!("cannot repair the store at {root}"))?,
                ),
                false => None,
            };
            if json {
                print_json(&VerifyView::new(&report, repaired.as_ref()))?;
            } else {
                for p in &report.problems {
                    println!("{p}");
                }
            }
            eprintln!(
                "checked {} objects ({}), {} packed copies, {} trees, {} images: {} problems",
                report.objects,
                human(report.object_bytes),
                report.packed_objects,
                report.trees,
                report.images,
                report.problems.len()
            );
            if let (Some(r), false) = (&repaired, json) {
                eprintln!(
                    "removed {} corrupt loose objects and {} corrupt packed copies ({} packs rewritten)",
                    r.loose, r.packed, r.packs
                );
                for id in &r.missing {
                    println!("object {id} has no good copy left: import its source again or `store pull` it");
                }
            }
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        StoreCmd::Gc { dry_run, json } => {
            let r = crate::upkeep::gc(store, dry_run)
                .with_context(|| format!("cannot collect garbage in {root}"))?;
            if json {
                print_json(&GcView::new(dry_run, &r))?;
                return Ok(ExitCode::SUCCESS);
            }
            let verb = if dry_run { "would remove" } else { "removed" };
            println!(
                "{verb} {} objects ({}), {} trees, {} temporary files, {} partial objects ({}), {} packs ({}), {} loose copies of packed objects ({})",
                r.objects,
                human(r.object_bytes),
                r.trees,
                r.tmp_files,
                r.partial_objects,
                human(r.partial_bytes),
                r.packs,
                human(r.pack_bytes),
                r.loose_copies,
                human(r.loose_copy_bytes)
            );
            if r.repacked > 0 {
                let verb = if dry_run { "would rewrite" } else { "rewrote" };
                println!("{verb} {} packs without their garbage", r.repacked);
            }
            if r.kept_corrupt > 0 {
                println!(
                    "kept {} packs with garbage: they hold corrupt copies of live objects (`store verify --repair`)",
                    r.kept_corrupt
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Pack { images } => {
            let r = crate::upkeep::pack(store, &images)
                .with_context(|| format!("cannot pack images in {root}"))?;
            match &r.pack {
                Some(p) => println!(
                    "packed {} of {} objects ({}) into {}",
                    p.len(),
                    r.objects,
                    human(p.pack_len()),
                    p.pack_path().display()
                ),
                None => println!(
                    "nothing to pack: {} objects, all large or packed",
                    r.objects
                ),
            }
            if r.loose_copies > 0 {
                println!(
                    "removed {} loose copies of packed objects ({})",
                    r.loose_copies,
                    human(r.loose_copy_bytes)
                );
            }
            if r.missing > 0 {
                eprintln!(
                    "{} objects are not in this store (not fetched from its remote yet) and were not packed",
                    r.missing
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Push {
            images,
            to,
            endpoint,
        } => {
            let remote = Remote::open(&to, endpoint.as_deref())
                .with_context(|| format!("cannot open the remote store {to}"))?;
            let bar = progress_bar("pushing");
            let r = sync::push(store, &remote, &images, &|total, done| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .with_context(|| format!("cannot push to {to}"))?;
            bar.finish_and_clear();
            println!(
                "uploaded {} objects ({}), {} outboards, {} trees, {} image records; {} objects were there",
                r.objects,
                human(r.bytes),
                r.outboards,
                r.trees,
                r.images,
                r.objects_skipped
            );
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Pull {
            images,
            from,
            endpoint,
        } => {
            let remote = Remote::open(&from, endpoint.as_deref())
                .with_context(|| format!("cannot open the remote store {from}"))?;
            let bar = progress_bar("pulling");
            let r = sync::pull(store, &remote, &images, &|_, done| bar.set_position(done))
                .with_context(|| format!("cannot pull from {from}"))?;
            bar.finish_and_clear();
            println!(
                "fetched {} objects ({}) for {} images; {} objects were here",
                r.objects,
                human(r.bytes),
                r.images,
                r.objects_skipped
            );
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Stats { json } => {
            let s = crate::upkeep::stats(store)
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
            println!(
                "local:        {} imported or written here",
                human(s.object_bytes - s.fetched_bytes)
            );
            println!(
                "fetched:      {} objects ({}) from a remote store",
                s.fetched_objects,
                human(s.fetched_bytes)
            );
            println!(
                "partial:      {} objects being fetched from a remote ({} kept)",
                s.partial_objects,
                human(s.partial_bytes)
            );
            println!(
                "packs:        {} holding {} objects ({})",
                s.packs,
                s.packed_objects,
                human(s.pack_bytes)
            );
            if let Some(c) = s.cache {
                println!(
                    "remote cache: {} reads hit, {} fetched ({}), {} mismatches, {} evictions ({})",
                    c.hits,
                    c.misses,
                    human(c.bytes_fetched),
                    c.mismatches,
                    c.evictions,
                    human(c.bytes_evicted)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
