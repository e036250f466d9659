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
        served.banner.contains("export demo (read-only):"),
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

/// An image removed and re-created under the same name while the server runs is served
/// with its new contents to the next client, not from the old cached layout.
#[test]
fn a_recreated_image_is_served_fresh() {
    if !common::can_run("a_recreated_image_is_served_fresh", false, &["nbdcopy"]) {
        return;
    }
    let env = Env::new();
    let make = |content: &str| {
        let dir = env.path(content);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), content).unwrap();
        env.import(&dir)
    };
    let (one, two) = (make("first"), make("second"));
    env.ok(&["image", "create", "img", "--tree", &one]);
    let served = Served::start(&env, &[]);
    let copy = |n: &str| {
        let out = env.path(n);
        let o = Command::new("nbdcopy")
            .arg(served.uri("img"))
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(out).unwrap()
    };
    let before = copy("a.img");
    env.ok(&["image", "rm", "img"]);
    env.ok(&["image", "create", "img", "--tree", &two]);
    let after = copy("b.img");
    let want = env.path("want.img");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "img".as_ref(),
        want.as_os_str(),
    ]);
    assert!(
        before != after,
        "the re-created image was served from the old layout"
    );
    assert!(after == std::fs::read(want).unwrap());
}
