use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::json::{print as print_json, ImageDetailView, ImageView};
use super::{human, progress_bar};
use crate::blockdev::{self, ImageDevice};
use crate::image::{self, format_uuid, parse_size, CreateOptions, ImageRecord};
use crate::store::Store;

#[derive(Debug, Subcommand)]
pub(super) enum ImageCmd {
    /// Create an image from trees, merged in order (later trees win). Reads manifests only
    Create {
        name: String,
        /// Tree id or a unique prefix of at least 4 digits (repeatable; later trees win)
        #[arg(long = "tree", required = true, value_name = "ID")]
        trees: Vec<String>,
        /// Device size, e.g. 512M or 4G [default: what the tree needs plus headroom]
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Volume label, at most 16 bytes [default: the name, truncated]
        #[arg(long)]
        label: Option<String>,
        /// Number of inodes [default: what the tree needs plus headroom]
        #[arg(long)]
        inodes: Option<u32>,
    },
    /// List images
    List {
        /// Print a JSON array of image records (fields: src/cli/json.rs)
        #[arg(long)]
        json: bool,
    },
    /// Show an image's record and filesystem geometry
    Show {
        name: String,
        /// Print one JSON object (fields: src/cli/json.rs)
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (its trees and objects stay until `store gc`)
    Rm { name: String },
    /// Write an image to a sparse raw file
    Export { name: String, out: PathBuf },
}

pub(super) fn run(store: &Store, cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::Create {
            name,
            trees,
            size,
            label,
            inodes,
        } => {
            let trees = trees
                .iter()
                .map(|t| store.resolve_tree(t))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("cannot create image {name:?}"))?;
            let opts = CreateOptions {
                size,
                inodes,
                label,
            };
            // Sizing a large tree builds big short-lived tables and tens of thousands of
            // small blocks (`crate::alloc`). `TESSERA_SMALL_PAGES` set: 4 KiB pages only
            // (to measure what huge pages do).
            if std::env::var_os("TESSERA_SMALL_PAGES").is_none() {
                crate::alloc::huge_pages_for_large(true);
                crate::alloc::huge_heap(64 << 20);
            }
            let (record, planned) = image::create(store, &name, &trees, &opts)
                .with_context(|| format!("cannot create image {name:?}"))?;
            // Created by sizing only: nothing is synthesized, so no memory figure.
            let s = planned.summary;
            print_image(&record, s.size, s.stats, planned.objects, None);
        }
        ImageCmd::List { json } => {
            let mut records = Vec::new();
            for name in store.list_images().context("cannot list images")? {
                records.push(
                    image::load(store, &name)
                        .with_context(|| format!("cannot load image {name:?}"))?,
                );
            }
            if json {
                let views: Vec<ImageView> = records.iter().map(ImageView::from).collect();
                print_json(&views)?;
            } else {
                for record in &records {
                    let size = record.size.map_or_else(|| "auto".to_owned(), human);
                    println!(
                        "{}\t{} tree(s)\tsize {size}",
                        record.name,
                        record.trees.len()
                    );
                }
            }
        }
        ImageCmd::Show { name, json } => {
            let record =
                image::load(store, &name).with_context(|| format!("cannot load image {name:?}"))?;
            let built = image::build(store, &record)
                .with_context(|| format!("cannot synthesize image {name:?}"))?;
            if json {
                print_json(&ImageDetailView::new(&record, &built))?;
            } else {
                let layout = &built.layout;
                let memory = Some((
                    layout.memory_bytes() as u64,
                    layout.block_map_bytes() as u64,
                ));
                print_image(
                    &record,
                    layout.size(),
                    layout.stats(),
                    built.objects.len(),
                    memory,
                );
            }
        }
        ImageCmd::Rm { name } => {
            image::remove(store, &name).with_context(|| format!("cannot remove image {name:?}"))?;
        }
        ImageCmd::Export { name, out } => {
            let dev = ImageDevice::open(store, &name)
                .with_context(|| format!("cannot synthesize image {name:?}"))?;
            let bar = progress_bar("exporting");
            bar.set_length(dev.size());
            blockdev::export(&dev, &out, |pos| bar.set_position(pos))
                .with_context(|| format!("cannot export image {name:?} to {}", out.display()))?;
            bar.finish_and_clear();
            eprintln!(
                "wrote {} ({}) to {}",
                name,
                human(dev.size()),
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `memory`: what the synthesized layout holds, and of it the block map, when the image
/// was synthesized.
fn print_image(
    record: &ImageRecord,
    size: u64,
    stats: tessera_ext4::Stats,
    objects: usize,
    memory: Option<(u64, u64)>,
) {
    println!("name:     {}", record.name);
    for (i, tree) in record.trees.iter().enumerate() {
        println!("tree {i}:   {tree}");
    }
    println!("label:    {}", record.label);
    if let Some(rt) = &record.runtime {
        // What the OCI config asked for; tessera records it, a runtime applies it.
        println!(
            "runtime:  {}",
            serde_json::to_string(rt).unwrap_or_default()
        );
    }
    println!("uuid:     {}", format_uuid(&record.uuid));
    println!("created:  {}", record.created);
    println!("size:     {} ({} bytes)", human(size), size);
    println!("inodes:   {} ({} free)", stats.inodes, stats.free_inodes);
    println!(
        "blocks:   {} ({} free, {} of file data)",
        stats.blocks, stats.free_blocks, stats.data_blocks
    );
    println!("objects:  {objects}");
    match memory {
        Some((all, map)) => println!(
            "metadata: {} generated, layout holds {} in memory (block map {})",
            human(stats.metadata_bytes),
            human(all),
            human(map)
        ),
        None => println!(
            "metadata: {}, generated when the image is first read",
            human(stats.metadata_bytes)
        ),
    }
}
