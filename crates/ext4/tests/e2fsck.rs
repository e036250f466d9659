//! Every synthesized image must pass `e2fsck -fn` with no problem line.

mod common;
use common::*;
use tessera_ext4::{FsTree, NodeKind};

#[test]
fn empty_tree() {
    if !have("e2fsck") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("empty.img");
    build_image(&Fixture::new(), &options(None), &img);
    e2fsck_clean(&img);
}

#[test]
fn every_kind_of_node() {
    if !have("e2fsck") {
        return;
    }
    let mut fx = Fixture::new();
    let d = fx.dir(FsTree::ROOT, "dir");
    let f = fx.file(d, "hello.txt", b"hello world\n");
    fx.file(FsTree::ROOT, "empty", b"");
    fx.file(FsTree::ROOT, "blocks", &vec![7u8; 3 * 4096 + 5]);
    fx.tree.link(FsTree::ROOT, b"hardlink", f).unwrap();
    fx.symlink(FsTree::ROOT, "fast", "dir/hello.txt");
    fx.symlink(FsTree::ROOT, "slow", &"x/".repeat(100));
    fx.node(
        FsTree::ROOT,
        "null",
        NodeKind::CharDev { major: 1, minor: 3 },
        0o666,
    );
    fx.node(
        FsTree::ROOT,
        "sda",
        NodeKind::BlockDev {
            major: 259,
            minor: 70000,
        },
        0o660,
    );
    fx.node(FsTree::ROOT, "fifo", NodeKind::Fifo, 0o644);
    fx.node(FsTree::ROOT, "sock", NodeKind::Socket, 0o755);
    fx.xattr(f, "user.small", b"1");
    let big = fx.file(FsTree::ROOT, "big-xattrs", b"x");
    fx.xattr(big, "user.big", &[9u8; 300]);
    fx.xattr(big, "security.capability", &[1u8; 20]);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("kinds.img");
    build_image(&fx, &options(None), &img);
    e2fsck_clean(&img);
}
