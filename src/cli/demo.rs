//! `tessera demo`: the first thing to run on a fresh machine.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::Args;

use super::human;
use crate::blockdev::{self, ImageDevice};
use crate::demo::store_demo_tree;
use crate::image::{self, CreateOptions};
use crate::store::Store;

#[derive(Debug, Args)]
pub(super) struct DemoArgs {
    /// Where to export the demo image
    #[arg(long, default_value = "demo.img")]
    out: PathBuf,
}

const NAME: &str = "demo";

pub(super) fn run(store: &Store, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let tree = store_demo_tree(store).context("cannot store the demo tree")?;
    eprintln!("store:  {}", store.root().display());
    eprintln!("tree:   {tree}");
    if store.image_path(NAME).exists() {
        image::remove(store, NAME)?;
    }
    image::create(store, NAME, &[tree], &CreateOptions::default())
        .context("cannot create the demo image")?;
    let dev = ImageDevice::open(store, NAME).context("cannot synthesize the demo image")?;
    blockdev::export(&dev, &args.out, |_| {})
        .with_context(|| format!("cannot export the demo image to {}", args.out.display()))?;
    eprintln!(
        "image:  {NAME} ({}) exported to {}",
        human(dev.size()),
        args.out.display()
    );

    let report = crate::upkeep::verify(store).context("cannot verify the store")?;
    for p in &report.problems {
        eprintln!("store problem: {p}");
    }
    anyhow::ensure!(report.problems.is_empty(), "the store has problems");
    eprintln!(
        "store:  verified {} objects, {} trees",
        report.objects, report.trees
    );

    match Command::new("e2fsck").arg("-fn").arg(&args.out).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            anyhow::ensure!(
                out.status.success(),
                "e2fsck found problems in {}:\n{text}",
                args.out.display()
            );
            eprintln!("e2fsck: clean");
        }
        Err(_) => eprintln!("e2fsck: not installed, skipped (apt-get install e2fsprogs)"),
    }
    eprintln!("next:   tessera serve     (exports the store's images over NBD and prints client commands)");
    eprintln!(
        "        sudo mount -o loop,ro {} /mnt && ls -la /mnt",
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
