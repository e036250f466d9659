#![cfg(feature = "ublk")]
//! The ublk command line where the kernel has no ublk (this host; the devices themselves are
//! tested in the vmtests guest, `vmtests/run ublk`): every refusal says what to do.

use std::path::Path;
use std::process::{Command, Output};

fn tessera(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("run tessera")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn serve_without_ublk_drv_or_root_says_what_to_do() {
    if Path::new("/dev/ublk-control").exists() {
        eprintln!("SKIPPED (not a failure): this kernel has ublk_drv loaded");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &[
            "serve",
            "--ublk",
            "demo",
            "--listen",
            "unix:/nonexistent/x.sock",
        ][..],
        &["serve", "--ublk-control"][..],
    ] {
        let out = tessera(dir.path(), args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let want = if root {
            "modprobe ublk_drv"
        } else {
            "need root"
        };
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn ublk_commands_without_a_server_name_the_socket_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["ublk", "list"][..],
        &["ublk", "list", "--json"][..],
        &["ublk", "add", "demo"][..],
        &["ublk", "del", "/dev/ublkb0"][..],
    ] {
        let out = tessera(dir.path(), args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(
            err.contains("run/ublk.sock") && err.contains("tessera serve --ublk"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn bad_export_names_are_refused_by_the_parser() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["a+b", "@x", "a@", "a@b@c"] {
        let out = tessera(dir.path(), &["serve", "--ublk", bad]);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(
            stderr(&out).contains("use IMAGE, IMAGE@OVERLAY or IMAGE+ephemeral"),
            "{bad:?}: {}",
            stderr(&out)
        );
    }
}
