//! `tessera import dir`: every kind of entry and all its metadata reach the manifest.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::fixture::{self, FUTURE, MTIME, OLD};
use common::{snapshot, Env};
use tessera::tree::{Entry, Kind, Manifest, Segment};

fn by_path(m: &Manifest) -> BTreeMap<Vec<u8>, Entry> {
    m.entries
        .iter()
        .map(|e| (e.path.0.clone(), e.clone()))
        .collect()
}

fn imported_fixture() -> (Env, std::path::PathBuf, Manifest) {
    let env = Env::new();
    let src = env.path("src");
    fixture::build(&src, common::is_root());
    let tree = env.import(&src);
    let manifest = env.manifest(&tree);
    (env, src, manifest)
}

#[test]
fn every_kind_of_entry_is_recorded() {
    let (_env, _src, m) = imported_fixture();
    let e = by_path(&m);
    let kind = |p: &[u8]| {
        e.get(p)
            .unwrap_or_else(|| panic!("{:?} missing", String::from_utf8_lossy(p)))
            .kind
    };
    assert_eq!(kind(b""), Kind::Dir);
    assert_eq!(kind(b"files/hello.txt"), Kind::File);
    assert_eq!(kind(b"files/empty"), Kind::File);
    assert_eq!(kind(b"files/bad\xffname"), Kind::File);
    assert_eq!(kind("ünïcödé/名前.txt".as_bytes()), Kind::File);
    assert_eq!(kind(b"links/relative"), Kind::Symlink);
    assert_eq!(kind(b"special/fifo"), Kind::Fifo);
    assert_eq!(kind(b"special/socket"), Kind::Socket);
    assert_eq!(
        e[&b"links/binary"[..]].target.as_ref().unwrap().0,
        b"target\xfe\xff"
    );
    assert_eq!(
        e[&b"links/long"[..]].target.as_ref().unwrap().0,
        fixture::LONG_TARGET.repeat(60).as_bytes()
    );
    assert_eq!(e[&b"files/empty"[..]].size, Some(0));
    assert_eq!(e[&b"files/exec"[..]].mode, 0o4755);
    assert_eq!(e[&b"other"[..]].mode, 0o1777);
    assert_eq!(e[&b"many"[..]].kind, Kind::Dir);
    assert_eq!(
        m.entries
            .iter()
            .filter(|x| x.path.0.starts_with(b"many/"))
            .count(),
        301
    );
    if common::is_root() {
        assert_eq!(kind(b"special/null"), Kind::Chardev);
        assert_eq!(e[&b"special/null"[..]].rdev, Some((1, 3)));
        assert_eq!(kind(b"special/loop7"), Kind::Blockdev);
        assert_eq!(e[&b"special/loop7"[..]].rdev, Some((7, 7)));
        assert_eq!(e[&b"special/big-numbers"[..]].rdev, Some((4095, 1_048_575)));
        assert_eq!(e[&b"files/big.bin"[..]].uid, 1234);
        assert_eq!(e[&b"files/big.bin"[..]].gid, 5678);
        let caps: Vec<_> = e[&b"files/exec"[..]]
            .xattrs
            .iter()
            .map(|x| x.name.0.clone())
            .collect();
        assert_eq!(caps, vec![b"security.capability".to_vec()]);
    } else {
        common::can_run(
            "every_kind_of_entry_is_recorded (devices, owners, capabilities)",
            true,
            &[],
        );
    }
}

#[test]
fn hardlinks_across_directories_share_a_link_group() {
    let (_env, _src, m) = imported_fixture();
    let e = by_path(&m);
    let link = |p: &str| e[p.as_bytes()].link;
    assert!(link("files/hello.txt").is_some());
    assert_eq!(link("files/hello.txt"), link("other/deeper/hello-link"));
    assert_eq!(link("files/hello.txt"), link("links/hello-link2"));
    assert!(link("files/big.bin").is_some());
    assert_eq!(link("files/big.bin"), link("other/big-link"));
    assert_ne!(link("files/hello.txt"), link("files/big.bin"));
    assert_eq!(link("files/empty"), None);
    assert_eq!(
        e[&b"files/hello.txt"[..]].object,
        e[&b"links/hello-link2"[..]].object
    );
}

#[test]
fn holes_become_segments_and_objects_hold_only_data() {
    let (env, src, m) = imported_fixture();
    let e = by_path(&m);
    let sparse = &e[&b"files/sparse"[..]];
    let size = (8 << 20) + 100;
    assert_eq!(sparse.size, Some(size));
    assert_eq!(
        sparse.segments.as_deref(),
        Some(
            &[
                Segment(0, 4096),
                Segment(5 << 20, 12288),
                Segment(8 << 20, 100)
            ][..]
        )
    );
    let object = env
        .open_store()
        .read_object(&sparse.object.unwrap())
        .unwrap();
    let source = fs::read(src.join("files/sparse")).unwrap();
    let expected: Vec<u8> = sparse
        .segments
        .as_ref()
        .unwrap()
        .iter()
        .flat_map(|s| source[s.0 as usize..(s.0 + s.1) as usize].to_vec())
        .collect();
    assert_eq!(object, expected);

    assert_eq!(e[&b"files/all-hole"[..]].segments, Some(vec![]));
    assert_eq!(
        e[&b"files/big.bin"[..]].segments,
        None,
        "a dense file records no segments"
    );
    assert_eq!(e[&b"files/empty"[..]].segments, None);
}

#[test]
fn manifest_matches_the_source_metadata_to_the_nanosecond() {
    let (_env, src, m) = imported_fixture();
    let snap = snapshot::snapshot(&src);
    let e = by_path(&m);
    assert_eq!(snap.len(), e.len());
    for (path, info) in &snap {
        let entry = &e[path];
        let what = String::from_utf8_lossy(path);
        assert_eq!(u32::from(entry.mode), info.mode, "{what} mode");
        assert_eq!((entry.uid, entry.gid), (info.uid, info.gid), "{what} owner");
        assert_eq!(
            (entry.atime.0, i64::from(entry.atime.1)),
            info.atime,
            "{what} atime"
        );
        assert_eq!(
            (entry.mtime.0, i64::from(entry.mtime.1)),
            info.mtime,
            "{what} mtime"
        );
        assert_eq!(
            (entry.ctime.0, i64::from(entry.ctime.1)),
            info.ctime,
            "{what} ctime"
        );
        let xattrs: Vec<_> = entry
            .xattrs
            .iter()
            .map(|x| (x.name.0.clone(), x.value.0.clone()))
            .collect();
        assert_eq!(xattrs, info.xattrs, "{what} xattrs");
        assert_eq!(
            entry.target.as_ref().map(|t| t.0.clone()),
            info.target,
            "{what} target"
        );
        assert_eq!(entry.rdev, info.rdev, "{what} rdev");
        if entry.kind == Kind::File {
            assert_eq!(entry.size, info.size, "{what} size");
        }
    }
    let t = |p: &str| e[p.as_bytes()].mtime;
    assert_eq!(
        (t("files/hello.txt").0, t("files/hello.txt").1 as i64),
        MTIME
    );
    assert_eq!((t("files/big.bin").0, t("files/big.bin").1 as i64), OLD);
    assert_eq!((t("files/sparse").0, t("files/sparse").1 as i64), FUTURE);
    assert_eq!(e[&b"files/hello.txt"[..]].xattrs[0].value.0, b"a comment");
}

#[test]
fn the_store_inside_the_source_is_skipped() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("file"), b"x").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("--store")
        .arg(src.join("store"))
        .args(["import", "dir"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    let bytes = tessera::store::Store::open(&src.join("store"))
        .unwrap()
        .read_tree_bytes(&tree.trim().parse().unwrap())
        .unwrap();
    let m = Manifest::from_bytes(&bytes).unwrap();
    let paths: Vec<_> = m.entries.iter().map(|e| e.path.0.clone()).collect();
    assert_eq!(paths, vec![b"".to_vec(), b"file".to_vec()]);
}

#[test]
fn importing_a_file_is_an_error() {
    let env = Env::new();
    let file = env.path("file");
    fs::write(&file, b"x").unwrap();
    let out = env.fails(&[
        std::ffi::OsStr::new("import"),
        "dir".as_ref(),
        file.as_os_str(),
    ]);
    assert!(
        out.contains("is not a directory") && out.contains(&*file.to_string_lossy()),
        "{out}"
    );
}

/// An unreadable file stops the import with its path in the message, and no tree is
/// written. As root, permissions do not stop reads, so the import runs as `nobody`.
#[test]
fn an_unreadable_file_is_an_error_naming_it() {
    if common::is_root()
        && !common::can_run(
            "an_unreadable_file_is_an_error_naming_it",
            false,
            &["setpriv"],
        )
    {
        return;
    }
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("fine"), b"fine").unwrap();
    fs::write(src.join("secret"), b"secret").unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::create_dir(&env.store).unwrap();
    fs::set_permissions(&env.store, fs::Permissions::from_mode(0o777)).unwrap();

    let mut cmd = if common::is_root() {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_tessera"));
        c
    } else {
        std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
    };
    let out = cmd
        .arg("--store")
        .arg(&env.store)
        .args(["import", "dir"])
        .arg(&src)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "import of an unreadable file succeeded"
    );
    assert!(
        stderr.contains(&*src.join("secret").to_string_lossy())
            && stderr.contains("ermission denied"),
        "{stderr}"
    );
    assert!(
        env.files("trees").is_empty(),
        "no tree may reference a half-imported directory"
    );
    assert!(env.files("tmp").is_empty());
}

/// Each cause is printed once: errors with a `#[source]` must not repeat it in their message.
#[test]
fn a_missing_source_is_reported_once() {
    let env = Env::new();
    let missing = env.path("missing");
    let out = env.fails(&[
        std::ffi::OsStr::new("import"),
        "dir".as_ref(),
        missing.as_os_str(),
    ]);
    assert_eq!(out.matches("No such file or directory").count(), 1, "{out}");
    assert!(out.contains(&*missing.to_string_lossy()), "{out}");
}

#[test]
fn a_symlink_naming_the_root_is_followed() {
    let env = Env::new();
    let real = env.path("real");
    fs::create_dir(&real).unwrap();
    fs::write(real.join("f"), b"x").unwrap();
    std::os::unix::fs::symlink(&real, env.path("alias")).unwrap();
    assert_eq!(env.import(&env.path("alias")), env.import(&real));
}

/// The walk stays on the root's filesystem: a mount point is recorded, its contents are not.
#[test]
fn mount_points_are_not_crossed() {
    if !common::can_run("mount_points_are_not_crossed", true, &["mount", "umount"]) {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("mnt")).unwrap();
    fs::write(src.join("file"), b"x").unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tessera-test"])
        .arg(src.join("mnt"))
        .status()
        .unwrap();
    assert!(mounted.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(src.join("mnt"));
    fs::write(src.join("mnt/inside"), b"other filesystem").unwrap();
    let m = env.manifest(&env.import(&src));
    let paths: Vec<_> = m
        .entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.path.0).into_owned())
        .collect();
    assert_eq!(paths, ["", "file", "mnt"]);
}
