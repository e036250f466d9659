//! End to end: import a directory, create and export the image, and read it back with
//! e2fsck, the kernel (loop mount) and ext4-view, comparing every entry with the source.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::snapshot::{self, Info};
use common::{ext4view, Env, LoopMount};
use tessera::blockdev::ImageDevice;

/// Import the fixture (changed by `tweak`) and export it as `img`; returns the source
/// snapshot and the image path.
fn fixture_image(
    env: &Env,
    root_only: bool,
    tweak: impl FnOnce(&Path),
) -> (BTreeMap<Vec<u8>, Info>, std::path::PathBuf) {
    let src = env.path("src");
    common::fixture::build(&src, root_only);
    tweak(&src);
    let tree = env.import(&src);
    env.ok(&["image", "create", "img", "--tree", &tree]);
    let out = env.path("img.img");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "img".as_ref(),
        out.as_os_str(),
    ]);
    (snapshot::snapshot(&src), out)
}

/// The kernel's view of a mounted image, minus what mkfs-like tools add (`lost+found`).
fn mounted_snapshot(mnt: &Path) -> BTreeMap<Vec<u8>, Info> {
    let mut snap = snapshot::snapshot(mnt);
    if snap.remove(&b"lost+found"[..]).is_some() {
        snap.get_mut(&b""[..]).unwrap().nlink -= 1;
    }
    snap
}

#[test]
fn e2fsck_finds_no_problem() {
    if !common::can_run("e2fsck_finds_no_problem", false, &["e2fsck"]) {
        return;
    }
    let env = Env::new();
    let (_, img) = fixture_image(&env, common::is_root(), |_| {});
    common::e2fsck_clean(&img);
}

#[test]
fn the_kernel_sees_exactly_the_source_tree() {
    if !common::can_run(
        "the_kernel_sees_exactly_the_source_tree",
        true,
        &["mount", "e2fsck"],
    ) {
        return;
    }
    let env = Env::new();
    let (source, img) = fixture_image(&env, true, |_| {});
    common::e2fsck_clean(&img);
    let mount = LoopMount::new(&img, &env.path("mnt"), "ro,noatime");
    let mounted = mounted_snapshot(&mount.dir);
    snapshot::assert_same(&source, &mounted);
}

#[test]
fn ext4_view_sees_exactly_the_source_tree() {
    let env = Env::new();
    // ext4-view 1.0.0 rejects inode times before 1970 or after 2038 (it converts the low 32
    // bits of the seconds with `i32::try_from(u32)`), so this copy of the fixture has none.
    let (source, img) = fixture_image(&env, common::is_root(), |src| {
        let t = common::fixture::MTIME;
        common::fixture::set_times(&src.join("files/big.bin"), t, t);
        common::fixture::set_times(&src.join("files/sparse"), t, t);
    });
    let expected = ext4view::project(&source);
    snapshot::assert_same(&expected, &ext4view::snapshot(&ext4view::load_file(&img)));

    // Straight from the read path the NBD server uses, without exporting.
    let store = env.open_store();
    let dev = ImageDevice::open(&store, "img").expect("open the image device");
    snapshot::assert_same(&expected, &ext4view::snapshot(&ext4view::load_device(dev)));
}

/// The kernel checks more on a read-write mount (group checksums, free counts, bitmap
/// padding) than on a read-only one; writing and deleting must leave a clean filesystem.
#[test]
fn the_exported_image_survives_a_read_write_mount() {
    if !common::can_run(
        "the_exported_image_survives_a_read_write_mount",
        true,
        &["mount", "e2fsck"],
    ) {
        return;
    }
    let env = Env::new();
    let (_, img) = fixture_image(&env, true, |_| {});
    {
        let mount = LoopMount::new(&img, &env.path("mnt"), "rw");
        let dir = &mount.dir;
        std::fs::write(dir.join("new-file"), vec![1u8; 1 << 20]).unwrap();
        std::fs::create_dir(dir.join("new-dir")).unwrap();
        std::fs::remove_file(dir.join("files/big.bin")).unwrap();
        std::fs::remove_dir_all(dir.join("many")).unwrap();
        assert_eq!(
            std::fs::read(dir.join("files/hello.txt")).unwrap(),
            b"hello, world\n"
        );
        let sync = Command::new("sync").status().unwrap();
        assert!(sync.success());
    }
    common::e2fsck_clean(&img);
}

/// Hardlink groups belong to their layer: replacing one name of a group in a later tree
/// leaves the others linked to each other, with a link count the kernel agrees with.
#[test]
fn a_later_tree_can_replace_one_name_of_a_hardlink_group() {
    if !common::can_run(
        "a_later_tree_can_replace_one_name_of_a_hardlink_group",
        true,
        &["mount", "e2fsck"],
    ) {
        return;
    }
    let env = Env::new();
    let lower = env.path("lower");
    std::fs::create_dir_all(lower.join("d")).unwrap();
    std::fs::write(lower.join("a"), b"shared").unwrap();
    std::fs::hard_link(lower.join("a"), lower.join("b")).unwrap();
    std::fs::hard_link(lower.join("a"), lower.join("d/c")).unwrap();
    let upper = env.path("upper");
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::write(upper.join("b"), b"replaced").unwrap();
    let (l, u) = (env.import(&lower), env.import(&upper));
    env.ok(&["image", "create", "img", "--tree", &l, "--tree", &u]);
    let img = env.path("img.img");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "img".as_ref(),
        img.as_os_str(),
    ]);
    common::e2fsck_clean(&img);

    use std::os::unix::fs::MetadataExt;
    let mount = LoopMount::new(&img, &env.path("mnt"), "ro");
    let meta = |p: &str| std::fs::metadata(mount.dir.join(p)).unwrap();
    assert_eq!(std::fs::read(mount.dir.join("b")).unwrap(), b"replaced");
    assert_eq!(meta("b").nlink(), 1);
    assert_eq!(meta("a").ino(), meta("d/c").ino());
    assert_eq!(meta("a").nlink(), 2);
}

/// A real tree from the running system (thousands of entries, odd names, many symlinks):
/// imported, exported and compared entry by entry with what the kernel sees.
#[test]
fn a_real_system_tree_round_trips_through_the_kernel() {
    let src = Path::new("/usr/share/doc");
    if !src.is_dir() {
        common::can_run(
            "a_real_system_tree_round_trips_through_the_kernel (/usr/share/doc)",
            true,
            &["/usr/share/doc"],
        );
        return;
    }
    if !common::can_run(
        "a_real_system_tree_round_trips_through_the_kernel",
        true,
        &["mount", "e2fsck"],
    ) {
        return;
    }
    let env = Env::new();
    let tree = env.import(src);
    let source = snapshot::snapshot(src);
    env.ok(&["image", "create", "doc", "--tree", &tree]);
    let img = env.path("doc.img");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "doc".as_ref(),
        img.as_os_str(),
    ]);
    common::e2fsck_clean(&img);
    let mount = LoopMount::new(&img, &env.path("mnt"), "ro,noatime");
    // Anything else reading the system tree meanwhile moves its atimes; compare the rest.
    let without_atime = |mut snap: BTreeMap<Vec<u8>, Info>| {
        snap.values_mut().for_each(|i| i.atime = (0, 0));
        snap
    };
    snapshot::assert_same(
        &without_atime(source),
        &without_atime(mounted_snapshot(&mount.dir)),
    );
}
