//! Writable exports through real clients: the kernel (nbdfuse + loop mount), qemu-io,
//! nbdcopy, libnbd; persistence across restarts and `kill -9`; a full disk.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::served::{Fuse, Served};
use common::{e2fsck_clean, Env, LoopMount};

/// Debian's Python, which has libnbd's `nbd` module (python3-libnbd); `python3` on PATH
/// may be another installation.
const PY: &str = "/usr/bin/python3";

/// An image of a small tree with room to write: returns the raw export of the base image.
fn image(env: &Env) -> PathBuf {
    let src = env.path("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hostname"), "tessera\n").unwrap();
    fs::write(src.join("keep"), vec![7u8; 100_000]).unwrap();
    fs::write(src.join("doomed"), "delete me").unwrap();
    fs::write(src.join("old-name"), "rename me").unwrap();
    let tree = env.import(&src);
    env.ok(&["image", "create", "img", "--tree", &tree, "--size", "64M"]);
    let raw = env.path("base.raw");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "img".as_ref(),
        raw.as_os_str(),
    ]);
    raw
}

/// nbdcopy the export to a file, retrying while the previous client's overlay is released.
fn copy_out(uri: &str, out: &Path) {
    let start = Instant::now();
    loop {
        let o = Command::new("nbdcopy").arg(uri).arg(out).output().unwrap();
        if o.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("attached by another client") && start.elapsed() < Duration::from_secs(10),
            "nbdcopy {uri}: {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sync() {
    assert!(Command::new("sync").status().unwrap().success());
}

#[test]
fn persistent_overlay_through_the_kernel_survives_a_restart() {
    if !common::can_run(
        "persistent_overlay_through_the_kernel",
        true,
        &["nbdfuse", "fusermount3", "nbdcopy", "e2fsck"],
    ) {
        return;
    }
    let env = Env::new();
    let base = image(&env);
    let base_bytes = fs::read(&base).unwrap();
    let mut served = Served::start(&env, &["--export", "img:persistent=vm1"]);
    {
        let fuse = Fuse::new(&env.path("fuse"), &served.uri("img"), false);
        let m = LoopMount::new(&fuse.file, &env.path("mnt"), "rw");
        let p = &m.dir;
        fs::write(p.join("new-file"), vec![1u8; 3 << 20]).unwrap();
        fs::write(p.join("etc/hostname"), "overwritten\n").unwrap();
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(p.join("keep"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"appended").unwrap();
        drop(f);
        fs::remove_file(p.join("doomed")).unwrap();
        fs::rename(p.join("old-name"), p.join("new-name")).unwrap();
        fs::create_dir(p.join("new-dir")).unwrap();
        sync();
        drop(m);
        drop(fuse);
    }
    let after = env.path("after.img");
    copy_out(&served.uri("img"), &after);
    e2fsck_clean(&after);

    served.stop(Duration::from_secs(10));
    let served = Served::start(&env, &["--export", "img:persistent=vm1"]);
    let again = env.path("again.img");
    copy_out(&served.uri("img"), &again);
    assert!(
        fs::read(&again).unwrap() == fs::read(&after).unwrap(),
        "overlay reattached after restart"
    );
    {
        let m = LoopMount::new(&again, &env.path("check"), "ro");
        let p = &m.dir;
        assert_eq!(fs::read(p.join("new-file")).unwrap(), vec![1u8; 3 << 20]);
        assert_eq!(
            fs::read_to_string(p.join("etc/hostname")).unwrap(),
            "overwritten\n"
        );
        assert!(fs::read(p.join("keep")).unwrap().ends_with(b"appended"));
        assert!(!p.join("doomed").exists() && !p.join("old-name").exists());
        assert_eq!(fs::read_to_string(p.join("new-name")).unwrap(), "rename me");
        assert!(p.join("new-dir").is_dir());
    }
    // The image and the store are untouched.
    env.ok(&["store", "verify"]);
    let base_again = env.path("base-again.raw");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "img".as_ref(),
        base_again.as_os_str(),
    ]);
    assert!(
        fs::read(&base_again).unwrap() == base_bytes,
        "base image changed"
    );
    let list = env.ok(&["overlay", "list"]);
    assert!(list.contains("vm1") && list.contains("img"), "{list}");
}

#[test]
fn ephemeral_overlay_starts_clean_every_time() {
    if !common::can_run(
        "ephemeral_overlay_starts_clean",
        true,
        &["nbdfuse", "fusermount3", "nbdcopy"],
    ) {
        return;
    }
    let env = Env::new();
    let base = image(&env);
    let served = Served::start(&env, &["--export", "img:ephemeral"]);
    {
        let fuse = Fuse::new(&env.path("fuse"), &served.uri("img"), false);
        let m = LoopMount::new(&fuse.file, &env.path("mnt"), "rw");
        fs::write(m.dir.join("scratch"), "temporary").unwrap();
        sync();
        drop(m);
        drop(fuse);
    }
    let out = env.path("out.img");
    copy_out(&served.uri("img"), &out);
    assert!(
        fs::read(&out).unwrap() == fs::read(&base).unwrap(),
        "a new connection sees the pristine image"
    );
    let eph = env.store.join("run/ephemeral");
    assert_eq!(
        fs::read_dir(&eph).map(|d| d.count()).unwrap_or(0),
        0,
        "ephemeral overlays are removed"
    );
}

#[test]
fn a_persistent_overlay_admits_one_client_and_one_image() {
    if !common::can_run(
        "a_persistent_overlay_admits_one_client",
        false,
        &["qemu-img", PY],
    ) {
        return;
    }
    let env = Env::new();
    image(&env);
    let served = Served::start(&env, &["--export", "img:persistent=solo"]);
    // Hold one connection open with libnbd, then try a second client.
    let script = format!(
        "import nbd, sys, time\nh = nbd.NBD()\nh.connect_uri({:?})\nprint('connected', flush=True)\nsys.stdin.read()\n",
        served.uri("img")
    );
    let mut holder = Command::new(PY)
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "connected");
    // qemu shows the server's error message ("server reported: ...").
    let second = Command::new("qemu-img")
        .arg("info")
        .arg(served.uri("img"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("attached by another client"), "{err}");
    drop(holder.stdin.take());
    holder.wait().unwrap();
    drop(served);

    // Re-create the image from another tree: the overlay refuses it.
    let other = env.path("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("x"), "different").unwrap();
    let tree = env.import(&other);
    env.ok(&["image", "rm", "img"]);
    env.ok(&["image", "create", "img", "--tree", &tree, "--size", "64M"]);
    let served = Served::start(&env, &["--export", "img:persistent=solo"]);
    let o = Command::new("qemu-img")
        .arg("info")
        .arg(served.uri("img"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("belongs to image"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn qemu_io_write_patterns_match_a_model_file() {
    if !common::can_run(
        "qemu_io_write_patterns",
        false,
        &["qemu-io", "qemu-img", "nbdcopy"],
    ) {
        return;
    }
    let env = Env::new();
    let base = image(&env);
    let model = env.path("model.raw");
    fs::copy(&base, &model).unwrap();
    let served = Served::start(&env, &["--export", "img:persistent=pat"]);
    let ops: &[&str] = &[
        "write -P 0xab 1000 5000",
        "write -P 0xcd 4096 4096",
        "write -P 0x11 4000 200",
        "write -z 8192 12288",
        "write -z 100 50",
        "discard 65536 131072",
        "write -P 0x22 70000 10",
        "write -P 0x33 1048575 3",
        "write -z -u 2097152 1048576",
        "write -P 0x44 -f 3000000 65536",
        "flush",
    ];
    let mut args = vec!["-f".to_owned(), "raw".to_owned()];
    for op in ops {
        args.push("-c".into());
        args.push((*op).into());
    }
    let on = |target: &str| {
        let o = Command::new("qemu-io")
            .args(&args)
            .arg(target)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "qemu-io {target}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    on(&served.uri("img"));
    on(model.to_str().unwrap());
    let out = env.path("out.raw");
    copy_out(&served.uri("img"), &out);
    let (a, b) = (fs::read(&out).unwrap(), fs::read(&model).unwrap());
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "overlay and model differ");
    assert_eq!(a.len(), b.len());
}

/// `kill -9` the server while a client writes with FUA and flushes: every acknowledged
/// write must be there after a restart, and the overlay must open.
#[test]
fn acknowledged_writes_survive_kill_9() {
    if !common::can_run(
        "acknowledged_writes_survive_kill_9",
        false,
        &[PY, "nbdcopy"],
    ) {
        return;
    }
    let env = Env::new();
    image(&env);
    for round in 0..4u64 {
        let mut served = Served::start(&env, &["--export", "img:persistent=crash"]);
        let script = format!(
            r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri({uri:?})
i = 0
while True:
    blk = (i * 7 + {round}) % 4000
    data = bytes([({round} * 50 + i) % 251 + 1]) * 4096
    if i % 3 == 0:
        h.pwrite(data, blk * 4096, nbd.CMD_FLAG_FUA)
    else:
        h.pwrite(data, blk * 4096)
        h.flush()
    print(blk, data[0], flush=True)
    i += 1
"#,
            uri = served.uri("img")
        );
        let writer = Command::new(PY)
            .arg("-c")
            .arg(script)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300 + round * 200));
        served.crash();
        let out = writer.wait_with_output().unwrap();
        let acked: Vec<(u64, u8)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
            })
            .collect();
        assert!(
            acked.len() > 5,
            "round {round}: too few writes before the crash ({})",
            acked.len()
        );
        let served = Served::start(&env, &["--export", "img:persistent=crash"]);
        let img = env.path("crash.img");
        copy_out(&served.uri("img"), &img);
        let bytes = fs::read(&img).unwrap();
        // The last acknowledged value of each block must be there.
        let mut last = std::collections::HashMap::new();
        for (blk, v) in acked {
            last.insert(blk, v);
        }
        for (blk, v) in last {
            let at = (blk * 4096) as usize;
            assert!(
                bytes[at..at + 4096].iter().all(|&b| b == v),
                "round {round}: block {blk} lost its acknowledged write"
            );
        }
    }
}

/// With the store on a nearly full filesystem, writes fail with ENOSPC and the overlay
/// stays consistent and reattachable.
#[test]
fn a_full_disk_gives_enospc_not_a_corrupt_overlay() {
    if !common::can_run("a_full_disk_gives_enospc", true, &[PY, "mount"]) {
        return;
    }
    let env = Env::new();
    image(&env);
    // Move the store onto a small tmpfs with 2 MiB to spare.
    let used: u64 = Command::new("du")
        .arg("-sb")
        .arg(&env.store)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .unwrap();
    let small = env.path("small");
    fs::create_dir(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={}", used + (2 << 20))])
        .arg("tmpfs")
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&env.store)
        .arg(small.join("store"))
        .status()
        .unwrap()
        .success());
    let env2 = Env {
        dir: tempfile::tempdir().unwrap(),
        store: small.join("store"),
    };
    let served = Served::start(&env2, &["--export", "img:persistent=full"]);
    let script = format!(
        r#"
import nbd, errno
h = nbd.NBD()
h.connect_uri({uri:?})
written = 0
try:
    for i in range(4000):
        h.pwrite(bytes([i % 250 + 1]) * 4096, i * 4096)
        written = i + 1
    h.flush()
    print("no error", written)
except nbd.Error as e:
    print("error", "ENOSPC" in str(e), written, e)
"#,
        uri = served.uri("img")
    );
    let out = Command::new(PY).arg("-c").arg(script).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("error True"),
        "expected ENOSPC, got: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(served);
    // Free the space again: the overlay still opens and reads.
    let served = Served::start(&env2, &["--export", "img:persistent=full"]);
    let o = Command::new(PY)
        .arg("-c")
        .arg(format!(
            "import nbd\nh = nbd.NBD()\nh.connect_uri({:?})\nh.pread(4096, 0)\nprint('ok')",
            served.uri("img")
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
