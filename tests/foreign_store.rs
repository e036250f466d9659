//! A server that does not own its store. The kernel's `mincore` then reports every page of a
//! read-only object as cached (`can_do_mincore()`, mm/mincore.c), and a read path that
//! believed it would answer cold reads "inline" on its async threads, stalling on the disk.
//!
//! The test runs parts of itself as another user (`setpriv`, from a copy of this test binary
//! that user can execute) against a store and an exported image owned by root: the read
//! path on a loose store, `tessera serve` read cold by nbdcopy, the read path on the store
//! once packed.

mod common;

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::served::Served;
use common::Env;
use tessera::blockdev::ImageDevice;
use tessera::store::Store;

const TEST: &str = "reads_of_a_store_owned_by_another_user_do_not_trust_mincore";
const HELPER: &str = "foreign_store_reader";
const NOBODY: &str = "65534";
const BIG: usize = 1 << 20;
const SMALL: usize = 16 << 10;

/// Deterministic bytes that occur nowhere else in the image.
fn noise(seed: u8, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new_derive_key("foreign store test")
        .update(&[seed])
        .finalize_xof()
        .fill(&mut out);
    out
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("file data in the exported image")
}

/// Drops `file` from the page cache (pages some process maps stay).
fn evict_file(file: &File) {
    // SAFETY: posix_fadvise takes integers only; `file` is open during the call.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Drops every file under `dir` from the page cache.
fn evict(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            evict(&path);
        } else if let Ok(f) = File::open(&path) {
            evict_file(&f);
        }
    }
}

/// `program` run as uid and gid [`NOBODY`], with no supplementary groups.
fn as_nobody(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(program);
    cmd
}

fn chmod(mode: &str, path: &Path) {
    let ok = Command::new("chmod")
        .args(["-R", mode])
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success(), "chmod -R {mode} {}", path.display());
}

#[test]
fn reads_of_a_store_owned_by_another_user_do_not_trust_mincore() {
    if !common::can_run(TEST, true, &["setpriv", "nbdcopy"]) {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("big"), noise(1, BIG)).unwrap();
    std::fs::write(src.join("small"), noise(2, SMALL)).unwrap();
    let tree = env.import(&src);
    env.ok(&["image", "create", "img", "--tree", &tree]);
    let raw = env.path("img.raw");
    env.ok(&[
        OsStr::new("image"),
        OsStr::new("export"),
        OsStr::new("img"),
        raw.as_os_str(),
    ]);
    let bytes = std::fs::read(&raw).unwrap();
    let big_at = find(&bytes, &noise(1, BIG)[..4096]);
    let small_at = find(&bytes, &noise(2, SMALL)[..4096]);

    // Everything readable by the other user; writable only what a server must write (its
    // run directory with the leases, the store's lock, a directory for its socket).
    let helper = env.path("helper");
    std::fs::copy(std::env::current_exe().unwrap(), &helper).unwrap();
    let tessera = env.path("tessera");
    std::fs::copy(env!("CARGO_BIN_EXE_tessera"), &tessera).unwrap();
    let socks = env.path("socks");
    for dir in [&socks, &env.store.join("run")] {
        std::fs::create_dir_all(dir).unwrap();
    }
    chmod("a+rX", env.dir.path());
    for writable in [&socks, &env.store.join("run"), &env.store.join("lock")] {
        chmod("a+w", writable);
    }
    let read_as_nobody = |mode: &str| {
        let out = as_nobody(&helper)
            .args(["--exact", HELPER, "--ignored", "--nocapture"])
            .env("FOREIGN_MODE", mode)
            .env("FOREIGN_STORE", &env.store)
            .env("FOREIGN_RAW", &raw)
            .env("FOREIGN_BIG_AT", big_at.to_string())
            .env("FOREIGN_SMALL_AT", small_at.to_string())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&format!("foreign store: {mode} checked")),
            "the {mode} reader as uid {NOBODY} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    read_as_nobody("loose");

    // The server as that user, read cold by a real client: the same bytes, and it says why
    // its replies are no longer zero-copy.
    let log = env.path("serve.log");
    let mut server = as_nobody(&tessera);
    server.arg("--store").arg(&env.store);
    let mut served = Served::start_command(server, socks.join("nbd.sock"), &log);
    evict(&env.store);
    let got = env.path("got.raw");
    let copy = Command::new("nbdcopy")
        .arg(served.uri("img"))
        .arg(&got)
        .output()
        .unwrap();
    assert!(
        copy.status.success(),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );
    assert!(
        std::fs::read(&got).unwrap() == bytes,
        "nbdcopy read other bytes than the export"
    );
    assert!(served.stop(Duration::from_secs(10)).success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("owned by another user"), "server log:\n{log}");

    env.ok(&["store", "pack", "img"]);
    chmod("a+rX", &env.store);
    read_as_nobody("packed");
}

/// The part that runs as another user; does nothing when run directly.
#[test]
#[ignore = "run as another user by reads_of_a_store_owned_by_another_user_do_not_trust_mincore"]
fn foreign_store_reader() {
    let Ok(mode) = std::env::var("FOREIGN_MODE") else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap();
    let (big_at, small_at): (u64, u64) = (
        var("FOREIGN_BIG_AT").parse().unwrap(),
        var("FOREIGN_SMALL_AT").parse().unwrap(),
    );
    let store_dir = var("FOREIGN_STORE");
    let store_dir = Path::new(&store_dir);
    let raw = std::fs::read(var("FOREIGN_RAW")).unwrap();
    let expect = |at: u64| &raw[at as usize..at as usize + 4096];
    // SAFETY: geteuid has no preconditions.
    assert_ne!(unsafe { libc::geteuid() }, 0, "the reader must not be root");
    let store = Store::open(store_dir).unwrap();
    let dev = ImageDevice::open(&store, "img").unwrap();
    let mut buf = vec![0u8; 4096];

    if mode == "loose" {
        // The premise: mincore calls an evicted file of another user's cached.
        let file = File::open(var("FOREIGN_RAW")).unwrap();
        // SAFETY: a root-owned file no one writes while the test runs.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        evict_file(&file);
        let mut vec = vec![0u8; map.len().div_ceil(4096)];
        // SAFETY: the whole live mapping, one byte per page in `vec`.
        let r = unsafe {
            libc::mincore(
                map.as_ptr() as *mut libc::c_void,
                map.len(),
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        assert!(
            vec.iter().all(|v| v & 1 == 1),
            "premise: mincore reported an evicted file of another user as cached"
        );

        // A blocking read of each first: the large object is mapped (only its first pages
        // touched, far from `far`), the small one's descriptor opened.
        let far = big_at + (BIG as u64) * 3 / 4;
        dev.read_at(&mut buf, big_at).unwrap();
        dev.read_at(&mut buf, small_at).unwrap();
        evict(store_dir);
        assert!(
            dev.read_at_resident(&mut buf, far).is_none(),
            "an evicted block of a mapped object was taken as cached"
        );
        let mut shared = Vec::new();
        assert!(
            dev.read_resident_shared(small_at, 4096, &mut shared)
                .is_none(),
            "an evicted small object was answered from its mapping"
        );
        dev.read_at(&mut buf, far).unwrap();
        assert_eq!(buf, expect(far));
    } else {
        // A packed object: not resident after eviction, resident again (through the pack's
        // descriptor) once read.
        dev.read_at(&mut buf, small_at).unwrap();
        evict(store_dir);
        assert!(
            dev.read_at_resident(&mut buf, small_at).is_none(),
            "an evicted packed object was taken as cached"
        );
        dev.read_at(&mut buf, small_at).unwrap();
        buf.fill(0);
        match dev.read_at_resident(&mut buf, small_at) {
            Some(Ok(())) => assert_eq!(buf, expect(small_at)),
            other => panic!("a cached packed object was not read inline: {other:?}"),
        }
    }
    println!("foreign store: {mode} checked");
}
