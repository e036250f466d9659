use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::{human, progress_bar};
use crate::image::{self, CreateOptions, ImageRecord};
use crate::import::{self, ImportSummary};
use crate::store::Store;

#[derive(Debug, Subcommand)]
pub(super) enum ImportCmd {
    /// Import a local directory (symlinks not followed, one filesystem); prints the tree id
    Dir {
        path: PathBuf,
        /// Also create an image of this name from the tree
        #[arg(long)]
        name: Option<String>,
        /// Leave the small objects loose instead of packing them (see `store pack`)
        #[arg(long)]
        no_pack: bool,
    },
    /// Import a tarball (plain, gzip, zstd or xz; GNU, PAX or ustar) or `-` for stdin;
    /// prints the tree id
    Tar {
        file: PathBuf,
        /// Also create an image of this name from the tree
        #[arg(long)]
        name: Option<String>,
        /// Leave the small objects loose instead of packing them (see `store pack`)
        #[arg(long)]
        no_pack: bool,
    },
    /// Import an OCI image layout DIR[:TAG|@DIGEST], one tree per layer with the layers
    /// below applied; prints the top tree id
    Oci {
        reference: String,
        /// Also create an image of this name (with the config's user, env, entrypoint, cmd)
        #[arg(long)]
        name: Option<String>,
        /// Leave the small objects loose instead of packing them (see `store pack`)
        #[arg(long)]
        no_pack: bool,
    },
    /// Import Debian packages' data, one tree per package (maintainer scripts are not run);
    /// prints one tree id per package
    Deb {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also create an image of this name from the package trees, in the order given
        #[arg(long)]
        name: Option<String>,
        /// Leave the small objects loose instead of packing them (see `store pack`)
        #[arg(long)]
        no_pack: bool,
    },
}

pub(super) fn run(store: &Store, cmd: ImportCmd) -> anyhow::Result<ExitCode> {
    let (name, no_pack) = match &cmd {
        ImportCmd::Dir { name, no_pack, .. }
        | ImportCmd::Tar { name, no_pack, .. }
        | ImportCmd::Oci { name, no_pack, .. }
        | ImportCmd::Deb { name, no_pack, .. } => (name.clone(), *no_pack),
    };
    if let Some(name) = &name {
        image::validate_name(name)?;
        anyhow::ensure!(
            !store.image_path(name).exists(),
            "an image named {name:?} already exists (remove it first)"
        );
    }
    // Held from import to image creation and packing, so a concurrent gc cannot collect
    // the new tree.
    let lock = store.lock(false)?;
    let bar = progress_bar("importing");
    let images = match cmd {
        ImportCmd::Dir { path, .. } => {
            let summary = import::import_dir(store, &path, &bar)
                .with_context(|| format!("cannot import {}", path.display()))?;
            one_tree(store, &summary, name)?
        }
        ImportCmd::Tar { file, .. } => {
            let summary = import_tar(store, &file, &bar)?;
            one_tree(store, &summary, name)?
        }
        ImportCmd::Oci {
            reference, name, ..
        } => import_oci(store, &reference, name, &bar)?,
        ImportCmd::Deb { files, name, .. } => import_deb(store, &files, name, &bar)?,
    };
    if no_pack {
        return Ok(ExitCode::SUCCESS);
    }
    let report = crate::upkeep::pack::write(store, &images)
        .context("imported, but cannot pack the new objects (they stay loose)")?;
    drop(lock);
    let Some(p) = &report.pack else {
        return Ok(ExitCode::SUCCESS);
    };
    let removed = match crate::upkeep::pack::try_prune(store, Some(p))
        .context("imported and packed, but cannot remove the loose copies (`store gc` will)")?
    {
        Some((n, _)) => format!("{n} loose copies removed"),
        None => "the store is busy: `store gc` removes the loose copies".to_owned(),
    };
    eprintln!(
        "packed {} small objects ({}), {removed}",
        p.len(),
        human(p.pack_len())
    );
    Ok(ExitCode::SUCCESS)
}

/// After importing one tree: prints its id, creates the image `name` of it if asked, and
/// returns the image whose order its objects are packed in (an unstored one without a name).
fn one_tree(
    store: &Store,
    summary: &ImportSummary,
    name: Option<String>,
) -> anyhow::Result<Vec<ImageRecord>> {
    report(summary);
    println!("{}", summary.tree);
    let trees = [summary.tree];
    Ok(vec![match name {
        Some(name) => create(store, &name, &trees, CreateOptions::default())?,
        None => image::record("tree", &trees, &CreateOptions::default()),
    }])
}

fn report(summary: &ImportSummary) {
    eprintln!(
        "imported {} entries, {} files, {} of data ({} new)",
        summary.entries,
        summary.files,
        human(summary.data_bytes),
        human(summary.new_bytes)
    );
}

fn create(
    store: &Store,
    name: &str,
    trees: &[crate::store::ObjectId],
    opts: CreateOptions,
) -> anyhow::Result<ImageRecord> {
    let (record, _) = image::create(store, name, trees, &opts)
        .with_context(|| format!("cannot create image {name:?}"))?;
    eprintln!("created image {name:?}");
    Ok(record)
}

fn import_tar(
    store: &Store,
    file: &Path,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<ImportSummary> {
    let (input, label): (Box<dyn Read>, String) = if file == Path::new("-") {
        (Box::new(std::io::stdin().lock()), "stdin".to_owned())
    } else {
        let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        if let Ok(meta) = f.metadata() {
            if meta.is_file() {
                bar.set_length(meta.len());
            }
        }
        (Box::new(f), file.display().to_string())
    };
    import::import_tar(store, input, &label, bar).with_context(|| format!("cannot import {label}"))
}

fn import_oci(
    store: &Store,
    reference: &str,
    name: Option<String>,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<ImageRecord>> {
    let imported = import::import_oci(store, reference, bar)
        .with_context(|| format!("cannot import {reference}"))?;
    for (i, layer) in imported.layers.iter().enumerate() {
        eprintln!("layer {i}: {} -> tree {}", layer.digest, layer.tree);
    }
    report(&imported.summary);
    println!("{}", imported.summary.tree);
    let trees = [imported.summary.tree];
    let Some(name) = name else {
        return Ok(vec![image::record(
            "tree",
            &trees,
            &CreateOptions::default(),
        )]);
    };
    let record = create(store, &name, &trees, CreateOptions::default())?;
    import::oci::set_runtime(store, &name, &imported.runtime)
        .with_context(|| format!("cannot record the run configuration of {name:?}"))?;
    Ok(vec![record])
}

fn import_deb(
    store: &Store,
    files: &[PathBuf],
    name: Option<String>,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<ImageRecord>> {
    let packages = import::import_debs(store, files, bar)?;
    let mut scripted = Vec::new();
    for p in &packages {
        eprintln!(
            "{}: {} entries, {} files, {} of data ({} new)",
            p.package,
            p.summary.entries,
            p.summary.files,
            human(p.summary.data_bytes),
            human(p.summary.new_bytes)
        );
        println!("{}\t{}", p.summary.tree, p.package);
        if !p.scripts.is_empty() {
            scripted.push(format!("{} ({})", p.package, p.scripts.join(", ")));
        }
    }
    if !scripted.is_empty() {
        eprintln!(
            "maintainer scripts were not run; packages that have them: {}",
            scripted.join("; ")
        );
    }
    let trees: Vec<_> = packages.iter().map(|p| p.summary.tree).collect();
    match name {
        Some(name) => {
            import::deb::check_conflicts(store, &packages)?;
            Ok(vec![create(
                store,
                &name,
                &trees,
                CreateOptions::default(),
            )?])
        }
        // Packages' trees may conflict (`check_conflicts`): each is laid out alone.
        None => Ok(trees
            .iter()
            .map(|t| image::record("tree", &[*t], &CreateOptions::default()))
            .collect()),
    }
}
