//! `tessera import deb`: real Debian packages (fetched with `apt-get download`) become one
//! tree each, compose into an image the kernel mounts, and match what dpkg-deb unpacks.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{snapshot, Env, LoopMount};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn debs_in(dir: &Path) -> Vec<PathBuf> {
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort();
    debs
}

fn import_args(debs: &[PathBuf], name: Option<&str>) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["import".into(), "deb".into()];
    args.extend(debs.iter().map(|d| d.clone().into_os_string()));
    if let Some(n) = name {
        args.extend(["--name".into(), n.into()]);
    }
    args
}

#[test]
fn real_packages_compose_into_an_image_matching_dpkg_deb() {
    if !common::can_run(
        "real_packages_compose_into_an_image_matching_dpkg_deb",
        true,
        &["apt-get", "dpkg-deb", "tar", "mount", "e2fsck"],
    ) {
        return;
    }
    let env = Env::new();
    let dl = env.path("debs");
    std::fs::create_dir(&dl).unwrap();
    let fetched = Command::new("apt-get")
        .args(["download", "busybox-static", "libc6", "coreutils"])
        .current_dir(&dl)
        .output()
        .unwrap();
    if !fetched.status.success() {
        // No package lists or no network: a missing peer like any other.
        common::can_run(
            &format!(
                "real_packages_compose_into_an_image_matching_dpkg_deb (apt-get download: {})",
                String::from_utf8_lossy(&fetched.stderr).trim()
            ),
            false,
            &["apt-get download"],
        );
        return;
    }
    let debs = debs_in(&dl);
    assert_eq!(debs.len(), 3);

    let out = env
        .command()
        .args(import_args(&debs, Some("pkgs")))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 3, "one tree per package: {stdout}");
    assert!(
        stderr.contains("maintainer scripts were not run") && stderr.contains("libc6_"),
        "{stderr}"
    );

    // Re-importing stores nothing new and gives the same trees.
    let files = env.files("objects");
    let again = env.ok(&import_args(&debs, None));
    assert_eq!(again, stdout);
    assert_eq!(env.files("objects"), files);

    // The oracle: dpkg-deb's own data archive of each package, unpacked in the same order.
    let union = env.path("union");
    std::fs::create_dir(&union).unwrap();
    for deb in &debs {
        run(Command::new("sh").arg("-c").arg(format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -x --same-owner --numeric-owner -p -C '{}'",
            deb.display(),
            union.display()
        )));
    }
    let img = env.path("pkgs.img");
    env.ok(&[
        OsString::from("image"),
        "export".into(),
        "pkgs".into(),
        img.clone().into_os_string(),
    ]);
    common::e2fsck_clean(&img);
    let mount = LoopMount::new(&img, &env.path("mnt"), "ro,noatime");
    let expected = snapshot::as_extracted(&union);
    assert!(expected.contains_key(&b"bin/busybox"[..]));
    assert!(expected.contains_key(&b"bin/ls"[..]));
    snapshot::assert_same(&expected, &snapshot::as_extracted(&mount.dir));
    // And the packaged binaries run against the packaged libc.
    let ls = Command::new(mount.dir.join("lib64/ld-linux-x86-64.so.2"))
        .arg("--library-path")
        .arg(mount.dir.join("lib/x86_64-linux-gnu"))
        .arg(mount.dir.join("bin/ls"))
        .arg(mount.dir.join("bin/busybox"))
        .output()
        .unwrap();
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
}

/// Build a package `name` shipping `files` (path, content) with `dpkg-deb --build`.
fn build_deb(dir: &Path, name: &str, files: &[(&str, &str)], postinst: bool) -> PathBuf {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\n\
             Description: test\n"
        ),
    )
    .unwrap();
    if postinst {
        let p = root.join("DEBIAN/postinst");
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for (path, content) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let deb = dir.join(format!("{name}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group", "-Zxz"])
        .arg(&root)
        .arg(&deb));
    deb
}

/// Two packages shipping one path differently cannot be composed: the error names the
/// path and both packages. The same file in both, and shared directories, are fine.
#[test]
fn conflicting_packages_are_refused_by_name() {
    if !common::can_run(
        "conflicting_packages_are_refused_by_name",
        false,
        &["dpkg-deb"],
    ) {
        return;
    }
    let env = Env::new();
    let dir = env.path("build");
    let a = build_deb(
        &dir,
        "pkg-a",
        &[("etc/x", "from a"), ("usr/share/same", "s")],
        true,
    );
    let b = build_deb(
        &dir,
        "pkg-b",
        &[("etc/x", "from b"), ("usr/share/same", "s")],
        false,
    );
    let c = build_deb(
        &dir,
        "pkg-c",
        &[("etc/y", "y"), ("usr/share/same", "s")],
        false,
    );

    let err = env.fails(&import_args(&[a.clone(), b.clone()], Some("clash")));
    assert!(
        err.contains("\"etc/x\" (pkg-a_1.0_all vs pkg-b_1.0_all)"),
        "{err}"
    );
    assert!(!err.contains("usr/share/same"), "{err}");
    assert!(!env.store.join("images/clash.json").exists());

    let out = env
        .command()
        .args(import_args(&[a, c], Some("fine")))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("pkg-a_1.0_all (postinst)"), "{stderr}");
    assert!(!stderr.contains("pkg-c_1.0_all ("), "{stderr}");
}

#[test]
fn a_file_that_is_not_a_package_is_refused() {
    let env = Env::new();
    let bogus = env.path("bogus.deb");
    std::fs::write(&bogus, b"!<arch>\nnot really").unwrap();
    let err = env.fails(&import_args(std::slice::from_ref(&bogus), None));
    assert!(err.contains("bogus.deb"), "{err}");
    std::fs::write(&bogus, vec![7u8; 100]).unwrap();
    let err = env.fails(&import_args(&[bogus], None));
    assert!(err.contains("not a valid ar archive"), "{err}");
    assert!(env.files("trees").is_empty());
}
