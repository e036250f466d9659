//! The kernel's ext4 driver mounts synthesized images read-only and read-write, and sees
//! exactly the fixture tree; ext4-view agrees.

mod common;
use common::verify::*;
use common::*;
use std::fs;
use std::process::Command;
use tessera_ext4::{FsTree, NodeKind};

fn kitchen_sink() -> Fixture {
    let mut fx = Fixture::new();
    let d = fx.dir(FsTree::ROOT, "dir");
    let f = fx.file(d, "hello.txt", b"hello world\n");
    fx.file(FsTree::ROOT, "empty", b"");
    fx.file(
        FsTree::ROOT,
        "blocks",
        &(0..3 * 4096 + 5)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<_>>(),
    );
    let other = fx.dir(FsTree::ROOT, "other");
    fx.tree.link(other, b"hardlink", f).unwrap();
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
        "nvme",
        NodeKind::BlockDev {
            major: 259,
            minor: 70000,
        },
        0o660,
    );
    fx.node(FsTree::ROOT, "fifo", NodeKind::Fifo, 0o644);
    fx.node(FsTree::ROOT, "sock", NodeKind::Socket, 0o755);
    fx.node(FsTree::ROOT, "setuid", NodeKind::Fifo, 0o4755);
    fx.xattr(f, "user.small", b"1");
    fx.xattr(f, "trusted.t", b"tt");
    let big = fx.file(FsTree::ROOT, "big-xattrs", b"x");
    fx.xattr(big, "user.big", &[9u8; 300]);
    fx.xattr(
        big,
        "security.capability",
        &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    fx.file(FsTree::ROOT, "ünïcødé ファイル", b"utf8");
    fx.file(FsTree::ROOT, &"n".repeat(255), b"long name");
    let mut deep = FsTree::ROOT;
    for i in 0..40 {
        deep = fx.dir(deep, &format!("level{i}"));
    }
    fx.file(deep, "bottom", b"deep");
    // Times before 1970 and after 2038.
    let old = fx.file(FsTree::ROOT, "old", b"1969");
    fx.tree.node_mut(old).meta.mtime = tessera_ext4::Timestamp {
        sec: -86_400,
        nsec: 1,
    };
    let future = fx.file(FsTree::ROOT, "future", b"2100");
    fx.tree.node_mut(future).meta.mtime = tessera_ext4::Timestamp {
        sec: 4_102_444_800,
        nsec: 999_999_999,
    };
    fx
}

#[test]
fn kernel_mounts_ro_and_sees_the_tree() {
    if !have("e2fsck") || !can_mount() {
        return;
    }
    let fx = kitchen_sink();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sink.img");
    build_image(&fx, &options(None), &img);
    e2fsck_clean(&img);
    ext4_view(&fx, &img);
    let mark = dmesg_mark();
    {
        let m = Mount::new(&img, "ro");
        kernel_view(&fx, m.path());
    }
    assert_eq!(ext4_errors_since(mark), Vec::<String>::new());
}

#[test]
fn kernel_mounts_rw_creates_writes_deletes_and_fsck_stays_clean() {
    if !have("e2fsck") || !can_mount() {
        return;
    }
    let fx = kitchen_sink();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("rw.img");
    build_image(&fx, &options(None), &img);
    let mark = dmesg_mark();
    {
        let m = Mount::new(&img, "rw");
        let p = m.path();
        fs::write(p.join("new-file"), vec![5u8; 1 << 20]).unwrap();
        fs::create_dir(p.join("new-dir")).unwrap();
        for i in 0..200 {
            fs::write(p.join("new-dir").join(format!("f{i}")), format!("{i}")).unwrap();
        }
        fs::write(p.join("dir/hello.txt"), b"rewritten").unwrap();
        fs::remove_file(p.join("blocks")).unwrap();
        fs::rename(p.join("empty"), p.join("dir/moved")).unwrap();
        fs::remove_dir_all(p.join("level0")).unwrap();
        assert!(Command::new("sync").status().unwrap().success());
        assert_eq!(fs::read(p.join("other/hardlink")).unwrap(), b"rewritten");
    }
    assert_eq!(ext4_errors_since(mark), Vec::<String>::new());
    e2fsck_clean(&img);
}
