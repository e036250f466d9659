use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::{human, progress_bar};
use crate::image::{self, CreateOptions};
use crate::import::{self, ImportSummary, ImportedDebs, PackSummary, Packing};
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
    // Held from import to image creation, so a concurrent gc cannot collect the new tree.
    let _lock = store.lock(false)?;
    let bar = progress_bar("importing");
    let packing = |merged: Option<&String>| match (no_pack, merged) {
        (true, _) => Packing::Loose,
        (false, Some(name)) => Packing::AsImage {
            name: name.clone(),
            below: Vec::new(),
        },
        (false, None) => Packing::EachTree,
    };
    let pack = match cmd {
        ImportCmd::Dir { path, .. } => {
            let summary = import::import_dir(store, &path, packing(None), &bar)
                .with_context(|| format!("cannot import {}", path.display()))?;
            one_tree(store, &summary, name)?;
            summary.pack
        }
        ImportCmd::Tar { file, .. } => {
            let summary = import_tar(store, &file, packing(None), &bar)?;
            one_tree(store, &summary, name)?;
            summary.pack
        }
        ImportCmd::Oci {
            reference, name, ..
        } => import_oci(store, &reference, name, packing(None), &bar)?,
        ImportCmd::Deb { files, name, .. } => {
            let packing = packing(name.as_ref());
            import_deb(store, &files, name, packing, &bar)?
        }
    };
    if let Some(p) = pack {
        eprintln!("packed {} small objects ({})", p.objects, human(p.bytes));
    }
    Ok(ExitCode::SUCCESS)
}

/// After importing one tree: prints its id, and creates the image `name` of it if asked.
fn one_tree(store: &Store, summary: &ImportSummary, name: Option<String>) -> anyhow::Result<()> {
    report(summary);
    println!("{}", summary.tree);
    if let Some(name) = name {
        create(store, &name, &[summary.tree], CreateOptions::default())?;
    }
    Ok(())
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
) -> anyhow::Result<()> {
    image::create(store, name, trees, &opts)
        .with_context(|| format!("cannot create image {name:?}"))?;
    eprintln!("created image {name:?}");
    Ok(())
}

fn import_tar(
    store: &Store,
    file: &Path,
    packing: Packing,
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
    import::import_tar(store, input, &label, packing, bar)
        .with_context(|| format!("cannot import {label}"))
}

fn import_oci(
    store: &Store,
    reference: &str,
    name: Option<String>,
    packing: Packing,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Option<PackSummary>> {
    let imported = import::import_oci(store, reference, packing, bar)
        .with_context(|| format!("cannot import {reference}"))?;
    for (i, layer) in imported.layers.iter().enumerate() {
        eprintln!("layer {i}: {} -> tree {}", layer.digest, layer.tree);
    }
    report(&imported.summary);
    println!("{}", imported.summary.tree);
    if let Some(name) = name {
        create(
            store,
            &name,
            &[imported.summary.tree],
            CreateOptions::default(),
        )?;
        import::oci::set_runtime(store, &name, &imported.runtime)
            .with_context(|| format!("cannot record the run configuration of {name:?}"))?;
    }
    Ok(imported.summary.pack)
}

fn import_deb(
    store: &Store,
    files: &[PathBuf],
    name: Option<String>,
    packing: Packing,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Option<PackSummary>> {
    let ImportedDebs { packages, pack } = import::import_debs(store, files, packing, bar)?;
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
    if let Some(name) = name {
        let trees: Vec<_> = packages.iter().map(|p| p.summary.tree).collect();
        import::deb::check_conflicts(store, &packages)?;
        create(store, &name, &trees, CreateOptions::default())?;
    }
    Ok(pack)
}
