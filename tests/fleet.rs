//! One server, many guests: export names that pick a mode (`IMAGE`, `IMAGE@OVERLAY`,
//! `IMAGE+ephemeral`), refusals a client and an operator can read, leases that keep
//! `store gc` away from served data, and a catalog that follows the store while serving.
//! Clients are libnbd (Python `nbd`, `nbdinfo`).

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::served::Served;
use common::Env;

/// Debian's Python, which has libnbd's `nbd` module (python3-libnbd).
const PY: &str = "/usr/bin/python3";

fn can_run(test: &str) -> bool {
    common::can_run(test, false, &[PY, "nbdinfo"])
        && (Command::new(PY)
            .args(["-c", "import nbd"])
            .status()
            .is_ok_and(|s| s.success())
            || common::can_run(test, false, &["python3-libnbd"]))
}

/// Runs a Python script (libnbd) with `args`; returns stdout, panics on failure.
fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new(PY)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A Python (libnbd) client left running: `script` runs with `args`, and each line it
/// prints is read by [`Client::line`]; it ends when its stdin closes.
struct Client {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Client {
    fn start(script: &str, args: &[&str]) -> Client {
        let mut child = Command::new(PY)
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python3");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Client { child, out }
    }

    /// Connects to `name` and keeps the connection until the client is finished.
    fn holding(sock: &str, name: &str) -> Client {
        let mut c = Client::start(
            &format!("{CONNECT}\nh, err = connect(sys.argv[1], sys.argv[2])\nassert err is None, err\nprint('held', flush=True)\nsys.stdin.read()\n"),
            &[sock, name],
        );
        assert_eq!(c.line(), "held");
        c
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.out, &mut line).unwrap();
        line.trim().to_owned()
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
    }

    /// Closes its stdin and waits for it; whether it succeeded.
    fn finish(mut self) -> bool {
        drop(self.child.stdin.take());
        self.child.wait().unwrap().success()
    }
}

/// An image `name` of a small tree (one file per `sizes` entry) with room to write; returns
/// its raw export.
fn image(env: &Env, name: &str, seed: u8, sizes: &[usize]) -> PathBuf {
    let src = env.path(&format!("src-{name}"));
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hostname"), format!("{name}\n")).unwrap();
    for (i, &size) in sizes.iter().enumerate() {
        let bytes: Vec<u8> = (0..size)
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed ^ i as u8))
            .collect();
        fs::write(src.join(format!("file{i}")), bytes).unwrap();
    }
    let tree = env.import(&src);
    env.ok(&["image", "create", name, "--tree", &tree, "--size", "64M"]);
    let raw = env.path(&format!("{name}.raw"));
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        name.as_ref(),
        raw.as_os_str(),
    ]);
    raw
}

fn object_count(env: &Env) -> usize {
    let mut n = 0;
    for fan in fs::read_dir(env.store.join("objects")).unwrap() {
        n += fs::read_dir(fan.unwrap().path()).unwrap().count();
    }
    n
}

/// The `nbd` handle of a connection attempt, or libnbd's error with the server's own
/// message (which libnbd reports only through its debug log) appended to its text.
const CONNECT: &str = r#"
import nbd, sys
def connect(sock, name):
    h = nbd.NBD()
    said = []
    h.set_debug_callback(lambda ctx, msg: said.append(msg))
    h.set_debug(True)
    try:
        h.connect_uri(f"nbd+unix:///{name}?socket={sock}")
        h.set_debug(False)
        return h, None
    except nbd.Error as e:
        server = [m.split("server error message: ", 1)[1] for m in said if "server error message: " in m]
        return None, Refused(e.string + " | " + " ".join(server), e.errno)
class Refused:
    def __init__(self, string, errno):
        self.string, self.errno = string, errno
    def __repr__(self):
        return self.string
"#;

#[test]
fn fifty_guests_on_one_image_each_keep_their_own_writes() {
    if !can_run("fifty_guests_on_one_image") {
        return;
    }
    let env = Env::new();
    let raw = image(&env, "img", 1, &[5000, 300_000]);
    let mut served = Served::start(&env, &["--overlays", "create", "--ephemeral"]);
    let sock = served.sock.display().to_string();
    // Block 4096 (16 MiB) is past the tree's data: every guest writes its own byte there,
    // and each guest also writes block 5000 + i, which only it should see.
    let write = format!(
        r#"{CONNECT}
sock, n = sys.argv[1], 50
OFF = 4096 * 4096
base = open(sys.argv[2], "rb").read()
guests = []
for i in range(n):
    h, err = connect(sock, f"img@guest{{i}}")
    assert err is None, err
    assert not h.is_read_only()
    guests.append(h)
ro, err = connect(sock, "img")
assert err is None and ro.is_read_only(), err
eph, err = connect(sock, "img+ephemeral")
assert err is None and not eph.is_read_only(), err
for i, h in enumerate(guests):
    h.pwrite(bytes([i + 1]) * 4096, OFF)
    h.pwrite(bytes([i + 1]) * 4096, (5000 + i) * 4096)
    h.flush()
eph.pwrite(b"\xee" * 4096, OFF)
for i, h in enumerate(guests):
    assert h.pread(4096, OFF) == bytes([i + 1]) * 4096, i
    for j in range(n):
        want = bytes([i + 1]) * 4096 if i == j else base[(5000 + j) * 4096:(5001 + j) * 4096]
        assert h.pread(4096, (5000 + j) * 4096) == want, (i, j)
    assert h.pread(65536, 0) == base[:65536]
assert ro.pread(4096, OFF) == base[OFF:OFF + 4096]
assert eph.pread(4096, OFF) == b"\xee" * 4096
eph.shutdown()
eph2, err = connect(sock, "img+ephemeral")
assert err is None, err
assert eph2.pread(4096, OFF) == base[OFF:OFF + 4096], "a new ephemeral overlay starts clean"
print("ok", len(guests))
"#
    );
    let out = python(&write, &[&sock, raw.to_str().unwrap()]);
    assert_eq!(out.trim(), "ok 50");

    // Every guest's flushed writes outlive the server.
    served.stop(Duration::from_secs(10));
    let listed = env.ok(&["overlay", "list"]);
    assert_eq!(listed.lines().filter(|l| l.contains("img")).count(), 50);
    let served = Served::start(&env, &["--overlays", "existing"]);
    let check = format!(
        r#"{CONNECT}
sock, n = sys.argv[1], 50
OFF = 4096 * 4096
for i in range(n):
    h, err = connect(sock, f"img@guest{{i}}")
    assert err is None, err
    assert h.pread(4096, OFF) == bytes([i + 1]) * 4096, i
    assert h.pread(4096, (5000 + i) * 4096) == bytes([i + 1]) * 4096, i
    h.shutdown()
print("ok")
"#
    );
    assert_eq!(
        python(&check, &[&served.sock.display().to_string()]).trim(),
        "ok"
    );
}

/// Connects to each name and prints `name errno message` per refusal.
const REFUSALS: &str = r#"
import errno
sock = sys.argv[1]
held = []
for name in sys.argv[2:]:
    h, err = connect(sock, name)
    if err is None:
        held.append(h)  # kept open: the next attempt on the same overlay is a second client
        print(name, "OK")
    else:
        if "server policy prevents" in err.string:
            kind = "POLICY"
        elif "server has no export named" in err.string:
            kind = "UNKNOWN"
        else:
            kind = errno.errorcode.get(err.errno, err.errno)
        print(name, kind, err.string.replace("\n", " "))
"#;

fn refusals(sock: &Path, names: &[&str]) -> Vec<(String, String, String)> {
    let script = format!("{CONNECT}{REFUSALS}");
    let mut args = vec![sock.to_str().unwrap()];
    args.extend_from_slice(names);
    python(&script, &args)
        .lines()
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            let name = parts.next().unwrap().to_owned();
            let code = parts.next().unwrap_or("").to_owned();
            let msg = parts.next().unwrap_or("").to_owned();
            (name, code, msg)
        })
        .collect()
}

fn wait_for_log(log: &Path, needle: &[&str]) -> String {
    let start = Instant::now();
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| needle.iter().all(|n| l.contains(n))) {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no log line with {needle:?} in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn refusals_name_the_overlay_and_the_reason_to_client_and_log() {
    if !can_run("refusals_name_the_overlay") {
        return;
    }
    let env = Env::new();
    image(&env, "img", 1, &[1000]);
    image(&env, "other", 2, &[2000]);
    let log = env.path("a.log");
    let a = Served::start_logged(&env, "a.sock", &log, &["--overlays", "create"]);
    let got = refusals(
        &a.sock,
        &[
            "img@x",
            "img@x",
            "other@x",
            "img+ephemeral",
            "nope",
            "img@../x",
            "img+what",
        ],
    );
    let expect = |i: usize, name: &str, code: &str, words: &[&str]| {
        let (n, c, m) = &got[i];
        assert_eq!((n.as_str(), c.as_str()), (name, code), "{got:?}");
        for w in words {
            assert!(m.contains(w), "{name}: {m:?} lacks {w:?}");
        }
    };
    expect(0, "img@x", "OK", &[]);
    // libnbd words NBD_REP_ERR_POLICY as "server policy prevents NBD_OPT_GO" and
    // NBD_REP_ERR_UNKNOWN as "server has no export named …".
    expect(
        1,
        "img@x",
        "POLICY",
        &["\"x\"", "attached by another client"],
    );
    expect(
        2,
        "other@x",
        "POLICY",
        &["\"x\"", "belongs to image \"img\""],
    );
    expect(
        3,
        "img+ephemeral",
        "POLICY",
        &["does not serve ephemeral", "--ephemeral"],
    );
    expect(4, "nope", "UNKNOWN", &["no image named \"nope\""]);
    expect(6, "img+what", "UNKNOWN", &["not an export name"]);
    assert_ne!(got[5].1, "OK", "a path in an overlay name: {got:?}");
    let text = wait_for_log(
        &log,
        &["export refused", "img@x", "attached by another client"],
    );
    assert!(
        text.lines().any(|l| l.contains("export refused")
            && l.contains("other@x")
            && l.contains("belongs to image")),
        "{text}"
    );

    // A second server on the same store: the overlay `x` is attached by the first one,
    // which still holds a client (kept open by a lingering Python process below).
    let hold = Client::holding(a.sock.to_str().unwrap(), "img@x");
    let log_b = env.path("b.log");
    let b = Served::start_logged(&env, "b.sock", &log_b, &["--overlays", "existing"]);
    let got = refusals(&b.sock, &["img@x", "img@y", "img"]);
    assert_eq!(got[0].1, "POLICY", "{got:?}");
    assert!(got[0].2.contains("attached by another client"), "{got:?}");
    assert_eq!(got[1].1, "POLICY", "{got:?}");
    assert!(
        got[1].2.contains("\"y\" does not exist") && got[1].2.contains("--overlays create"),
        "{got:?}"
    );
    assert_eq!(got[2].1, "OK", "{got:?}");
    wait_for_log(&log_b, &["export refused", "img@y", "does not exist"]);
    hold.finish();

    // The default server serves read-only exports only.
    let log_c = env.path("c.log");
    let c = Served::start_logged(&env, "c.sock", &log_c, &[]);
    let got = refusals(&c.sock, &["img@x", "img"]);
    assert_eq!(got[0].1, "POLICY", "{got:?}");
    assert!(
        got[0].2.contains("does not serve persistent overlays"),
        "{got:?}"
    );
    assert_eq!(got[1].1, "OK", "{got:?}");
    wait_for_log(&log_c, &["export refused", "img@x"]);
    drop((a, b, c));
}

#[test]
fn the_export_list_shows_what_can_be_asked_for() {
    if !can_run("the_export_list") {
        return;
    }
    let env = Env::new();
    image(&env, "img", 1, &[1000]);
    image(&env, "other", 2, &[1000]);
    {
        let s = Served::start(&env, &["--overlays", "create"]);
        // Creates the overlay `vm1` on img.
        python(
            &format!(
                "{CONNECT}\nh, err = connect(sys.argv[1], 'img@vm1')\nassert err is None, err\n"
            ),
            &[&s.sock.display().to_string()],
        );
    }
    let names = |extra: &[&str]| -> Vec<String> {
        let s = Served::start(&env, extra);
        let out = Command::new("nbdinfo")
            .arg("--list")
            .arg("--json")
            .arg(format!("nbd+unix://?socket={}", s.sock.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut names: Vec<String> = v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&[]), ["img", "other"]);
    assert_eq!(
        names(&["--overlays", "existing", "--ephemeral"]),
        [
            "img",
            "img+ephemeral",
            "img@vm1",
            "other",
            "other+ephemeral"
        ]
    );
    assert_eq!(
        names(&["--export", "img@vm2", "--export", "other"]),
        ["img@vm2", "other"]
    );

    // The banner's commands fit each export's mode.
    let s = Served::start(&env, &["--export", "img@vm2", "--export", "other"]);
    let section = |name: &str| -> String {
        let start = s.banner.find(&format!("export {name} (")).expect(name);
        let rest = &s.banner[start..];
        let end = rest[1..].find("\nexport ").map_or(rest.len(), |e| e + 1);
        rest[..end].to_owned()
    };
    let rw = section("img@vm2");
    assert!(
        rw.contains("(writable)") && !rw.contains("readonly=on"),
        "{rw}"
    );
    assert!(
        !rw.contains("nbdfuse -r") && !rw.contains("loop,ro"),
        "{rw}"
    );
    let ro = section("other");
    assert!(
        ro.contains("(read-only)") && ro.contains("readonly=on"),
        "{ro}"
    );
    assert!(ro.contains("nbdfuse -r") && ro.contains("loop,ro"), "{ro}");
}

#[test]
fn gc_while_serving_never_pulls_data_from_under_a_client() {
    if !can_run("gc_while_serving") {
        return;
    }
    let env = Env::new();
    // A large file (memory-mapped by the server) and small ones (read with pread).
    let raw = image(&env, "img", 3, &[3 << 20, 100_000, 5000, 70_000]);
    let before = object_count(&env);
    let log = env.path("serve.log");
    let served = Served::start_logged(&env, "s.sock", &log, &[]);
    let stop = env.path("stop");
    let reader = Command::new(PY)
        .arg("-c")
        .arg(format!(
            r#"{CONNECT}
import os
sock, raw, stop = sys.argv[1:4]
want = open(raw, "rb").read()
h, err = connect(sock, "img")
assert err is None, err
passes = 0
while passes < 3 or not os.path.exists(stop):
    for off in range(0, len(want), 1 << 20):
        assert h.pread(1 << 20, off) == want[off:off + (1 << 20)], off
    passes += 1
print("ok", passes, flush=True)
"#
        ))
        .args([
            served.sock.to_str().unwrap(),
            raw.to_str().unwrap(),
            stop.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader is connected once the server has leased the image's tree.
    let start = Instant::now();
    while !lease_names_a_tree(&env) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no lease appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    env.ok(&["image", "rm", "img"]);
    for _ in 0..5 {
        env.ok(&["store", "gc"]);
        assert_eq!(
            object_count(&env),
            before,
            "gc removed objects a client reads"
        );
    }
    fs::write(&stop, "").unwrap();
    let out = reader.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "reader: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok "));

    // Once the client is gone, so is the lease, and gc reclaims the image's objects.
    let start = Instant::now();
    loop {
        env.ok(&["store", "gc"]);
        if object_count(&env) == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "gc still keeps {} objects after the client left",
            object_count(&env)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(served);
}

#[test]
fn a_killed_servers_lease_does_not_block_gc() {
    if !can_run("a_killed_servers_lease") {
        return;
    }
    let env = Env::new();
    image(&env, "img", 4, &[300_000, 1000]);
    let mut served = Served::start(&env, &[]);
    let sock = served.sock.display().to_string();
    let holder = Client::holding(&sock, "img");
    env.ok(&["image", "rm", "img"]);
    env.ok(&["store", "gc"]);
    assert!(
        object_count(&env) > 0,
        "a served image's objects were removed"
    );
    served.crash();
    holder.finish();
    env.ok(&["store", "gc"]);
    assert_eq!(
        object_count(&env),
        0,
        "a dead server's lease still protects objects"
    );
    let leases = env.store.join("run/leases");
    assert_eq!(
        fs::read_dir(&leases).map_or(0, |d| d.count()),
        0,
        "gc leaves the dead server's lease file"
    );
}

#[test]
fn packing_while_serving_keeps_loose_what_a_server_leases() {
    if !can_run("packing_while_serving")
        || !common::can_run("packing_while_serving", false, &["nbdcopy"])
    {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for (i, size) in [3 << 20, 100_000, 5000, 70_000, 1, 2]
        .into_iter()
        .enumerate()
    {
        fs::write(src.join(format!("f{i}")), vec![i as u8 + 1; size]).unwrap();
    }
    let tree = env.import_loose(&src);
    env.ok(&["image", "create", "img", "--tree", &tree]);
    let want = env.export("img");
    let before = object_count(&env);
    let served = Served::start(&env, &[]);
    let sock = served.sock.display().to_string();
    let holder = Client::holding(&sock, "img");

    // Leased: the objects are packed, their loose copies stay.
    let out = env.ok(&["store", "pack", "img"]);
    assert!(out.starts_with("packed 5 of 6 objects"), "{out}");
    assert!(!out.contains("removed"), "{out}");
    assert_eq!(object_count(&env), before);
    let got = env.path("img.got");
    assert!(
        served.nbdcopy("img", &got) == want,
        "bytes changed while packing"
    );

    // The lease gone, gc removes them, and the server (its layout of the image kept, with
    // the objects it found loose) and a new one read the same bytes.
    assert!(holder.finish());
    let start = Instant::now();
    while lease_names_a_tree(&env) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the lease stayed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let gc = env.ok(&["store", "gc"]);
    assert!(gc.contains(", 5 loose copies of packed objects"), "{gc}");
    assert_eq!(
        object_count(&env),
        before - 5,
        "only the large object stays loose"
    );
    assert!(
        served.nbdcopy("img", &got) == want,
        "bytes changed after gc"
    );
    drop(served);
    let served = Served::start(&env, &[]);
    assert!(
        served.nbdcopy("img", &got) == want,
        "a new server reads other bytes"
    );
    let verify = env.ok(&["store", "verify"]);
    assert!(verify.is_empty(), "{verify}");
}

/// Whether some lease in the store names a tree.
fn lease_names_a_tree(env: &Env) -> bool {
    let Ok(dir) = fs::read_dir(env.store.join("run/leases")) else {
        return false;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .any(|v| v["trees"].as_array().is_some_and(|t| !t.is_empty()))
}

#[test]
fn images_created_or_recreated_while_serving_reach_new_connections() {
    if !can_run("images_created_or_recreated_while_serving") {
        return;
    }
    let env = Env::new();
    let old = image(&env, "img", 5, &[1000]);
    let kept = env.path("old.raw");
    fs::rename(&old, &kept).unwrap();
    let old = kept;
    let served = Served::start(&env, &["--overlays", "create", "--ephemeral"]);
    let sock = served.sock.display().to_string();
    // An old client of img, a persistent overlay made on it, and then img re-created with
    // other contents and a new image `late`, all while the server runs.
    let mut old_client = Client::start(
        &format!(
            r#"{CONNECT}
sock, old = sys.argv[1], sys.argv[2]
h, err = connect(sock, "img")
assert err is None, err
o, err = connect(sock, "img@made-on-old")
assert err is None, err
o.shutdown()
print("held", flush=True)
sys.stdin.readline()
want = open(old, "rb").read()
for off in range(0, len(want), 1 << 20):
    assert h.pread(1 << 20, off) == want[off:off + (1 << 20)], off
print("old bytes", flush=True)
"#
        ),
        &[&sock, old.to_str().unwrap()],
    );
    assert_eq!(old_client.line(), "held");

    env.ok(&["image", "rm", "img"]);
    let new = image(&env, "img", 6, &[7000]);
    let late = image(&env, "late", 7, &[3000]);
    assert!(
        fs::read(&old).unwrap() != fs::read(&new).unwrap(),
        "re-created img is the same"
    );

    let check = format!(
        r#"{CONNECT}
sock, new, late = sys.argv[1:4]
for name, raw in [("img", new), ("img+ephemeral", new), ("late", late),
                  ("late+ephemeral", late), ("late@fresh", late)]:
    h, err = connect(sock, name)
    assert err is None, (name, err)
    want = open(raw, "rb").read()
    for off in range(0, len(want), 1 << 20):
        assert h.pread(1 << 20, off) == want[off:off + (1 << 20)], (name, off)
h, err = connect(sock, "img@made-on-old")
assert err is not None and "belongs to image" in err.string, err
print("ok")
"#
    );
    assert_eq!(
        python(
            &check,
            &[&sock, new.to_str().unwrap(), late.to_str().unwrap()]
        )
        .trim(),
        "ok"
    );
    // The old connection still reads the old image.
    old_client.send("go");
    assert_eq!(old_client.line(), "old bytes");
    assert!(old_client.finish());
}

#[test]
fn a_shared_overlay_offers_multi_conn_and_a_flush_on_one_connection_covers_all() {
    if !can_run("a_shared_overlay_offers_multi_conn")
        || !common::can_run("multi_conn", false, &["nbdcopy"])
    {
        return;
    }
    let env = Env::new();
    let raw = image(&env, "img", 8, &[20_000]);
    let mut served = Served::start(
        &env,
        &[
            "--overlays",
            "create",
            "--ephemeral",
            "--overlay-connections",
            "2",
        ],
    );
    let sock = served.sock.display().to_string();
    let script = format!(
        r#"{CONNECT}
sock = sys.argv[1]
a, err = connect(sock, "img@shared")
assert err is None, err
b, err = connect(sock, "img@shared")
assert err is None, err
assert a.can_multi_conn() and b.can_multi_conn()
c, err = connect(sock, "img@shared")
assert err is not None and "allows 2" in err.string, err
e, err = connect(sock, "img+ephemeral")
assert err is None and not e.can_multi_conn(), err
ro, err = connect(sock, "img")
assert err is None and ro.can_multi_conn(), err
OFF = 3000 * 4096
a.pwrite(b"\x5a" * 8192, OFF)
b.flush()  # covers the write made on the other connection
assert a.pread(8192, OFF) == b"\x5a" * 8192
assert b.pread(8192, OFF) == b"\x5a" * 8192
print("ok", flush=True)
sys.stdin.read()
"#
    );
    let mut client = Client::start(&script, &[&sock]);
    assert_eq!(client.line(), "ok");
    // A crash right after: only the flush made the write durable.
    served.crash();
    client.finish();

    let served = Served::start(
        &env,
        &["--overlays", "create", "--overlay-connections", "4"],
    );
    let sock = served.sock.display().to_string();
    let check = format!(
        "{CONNECT}\nh, err = connect(sys.argv[1], 'img@shared')\nassert err is None, err\nassert h.pread(8192, 3000 * 4096) == b'\\x5a' * 8192\nprint('ok')\n"
    );
    assert_eq!(python(&check, &[&sock]).trim(), "ok");

    // nbdcopy writes through several connections when the export offers multi-conn.
    let pattern: Vec<u8> = (0..(8 << 20)).map(|i: u32| (i % 253) as u8).collect();
    let src = env.path("pattern.raw");
    fs::write(&src, &pattern).unwrap();
    let uri = format!("nbd+unix:///img@copied?socket={sock}");
    let o = Command::new("nbdcopy")
        .args(["--connections=4", "--destination-is-zero"])
        .arg(&src)
        .arg(&uri)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = env.path("back.raw");
    let o = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&back)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = fs::read(&back).unwrap();
    let base = fs::read(&raw).unwrap();
    assert!(
        back[..pattern.len()] == pattern[..],
        "nbdcopy's writes read back"
    );
    assert!(
        back[pattern.len()..] == base[pattern.len()..],
        "the rest is the image"
    );
}

/// Regression: a farm's server stopped accepting guests at 512 (the old default) or at the
/// common soft descriptor limit of 1024, silently leaving the rest in the listen queue.
#[test]
fn the_descriptor_limit_is_raised_and_connections_fit_in_it() {
    let env = Env::new();
    image(&env, "img", 9, &[100]);
    let limits = |extra: &str, max: &str| -> (String, String) {
        let log = env.path("limits.log");
        let sock = env.path("limits.sock");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{extra}; exec \"$0\" --store \"$1\" serve --listen unix:\"$2\" --no-demo --max-connections {max}"
            ))
            .arg(env!("CARGO_BIN_EXE_tessera"))
            .arg(&env.store)
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("ready: ") {
            line.clear();
            assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0);
        }
        let proc_limits = fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let open_files = proc_limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_owned();
        (open_files, fs::read_to_string(&log).unwrap())
    };
    let (open_files, log) = limits("ulimit -S -n 1024; ulimit -H -n 8192", "4096");
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["8192", "8192"], "{open_files}");
    assert!(
        log.contains("lowered"),
        "4096 connections need more than 8192 descriptors: {log}"
    );
    let (_, log) = limits("ulimit -S -n 1024; ulimit -H -n 8192", "2000");
    assert!(
        !log.contains("lowered"),
        "2000 connections fit in 8192: {log}"
    );
}
