//! Soak: many clients sending random valid and mutated traffic (corrupted
//! handshakes, random commands, flags, offsets and lengths up to past the
//! maximum, truncated writes, abrupt closes) against a read-only and a
//! writable export for a bounded time. Afterwards the server answers, the
//! exports read back exactly, and its RSS is within [`RSS_BOUND`] of where
//! a shorter warm-up soak left it, with idle clients still connected.
//!
//! The server runs in a child process (this test binary, re-run on the
//! ignored `soak_server_child`) so that its RSS is its own.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tessera_nbd::proto::*;
use tessera_nbd::{Config, ExportMap, MemDevice};

const SIZE: usize = 16 << 20;
const CLIENTS: usize = 12;
const WARM_UP: Duration = Duration::from_secs(6);
const SOAK: Duration = Duration::from_secs(14);
/// RSS after the soak may exceed the RSS after the warm-up soak by at most
/// this: allocator slack. A leak of 20 KiB per session (about 1 000
/// sessions) would exceed it.
const RSS_BOUND: u64 = 20 << 20;
const CHILD_ENV: &str = "TESSERA_SOAK_CHILD";

/// The server side, run only as a child of `soak_memory_returns`.
#[test]
#[ignore = "run by soak_memory_returns in a child process"]
fn soak_server_child() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let data = pattern_image(SIZE);
    let mut exports = ExportMap::new();
    exports.insert("ro", Arc::new(MemDevice::new(data.clone(), false)));
    exports.insert("rw", Arc::new(MemDevice::new(data, true)));
    let server = Server::start(exports, Config::default());
    println!("SOCK {}", server.sock.display());
    // Serve until the parent closes our stdin.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb << 10
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn connect(sock: &Path) -> Option<UnixStream> {
    let s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(50))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    Some(s)
}

/// Reads whatever the server sends until it pauses or closes.
fn drain(s: &mut UnixStream) {
    let mut buf = vec![0u8; 256 << 10];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// One hostile session; every I/O error just ends it.
fn session(sock: &Path, rng: &mut Rng) -> std::io::Result<()> {
    let Some(mut s) = connect(sock) else {
        return Ok(());
    };
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    if rng.below(8) == 0 {
        // Corrupted handshake: random bytes where flags and options go.
        let junk: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
        s.write_all(&junk)?;
        drain(&mut s);
        return Ok(());
    }
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
    if rng.below(4) == 0 {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend(OPT_STRUCTURED_REPLY.to_be_bytes());
        v.extend(0u32.to_be_bytes());
        s.write_all(&v)?;
    }
    let export = if rng.below(2) == 0 { "ro" } else { "rw" };
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend(OPT_GO.to_be_bytes());
    let payload = go_payload(export);
    v.extend((payload.len() as u32).to_be_bytes());
    v.extend(payload);
    if rng.below(10) == 0 {
        // Mutate one byte of the option.
        let i = rng.below(v.len() as u64) as usize;
        v[i] ^= 1 << rng.below(8);
    }
    s.write_all(&v)?;
    drain(&mut s);
    for _ in 0..rng.below(40) {
        let kind = if rng.below(10) == 0 {
            rng.below(12) as u16
        } else {
            [
                CMD_READ, CMD_READ, CMD_READ, CMD_WRITE, CMD_WRITE, CMD_FLUSH,
            ][rng.below(6) as usize]
        };
        let flags = if rng.below(5) == 0 {
            rng.next() as u16
        } else {
            0
        };
        let len: u32 = match rng.below(20) {
            0 => (64 << 20) + rng.below(8 << 20) as u32,
            1 => rng.below(64 << 20) as u32,
            _ => rng.below(1 << 20) as u32,
        };
        let offset = if rng.below(10) == 0 {
            rng.next()
        } else {
            rng.below(SIZE as u64)
        };
        let mut req = request(kind, flags, rng.next(), offset, len);
        if rng.below(30) == 0 {
            req[rng.below(4) as usize] ^= 0xff; // bad magic
        }
        s.write_all(&req)?;
        if kind == CMD_WRITE {
            let send = if rng.below(6) == 0 {
                rng.below(len as u64 + 1) // truncated, then closed
            } else {
                len as u64
            };
            let chunk = vec![rng.next() as u8; 1 << 20];
            let mut left = send;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            if send < len as u64 {
                return Ok(());
            }
        }
        if rng.below(3) == 0 {
            drain(&mut s);
        }
        if rng.below(25) == 0 {
            return Ok(()); // abrupt close with requests in flight
        }
    }
    drain(&mut s);
    Ok(())
}

/// Hostile sessions from [`CLIENTS`] threads for `time`; returns how many.
fn soak(sock: &Path, time: Duration, round: u64) -> u64 {
    let deadline = Instant::now() + time;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let sock = sock.to_path_buf();
            std::thread::spawn(move || {
                let seed = (i as u64 + 1 + round * CLIENTS as u64) * 0x1234_5678_9abc;
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
                let mut sessions = 0u64;
                while Instant::now() < deadline {
                    let _ = session(&sock, &mut rng);
                    sessions += 1;
                }
                sessions
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}

/// RSS once two readings 300 ms apart agree within 1 MiB (or after 5 s):
/// connections the soak closed are torn down asynchronously.
fn settled_rss(pid: u32) -> u64 {
    let mut last = rss_bytes(pid);
    for _ in 0..16 {
        std::thread::sleep(Duration::from_millis(300));
        let now = rss_bytes(pid);
        if now.abs_diff(last) < 1 << 20 {
            return now;
        }
        last = now;
    }
    last
}

#[test]
fn soak_memory_returns() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "soak_server_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let sock = loop {
        let mut line = String::new();
        assert_ne!(out.read_line(&mut line).unwrap(), 0, "child server died");
        if let Some(p) = line.trim().strip_prefix("SOCK ") {
            break PathBuf::from(p);
        }
    };
    let data = pattern_image(SIZE);
    let read_all = |export: &str| {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        greet(&mut s);
        go(&mut s, export);
        let mut got = Vec::with_capacity(SIZE);
        for off in (0..SIZE).step_by(4 << 20) {
            got.extend(pread(&mut s, off as u64, 4 << 20).unwrap());
        }
        got
    };
    // The connections that stay open through both measurements: the
    // writable one the checks below use, and three idle clients, as in the
    // report of RSS that climbed and stayed. The server keeps idle buffers
    // in proportion to its open connections, so both measurements must see
    // the same ones.
    let (mut s, _, _) = {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        greet(&mut s);
        let (size, flags) = go(&mut s, "rw");
        (s, size, flags)
    };
    let idle: Vec<_> = (0..3)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            greet(&mut s);
            go(&mut s, "ro");
            s
        })
        .collect();

    // After each soak: the server answers, the read-only export is intact,
    // and the writable one takes a write and reads it back exactly.
    let check = |s: &mut UnixStream| {
        assert!(read_all("ro") == data, "read-only export changed");
        let mut w = request(CMD_WRITE, 0, 1, 4096, 1 << 20);
        w.extend(&data[..1 << 20]);
        s.write_all(&w).unwrap();
        assert_eq!(simple_reply(s), (0, 1));
        assert!(pread(s, 4096, 1 << 20).unwrap() == data[..1 << 20]);
    };

    // Warm up with the same hostile traffic: it grows the allocator's
    // arenas and the buffer pool to their working size, which differs
    // from run to run by tens of MiB. A leak grows with the sessions that
    // follow; the plateau does not. Both measurements follow the same
    // steps, with the same connections open.
    let warm_sessions = soak(&sock, WARM_UP, 0);
    check(&mut s);
    let before = settled_rss(pid);

    let sessions = soak(&sock, SOAK, 1);
    let peak = rss_bytes(pid);
    check(&mut s);
    let after = settled_rss(pid);
    eprintln!(
        "soak: {warm_sessions} warm-up sessions, then {sessions}; server RSS {} MiB after warm-up, \
         {} MiB at the end of the soak, {} MiB after",
        before >> 20,
        peak >> 20,
        after >> 20
    );
    drop(idle);
    drop(s);
    drop(child.stdin.take());
    let _ = child.wait();
    assert!(
        after <= before + RSS_BOUND,
        "RSS {} MiB after the soak, {} MiB before",
        after >> 20,
        before >> 20
    );
}
