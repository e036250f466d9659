//! `tessera import tar`: real tarballs made by GNU tar round-trip through the kernel, and
//! a corpus of broken and hostile archives (made here, with the `tar` crate or raw header
//! bytes) is refused with an error naming the entry, leaving the store as it was.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::snapshot::{self, Info};
use common::{fixture, Env, LoopMount};
use tessera::tree::{Entry, Kind, Manifest, Segment};

fn import_tar(env: &Env, file: &Path) -> String {
    env.ok(&[OsStr::new("import"), OsStr::new("tar"), file.as_os_str()])
        .trim()
        .to_owned()
}

fn export(env: &Env, tree: &str, name: &str) -> std::path::PathBuf {
    env.ok(&["image", "create", name, "--tree", tree]);
    let img = env.path(&format!("{name}.img"));
    env.ok(&[
        OsStr::new("image"),
        OsStr::new("export"),
        OsStr::new(name),
        img.as_os_str(),
    ]);
    img
}

fn mounted_snapshot(mnt: &Path) -> BTreeMap<Vec<u8>, Info> {
    let mut snap = snapshot::snapshot(mnt);
    if snap.remove(&b"lost+found"[..]).is_some() {
        snap.get_mut(&b""[..]).unwrap().nlink -= 1;
    }
    snap
}

fn sh(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The fixture (every kind of entry, odd names, nanosecond and pre-1970 times, xattrs,
/// hardlinks, devices) plus part of /usr/share/doc.
fn source(env: &Env) -> std::path::PathBuf {
    let src = env.path("src");
    fixture::build(&src, true);
    std::fs::remove_file(src.join("special/socket")).unwrap(); // tar cannot hold sockets
    if Path::new("/usr/share/doc").is_dir() {
        std::fs::create_dir(src.join("doc")).unwrap();
        sh(&format!(
            "cd /usr/share/doc && ls | head -40 | xargs cp -a -t '{}'",
            src.join("doc").display()
        ));
    }
    src
}

/// What survives a tar archive: everything but birth times. (With `--xattrs-include='*'`
/// GNU tar keeps POSIX ACLs as their raw `system.posix_acl_*` xattrs.)
fn through_tar(mut snap: BTreeMap<Vec<u8>, Info>) -> BTreeMap<Vec<u8>, Info> {
    for i in snap.values_mut() {
        i.crtime = None;
    }
    snap
}

fn assert_mounted_equals(env: &Env, img: &Path, expected: &BTreeMap<Vec<u8>, Info>, mnt: &str) {
    common::e2fsck_clean(img);
    let mount = LoopMount::new(img, &env.path(mnt), "ro,noatime");
    let mut actual = mounted_snapshot(&mount.dir);
    actual.values_mut().for_each(|i| i.crtime = None);
    // GNU tar records a directory's atime after listing it, which moved it: the archive
    // holds that later time, not the one the source snapshot saw.
    let mut expected = expected.clone();
    for snap in [&mut expected, &mut actual] {
        snap.values_mut()
            .filter(|i| i.kind == "dir")
            .for_each(|i| i.atime = (0, 0));
    }
    snapshot::assert_same(&expected, &actual);
}

/// GNU tar `--xattrs` (which writes PAX headers: nanosecond atime/mtime/ctime, SCHILY
/// xattrs) and `--format=pax` compressed with zstd: the kernel sees the source tree,
/// every time and xattr included.
#[test]
fn pax_tarballs_round_trip_through_the_kernel() {
    if !common::can_run(
        "pax_tarballs_round_trip_through_the_kernel",
        true,
        &["tar", "zstd", "mount", "e2fsck"],
    ) {
        return;
    }
    let env = Env::new();
    let src = source(&env);
    let expected = through_tar(snapshot::snapshot(&src));
    let tar = env.path("src.tar");
    let zst = env.path("src.pax.tar.zst");
    // O_NOATIME reads, so archiving moves no atime the snapshot holds.
    sh(&format!(
        "tar --xattrs --xattrs-include='*' --atime-preserve=system -cf '{}' -C '{}' . \
         && tar --format=pax --xattrs --xattrs-include='*' --atime-preserve=system -cf - -C '{}' . \
            | zstd -q -o '{}'",
        tar.display(),
        src.display(),
        src.display(),
        zst.display()
    ));
    let t1 = import_tar(&env, &tar);
    let img = export(&env, &t1, "gnu-xattrs");
    assert_mounted_equals(&env, &img, &expected, "mnt1");

    let t2 = import_tar(&env, &zst);
    let img = export(&env, &t2, "pax-zstd");
    assert_mounted_equals(&env, &img, &expected, "mnt2");
}

/// Plain GNU format (whole-second mtimes, no atime/ctime, no xattrs) through gzip, and
/// ustar through xz: what the format holds arrives, the rest is the documented default
/// (atime = ctime = mtime).
#[test]
fn gnu_and_ustar_tarballs_round_trip_through_the_kernel() {
    if !common::can_run(
        "gnu_and_ustar_tarballs_round_trip_through_the_kernel",
        true,
        &["tar", "gzip", "xz", "mount", "e2fsck"],
    ) {
        return;
    }
    let env = Env::new();
    let src = source(&env);
    // Whole seconds: GNU tar rounds -1000.5 down to -1001, which the projection below
    // (dropping nanoseconds) would not; keep this file's times positive.
    fixture::set_times(&src.join("files/big.bin"), fixture::MTIME, fixture::MTIME);
    let mut expected = through_tar(snapshot::snapshot(&src));
    for i in expected.values_mut() {
        i.mtime.1 = 0;
        i.atime = i.mtime;
        i.ctime = i.mtime;
        i.xattrs.clear();
    }
    let gz = env.path("src.tar.gz");
    sh(&format!(
        "tar --format=gnu -czf '{}' -C '{}' .",
        gz.display(),
        src.display()
    ));
    let tree = import_tar(&env, &gz);
    let img = export(&env, &tree, "gnu-gz");
    assert_mounted_equals(&env, &img, &expected, "mnt1");

    // ustar cannot hold the fixture's long symlink target or device numbers over 2^21;
    // archive the doc part only.
    if src.join("doc").is_dir() {
        let xz = env.path("doc.tar.xz");
        sh(&format!(
            "tar --format=ustar -cJf '{}' -C '{}' .",
            xz.display(),
            src.join("doc").display()
        ));
        let mut expected: BTreeMap<_, _> = expected
            .iter()
            .filter_map(|(p, i)| {
                let rest = if p == b"doc" {
                    Some(Vec::new())
                } else {
                    p.strip_prefix(b"doc/").map(<[u8]>::to_vec)
                };
                rest.map(|r| (r, i.clone()))
            })
            .collect();
        expected.values_mut().for_each(|i| {
            if i.same_inode_as.is_some() {
                let p = i.same_inode_as.as_ref().unwrap();
                i.same_inode_as = Some(p.strip_prefix(b"doc/").unwrap_or(p).to_vec());
            }
        });
        let tree = import_tar(&env, &xz);
        let img = export(&env, &tree, "ustar-xz");
        assert_mounted_equals(&env, &img, &expected, "mnt2");
    }
}

/// The same tarball twice (and the same content compressed differently): the same tree,
/// and nothing new in the store.
#[test]
fn reimporting_stores_nothing_new() {
    let env = Env::new();
    let tar = env.path("a.tar");
    write_archive(&tar, |b| {
        add_file(b, "d/f", b"content", 0o644);
        add_file(b, "d/g", &fixture::pseudo_random(3 << 20), 0o600);
    });
    let first = import_tar(&env, &tar);
    let files = env.files("");
    assert_eq!(import_tar(&env, &tar), first);
    let gz = env.path("a.tar.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&std::fs::read(&tar).unwrap()).unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    assert_eq!(import_tar(&env, &gz), first);
    // From stdin too.
    let out = env
        .command()
        .args(["import", "tar", "-"])
        .stdin(std::fs::File::open(&tar).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), first);
    assert_eq!(env.files(""), files, "re-imports changed the store");
}

/// An import killed halfway (here: stdin still open, half the archive sent) leaves no tree
/// and no named object, packing or not: what it staged is under `tmp/`, which `store gc`
/// clears, and its spool is an unlinked file there, gone with the process.
#[test]
fn an_interrupted_import_leaves_nothing_referenced() {
    for flags in [&["--no-pack"][..], &[]] {
        let env = Env::new();
        let data = archive(|b| {
            for i in 0..20 {
                add_file(
                    b,
                    &format!("f{i}"),
                    &fixture::pseudo_random(200_000 + i),
                    0o644,
                );
            }
        });
        let mut child = env
            .command()
            .args(["import", "tar"])
            .args(flags)
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&data[..data.len() / 2]).unwrap();
        stdin.flush().unwrap();
        // Wait until it has written something under tmp/ (a staged file, or bytes in its
        // unlinked spool), then kill it without warning.
        let tmp = env.store.join("tmp");
        let writing = || {
            !env.files("tmp").is_empty()
                || std::fs::read_dir(format!("/proc/{}/fd", child.id()))
                    .into_iter()
                    .flatten()
                    .filter_map(|fd| fd.ok().map(|fd| fd.path()))
                    .any(|fd| {
                        std::fs::read_link(&fd).is_ok_and(|t| t.starts_with(&tmp))
                            && std::fs::metadata(&fd).is_ok_and(|m| m.len() > 0)
                    })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !writing() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(writing(), "the import {flags:?} wrote nothing under tmp/");
        child.kill().unwrap();
        child.wait().unwrap();
        drop(stdin);
        assert!(env.files("trees").is_empty());
        assert!(env.files("objects").is_empty());
        assert!(env.files("packs").is_empty());
        env.ok(&["store", "verify"]);
        env.ok(&["store", "gc"]);
        assert!(env.files("tmp").is_empty());
    }
}

/// GNU sparse members keep their holes; PAX-encoded sparse files are refused by name.
#[test]
fn gnu_sparse_entries_keep_their_holes() {
    if !common::can_run("gnu_sparse_entries_keep_their_holes", false, &["tar"]) {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir(&src).unwrap();
    let f = std::fs::File::create(src.join("sparse")).unwrap();
    f.set_len(10 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"middle", 5 << 20).unwrap();
    f.write_all_at(b"end", (10 << 20) - 3).unwrap();
    drop(f);
    let gnu = env.path("gnu.tar");
    sh(&format!(
        "tar --format=gnu --sparse -cf '{}' -C '{}' sparse",
        gnu.display(),
        src.display()
    ));
    let m = env.manifest(&import_tar(&env, &gnu));
    let e = entry(&m, "sparse");
    assert_eq!(e.size, Some(10 << 20));
    assert_eq!(
        e.segments,
        Some(vec![
            Segment(5 << 20, 4096),
            Segment((10 << 20) - 4096, 4096)
        ])
    );
    let pax = env.path("pax.tar");
    sh(&format!(
        "tar --format=pax --sparse -cf '{}' -C '{}' sparse",
        pax.display(),
        src.display()
    ));
    let err = env.fails(&[OsStr::new("import"), OsStr::new("tar"), pax.as_os_str()]);
    assert!(err.contains("GNU.sparse"), "{err}");
}

fn entry<'m>(m: &'m Manifest, path: &str) -> &'m Entry {
    m.entries
        .iter()
        .find(|e| e.path.0 == path.as_bytes())
        .unwrap_or_else(|| panic!("{path} missing"))
}

// ---- building archives ----

fn write_archive(path: &Path, build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

fn add_link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
    let mut h = header(kind, 0o777, 0);
    b.append_link(&mut h, path, target).unwrap();
}

/// A member whose name bytes are written as given (the Builder refuses `..` and absolute
/// names), as a hostile archive would have them.
fn add_raw(b: &mut tar::Builder<Vec<u8>>, name: &[u8], data: &[u8]) {
    let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
    let field = &mut h.as_old_mut().name;
    field.fill(0);
    field[..name.len()].copy_from_slice(name);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// Import `archive` (bytes) expecting failure; the message must contain each of `needles`
/// and the store must hold no tree and no object afterwards.
fn refused(archive: &[u8], needles: &[&str]) {
    let env = Env::new();
    let path = env.path("bad.tar");
    std::fs::write(&path, archive).unwrap();
    let err = env.fails(&[OsStr::new("import"), OsStr::new("tar"), path.as_os_str()]);
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    assert_eq!(env.files("trees"), Vec::<std::path::PathBuf>::new());
    assert_eq!(env.files("objects"), Vec::<std::path::PathBuf>::new());
    assert_eq!(env.files("tmp"), Vec::<std::path::PathBuf>::new());
}

fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

#[test]
fn dotdot_components_are_refused() {
    let a = archive(|b| {
        add_file(b, "ok", b"fine", 0o644);
        add_raw(b, b"a/../../etc/passwd", b"root::0:0::/:/bin/sh\n");
    });
    refused(&a, &["a/../../etc/passwd", "'..'"]);
}

/// Absolute names are made relative, as GNU tar does without -P.
#[test]
fn absolute_names_become_relative() {
    let env = Env::new();
    let path = env.path("abs.tar");
    std::fs::write(&path, archive(|b| add_raw(b, b"/etc/hostname", b"host\n"))).unwrap();
    let m = env.manifest(&import_tar(&env, &path));
    assert_eq!(entry(&m, "etc/hostname").size, Some(5));
    assert_eq!(entry(&m, "etc").kind, Kind::Dir);
}

#[test]
fn entries_through_a_symlink_are_refused() {
    let a = archive(|b| {
        add_link(b, tar::EntryType::Symlink, "escape", "/etc");
        add_file(b, "escape/passwd", b"x", 0o644);
    });
    refused(&a, &["escape/passwd", "\"escape\" is a symlink"]);
}

#[test]
fn hardlinks_to_missing_or_later_entries_are_refused() {
    let a = archive(|b| add_link(b, tar::EntryType::Link, "link", "missing"));
    refused(&a, &["\"link\"", "not an earlier entry"]);
    let a = archive(|b| {
        add_link(b, tar::EntryType::Link, "link", "later");
        add_file(b, "later", b"x", 0o644);
    });
    refused(
        &a,
        &["\"link\"", "\"later\", which is not an earlier entry"],
    );
}

/// Later duplicates win, as with `tar -x`; hardlinks made before keep the old content.
#[test]
fn later_duplicates_win() {
    let env = Env::new();
    let path = env.path("dup.tar");
    std::fs::write(
        &path,
        archive(|b| {
            add_file(b, "f", b"first", 0o644);
            add_link(b, tar::EntryType::Link, "g", "f");
            add_file(b, "f", b"second", 0o600);
        }),
    )
    .unwrap();
    let m = env.manifest(&import_tar(&env, &path));
    assert_eq!(entry(&m, "f").size, Some(6));
    assert_eq!(entry(&m, "f").mode, 0o600);
    assert_eq!(entry(&m, "g").size, Some(5));
    assert_eq!(entry(&m, "g").link, None);
}

#[test]
fn truncated_archives_are_refused() {
    let a = archive(|b| add_file(b, "big", &fixture::pseudo_random(100_000), 0o644));
    refused(&a[..50_000], &["\"big\"", "truncated"]);
    // Cut inside the second header.
    let a = archive(|b| {
        add_file(b, "one", b"1", 0o644);
        add_file(b, "two", b"2", 0o644);
    });
    refused(&a[..1024 + 100], &["after \"one\""]);
}

#[test]
fn corrupt_compression_is_refused() {
    let tar = archive(|b| add_file(b, "f", &fixture::pseudo_random(200_000), 0o644));
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&tar).unwrap();
    let mut gz = enc.finish().unwrap();
    let mid = gz.len() / 2;
    gz[mid] ^= 0xff;
    gz[mid + 1] ^= 0x55;
    refused(&gz, &["bad.tar"]);
    // A flipped byte in the zstd checksum trailer.
    let mut zst = zstd::encode_all(&tar[..], 3).unwrap();
    let last = zst.len() - 1;
    zst[last] ^= 1;
    refused(&zst, &["bad.tar"]);
}

#[test]
fn absurd_sizes_are_refused_without_allocating_them() {
    // 2^60 bytes, base-256 encoded: more than ext4 holds.
    let mut a = archive(|b| add_file(b, "huge", b"", 0o644));
    let h = tar::Header::from_byte_slice(&a[..512]).clone();
    let mut h = h;
    h.set_size(1 << 60);
    h.set_cksum();
    a[..512].copy_from_slice(h.as_bytes());
    refused(&a, &["\"huge\"", "more than ext4"]);
    // 8 GiB claimed by a tiny archive: truncated, found by reading, not by allocating.
    let mut a = archive(|b| add_file(b, "liar", b"", 0o644));
    h = tar::Header::from_byte_slice(&a[..512]).clone();
    h.set_size(8 << 30);
    h.set_cksum();
    a[..512].copy_from_slice(h.as_bytes());
    refused(&a, &["\"liar\"", "truncated"]);
}

#[test]
fn names_over_255_bytes_are_refused() {
    let long = format!("dir/{}", "n".repeat(256));
    let a = archive(|b| add_file(b, &long, b"x", 0o644)); // a GNU long-name member
    refused(&a, &["256 bytes", "255"]);
}

#[test]
fn garbage_is_not_a_tarball() {
    refused(&[0x42u8; 3000], &["bad.tar"]);
}
