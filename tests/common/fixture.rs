//! A source tree with one of every kind of entry the importer must carry.

use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

/// Nanosecond-precise times used by the fixture (including before 1970 and after 2038).
pub const MTIME: (i64, i64) = (1_600_000_000, 123_456_789);
pub const OLD: (i64, i64) = (-1_000, 500_000_000);
pub const FUTURE: (i64, i64) = (4_102_444_800, 999_999_999);
/// Repeated 60 times: a 300-byte symlink target.
pub const LONG_TARGET: &str = "long/";

/// Build the fixture under `root` (which must not exist). With `root_only`, also what needs
/// root: device nodes, foreign owners and `security.capability`.
pub fn build(root: &Path, root_only: bool) {
    let dir = |p: &str| fs::create_dir_all(root.join(p)).unwrap();
    let write = |p: &str, data: &[u8]| fs::write(root.join(p), data).unwrap();
    let chmod = |p: &str, mode: u32| {
        fs::set_permissions(root.join(p), fs::Permissions::from_mode(mode)).unwrap()
    };

    dir("");
    dir("files");
    dir("other/deeper");
    dir("links");
    dir("special");
    dir("ünïcödé");
    dir("many");

    write("files/hello.txt", b"hello, world\n");
    write("files/empty", b"");
    write("files/big.bin", &pseudo_random(300 * 1024 + 17));
    write("files/exec", b"#!/bin/sh\nexit 0\n");
    chmod("files/exec", 0o4755);
    write("files/sticky-dir-file", b"x");
    chmod("other", 0o1777);
    write("ünïcödé/名前.txt", "多くの言葉\n".as_bytes());
    write("many/.hidden", b"h");
    for i in 0..300 {
        write(
            &format!("many/file-{i:04}-with-a-longer-name-to-fill-blocks"),
            format!("{i}\n").as_bytes(),
        );
    }
    let bad_name = root.join(OsStr::from_bytes(b"files/bad\xffname"));
    fs::write(bad_name, b"not utf-8 name\n").unwrap();

    // Sparse: data at 0, at 5 MiB, and a partial block at the end of an 8 MiB + 100 file.
    let sparse = fs::File::create(root.join("files/sparse")).unwrap();
    let size = (8 << 20) + 100;
    sparse.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    sparse.write_all_at(&[0xaa; 4096], 0).unwrap();
    sparse
        .write_all_at(&pseudo_random(10_000), 5 << 20)
        .unwrap();
    sparse.write_all_at(b"tail", size - 4).unwrap();
    drop(sparse);
    fs::File::create(root.join("files/all-hole"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();

    // Hardlinks across directories.
    fs::hard_link(
        root.join("files/hello.txt"),
        root.join("other/deeper/hello-link"),
    )
    .unwrap();
    fs::hard_link(root.join("files/hello.txt"), root.join("links/hello-link2")).unwrap();
    fs::hard_link(root.join("files/big.bin"), root.join("other/big-link")).unwrap();

    symlink("../files/hello.txt", root.join("links/relative")).unwrap();
    symlink("/nowhere/at/all", root.join("links/dangling")).unwrap();
    // Longer than the 60 bytes that fit in the inode; components stay under 255 bytes
    // because ext4-view rejects longer ones.
    symlink(LONG_TARGET.repeat(60), root.join("links/long")).unwrap();
    symlink(
        OsStr::from_bytes(b"target\xfe\xff"),
        root.join("links/binary"),
    )
    .unwrap();

    mkfifo(&root.join("special/fifo"));
    let sock = std::os::unix::net::UnixListener::bind(root.join("special/socket")).unwrap();
    drop(sock);

    set_xattr(&root.join("files/hello.txt"), "user.comment", b"a comment");
    set_xattr(
        &root.join("files/big.bin"),
        "user.binary",
        &[0, 1, 2, 0xff, 0xfe],
    );
    set_xattr(&root.join("other"), "user.on-a-dir", b"yes");
    // POSIX ACLs: the VFS xattr format differs from ext4's on-disk one, so these check a
    // conversion, not just a copy.
    set_xattr(
        &root.join("ünïcödé/名前.txt"),
        "system.posix_acl_access",
        &acl(&[(2, 6, 1000)]),
    );
    set_xattr(
        &root.join("ünïcödé"),
        "system.posix_acl_default",
        &acl(&[(8, 5, 100)]),
    );
    if root_only {
        mknod(&root.join("special/null"), libc::S_IFCHR, 1, 3);
        mknod(&root.join("special/loop7"), libc::S_IFBLK, 7, 7);
        mknod(
            &root.join("special/big-numbers"),
            libc::S_IFCHR,
            4095,
            1_048_575,
        );
        // security.capability v2 for cap_net_raw (bit 13) permitted+effective.
        let mut cap = vec![0u8; 20];
        cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
        cap[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
        set_xattr(&root.join("files/exec"), "security.capability", &cap);
        set_xattr(&root.join("files/empty"), "trusted.overlay.opaque", b"y");
        std::os::unix::fs::lchown(root.join("files/big.bin"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(root.join("links/relative"), Some(42), Some(43)).unwrap();
    }

    // Times last: creating children changes a directory's mtime.
    set_times(&root.join("files/hello.txt"), MTIME, MTIME);
    set_times(&root.join("files/big.bin"), OLD, OLD);
    set_times(&root.join("files/sparse"), FUTURE, FUTURE);
    set_times(&root.join("links/relative"), MTIME, MTIME);
    for d in ["files", "other/deeper", "other", "ünïcödé", ""] {
        set_times(&root.join(d), MTIME, (MTIME.0 + 1, 1));
    }
}

/// A POSIX ACL in the VFS xattr format (version 2): the base entries plus `extra`
/// (tag, perm, id) entries, in the order the kernel requires.
fn acl(extra: &[(u16, u16, u32)]) -> Vec<u8> {
    const UNDEFINED: u32 = u32::MAX;
    let mut entries = vec![(1u16, 6u16, UNDEFINED)]; // ACL_USER_OBJ rw-
    entries.extend(extra.iter().filter(|e| e.0 == 2)); // ACL_USER
    entries.push((4, 4, UNDEFINED)); // ACL_GROUP_OBJ r--
    entries.extend(extra.iter().filter(|e| e.0 == 8)); // ACL_GROUP
    entries.push((0x10, 6, UNDEFINED)); // ACL_MASK rw-
    entries.push((0x20, 4, UNDEFINED)); // ACL_OTHER r--
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

pub fn pseudo_random(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&(len as u64).to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn check(rc: libc::c_int, what: &str, p: &Path) {
    assert_eq!(
        rc,
        0,
        "{what} {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn mkfifo(p: &Path) {
    // SAFETY: valid C string.
    check(
        unsafe { libc::mkfifo(cpath(p).as_ptr(), 0o640) },
        "mkfifo",
        p,
    );
}

pub fn mknod(p: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    // SAFETY: valid C string.
    let rc = unsafe { libc::mknod(cpath(p).as_ptr(), kind | 0o620, libc::makedev(major, minor)) };
    check(rc, "mknod", p);
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings; pointer and length describe `value`.
    let rc = unsafe {
        libc::lsetxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(rc, "setxattr", p);
}

/// Set atime and mtime (seconds, nanoseconds) without following symlinks.
pub fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid C string and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cpath(p).as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(rc, "utimensat", p);
}
