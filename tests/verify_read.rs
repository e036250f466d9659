//! `serve --verify`: a flipped byte in a store object turns the reads that touch its group
//! into EIO, with a log line naming the object, while every other block of the image reads
//! exactly as `tessera image export` wrote it before the flip. Plus the outboard files'
//! life cycle: written at import, recomputed for older stores, checked by `store verify`,
//! removed by `store gc`. Imports use `--no-pack`: the flipped byte is in a loose object
//! file (tests/pack.rs flips one in a pack).

mod common;
#[path = "../crates/nbd/tests/support/mod.rs"]
mod nbd_support;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use tessera::store::outboard::GROUP_LEN;
use tessera::store::{ObjectId, Store};
use tessera_ext4::Piece;

const BLOCK: u64 = 4096;

/// Deterministic bytes that do not compress or repeat.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

/// A tree with a small file (one group, checked whole) and a large one (17 groups).
struct Fixture {
    env: Env,
    raw: PathBuf,
    small: ObjectId,
    large: ObjectId,
}

fn fixture() -> Fixture {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    let small = noise(10_000, 1);
    let large = noise(16 * GROUP_LEN as usize + 12_345, 2);
    fs::write(src.join("small.bin"), &small).unwrap();
    fs::write(src.join("dir/large.bin"), &large).unwrap();
    fs::write(src.join("dir/other.txt"), noise(3000, 3)).unwrap();
    let tree = env.import_loose(&src);
    env.ok(&["image", "create", "img", "--tree", &tree, "--size", "16M"]);
    let raw = env.path("img.raw");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "img".as_ref(),
        raw.as_os_str(),
    ]);
    Fixture {
        env,
        raw,
        small: ObjectId::of(&small),
        large: ObjectId::of(&large),
    }
}

/// Where each object's bytes lie in the image: (device offset, len, object, object offset).
fn data_map(store: &Store) -> Vec<(u64, u64, ObjectId, u64)> {
    let record = tessera::image::load(store, "img").unwrap();
    let built = tessera::image::build(store, &record).unwrap();
    let mut out = Vec::new();
    let mut pos = 0;
    for piece in built.layout.pieces(0, built.layout.size()) {
        if let Piece::Data {
            handle,
            offset,
            len,
        } = piece
        {
            out.push((pos, len, built.objects[handle.0 as usize], offset));
        }
        pos += piece.len();
    }
    out
}

/// The 4 KiB blocks of the image that hold any of `object`'s bytes in `range`.
fn blocks_of(
    map: &[(u64, u64, ObjectId, u64)],
    object: ObjectId,
    range: std::ops::Range<u64>,
) -> BTreeSet<u64> {
    let mut blocks = BTreeSet::new();
    for &(dev, len, _, at) in map.iter().filter(|m| m.2 == object) {
        let start = at.max(range.start);
        let end = (at + len).min(range.end);
        if start < end {
            let first = (dev + start - at) / BLOCK;
            let last = (dev + end - at - 1) / BLOCK;
            blocks.extend(first..=last);
        }
    }
    blocks
}

/// Flip one bit of the object at `offset`, the way a failing disk or a careless edit would.
fn flip(store: &Store, id: &ObjectId, offset: u64) {
    let path = store.object_path(id);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x10;
    file.write_all_at(&byte, offset).unwrap();
    drop(file);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
}

/// `tessera serve` with its stderr in a file, stopped on drop.
struct Server {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Server {
    fn start(env: &Env, name: &str, extra: &[&str]) -> Server {
        let sock = env.path(&format!("{name}.sock"));
        let log = env.path(&format!("{name}.log"));
        let child = env
            .command()
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn tessera serve");
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "serve did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, sock, log }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///img?socket={}", self.sock.display())
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(5) {
                self.child.kill().ok();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.wait().ok();
    }
}

/// Run a Python script with libnbd's bindings, `h` an open handle.
fn python(py: &str, script: &str) -> std::process::Output {
    Command::new(py)
        .arg("-c")
        .arg(format!("import nbd\nh = nbd.NBD()\n{script}"))
        .output()
        .expect("run python3")
}

/// Read every 4 KiB block of the export with libnbd, in a shuffled order so no block is
/// read only after its neighbours warmed its group; compare with `reference`. Returns the
/// blocks that failed with EIO; any other error or any wrong byte fails the test.
fn read_all_blocks(py: &str, uri: &str, reference: &Path) -> BTreeSet<u64> {
    let script = format!(
        r#"
import errno, random
ref = open({reference:?}, "rb").read()
h.connect_uri({uri:?})
size = h.get_size()
assert size == len(ref), (size, len(ref))
blocks = list(range(size // 4096))
random.Random(7).shuffle(blocks)
for b in blocks:
    try:
        got = h.pread(4096, b * 4096)
    except nbd.Error as e:
        if e.errnum != errno.EIO:
            raise
        print("EIO", b)
        continue
    if got != ref[b * 4096:(b + 1) * 4096]:
        print("WRONG", b)
"#,
        reference = reference.display().to_string(),
    );
    let out = python(py, &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python3 failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrong: Vec<&str> = stdout.lines().filter(|l| l.starts_with("WRONG")).collect();
    assert!(
        wrong.is_empty(),
        "blocks served with wrong bytes: {wrong:?}"
    );
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("EIO "))
        .map(|b| b.parse().unwrap())
        .collect()
}

#[test]
fn flipped_bytes_are_eio_and_everything_else_reads_back() {
    let Some(py) = nbd_support::python_nbd() else {
        return;
    };
    let fx = fixture();
    let store = fx.env.open_store();
    assert!(
        store.outboard_path(&fx.large).exists(),
        "import writes the large object's outboard"
    );
    assert!(
        !store.outboard_path(&fx.small).exists(),
        "a small object has none"
    );
    let map = data_map(&store);

    // One bit in the small object (checked whole) and one in group 5 of the large one.
    flip(&store, &fx.small, 100);
    flip(&store, &fx.large, 5 * GROUP_LEN + 777);
    let mut want = blocks_of(&map, fx.small, 0..u64::MAX);
    want.extend(blocks_of(&map, fx.large, 5 * GROUP_LEN..6 * GROUP_LEN));
    assert!(
        want.len() >= 2 + 16,
        "the flipped groups span {} blocks",
        want.len()
    );

    let server = Server::start(&fx.env, "verify", &["--verify"]);
    let failed = read_all_blocks(py, &server.uri(), &fx.raw);
    assert_eq!(
        failed, want,
        "exactly the blocks of the damaged groups fail"
    );
    // Again, now that every good group is remembered and the bad ones too.
    assert_eq!(read_all_blocks(py, &server.uri(), &fx.raw), want);
    let log = server.log();
    for id in [fx.small, fx.large] {
        let lines = log.lines().filter(|l| l.contains(&id.to_hex())).count();
        assert_eq!(lines, 1, "one log line names object {id}:\n{log}");
    }
    drop(server);

    // Without --verify the damage is served as data; `store verify` names both objects.
    let server = Server::start(&fx.env, "plain", &[]);
    let script = format!(
        "h.connect_uri({:?})\nprint(h.pread(4096, {} * 4096) == open({:?}, 'rb').read()[{} * 4096:][:4096])",
        server.uri(),
        want.first().unwrap(),
        fx.raw.display().to_string(),
        want.first().unwrap(),
    );
    let out = python(py, &script);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "False");
    drop(server);
    let report = fx.env.fails(&["store", "verify"]);
    for id in [fx.small, fx.large] {
        assert!(
            report.contains(&format!("object {id} is corrupt")),
            "{report}"
        );
    }
}

#[test]
fn an_older_store_gets_its_outboard_on_the_first_verified_read() {
    let Some(py) = nbd_support::python_nbd() else {
        return;
    };
    let fx = fixture();
    let store = fx.env.open_store();
    let outboard = store.outboard_path(&fx.large);
    let written = fs::read(&outboard).unwrap();
    fs::remove_file(&outboard).unwrap();

    let server = Server::start(&fx.env, "verify", &["--verify"]);
    assert_eq!(read_all_blocks(py, &server.uri(), &fx.raw), BTreeSet::new());
    assert_eq!(
        fs::read(&outboard).unwrap(),
        written,
        "recomputed the same outboard"
    );
    drop(server);

    // A damaged outboard is ignored and replaced; the reads stay correct.
    let mut damaged = written.clone();
    damaged[100] ^= 1;
    fs::set_permissions(&outboard, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&outboard, &damaged).unwrap();
    let report = fx.env.fails(&["store", "verify"]);
    assert!(
        report.contains(&format!("outboard of object {} is invalid", fx.large)),
        "{report}"
    );
    let server = Server::start(&fx.env, "again", &["--verify"]);
    assert_eq!(read_all_blocks(py, &server.uri(), &fx.raw), BTreeSet::new());
    assert_eq!(fs::read(&outboard).unwrap(), written);
    drop(server);
    fx.env.ok(&["store", "verify"]);
}

#[test]
fn gc_removes_outboards_with_their_objects() {
    let fx = fixture();
    let store = fx.env.open_store();
    let outboard = store.outboard_path(&fx.large);
    assert!(outboard.exists());
    // An outboard left behind by a crash between the two renames, or a hand-removed object.
    let orphan = ObjectId::of(b"gone");
    fs::create_dir_all(store.outboard_path(&orphan).parent().unwrap()).unwrap();
    fs::copy(&outboard, store.outboard_path(&orphan)).unwrap();
    let report = fx.env.fails(&["store", "verify"]);
    assert!(
        report.contains(&format!("outboard of missing object {orphan}")),
        "{report}"
    );

    let kept = tessera::upkeep::gc(&store, false).unwrap();
    assert_eq!(kept.outboards, 1);
    assert!(outboard.exists() && !store.outboard_path(&orphan).exists());

    fx.env.ok(&["image", "rm", "img"]);
    let gone = tessera::upkeep::gc(&store, false).unwrap();
    assert_eq!(gone.outboards, 1);
    assert!(!outboard.exists() && !store.has_object(&fx.large));
    fx.env.ok(&["store", "verify"]);
}

/// The resident fast path never returns bytes that were not checked: it defers to the
/// I/O path (which checks) until the group is verified. Objects are shared between
/// devices, so a device without verification must not count as having checked anything.
#[test]
fn resident_reads_wait_for_verification() {
    let fx = fixture();
    let plain = fx.env.open_store();
    let store = plain.clone().verifying_reads(true);
    let map = data_map(&store);
    let &(at, _, _, _) = map.iter().find(|m| m.2 == fx.large && m.3 == 0).unwrap();
    let want = fs::read(&fx.raw).unwrap()[at as usize..][..4096].to_vec();
    let unchecked = tessera::blockdev::ImageDevice::open(&plain, "img").unwrap();
    let checked = tessera::blockdev::ImageDevice::open(&store, "img").unwrap();
    let mut buf = vec![0u8; 4096];
    // Map the object and make its pages resident through the unchecked device.
    for _ in 0..2 {
        unchecked.read_at(&mut buf, at).unwrap();
    }
    assert!(unchecked.read_at_resident(&mut buf, at).is_some());
    assert!(
        checked.read_at_resident(&mut buf, at).is_none(),
        "not verified yet"
    );
    checked.read_at(&mut buf, at).unwrap();
    assert_eq!(buf, want);
    buf.fill(0);
    checked.read_at_resident(&mut buf, at).unwrap().unwrap();
    assert_eq!(buf, want);
}
