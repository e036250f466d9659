//! `tessera store pack` through the CLI and a real client: a packed image serves the same
//! bytes (nbdcopy against `image export`, e2fsck on the copy), `store verify` checks packed
//! copies, and `store gc` drops packs that hold garbage.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::served::Served;
use common::Env;

fn nbdcopy(served: &Served, export: &str, to: &std::path::Path) {
    let o = Command::new("nbdcopy")
        .arg(served.uri(export))
        .arg(to)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nbdcopy {export}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_packed_image_is_served_verified_and_collected() {
    if !common::can_run("a_packed_image_is_served", false, &["nbdcopy", "e2fsck"]) {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    common::fixture::build(&src, false);
    let tree = env.import(&src);
    env.ok(&["image", "create", "sink", "--tree", &tree]);
    let other = env.path("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(
        other.join("only-here"),
        b"an object only the second image names",
    )
    .unwrap();
    let other_tree = env.import(&other);
    env.ok(&[
        "image",
        "create",
        "two",
        "--tree",
        &tree,
        "--tree",
        &other_tree,
    ]);
    let want = env.path("sink.want");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "sink".as_ref(),
        want.as_os_str(),
    ]);

    let out = env.ok(&["store", "pack", "sink"]);
    assert!(out.starts_with("packed "), "{out}");
    let out = env.ok(&["store", "pack", "two"]);
    assert!(
        out.starts_with("packed 1 of "),
        "only the new object: {out}"
    );
    assert!(env.ok(&["store", "pack"]).starts_with("nothing to pack"));
    let packs = env.files("packs");
    assert_eq!(packs.len(), 4, "two packs and their indexes: {packs:?}");

    let served = Served::start(&env, &[]);
    let got = env.path("sink.got");
    nbdcopy(&served, "sink", &got);
    assert!(
        fs::read(&got).unwrap() == fs::read(&want).unwrap(),
        "a packed image served other bytes than its export"
    );
    common::e2fsck_clean(&got);

    let stats = env.ok(&["store", "stats"]);
    assert!(
        stats.contains("packs:        2 holding copies of "),
        "{stats}"
    );
    let verify = env.ok(&["store", "verify"]);
    assert!(verify.is_empty(), "{verify}");

    drop(served);

    // Removing "two" makes its object garbage: gc removes the pack holding it (a copy), not
    // the other, and "sink" is still served from its pack.
    env.ok(&["image", "rm", "two"]);
    let gc = env.ok(&["store", "gc"]);
    assert!(gc.contains(", 1 packs ("), "{gc}");
    assert_eq!(env.files("packs").len(), 2);
    let served = Served::start(&env, &[]);
    nbdcopy(&served, "sink", &got);
    assert!(fs::read(&got).unwrap() == fs::read(&want).unwrap());
    drop(served);

    // A damaged packed copy is reported by verify, named by pack and object.
    let pack = env
        .files("packs")
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "pack"))
        .unwrap();
    let f = fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.write_all_at(b"!", 0).unwrap();
    let out = env.fails(&["store", "verify"]);
    assert!(out.contains("holds a corrupt copy of object"), "{out}");
}
