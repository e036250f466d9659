use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::{human, progress_bar};
use crate::image::{self, CreateOptions};
use crate::import;
use crate::store::Store;

#[derive(Debug, Subcommand)]
pub(super) enum ImportCmd {
    /// Import a local directory (symlinks not followed, one filesystem); prints the tree id
    Dir {
        path: PathBuf,
        /// Also create an image of this name from the tree
        #[arg(long)]
        name: Option<String>,
    },
}

pub(super) fn run(store: &Store, cmd: ImportCmd) -> anyhow::Result<ExitCode> {
    let ImportCmd::Dir { path, name } = cmd;
    if let Some(name) = &name {
        image::validate_name(name)?;
        anyhow::ensure!(
            !store.image_path(name).exists(),
            "an image named {name:?} already exists (remove it first)"
        );
    }
    // Held from import to image creation, so a concurrent gc cannot collect the new tree.
    let _lock = store.lock(false)?;
    let bar = progress_bar("importing");
    let summary = import::import_dir(store, &path, &bar)
        .with_context(|| format!("cannot import {}", path.display()))?;
    eprintln!(
        "imported {} entries, {} files, {} of data ({} new)",
        summary.entries,
        summary.files,
        human(summary.data_bytes),
        human(summary.new_bytes)
    );
    println!("{}", summary.tree);
    if let Some(name) = name {
        image::create(store, &name, &[summary.tree], &CreateOptions::default())
            .with_context(|| format!("cannot create image {name:?}"))?;
        eprintln!("created image {name:?}");
    }
    Ok(ExitCode::SUCCESS)
}
