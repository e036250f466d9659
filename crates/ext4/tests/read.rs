//! The reader (`tessera_ext4::read`) against our own images and against images written by
//! `mkfs.ext4 -d` (e2fsprogs), compared with the source directory.

mod common;
use common::verify::*;
use common::*;
use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use tessera_ext4::read::{Filesystem, InodeKind, ReadError};

#[test]
fn reads_back_the_kitchen_sink() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sink.img");
    build_image(&kitchen_sink(), &options(None), &img);
    reader_view(&kitchen_sink(), &img);
}

#[test]
fn reads_back_sparse_files_and_a_deep_extent_tree() {
    let mut fx = Fixture::new();
    // Every other block: more extents than fit in the inode, so the tree has depth >= 1.
    let segs: Vec<(u64, u64)> = (0..400).map(|i| (i * 8192, 4096)).collect();
    fx.sparse(tessera_ext4::FsTree::ROOT, "holes", 400 * 8192 + 100, &segs);
    fx.sparse(tessera_ext4::FsTree::ROOT, "all-hole", 1 << 20, &[]);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.img");
    build_image(&fx, &options(None), &img);
    reader_view(&fx, &img);
}

#[test]
fn refuses_what_is_not_ext4() {
    let zeros = vec![0u8; 8192];
    assert!(matches!(
        Filesystem::open(&zeros[..]),
        Err(ReadError::NotExt4 { magic: 0 })
    ));
    let short = [0u8; 100];
    assert!(matches!(
        Filesystem::open(&short[..]),
        Err(ReadError::Io { .. })
    ));
}

/// A source directory with one of most things mkfs.ext4 -d copies.
fn source_tree(root: &Path, with_devices: bool) {
    fs::create_dir_all(root.join("d/e")).unwrap();
    fs::write(root.join("small"), b"hello\n").unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(root.join("d/big"), &big).unwrap();
    fs::write(root.join("d/e/empty"), b"").unwrap();
    fs::hard_link(root.join("small"), root.join("d/e/link")).unwrap();
    std::os::unix::fs::symlink("small", root.join("fast")).unwrap();
    std::os::unix::fs::symlink("y/".repeat(80), root.join("slow")).unwrap();
    xattr::set(root.join("small"), "user.k", b"v").unwrap();
    xattr::set(root.join("d/big"), "user.large", &[5u8; 600]).unwrap();
    // Many entries: more than one directory block.
    for i in 0..300 {
        fs::write(
            root.join(format!("d/e/n{i:04}-{}", "x".repeat(40))),
            i.to_string(),
        )
        .unwrap();
    }
    if with_devices {
        let ok = Command::new("mknod")
            .arg(root.join("null"))
            .args(["c", "1", "3"])
            .status();
        assert!(ok.unwrap().success());
        let ok = Command::new("mkfifo").arg(root.join("fifo")).status();
        assert!(ok.unwrap().success());
    }
}

/// Every entry of `root` (lstat, contents, target, xattrs) against the reader's walk;
/// mkfs.ext4 -d keeps whole seconds only.
fn compare_with_source(root: &Path, img: &Path) {
    let fs_ = Filesystem::open(ImageFile(fs::File::open(img).unwrap())).unwrap();
    let got = fs_.walk().unwrap();
    let mut by_ino: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut src_paths = vec![];
    for e in walkdir(root) {
        src_paths.push(
            e.strip_prefix(root)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec(),
        );
    }
    src_paths.push(b"lost+found".to_vec());
    src_paths.sort();
    let got_paths: Vec<_> = got.iter().map(|e| e.path.clone()).collect();
    assert_eq!(got_paths, src_paths);
    for e in &got {
        if e.path == b"lost+found" || e.path.is_empty() {
            continue;
        }
        let p = root.join(std::ffi::OsStr::from_bytes(&e.path));
        let md = fs::symlink_metadata(&p).unwrap();
        let what = p.display();
        assert_eq!(
            e.inode.meta.mode as u32,
            md.mode() & 0o7777,
            "mode of {what}"
        );
        assert_eq!(
            (e.inode.meta.uid, e.inode.meta.gid),
            (md.uid(), md.gid()),
            "owner of {what}"
        );
        assert_eq!(e.inode.meta.mtime.sec, md.mtime(), "mtime of {what}");
        let mut names: Vec<Vec<u8>> = xattr::list(&p)
            .unwrap()
            .map(|n| n.as_bytes().to_vec())
            .collect();
        names.sort();
        let got_names: Vec<_> = e.inode.meta.xattrs.iter().map(|x| x.name.clone()).collect();
        assert_eq!(got_names, names, "xattr names of {what}");
        for x in &e.inode.meta.xattrs {
            let v = xattr::get(&p, std::ffi::OsStr::from_bytes(&x.name))
                .unwrap()
                .unwrap();
            assert_eq!(x.value, v, "xattr value of {what}");
        }
        let ft = md.file_type();
        match e.inode.kind {
            InodeKind::File => {
                assert!(ft.is_file(), "{what}");
                let extents = fs_.extents(&e.inode).unwrap();
                let mut buf = vec![0u8; e.inode.size as usize];
                fs_.read_file(&e.inode, &extents, &mut buf, 0).unwrap();
                assert!(buf == fs::read(&p).unwrap(), "contents of {what}");
                if md.nlink() > 1 {
                    let first = by_ino.entry(e.inode.ino).or_insert_with(|| e.path.clone());
                    assert!(
                        md.ino()
                            == fs::metadata(root.join(std::ffi::OsStr::from_bytes(first)))
                                .unwrap()
                                .ino()
                    );
                }
                assert_eq!(e.inode.links as u64, md.nlink(), "links of {what}");
            }
            InodeKind::Dir => assert!(ft.is_dir(), "{what}"),
            InodeKind::Symlink => {
                assert_eq!(
                    fs_.symlink_target(&e.inode).unwrap(),
                    fs::read_link(&p).unwrap().as_os_str().as_bytes()
                );
            }
            InodeKind::CharDev { major, minor } => {
                assert!(ft.is_char_device());
                assert_eq!(
                    (major, minor),
                    (libc_major(md.rdev()), libc_minor(md.rdev()))
                );
            }
            InodeKind::Fifo => assert!(ft.is_fifo()),
            other => panic!("unexpected {other:?} at {what}"),
        }
    }
}

fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32
}

fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32
}

fn walkdir(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                out.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    out
}

fn mkfs(src: &Path, img: &Path, extra: &[&str]) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0"])
        .args(extra)
        .arg("-d")
        .arg(src)
        .arg(img)
        .arg("16M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn reads_images_written_by_mkfs() {
    if !have("mkfs.ext4") {
        return;
    }
    let root_ok = unsafe_free_is_root();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    source_tree(&src, root_ok);
    // The defaults for a small filesystem (1 KiB blocks), 4 KiB blocks, no 64bit (32-byte
    // group descriptors), no flex_bg, and 128-byte inodes (no nanoseconds, no crtime).
    for (name, extra) in [
        ("default", &[][..]),
        ("4k", &["-b", "4096"][..]),
        ("no64", &["-O", "^64bit,^flex_bg", "-b", "4096"][..]),
        ("small-inodes", &["-I", "128"][..]),
    ] {
        let img = dir.path().join(format!("{name}.img"));
        mkfs(&src, &img, extra);
        compare_with_source(&src, &img);
    }
}

#[test]
fn refuses_inline_data_and_a_journal_needing_recovery() {
    if !have("mkfs.ext4") || !have("debugfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("inline.img");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "inline_data"])
        .arg(&img)
        .arg("8M")
        .status()
        .unwrap();
    assert!(out.success());
    let err = Filesystem::open(ImageFile(fs::File::open(&img).unwrap()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("inline_data"), "{err}");
    let img = dir.path().join("recover.img");
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .arg("8M")
        .status()
        .unwrap()
        .success());
    let set = Command::new("debugfs")
        .args(["-w", "-R", "feature needs_recovery"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(set.status.success());
    let err = Filesystem::open(ImageFile(fs::File::open(&img).unwrap()))
        .err()
        .unwrap();
    assert!(matches!(err, ReadError::NeedsRecovery), "{err}");
    assert!(err.to_string().contains("needs_recovery"));
}

fn unsafe_free_is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    let root = String::from_utf8_lossy(&out.stdout).trim() == "0";
    if !root {
        eprintln!("SKIPPED: device nodes in the mkfs source tree need root");
    }
    root
}
