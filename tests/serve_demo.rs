//! The README's main command: `tessera serve` on an empty store creates and serves the
//! demo image, and what it serves is a clean ext4 the kernel mounts.

mod common;

use std::process::Command;

use common::served::Served;
use common::{e2fsck_clean, Env, LoopMount};

#[test]
fn serve_on_an_empty_store_serves_the_demo_image() {
    if !common::can_run(
        "serve_on_an_empty_store_serves_the_demo_image",
        true,
        &["nbdcopy", "e2fsck", "mount"],
    ) {
        return;
    }
    let env = Env::new();
    let served = Served::start(&env, &[]);
    assert!(
        served.banner.contains("export demo:"),
        "banner: {}",
        served.banner
    );
    assert!(served.banner.contains("nbdfuse") && served.banner.contains("qemu-system-x86_64"));
    let img = env.path("demo.img");
    let o = Command::new("nbdcopy")
        .arg(served.uri("demo"))
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    e2fsck_clean(&img);
    let m = LoopMount::new(&img, &env.path("mnt"), "ro");
    assert!(
        std::fs::read_dir(&m.dir).unwrap().count() > 2,
        "the demo tree has files"
    );
}

#[test]
fn no_demo_serves_an_empty_store_as_is() {
    let env = Env::new();
    let served = Served::start(&env, &["--no-demo"]);
    assert!(
        served.banner.contains("no images"),
        "banner: {}",
        served.banner
    );
    assert!(!env.store.join("images").join("demo.json").exists());
}
