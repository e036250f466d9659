//! `tessera serve` end to end: the binary serves a synthesized image and real
//! NBD clients (nbdinfo, nbdcopy, qemu-img, the kernel through nbdfuse + a
//! loop mount) see exactly the bytes `tessera image export` writes.

mod common;
#[path = "../crates/nbd/tests/support/mod.rs"]
mod nbd_support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::served::Served;
use common::{snapshot, Env};
use tessera::blockdev::ImageDevice;

/// Imports the fixture as image `img` and exports the raw reference file.
fn image(env: &Env) -> (PathBuf, PathBuf) {
    let src = env.path("src");
    common::fixture::build(&src, common::is_root());
    let tree = env.import(&src);
    env.ok(&["image", "create", "img", "--tree", &tree]);
    let raw = env.path("img.raw");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "img".as_ref(),
        raw.as_os_str(),
    ]);
    (src, raw)
}

fn tool(cmd: &mut Command) -> String {
    nbd_support::run(cmd)
}

#[test]
fn clients_see_the_exported_bytes() {
    if !common::can_run(
        "clients_see_the_exported_bytes",
        false,
        &["nbdinfo", "nbdcopy", "qemu-img"],
    ) {
        return;
    }
    let env = Env::new();
    let (_, raw) = image(&env);
    let served = Served::start(&env, &[]);
    assert!(served.banner.contains("nbdinfo 'nbd+unix:///img?socket="));
    let want = std::fs::read(&raw).unwrap();

    let out = tool(Command::new("nbdinfo").arg("--json").arg(served.uri("img")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], want.len() as u64);
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert!(e["description"].as_str().unwrap().contains("\"img\""));

    let copy = env.path("copy.raw");
    tool(Command::new("nbdcopy").arg(served.uri("img")).arg(&copy));
    assert!(std::fs::read(&copy).unwrap() == want, "nbdcopy differs");
    let copy4 = env.path("copy4.raw");
    tool(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=64"])
            .arg(served.uri("img"))
            .arg(&copy4),
    );
    assert!(
        std::fs::read(&copy4).unwrap() == want,
        "nbdcopy -C 4 differs"
    );

    let out = tool(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&raw)
            .arg(served.uri("img")),
    );
    assert!(out.contains("identical"), "{out}");

    // The only image is also the default export.
    let out = tool(Command::new("nbdinfo").arg("--size").arg(served.uri("")));
    assert_eq!(out.trim(), want.len().to_string());
}

#[test]
fn block_status_matches_the_image_extents() {
    if !common::can_run(
        "block_status_matches_the_image_extents",
        false,
        &["nbdinfo"],
    ) {
        return;
    }
    let env = Env::new();
    image(&env);
    let served = Served::start(&env, &[]);
    let dev = ImageDevice::open(&env.open_store(), "img").unwrap();
    let mut want: Vec<(u64, u64, u32)> = Vec::new();
    for e in dev.extents(0, dev.size()).unwrap() {
        let t = if e.zero { 3 } else { 0 };
        match want.last_mut() {
            Some(r) if r.2 == t => r.1 += e.len,
            _ => want.push((e.offset, e.len, t)),
        }
    }
    let out = tool(Command::new("nbdinfo").arg("--map").arg(served.uri("img")));
    let got: Vec<(u64, u64, u32)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn concurrent_clients_read_the_right_bytes() {
    let env = Env::new();
    let (_, raw) = image(&env);
    let served = Served::start(&env, &[]);
    let want = Arc::new(std::fs::read(&raw).unwrap());
    let sock = Arc::new(served.sock.clone());
    let threads: Vec<_> = (0..64u64)
        .map(|t| {
            let want = want.clone();
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = std::os::unix::net::UnixStream::connect(&*sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                nbd_support::greet(&mut s);
                let (size, _) = nbd_support::go(&mut s, "img");
                assert_eq!(size, want.len() as u64);
                let mut x = (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                for round in 0..32u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = 1 + x % (200 << 10);
                    let off = (x >> 24) % (size - len);
                    s.write_all(&nbd_support::request(0, 0, round, off, len as u32))
                        .unwrap();
                    let (err, cookie) = nbd_support::simple_reply(&mut s);
                    assert_eq!((err, cookie), (0, round));
                    let got = nbd_support::read_exact(&mut s, len as usize);
                    assert!(
                        got == want[off as usize..(off + len) as usize],
                        "t{t} r{round}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn the_kernel_reads_the_image_through_nbdfuse() {
    if !common::can_run(
        "the_kernel_reads_the_image_through_nbdfuse",
        true,
        &["nbdfuse", "fusermount3", "mount"],
    ) || !Path::new("/dev/fuse").exists()
    {
        return;
    }
    let env = Env::new();
    let (src, _) = image(&env);
    let served = Served::start(&env, &[]);
    let fuse_dir = env.path("fuse");
    std::fs::create_dir(&fuse_dir).unwrap();
    let file = fuse_dir.join("disk.img");
    let mut fuse = Command::new("nbdfuse")
        .arg("-r")
        .arg(&file)
        .arg(served.uri("img"))
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !file.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nbdfuse did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    {
        let mount = common::LoopMount::new(&file, &env.path("mnt"), "ro,noatime");
        let mut mounted = snapshot::snapshot(&mount.dir);
        if mounted.remove(&b"lost+found"[..]).is_some() {
            mounted.get_mut(&b""[..]).unwrap().nlink -= 1;
        }
        snapshot::assert_same(&snapshot::snapshot(&src), &mounted);
    }
    Command::new("fusermount3")
        .arg("-u")
        .arg(&fuse_dir)
        .status()
        .unwrap();
    fuse.wait().unwrap();
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let env = Env::new();
    image(&env);
    let mut served = Served::start(&env, &[]);
    // A client mid-session does not keep the server alive.
    let mut s = std::os::unix::net::UnixStream::connect(&served.sock).unwrap();
    nbd_support::greet(&mut s);
    nbd_support::go(&mut s, "img");
    let status = served.stop(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(!served.sock.exists(), "socket file left behind");
    assert!(nbd_support::is_closed(&mut s));
}

#[test]
fn export_filter_and_unknown_names() {
    let env = Env::new();
    image(&env);
    let err = env.fails(&["serve", "--export", "nope"]);
    assert!(err.contains("nope"), "{err}");
    let err = env.fails(&["serve", "--listen", "bogus"]);
    assert!(err.contains("unix:PATH"), "{err}");
    let err = env.fails(&["serve", "--tls", "require"]);
    assert!(err.contains("--tls-cert"), "{err}");

    let served = Served::start(&env, &["--export", "img"]);
    let mut s = std::os::unix::net::UnixStream::connect(&served.sock).unwrap();
    nbd_support::greet(&mut s);
    nbd_support::send_option(
        &mut s,
        tessera_nbd::proto::OPT_GO,
        &nbd_support::go_payload("other"),
    );
    let (_, rtype, _) = nbd_support::read_option_reply(&mut s);
    assert_eq!(rtype, tessera_nbd::proto::REP_ERR_UNKNOWN);
    nbd_support::go(&mut s, "img");
}

/// A client with one request at a time in flight (nbdsh's synchronous `pread`) reads the
/// right bytes while the server busy-polls for its next request, and the server does poll
/// for it (the connection's log line counts polls as `polls=HIT/MISS`); with
/// `--busy-poll 0` it never polls.
#[test]
fn one_request_at_a_time_is_polled_for() {
    if !common::can_run("one_request_at_a_time_is_polled_for", false, &["nbdsh"]) {
        return;
    }
    let env = Env::new();
    let (_, raw) = image(&env);
    let want = std::fs::read(&raw).unwrap();
    let blocks = want.len() / 4096;
    for poll in ["50", "0"] {
        let log = env.path(&format!("poll-{poll}.log"));
        let mut served = Served::start_logged_with(
            &env,
            &format!("poll-{poll}.sock"),
            &log,
            &["--busy-poll", poll],
            &[("RUST_LOG", "tessera_nbd=info")],
        );
        let out = env.path(&format!("reads-{poll}.bin"));
        let script = format!(
            "with open({out:?}, 'wb') as f:\n    for i in range(1000):\n        f.write(h.pread(4096, (i * 7919 % {blocks}) * 4096))\n",
            out = out.display().to_string(),
        );
        // nbdsh runs the first `python3` on PATH, and its module is Debian's, for
        // /usr/bin/python3 (a pyenv python first on PATH has no `nbd`).
        let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
        tool(
            Command::new("nbdsh")
                .env("PATH", path)
                .arg("-u")
                .arg(served.uri("img"))
                .arg("-c")
                .arg(&script),
        );
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), 1000 * 4096);
        for (i, chunk) in got.chunks(4096).enumerate() {
            let at = (i * 7919 % blocks) * 4096;
            assert!(chunk == &want[at..at + 4096], "read {i} at {at} differs");
        }
        assert!(served.stop(Duration::from_secs(10)).success());

        let log = std::fs::read_to_string(&log).unwrap();
        let field = |line: &str, name: &str| -> Option<String> {
            let words = line.split_whitespace();
            words
                .filter_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
                .next()
        };
        let line = log
            .lines()
            .filter(|l| l.contains("connection closed"))
            .find(|l| field(l, "requests=").is_some_and(|n| n.parse::<u64>().unwrap() >= 1000))
            .unwrap_or_else(|| panic!("no log line of the 1000-read connection:\n{log}"));
        let polls = field(line, "polls=").unwrap_or_else(|| panic!("no polls= in {line}"));
        let (hit, missed) = polls.split_once('/').unwrap();
        let polled = hit.parse::<u64>().unwrap() + missed.parse::<u64>().unwrap();
        if poll == "0" {
            assert_eq!(polled, 0, "{line}");
        } else {
            assert!(polled > 0, "a one-at-a-time client is polled for: {line}");
        }
    }
}

/// On a plain socket, file data of large reads reaches the socket by reference (`vmsplice`
/// and `splice`: crates/nbd/src/splice.rs; the connection's log line counts it as
/// `spliced=BYTES`); `--no-splice` copies it. The bytes are the export's either way.
#[test]
fn large_reads_are_spliced_unless_turned_off() {
    if !common::can_run(
        "large_reads_are_spliced_unless_turned_off",
        false,
        &["nbdcopy"],
    ) {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    for (i, len) in [3 << 20, 300_001, 70_000, 4096, 5].into_iter().enumerate() {
        std::fs::write(
            src.join(format!("f{i}")),
            common::fixture::pseudo_random(len),
        )
        .unwrap();
    }
    let tree = env.import(&src);
    env.ok(&["image", "create", "img", "--tree", &tree]);
    let raw = env.path("img.raw");
    env.ok(&["image", "export", "img", raw.to_str().unwrap()]);
    let want = std::fs::read(&raw).unwrap();
    // TCP splices too (`tcp_sendmsg_locked` takes the pages): one copy over each socket.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for flag in ["", "--no-splice"] {
        let log = env.path(&format!("splice{flag}.log"));
        let tcp = format!("tcp:127.0.0.1:{port}");
        let mut extra = vec!["--listen", &tcp];
        if !flag.is_empty() {
            extra.push(flag);
        }
        let mut served = Served::start_logged_with(
            &env,
            &format!("splice{flag}.sock"),
            &log,
            &extra,
            &[("RUST_LOG", "tessera_nbd=info")],
        );
        // The first copy may find objects not yet mapped or resident; the others are warm.
        let tcp_uri = format!("nbd://127.0.0.1:{port}/img");
        for (round, uri) in [served.uri("img"), served.uri("img"), tcp_uri]
            .iter()
            .enumerate()
        {
            let copy = env.path(&format!("copy{flag}-{round}.raw"));
            tool(Command::new("nbdcopy").arg(uri).arg(&copy));
            assert!(
                std::fs::read(&copy).unwrap() == want,
                "nbdcopy {flag} of {uri} differs"
            );
        }
        assert!(served.stop(Duration::from_secs(10)).success());
        let log = std::fs::read_to_string(&log).unwrap();
        let spliced_from = |peer: &str| -> u64 {
            log.lines()
                .filter(|l| l.contains("connection closed") && l.contains(peer))
                .map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("spliced="))
                        .unwrap_or_else(|| panic!("no spliced= in {l}"))
                        .parse::<u64>()
                        .unwrap()
                })
                .sum()
        };
        let (spliced, over_tcp) = (spliced_from("peer="), spliced_from("peer=127.0.0.1"));
        if flag.is_empty() {
            assert!(
                spliced - over_tcp >= 3 << 20 && over_tcp >= 3 << 20,
                "only {spliced} bytes were spliced, {over_tcp} over TCP:\n{log}"
            );
        } else {
            assert_eq!(spliced, 0, "{log}");
        }
    }
}
