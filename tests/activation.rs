//! systemd socket activation: `systemd-socket-activate` binds a socket, starts `tessera
//! serve` on the first connection with the socket inherited (LISTEN_FDS), and libnbd's
//! tools read the export through it.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Env;

const TOOL: &str = "systemd-socket-activate";

/// An image with a few files; returns its raw export.
fn image(env: &Env) -> Vec<u8> {
    let src = env.path("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hostname"), "activated\n").unwrap();
    fs::write(src.join("data"), vec![5u8; 200_000]).unwrap();
    let tree = env.import(&src);
    env.ok(&["image", "create", "img", "--tree", &tree, "--size", "32M"]);
    let raw = env.path("img.raw");
    env.ok(&["image", "export", "img", raw.to_str().unwrap()]);
    fs::read(raw).unwrap()
}

/// `systemd-socket-activate -l ADDR -- tessera serve …`: the tool execs tessera in its own
/// process, so its pid is the server's once a client has connected. SIGTERM on drop.
struct Activated {
    child: Option<Child>,
    /// Lines the tool and then tessera write to stderr.
    stderr: mpsc::Receiver<String>,
    stdout: Option<std::process::ChildStdout>,
}

impl Activated {
    fn start(env: &Env, listen: &str, serve_args: &[&str]) -> Activated {
        let mut child = Command::new(TOOL)
            .arg("-l")
            .arg(listen)
            .arg("--fdname=nbd")
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_tessera"))
            .arg("--store")
            .arg(&env.store)
            .arg("serve")
            .arg("--no-demo")
            .args(serve_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn systemd-socket-activate");
        let (tx, stderr) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdout = child.stdout.take();
        let mut a = Activated {
            child: Some(child),
            stderr,
            stdout,
        };
        // The tool says "Listening on ADDR as 3." once the socket is bound.
        a.wait_for_line("Listening on");
        a
    }

    /// Stderr lines up to and including the first containing `needle`.
    fn wait_for_line(&mut self, needle: &str) -> String {
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                    if line.contains(needle) {
                        return seen;
                    }
                }
                Err(_) => panic!("no {needle:?} on stderr within 10 s; got:\n{seen}"),
            }
        }
    }

    /// The banner tessera printed, up to its first export's commands.
    fn banner(&mut self) -> String {
        let mut banner = String::new();
        let lines = BufReader::new(self.stdout.take().unwrap()).lines();
        for line in lines.map_while(Result::ok) {
            banner.push_str(&line);
            banner.push('\n');
            if line.contains("nbdinfo") {
                break;
            }
        }
        banner
    }

    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                child.kill().ok();
                panic!("tessera serve did not stop within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// `nbdinfo --size` and `nbdcopy` of `uri`: the size and bytes must be the image's.
fn read_through(uri: &str, out: &std::path::Path, expect: &[u8]) {
    let o = Command::new("nbdinfo")
        .arg("--size")
        .arg(uri)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nbdinfo {uri}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        expect.len().to_string()
    );
    let o = Command::new("nbdcopy").arg(uri).arg(out).output().unwrap();
    assert!(
        o.status.success(),
        "nbdcopy {uri}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        fs::read(out).unwrap() == expect,
        "bytes read through {uri} differ from `image export`"
    );
}

#[test]
fn serves_on_an_inherited_unix_socket() {
    if !common::can_run(
        "serves_on_an_inherited_unix_socket",
        false,
        &[TOOL, "nbdinfo", "nbdcopy"],
    ) {
        return;
    }
    let env = Env::new();
    let raw = image(&env);
    let sock: PathBuf = env.path("activated.sock");
    let mut served = Activated::start(&env, sock.to_str().unwrap(), &["--export", "img"]);
    let uri = format!("nbd+unix:///img?socket={}", sock.display());
    // The first connection starts tessera; it must be served, not lost.
    read_through(&uri, &env.path("out.raw"), &raw);
    let log = served.wait_for_line("socket activation");
    assert!(
        log.contains(&format!("fd 3 (nbd) is unix:{}", sock.display())),
        "{log}"
    );
    let banner = served.banner();
    assert!(
        banner.contains(&format!("listening on unix:{}", sock.display())),
        "the banner names the inherited socket: {banner}"
    );
    assert!(banner.contains(&uri), "{banner}");
    // A second client, on the same server.
    read_through(&uri, &env.path("again.raw"), &raw);
    assert!(served.stop().success());
    assert!(
        sock.exists(),
        "the socket file belongs to the socket unit and must outlive the service"
    );
}

#[test]
fn serves_on_an_inherited_tcp_socket() {
    if !common::can_run(
        "serves_on_an_inherited_tcp_socket",
        false,
        &[TOOL, "nbdinfo", "nbdcopy"],
    ) {
        return;
    }
    let env = Env::new();
    let raw = image(&env);
    // A port that was free a moment ago; the tool binds it again.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut served = Activated::start(&env, &addr, &[]);
    let uri = format!("nbd://{addr}/img");
    read_through(&uri, &env.path("out.raw"), &raw);
    let banner = served.banner();
    assert!(
        banner.contains(&format!("listening on tcp:{addr}")),
        "the banner names the inherited socket: {banner}"
    );
    assert!(banner.contains(&uri), "{banner}");
    assert!(served.stop().success());
}

#[test]
fn inherited_sockets_and_listen_together_are_refused() {
    if !common::can_run(
        "inherited_sockets_and_listen_together_are_refused",
        false,
        &[TOOL, "nbdinfo"],
    ) {
        return;
    }
    let env = Env::new();
    image(&env);
    let sock = env.path("activated.sock");
    let other = format!("unix:{}", env.path("other.sock").display());
    let mut served = Activated::start(&env, sock.to_str().unwrap(), &["--listen", &other]);
    // Connecting starts tessera, which must refuse to run rather than ignore either.
    let o = Command::new("nbdinfo")
        .arg(format!("nbd+unix:///img?socket={}", sock.display()))
        .output()
        .unwrap();
    assert!(!o.status.success(), "nbdinfo got an answer");
    let log = served.wait_for_line("error:");
    assert!(log.contains("--listen was given too"), "{log}");
    let mut child = served.child.take().unwrap();
    assert!(!child.wait().unwrap().success());
    assert!(!env.path("other.sock").exists(), "nothing was bound");
}

/// Debian's Python, which has libnbd's `nbd` module (python3-libnbd).
const PY: &str = "/usr/bin/python3";

/// Every system call in the systemd syscall set `name` (`@group` or a call), expanded.
fn syscall_set(name: &str, out: &mut std::collections::BTreeSet<String>) {
    if !name.starts_with('@') {
        out.insert(name.to_owned());
        return;
    }
    let o = Command::new("systemd-analyze")
        .arg("syscall-filter")
        .arg(name)
        .output()
        .unwrap();
    assert!(o.status.success(), "systemd-analyze syscall-filter {name}");
    for line in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
        let entry = line.trim();
        if !entry.is_empty() && !entry.starts_with('#') {
            syscall_set(entry, out);
        }
    }
}

/// The hardening in contrib/systemd/tessera.service must not break the server: every
/// system call it makes while serving through every kind of export, from socket
/// activation to shutdown, is one its `SystemCallFilter=` allows.
#[test]
fn the_unit_files_syscall_filter_allows_what_serve_calls() {
    if !common::can_run(
        "the_unit_files_syscall_filter_allows_what_serve_calls",
        false,
        &[TOOL, "strace", "systemd-analyze", "nbdcopy", PY],
    ) {
        return;
    }
    let unit = fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/tessera.service"),
    )
    .unwrap();
    let filter: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(!filter.is_empty(), "the unit has a SystemCallFilter=");
    let mut allowed = std::collections::BTreeSet::new();
    for f in &filter {
        assert!(!f.starts_with('~'), "deny lists are not handled here: {f}");
        syscall_set(f, &mut allowed);
    }

    let env = Env::new();
    let raw = image(&env);
    let sock = env.path("activated.sock");
    let summary = env.path("strace.txt");
    let mut strace = Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(&summary)
        .arg("--")
        .arg(TOOL)
        .arg("-l")
        .arg(&sock)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_tessera"))
        .arg("--store")
        .arg(&env.store)
        .args(["serve", "--no-demo", "--overlays", "create", "--ephemeral"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket from {TOOL}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Read-only, persistent and ephemeral exports: reads, writes, zeroes, flushes.
    let base = format!("nbd+unix:///img?socket={}", sock.display());
    read_through(&base, &env.path("out.raw"), &raw);
    for name in ["img@vm1", "img+ephemeral"] {
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        let script = format!(
            "import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
             h.pwrite(b'x' * 65536, 1 << 20)\nh.zero(8192, 4 << 20)\nh.flush()\n\
             assert h.pread(65536, 1 << 20) == b'x' * 65536\nh.shutdown()\n"
        );
        let o = Command::new(PY).arg("-c").arg(&script).output().unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // The server is strace's child (the tool exec'd it in place): stop it as systemd would.
    let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", strace.id())).unwrap();
    let server: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: kill(2) on our grandchild's pid, which is alive (strace has not exited).
    unsafe { libc::kill(server, libc::SIGTERM) };
    assert!(
        strace.wait().unwrap().success(),
        "tessera serve exit status"
    );

    // `strace -c`: a table whose rows start with "% time" and "seconds" and end with the
    // call's name. strace may also write other lines to the file, such as
    // "PID ???( <detached ...>" for a thread it lost mid-call when the server exited.
    let table = fs::read_to_string(&summary).unwrap();
    let called: Vec<&str> = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 5 && f[..2].iter().all(|x| x.parse::<f64>().is_ok()))
        .filter_map(|f| f.last().copied())
        .filter(|name| *name != "total")
        .collect();
    assert!(called.contains(&"getsockname"), "{table}");
    let denied: Vec<&&str> = called.iter().filter(|c| !allowed.contains(**c)).collect();
    assert!(
        denied.is_empty(),
        "tessera serve makes system calls SystemCallFilter={} denies: {denied:?}\n{table}",
        filter.join(" ")
    );
}
