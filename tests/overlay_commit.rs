//! `tessera overlay commit`: a guest's writes through the kernel (nbdfuse + rw loop mount)
//! become a new image; the kernel's view of that image matches its view of the overlay,
//! entry by entry, and only the changed bytes were stored.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::served::{Fuse, Served};
use common::snapshot::{assert_same, snapshot, Info};
use common::{e2fsck_clean, fixture, Env, LoopMount};

/// The kernel's view without what it changes on its own: atimes and ctimes, and the
/// `lost+found` each image synthesizes.
fn view(root: &Path) -> BTreeMap<Vec<u8>, Info> {
    let mut snap = snapshot(root);
    snap.retain(|p, _| !p.starts_with(b"lost+found"));
    for info in snap.values_mut() {
        info.atime = (0, 0);
        info.ctime = (0, 0);
    }
    snap
}

/// Total bytes of the store's objects, loose or packed.
fn object_bytes(env: &Env) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&env.ok(&["store", "stats", "--json"])).unwrap();
    stats["object_bytes"].as_u64().unwrap()
}

fn remove_xattr(path: &Path, name: &str) {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: both arguments are NUL-terminated strings that outlive the call.
    let r = unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) };
    assert_eq!(
        r,
        0,
        "removexattr {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// What the guest does: every kind of change the commit must carry.
fn guest_writes(p: &Path) {
    fs::create_dir(p.join("new")).unwrap();
    fs::write(p.join("new/file"), fixture::pseudo_random(200_000)).unwrap();
    // hello.txt has two hardlinks: all three see the change.
    fs::write(p.join("files/hello.txt"), b"changed\n").unwrap();
    fs::remove_file(p.join("files/empty")).unwrap();
    fs::remove_dir_all(p.join("many")).unwrap();
    // Deleted and re-created: nothing of the old directory may survive.
    fs::remove_dir_all(p.join("other/deeper")).unwrap();
    fs::create_dir(p.join("other/deeper")).unwrap();
    fs::write(p.join("other/deeper/fresh"), b"fresh\n").unwrap();
    fixture::set_xattr(&p.join("files/exec"), "user.new", b"added");
    remove_xattr(&p.join("files/big.bin"), "user.binary");
    fs::set_permissions(
        p.join("files/sticky-dir-file"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::lchown(p.join("links/dangling"), Some(7), Some(8)).unwrap();
    symlink("x/y", p.join("links/new-link")).unwrap();
    fs::remove_file(p.join("links/relative")).unwrap();
    symlink("elsewhere", p.join("links/relative")).unwrap();
    // A third name for the big.bin group: the group moves to the new tree whole.
    fs::hard_link(p.join("files/big.bin"), p.join("files/big-link2")).unwrap();
    // Same data under a new name: no new object.
    fs::rename(p.join("files/sparse"), p.join("files/sparse-moved")).unwrap();
    fixture::set_times(&p.join("files/exec"), (1, 0), (1_234_567_890, 42));
}

#[test]
fn commit_carries_every_change_and_stores_only_new_data() {
    if !common::can_run(
        "overlay_commit",
        true,
        &["nbdfuse", "fusermount3", "e2fsck"],
    ) {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fixture::build(&src, true);
    let tree = env.import(&src);
    env.ok(&["image", "create", "img", "--tree", &tree, "--size", "64M"]);
    let before = object_bytes(&env);
    let loose_before = env.files("objects").len();

    let mut served = Served::start(&env, &["--export", "img:persistent=vm"]);
    {
        let fuse = Fuse::new(&env.path("fuse"), &served.uri("img"), false);
        let m = LoopMount::new(&fuse.file, &env.path("mnt"), "rw");
        guest_writes(&m.dir);
        assert!(Command::new("sync").status().unwrap().success());
        // A client is attached: the overlay is refused.
        let err = env.fails(&["overlay", "commit", "vm", "--name", "next"]);
        assert!(err.contains("attached by another client"), "{err}");
        drop(m);
        drop(fuse);
    }
    served.stop(Duration::from_secs(10));

    let out = env.ok(&["overlay", "commit", "vm", "--name", "next"]);
    assert!(out.contains("image next"), "{out}");
    // new/, new/file, other/deeper/fresh, links/new-link, files/big-link2,
    // files/sparse-moved are new; the re-created other/deeper is emitted with its content.
    assert!(
        out.contains(" 3 deleted"),
        "files/empty, many, files/sparse: {out}"
    );
    let stored = 200_000 + "changed\n".len() as u64 + "fresh\n".len() as u64;
    assert_eq!(
        object_bytes(&env) - before,
        stored,
        "only the new data is stored"
    );
    assert!(out.contains("stored 3 objects"), "{out}");
    assert!(
        env.files("objects").len() == loose_before,
        "the commit's small objects were written loose, not packed"
    );
    let err = env.fails(&["overlay", "commit", "vm", "--name", "next"]);
    assert!(err.contains("already exists"), "{err}");
    env.ok(&["store", "verify"]);

    // The kernel's view of `next` against its view of the overlay.
    let next = env.path("next.img");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "next".as_ref(),
        next.as_os_str(),
    ]);
    e2fsck_clean(&next);
    let committed = {
        let m = LoopMount::new(&next, &env.path("next-mnt"), "ro");
        view(&m.dir)
    };
    let served = Served::start(&env, &["--export", "img:persistent=vm"]);
    let guest = {
        let fuse = Fuse::new(&env.path("fuse2"), &served.uri("img"), true);
        let m = LoopMount::new(&fuse.file, &env.path("mnt2"), "ro,noload");
        let v = view(&m.dir);
        drop(m);
        drop(fuse);
        v
    };
    assert_same(&guest, &committed);
    assert!(!committed.contains_key(&b"other/deeper/hello-link"[..]));
    assert_eq!(
        committed[&b"files/big-link2"[..]].same_inode_as,
        Some(b"files/big-link2".to_vec()),
        "the three big.bin names are one inode"
    );
    assert_eq!(committed[&b"files/big.bin"[..]].nlink, 3);
}

#[test]
fn commit_refuses_an_unknown_overlay_and_a_bad_name() {
    let env = Env::new();
    let err = env.fails(&["overlay", "commit", "nope", "--name", "next"]);
    assert!(err.contains("overlay \"nope\" does not exist"), "{err}");
    let err = env.fails(&["overlay", "commit", "nope", "--name", "../x"]);
    assert!(err.contains("invalid image name"), "{err}");
}
