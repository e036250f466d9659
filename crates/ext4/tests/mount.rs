//! The kernel's ext4 driver mounts synthesized images read-only and read-write, and sees
//! exactly the fixture tree; ext4-view agrees.

mod common;
use common::verify::*;
use common::*;
use std::fs;
use std::process::Command;

#[test]
fn kernel_mounts_ro_and_sees_the_tree() {
    if !have("e2fsck") || !can_mount() {
        return;
    }
    check_all_readers(&kitchen_sink(), None, "sink.img");
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
