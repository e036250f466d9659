//! A fleet's store on S3 (issue 13), against a real engine: Ceph's radosgw, started once for
//! this test binary by `tools/ceph-s3` and stopped when it exits. Two "hosts" are two
//! stores: A imports and pushes, B serves the bucket's images lazily (`serve --remote`).
//! Each test works under its own prefix of one bucket; the tests run one at a time because
//! one of them stops the gateway.

mod common;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::served::{Fuse, Served};
use common::{Env, LoopMount};
use tessera::store::{ObjectId, Store};
use tessera_ext4::Piece;

const PY: &str = "/usr/bin/python3";

/// The running engine.
struct Ceph {
    dir: PathBuf,
    s3cfg: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/ceph-s3")
}

static CEPH_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn stop_ceph() {
    if let Some(dir) = CEPH_DIR.get() {
        let _ = Command::new(script())
            .arg("stop")
            .arg(dir)
            .stdout(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(dir);
    }
}

/// Two free TCP ports in a row (the gateway's and, one below, the monitor's).
fn free_ports() -> u16 {
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port > 1025 && std::net::TcpListener::bind(("127.0.0.1", port - 1)).is_ok() {
            return port;
        }
    }
    panic!("no two free ports in a row");
}

/// The shared engine, started on first use; `None` (test skipped) without the packages,
/// unless TESSERA_REQUIRE_PEERS=1.
fn ceph(test: &str) -> Option<&'static Ceph> {
    static CEPH: OnceLock<Option<Ceph>> = OnceLock::new();
    if !common::can_run(
        test,
        true,
        &["ceph-mon", "ceph-osd", "radosgw", "s3cmd", "nbdcopy"],
    ) {
        return None;
    }
    CEPH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tessera-ceph-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let _ = CEPH_DIR.set(dir.clone());
        // SAFETY: atexit with a plain extern "C" function; it runs once, at process exit.
        unsafe { libc::atexit(stop_ceph) };
        // A fresh cluster now and then fails to come up (the OSD refused by its monitor);
        // a second try on other ports has always worked.
        let mut tries = 0;
        let out = loop {
            tries += 1;
            let out = Command::new(script())
                .arg("start")
                .arg(&dir)
                .arg(free_ports().to_string())
                .arg("tessera")
                .output()
                .expect("run tools/ceph-s3");
            if out.status.success() || tries == 3 {
                break out;
            }
            stop_ceph();
        };
        assert!(
            out.status.success(),
            "tools/ceph-s3 start failed {tries} times: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let vars: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        for key in [
            "AWS_ENDPOINT",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "AWS_ALLOW_HTTP",
        ] {
            // The children (tessera) read them; set before any is spawned.
            std::env::set_var(key, &vars[key]);
        }
        Some(Ceph {
            dir,
            s3cfg: PathBuf::from(&vars["S3CFG"]),
        })
    })
    .as_ref()
}

/// One test at a time (one stops the gateway).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ceph {
    fn s3cmd(&self, args: &[&str]) -> String {
        let out = Command::new("s3cmd")
            .arg("-c")
            .arg(&self.s3cfg)
            .args(args)
            .output()
            .expect("run s3cmd");
        assert!(
            out.status.success(),
            "s3cmd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn gateway(&self, action: &str) {
        let st = Command::new(script())
            .arg(action)
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(st.success(), "ceph-s3 {action}");
    }
}

/// Host A: a tree with files of many sizes (one large enough for several 1 MiB chunks),
/// imported as image `web`; returns A and the source directory.
fn host_a(files: usize) -> (Env, PathBuf) {
    let a = Env::new();
    let src = a.path("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    let mut seed = 1u64;
    let mut bytes = |len: usize| {
        (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) as u8
            })
            .collect::<Vec<u8>>()
    };
    fs::write(src.join("big.bin"), bytes(5 << 20 | 12345)).unwrap();
    fs::write(src.join("mid.bin"), bytes(700 << 10)).unwrap();
    for i in 0..files {
        fs::write(src.join(format!("etc/f{i}")), bytes(100 + i * 1500)).unwrap();
    }
    a.ok(&["import", "dir", src.to_str().unwrap(), "--name", "web"]);
    (a, src)
}

fn url(prefix: &str) -> String {
    format!("s3://tessera/{prefix}")
}

fn objects_in(store: &Path) -> Vec<ObjectId> {
    let mut ids = Vec::new();
    let Ok(fans) = fs::read_dir(store.join("objects")) else {
        return ids;
    };
    for fan in fans {
        let fan = fan.unwrap();
        for e in fs::read_dir(fan.path()).unwrap() {
            let name = format!(
                "{}{}",
                fan.file_name().to_string_lossy(),
                e.unwrap().file_name().to_string_lossy()
            );
            ids.push(name.parse().unwrap());
        }
    }
    // Imports pack small objects: those count as present too.
    if store.join("packs").is_dir() {
        for pack in Store::open(store).unwrap().packs().packs() {
            ids.extend(pack.entries().map(|(id, _, _)| id));
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

/// Where each object's bytes sit in image `name` of `store`: (object, device offset, len).
fn placements(store: &Path, name: &str) -> Vec<(ObjectId, u64, u64)> {
    let store = Store::open(store).unwrap();
    let record = tessera::image::load(&store, name).unwrap();
    let built = tessera::image::build(&store, &record).unwrap();
    let mut at = 0;
    let mut out = Vec::new();
    for piece in built.layout.pieces(0, built.layout.size()) {
        if let Piece::Data { handle, .. } = piece {
            let id = built.objects[handle.0 as usize];
            match out.last_mut() {
                Some((last, start, len)) if *last == id && *start + *len == at => {
                    *len += piece.len()
                }
                _ => out.push((id, at, piece.len())),
            }
        }
        at += piece.len();
    }
    out
}

/// Reads `len` bytes at `offset` of `uri` with libnbd; Err(message) if the read fails.
fn nbd_read(uri: &str, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let script = "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
                  try:\n  sys.stdout.buffer.write(h.pread(int(sys.argv[3]),int(sys.argv[2])))\n\
                  except nbd.Error as e:\n  print(e, file=sys.stderr); sys.exit(3)\n";
    let out = Command::new(PY)
        .args(["-c", script, uri, &offset.to_string(), &len.to_string()])
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => Ok(out.stdout),
        Some(3) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        _ => panic!(
            "python nbd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn export(env: &Env) -> Vec<u8> {
    let img = env.path("export.img");
    env.ok(&["image", "export", "web", img.to_str().unwrap()]);
    fs::read(img).unwrap()
}

#[test]
fn b_serves_a_pushed_image_lazily_and_whole_reads_equal_a_export() {
    let Some(_ceph) = ceph("remote: lazy serve") else {
        return;
    };
    let _one = serial();
    let (a, src) = host_a(12);
    let u = url("two-hosts");
    let pushed = a.ok(&["store", "push", "--to", &u]);
    assert!(pushed.contains("uploaded 14 objects"), "{pushed}");
    let a_img = export(&a);

    // B, first reader: the kernel mounts the export and reads one file.
    let b = Env::new();
    let mut served = Served::start_logged(&b, "b.sock", &b.path("b.log"), &["--remote", &u]);
    assert!(
        objects_in(&b.store).is_empty(),
        "B fetched objects before any read"
    );
    if common::can_run("remote: kernel mount", true, &["nbdfuse", "fusermount3"]) {
        let fuse = Fuse::new(&b.path("fuse"), &served.uri("web"), true);
        {
            let mnt = LoopMount::new(&fuse.file, &b.path("mnt"), "ro");
            let got = fs::read(mnt.dir.join("etc/f3")).unwrap();
            assert_eq!(got, fs::read(src.join("etc/f3")).unwrap());
            // Only what was read: that file's object, not everything (readahead may
            // bring its neighbours).
            let want = ObjectId::of(&got);
            let have = objects_in(&b.store);
            assert!(have.contains(&want), "{have:?}");
            assert!(have.len() < objects_in(&a.store).len(), "{have:?}");
            let big = fs::read(mnt.dir.join("big.bin")).unwrap();
            assert_eq!(big, fs::read(src.join("big.bin")).unwrap());
        }
        drop(fuse);
    }

    // Then everything: nbdcopy from B equals A's export, and B now holds every object.
    let b_img = b.path("b.img");
    let st = Command::new("nbdcopy")
        .arg(served.uri("web"))
        .arg(&b_img)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        fs::read(&b_img).unwrap() == a_img,
        "B's export differs from A's"
    );
    assert_eq!(objects_in(&b.store), objects_in(&a.store));
    assert!(
        fs::read_dir(b.store.join("partial"))
            .map(|d| d
                .flatten()
                .all(|f| fs::read_dir(f.path()).unwrap().count() == 0))
            .unwrap_or(true),
        "fully fetched objects are ordinary objects"
    );
    served.stop(Duration::from_secs(10));
    // And B's store now exports it without the remote.
    assert!(export(&b) == a_img);
}

#[test]
fn a_tampered_object_in_the_bucket_fails_its_reads_only() {
    let Some(ceph) = ceph("remote: tampered object") else {
        return;
    };
    let _one = serial();
    let (a, _src) = host_a(4);
    let u = url("tampered");
    a.ok(&["store", "push", "--to", &u]);
    let a_img = export(&a);
    let places = placements(&a.store, "web");
    // Flip one byte in the middle of the large object (group 40 of 82, chunk 2).
    let big = places.iter().max_by_key(|p| p.2).unwrap();
    let hex = big.0.to_hex();
    let key = format!("s3://tessera/tampered/objects/{}/{}", &hex[..2], &hex[2..]);
    let mut bytes = fs::read(Store::open(&a.store).unwrap().object_path(&big.0)).unwrap();
    bytes[40 << 16] ^= 1;
    let tmp = a.path("tampered.bin");
    fs::write(&tmp, &bytes).unwrap();
    ceph.s3cmd(&["put", tmp.to_str().unwrap(), &key]);

    let b = Env::new();
    let log = b.path("b.log");
    let served = Served::start_logged(&b, "b.sock", &log, &["--remote", &u]);
    let uri = served.uri("web");
    // The tampered chunk fails with EIO, and the log names the object.
    let err = nbd_read(&uri, big.1 + (40 << 16), 4096).unwrap_err();
    assert!(
        err.contains("Input/output error") || err.contains("EIO"),
        "{err}"
    );
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&hex) && text.contains("do not match"),
        "log: {text}"
    );
    // The same object's untampered chunks, and every other file, still read right.
    let first = nbd_read(&uri, big.1, 1 << 20).unwrap();
    assert!(first == a_img[big.1 as usize..big.1 as usize + (1 << 20)]);
    for &(id, at, len) in places.iter().filter(|p| p.0 != big.0) {
        let got = nbd_read(&uri, at, len).unwrap();
        assert!(
            got == a_img[at as usize..(at + len) as usize],
            "object {id}"
        );
    }
}

#[test]
fn backend_down_cached_reads_work_uncached_fail_and_recover() {
    let Some(ceph) = ceph("remote: backend down") else {
        return;
    };
    let _one = serial();
    let (a, _src) = host_a(4);
    let u = url("outage");
    a.ok(&["store", "push", "--to", &u]);
    let a_img = export(&a);
    let places = placements(&a.store, "web");
    let big = *places.iter().max_by_key(|p| p.2).unwrap();
    let mid = *places.iter().find(|p| p.2 == 700 << 10).unwrap();
    let slice = |at: u64, len: u64| &a_img[at as usize..(at + len) as usize];

    let b = Env::new();
    let served = Served::start_logged(&b, "b.sock", &b.path("b.log"), &["--remote", &u]);
    let uri = served.uri("web");
    assert!(nbd_read(&uri, big.1, 1 << 20).unwrap() == slice(big.1, 1 << 20));

    ceph.gateway("rgw-stop");
    let result = std::panic::catch_unwind(|| {
        // Cached: served from B's store.
        assert!(nbd_read(&uri, big.1, 1 << 20).unwrap() == slice(big.1, 1 << 20));
        // Uncached: this request fails, the next cached one still works.
        let err = nbd_read(&uri, mid.1, mid.2).unwrap_err();
        assert!(
            err.contains("Input/output error") || err.contains("EIO"),
            "{err}"
        );
        let err = nbd_read(&uri, big.1 + (3 << 20), 4096).unwrap_err();
        assert!(!err.is_empty());
        assert!(nbd_read(&uri, big.1 + 4096, 4096).unwrap() == slice(big.1 + 4096, 4096));
    });
    ceph.gateway("rgw-start");
    result.unwrap();
    // The server stayed up and reads what it could not before.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match nbd_read(&uri, mid.1, mid.2) {
            Ok(got) => {
                assert!(got == slice(mid.1, mid.2));
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("no recovery after the gateway came back: {e}"),
        }
    }
    assert!(nbd_read(&uri, big.1 + (3 << 20), 4096).unwrap() == slice(big.1 + (3 << 20), 4096));
}

#[test]
fn an_interrupted_push_finishes_on_rerun_uploading_nothing_twice() {
    let Some(_ceph) = ceph("remote: interrupted push") else {
        return;
    };
    let _one = serial();
    let (a, _src) = host_a(60);
    let u = url("interrupted");
    let total = objects_in(&a.store).len();

    let mut child = a
        .command()
        .args(["store", "push", "--to", &u])
        .env("RUST_LOG", "tessera=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut uploaded: Vec<String> = Vec::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("uploaded object") {
            uploaded.push(line);
            if uploaded.len() == 5 {
                child.kill().unwrap();
                break;
            }
        }
    }
    uploaded.extend(
        lines
            .map_while(Result::ok)
            .filter(|l| l.contains("uploaded object")),
    );
    child.wait().unwrap();
    let first = uploaded.len();
    assert!(
        first >= 5 && first < total,
        "{first} of {total} uploaded before the kill"
    );

    let out = a
        .command()
        .args(["store", "push", "--to", &u])
        .env("RUST_LOG", "tessera=info")
        .output()
        .unwrap();
    assert!(out.status.success());
    uploaded.extend(
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains("uploaded object"))
            .map(str::to_owned),
    );
    let ids: Vec<String> = uploaded
        .iter()
        .map(|l| {
            let at = l.find("object=").expect("object field") + 7;
            l[at..at + 64].to_owned()
        })
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an object was uploaded twice");
    // Objects whose upload finished just before the kill went unlogged; the rerun found
    // them there (create-only) rather than sending them again.
    assert!(
        ids.len() <= total,
        "{} uploads of {total} objects",
        ids.len()
    );
    let third = a.ok(&["store", "push", "--to", &u]);
    assert!(third.starts_with("uploaded 0 objects"), "{third}");

    // The bucket is complete: a third host pulls the image whole and exports A's bytes.
    let c = Env::new();
    c.ok(&["store", "pull", "web", "--from", &u]);
    // Pulled objects count as fetched from the remote, none as local.
    let stats: serde_json::Value =
        serde_json::from_str(&c.ok(&["store", "stats", "--json"])).unwrap();
    assert_eq!(stats["fetched_objects"], total, "{stats}");
    assert_eq!(stats["local_bytes"], 0, "{stats}");
    assert!(export(&c) == export(&a));
}

#[test]
fn a_trace_recorded_by_the_first_server_is_replayed_by_the_next() {
    // A file:// remote: this one needs no engine, only libnbd's Python module.
    if !common::can_run("remote: prefetch trace", false, &[PY]) {
        return;
    }
    let (a, _src) = host_a(6);
    let bucket = a.path("bucket");
    let u = format!("file://{}", bucket.display());
    a.ok(&["store", "push", "--to", &u]);
    let places = placements(&a.store, "web");
    let big = *places.iter().max_by_key(|p| p.2).unwrap();
    let small = *places.iter().min_by_key(|p| p.2).unwrap();

    // B serves first and reads two things; stopping writes the trace, here and remotely.
    let b = Env::new();
    let mut served = Served::start_logged(&b, "b.sock", &b.path("b.log"), &["--remote", &u]);
    nbd_read(&served.uri("web"), small.1, small.2).unwrap();
    nbd_read(&served.uri("web"), big.1 + (2 << 20), 4096).unwrap();
    assert!(served.stop(Duration::from_secs(10)).success());
    let trace = fs::read_to_string(b.store.join("traces/web")).unwrap();
    assert_eq!(trace.lines().count(), 2, "{trace}");
    assert!(
        trace.starts_with(&small.0.to_hex()),
        "fetch order kept: {trace}"
    );
    assert!(bucket.join("traces/web").exists());

    // C fetches the same while nobody reads.
    let c = Env::new();
    let mut served = Served::start_logged(&c, "c.sock", &c.path("c.log"), &["--remote", &u]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let big_hex = big.0.to_hex();
    let chunks = c
        .store
        .join("partial")
        .join(&big_hex[..2])
        .join(format!("{}.chunks", &big_hex[2..]));
    while !(objects_in(&c.store).contains(&small.0)
        && fs::read(&chunks).is_ok_and(|m| m.get(2) == Some(&1)))
    {
        assert!(Instant::now() < deadline, "the trace was not replayed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        objects_in(&c.store),
        vec![small.0],
        "only what the trace names"
    );
    served.stop(Duration::from_secs(10));
}

/// Bytes of fetched object data in `store`: whole objects, and the marked chunks of
/// partial ones (what `serve --cache-size` bounds).
fn fetched_bytes(store: &Path) -> u64 {
    let mut total = 0;
    for id in objects_in(store) {
        total += Store::open(store).unwrap().object_len(&id).unwrap();
    }
    for fan in fs::read_dir(store.join("partial")).into_iter().flatten() {
        for e in fs::read_dir(fan.unwrap().path()).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "chunks") {
                continue;
            }
            let len = fs::metadata(&path).map_or(0, |m| m.len());
            let mut map = path.clone().into_os_string();
            map.push(".chunks");
            let marks = fs::read(map).unwrap_or_default();
            for (c, _) in marks.iter().enumerate().filter(|(_, &m)| m == 1) {
                total += CHUNK.min(len - c as u64 * CHUNK);
            }
        }
    }
    total
}

const CHUNK: u64 = 1 << 20;

/// One libnbd connection answering the test's reads one at a time.
struct Reader {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Reader {
    fn new(uri: &str) -> Reader {
        let script = "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
                      for line in sys.stdin:\n  at,n=map(int,line.split())\n  \
                      sys.stdout.buffer.write(h.pread(n,at)); sys.stdout.flush()\n";
        let mut child = Command::new(PY)
            .args(["-c", script, uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Reader { child, out }
    }

    fn read(&mut self, at: u64, len: u64) -> Vec<u8> {
        use std::io::{Read, Write};
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{at} {len}").unwrap();
        stdin.flush().unwrap();
        let mut buf = vec![0u8; len as usize];
        self.out.read_exact(&mut buf).unwrap();
        buf
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A libnbd client that reads `len` bytes at `offset` of `uri` and keeps its connection
/// (and so the server's lease on the image) until dropped.
struct Holding(std::process::Child);

impl Holding {
    fn new(uri: &str, offset: u64, len: u64) -> Holding {
        let script = "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
                      h.pread(int(sys.argv[3]),int(sys.argv[2]))\nprint('held',flush=True)\n\
                      sys.stdin.read()\n";
        let mut child = Command::new(PY)
            .args(["-c", script, uri, &offset.to_string(), &len.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held");
        Holding(child)
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[test]
fn a_bounded_cache_stays_under_its_size_refetches_and_gc_and_stats_follow() {
    let Some(_ceph) = ceph("remote: bounded cache") else {
        return;
    };
    let _one = serial();
    // About 8.3 MiB of file data: the 5 MiB object, one of 700 KiB, 60 small ones.
    let (a, _src) = host_a(60);
    let u = url("bounded");
    a.ok(&["store", "push", "--to", &u]);
    let a_img = export(&a);
    let places = placements(&a.store, "web");
    let a_store = Store::open(&a.store).unwrap();
    let sizes: HashMap<ObjectId, u64> = objects_in(&a.store)
        .into_iter()
        .map(|id| (id, a_store.object_len(&id).unwrap()))
        .collect();
    let data: u64 = sizes.values().sum();
    const LIMIT: u64 = 2 << 20;
    assert!(data > 3 * LIMIT, "{data} bytes of data");

    let b = Env::new();
    let mut served = Served::start_logged(
        &b,
        "b.sock",
        &b.path("b.log"),
        &["--remote", &u, "--cache-size", "2M"],
    );
    let uri = served.uri("web");
    // One reader, one read at a time, every file: each read is answered only once the
    // cache is back under its bound, so between reads B holds at most the bound.
    let mut reader = Reader::new(&uri);
    for &(id, at, len) in &places {
        let got = reader.read(at, len);
        assert!(
            got == a_img[at as usize..(at + len) as usize],
            "object {id}"
        );
        let kept = fetched_bytes(&b.store);
        assert!(
            kept <= LIMIT,
            "{kept} bytes kept after reading {id}, bound {LIMIT}"
        );
    }
    drop(reader);
    // Every byte, by nbdcopy (4 connections, many reads in flight): right, and B keeps no
    // more than the bound. Eviction runs after each read lets go of its object, so at
    // rest nothing is in flight; one chunk of slack for a read that finished last.
    let b_img = b.path("b.img");
    let st = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&b_img)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        fs::read(&b_img).unwrap() == a_img,
        "B's export differs from A's"
    );
    let kept = fetched_bytes(&b.store);
    // Objects B has not kept whole (the large one is never whole: it is over the bound).
    let big = *places.iter().max_by_key(|p| p.2).unwrap();
    assert!(kept <= LIMIT + CHUNK, "{kept} bytes kept, bound {LIMIT}");
    let evicted: Vec<_> = places
        .iter()
        .filter(|p| p.0 != big.0 && !objects_in(&b.store).contains(&p.0))
        .copied()
        .collect();
    assert!(!evicted.is_empty(), "nothing was evicted");

    // Evicted data is fetched again when read, and still right.
    for &(id, at, len) in &evicted {
        let got = nbd_read(&uri, at, len).unwrap();
        assert!(
            got == a_img[at as usize..(at + len) as usize],
            "object {id}"
        );
    }
    let here = objects_in(&b.store);
    assert!(
        evicted.iter().all(|p| here.contains(&p.0)),
        "re-read objects are here again"
    );
    assert!(fetched_bytes(&b.store) <= LIMIT + CHUNK);

    // gc: a partial object a running server's client reads survives even with its image
    // record gone (the lease covers it); an orphan one and a stray file do not.
    let hex = big.0.to_hex();
    let big_partial = b.store.join("partial").join(&hex[..2]).join(&hex[2..]);
    let holding = Holding::new(&uri, big.1 + (3 << 20), 4096);
    assert!(
        big_partial.exists(),
        "a chunk of the large object is being kept"
    );
    let orphan = ObjectId::of(b"no tree names this").to_hex();
    let fan = b.store.join("partial").join(&orphan[..2]);
    fs::create_dir_all(&fan).unwrap();
    fs::write(fan.join(&orphan[2..]), vec![7u8; 5000]).unwrap();
    fs::write(fan.join(format!("{}.chunks", &orphan[2..])), [1u8]).unwrap();
    fs::write(fan.join("stray.tmp"), b"x").unwrap();
    b.ok(&["image", "rm", "web"]);
    let gc: serde_json::Value = serde_json::from_str(&b.ok(&["store", "gc", "--json"])).unwrap();
    assert_eq!(gc["partial_objects"], 1, "{gc}");
    assert!(
        big_partial.exists(),
        "the leased partial object was removed"
    );
    let big_outboard = b.store.join("outboard").join(&hex[..2]).join(&hex[2..]);
    assert!(
        big_outboard.exists(),
        "the outboard of an object being fetched was removed"
    );
    assert!(!fan.join(&orphan[2..]).exists() && !fan.join("stray.tmp").exists());
    drop(holding);

    // After the server: the store's statistics hold what it did.
    assert!(served.stop(Duration::from_secs(10)).success());
    let stats: serde_json::Value =
        serde_json::from_str(&b.ok(&["store", "stats", "--json"])).unwrap();
    let a_stats: serde_json::Value =
        serde_json::from_str(&a.ok(&["store", "stats", "--json"])).unwrap();
    assert_eq!(
        a_stats["local_bytes"], data,
        "A imported everything: {a_stats}"
    );
    assert_eq!(a_stats["fetched_objects"], 0, "{a_stats}");
    assert_eq!(
        a_stats["remote_cache"],
        serde_json::Value::Null,
        "{a_stats}"
    );
    let cache = &stats["remote_cache"];
    let n = |k: &str| cache[k].as_u64().unwrap_or_else(|| panic!("{k}: {stats}"));
    assert!(n("misses") >= sizes.len() as u64, "{stats}");
    assert!(
        n("bytes_fetched") >= data,
        "everything was fetched at least once: {stats}"
    );
    assert!(
        n("evictions") > 0 && n("bytes_evicted") >= data - LIMIT - CHUNK,
        "{stats}"
    );
    assert_eq!(n("mismatches"), 0);
    assert_eq!(stats["local_bytes"], 0, "B imported nothing: {stats}");
    let here = objects_in(&b.store);
    let here_bytes: u64 = here.iter().map(|id| sizes[id]).sum();
    assert_eq!(stats["fetched_objects"], here.len(), "{stats}");
    assert_eq!(stats["fetched_bytes"], here_bytes, "{stats}");
    assert_eq!(stats["partial_objects"], 1, "{stats}");
    // With neither image nor server left, gc takes the partial object too.
    b.ok(&["store", "gc"]);
    assert!(!big_partial.exists() && !big_outboard.exists());
}

/// Sets the flag when dropped, so a helper thread stops even when the test panics.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn gc_in_a_loop_never_takes_what_a_lazy_server_is_fetching() {
    // A file:// remote: the fetch path is the same as S3's, only the transport differs.
    if !common::can_run("remote: gc during fetches", false, &[PY]) {
        return;
    }
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    // Many small objects (each fetched whole through tmp/), some chunked ones with
    // outboards (fetched through partial/): every kind of file a fetch writes.
    let (a, _src) = host_a(120);
    let bucket = a.path("bucket");
    let u = format!("file://{}", bucket.display());
    a.ok(&["store", "push", "--to", &u]);
    let a_img = export(&a);
    let places = placements(&a.store, "web");

    let b = Env::new();
    let log = b.path("b.log");
    let mut served = Served::start_logged(&b, "b.sock", &log, &["--remote", &u]);
    let stop = AtomicBool::new(false);
    let runs = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let out = b.run(&["store", "gc"]);
                runs.fetch_add(1, Ordering::Relaxed);
                if !out.status.success() {
                    failed
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
            }
        });
        let mut reader = Reader::new(&served.uri("web"));
        for &(id, at, len) in &places {
            let got = reader.read(at, len);
            assert!(
                got == a_img[at as usize..(at + len) as usize],
                "object {id} read wrong bytes while gc ran; server log:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
    });
    assert!(runs.load(Ordering::Relaxed) > 0, "gc never ran");
    let failed = failed.into_inner().unwrap();
    assert!(failed.is_empty(), "gc failed: {failed:?}");
    assert!(served.stop(Duration::from_secs(10)).success());
    let kept: HashSet<ObjectId> = objects_in(&b.store).into_iter().collect();
    for (id, _, _) in &places {
        assert!(
            kept.contains(id),
            "gc removed {id}, fetched for a running server"
        );
    }
}

#[test]
fn a_file_imported_while_its_object_is_cached_is_never_evicted() {
    // A file:// remote: this one needs no engine, only libnbd's Python module.
    if !common::can_run("remote: import of a cached object", false, &[PY]) {
        return;
    }
    let (a, src) = host_a(6);
    let bucket = a.path("bucket");
    let u = format!("file://{}", bucket.display());
    a.ok(&["store", "push", "--to", &u]);
    let places = placements(&a.store, "web");
    let big = *places.iter().max_by_key(|p| p.2).unwrap();
    let f3 = fs::read(src.join("etc/f3")).unwrap();
    let id = ObjectId::of(&f3);
    let at = places.iter().find(|p| p.0 == id).unwrap();

    let b = Env::new();
    let mut served = Served::start_logged(
        &b,
        "b.sock",
        &b.path("b.log"),
        &["--remote", &u, "--cache-size", "1M"],
    );
    let mut reader = Reader::new(&served.uri("web"));
    assert!(reader.read(at.1, at.2) == f3);
    assert!(objects_in(&b.store).contains(&id), "fetched");
    // B imports a directory holding the same file while it serves.
    let mine = b.path("mine");
    fs::create_dir(&mine).unwrap();
    fs::write(mine.join("same"), &f3).unwrap();
    b.ok(&["import", "dir", mine.to_str().unwrap(), "--name", "mine"]);
    // Two chunks of the big object: over the bound, everything not in use goes.
    reader.read(big.1, 10);
    reader.read(big.1 + CHUNK, 10);
    drop(reader);
    assert!(served.stop(Duration::from_secs(10)).success());
    assert!(
        objects_in(&b.store).contains(&id),
        "the object of B's own image was evicted"
    );
    assert!(
        fetched_bytes(&b.store) <= 1 << 20,
        "the bound held: {}",
        fetched_bytes(&b.store)
    );
    // B's image works without the remote.
    let out = b.path("mine.img");
    b.ok(&["image", "export", "mine", out.to_str().unwrap()]);
}
