//! Shared test helpers: an in-process server on a private Unix socket, peer
//! tool discovery, deterministic images, and a tiny blocking NBD client for
//! exact (and deliberately wrong) requests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tessera_nbd::proto::*;
use tessera_nbd::{Config, Exports};

/// A server running on its own runtime thread; stopped on drop.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(exports: impl Exports, config: Config) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = sock.clone();
        let exports: Arc<dyn Exports> = Arc::new(exports);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&path).unwrap();
                ready_tx.send(()).unwrap();
                tessera_nbd::run(listener, exports, config, stopped).await;
            });
        });
        ready_rx.recv().unwrap();
        Server {
            dir,
            sock,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// True if `tool` is on PATH. A missing peer skips the test loudly, unless
/// TESSERA_REQUIRE_PEERS=1, in which case it fails.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("TESSERA_REQUIRE_PEERS").as_deref() == Ok("1") {
            panic!("peer tool {tool} is missing and TESSERA_REQUIRE_PEERS=1");
        }
        eprintln!("SKIPPED: peer tool {tool} is not installed");
    }
    found
}

/// The Python with libnbd bindings (Debian's, not a pyenv shim).
pub fn python_nbd() -> Option<&'static str> {
    for py in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(py)
            .args(["-c", "import nbd"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(py);
        }
    }
    if std::env::var("TESSERA_REQUIRE_PEERS").as_deref() == Ok("1") {
        panic!("python3 nbd module is missing and TESSERA_REQUIRE_PEERS=1");
    }
    eprintln!("SKIPPED: python3 nbd module (python3-libnbd) is not installed");
    None
}

/// Runs a command, panicking with its output on failure; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Deterministic image: pseudo-random data with zero regions of varied
/// sizes and alignments, so holes and data alternate.
pub fn pattern_image(size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for (i, b) in v.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Zero out 64 KiB windows at irregular places: [256K, 512K) of every
        // MiB, plus a 12 KiB run at 900K.
        let in_mib = i % (1 << 20);
        let zero =
            (256 << 10..512 << 10).contains(&in_mib) || (900 << 10..912 << 10).contains(&in_mib);
        *b = if zero { 0 } else { x as u8 };
    }
    v
}

pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

// ---- a minimal blocking client ----

pub fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Reads the greeting and answers with fixed newstyle + no zeroes.
pub fn greet(s: &mut UnixStream) {
    let g = read_exact(s, 18);
    assert_eq!(be64(&g), NBD_MAGIC);
    assert_eq!(be64(&g[8..]), IHAVEOPT);
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
}

pub fn send_option(s: &mut UnixStream, code: u32, data: &[u8]) {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend(code.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    s.write_all(&v).unwrap();
}

/// One option reply: (option, type, data).
pub fn read_option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let h = read_exact(s, 20);
    assert_eq!(be64(&h), OPTION_REPLY_MAGIC);
    let len = be32(&h[16..]) as usize;
    (be32(&h[8..]), be32(&h[12..]), read_exact(s, len))
}

pub fn go_payload(name: &str) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend(name.as_bytes());
    v.extend(0u16.to_be_bytes());
    v
}

/// The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
pub fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (export.len() as u32).to_be_bytes().to_vec();
    v.extend(export.as_bytes());
    v.extend((queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend((q.len() as u32).to_be_bytes());
        v.extend(q.as_bytes());
    }
    v
}

/// NBD_OPT_GO to `name`; returns (size, transmission flags).
pub fn go(s: &mut UnixStream, name: &str) -> (u64, u16) {
    send_option(s, OPT_GO, &go_payload(name));
    let mut size_flags = None;
    loop {
        let (_, rtype, data) = read_option_reply(s);
        match rtype {
            REP_INFO if u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                size_flags = Some((be64(&data[2..]), u16::from_be_bytes([data[10], data[11]])));
            }
            REP_INFO => {}
            REP_ACK => return size_flags.expect("INFO_EXPORT before ACK"),
            other => panic!("GO failed with reply type {other:#x}"),
        }
    }
}

/// A connected client in transmission (simple replies).
pub fn open(server: &Server, name: &str) -> (UnixStream, u64, u16) {
    let mut s = server.connect();
    greet(&mut s);
    let (size, flags) = go(&mut s, name);
    (s, size, flags)
}

pub fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v.extend(offset.to_be_bytes());
    v.extend(len.to_be_bytes());
    v
}

/// Reads a simple reply header: (error, cookie).
pub fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let h = read_exact(s, 16);
    assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC, "expected a simple reply");
    (be32(&h[4..]), be64(&h[8..]))
}

/// Simple-reply READ.
pub fn pread(s: &mut UnixStream, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
    s.write_all(&request(CMD_READ, 0, 42, offset, len)).unwrap();
    let (err, cookie) = simple_reply(s);
    assert_eq!(cookie, 42);
    if err != 0 {
        return Err(err);
    }
    Ok(read_exact(s, len as usize))
}

/// True once the server has closed the connection (EOF or reset).
pub fn is_closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => {
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        }
    }
}
