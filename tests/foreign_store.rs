//! A server that does not own its store. The kernel's `mincore` then reports every page of a
//! read-only object as cached (`can_do_mincore()`, mm/mincore.c), and a read path that
//! believed it would answer cold reads "inline" on its async threads, stalling on the disk.
//!
//! The test runs its second half as another user (`setpriv`, from a copy of this test binary
//! that user can execute), against a store and an exported image owned by root.

mod common;

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

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

/// Drops every file under `dir` from the page cache (pages this process maps stay).
fn evict(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            evict(&path);
        } else if let Ok(f) = std::fs::File::open(&path) {
            // SAFETY: posix_fadvise takes integers only; `f` is open during the call.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

#[test]
fn reads_of_a_store_owned_by_another_user_do_not_trust_mincore() {
    if !common::can_run(TEST, true, &["setpriv"]) {
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
    // The same store with its small objects in a pack.
    let packed = env.path("packed");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&env.store)
        .arg(&packed)
        .status()
        .unwrap();
    assert!(cp.success());
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("--store")
        .arg(&packed)
        .args(["store", "pack", "img"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Everything readable by the other user; nothing writable or owned by it.
    let chmod = Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(env.dir.path())
        .status()
        .unwrap();
    assert!(chmod.success());
    let helper = env.path("helper");
    std::fs::copy(std::env::current_exe().unwrap(), &helper).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let out = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(&helper)
        .args([
            "--exact",
            HELPER,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FOREIGN_STORE", &env.store)
        .env("FOREIGN_PACKED", &packed)
        .env("FOREIGN_RAW", &raw)
        .env("FOREIGN_BIG_AT", big_at.to_string())
        .env("FOREIGN_SMALL_AT", small_at.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("foreign store: checked"),
        "the reader as uid {NOBODY} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// The half that runs as another user; does nothing when run directly.
#[test]
#[ignore = "run as another user by reads_of_a_store_owned_by_another_user_do_not_trust_mincore"]
fn foreign_store_reader() {
    let Some(store_dir) = std::env::var_os("FOREIGN_STORE") else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap();
    let (big_at, small_at): (u64, u64) = (
        var("FOREIGN_BIG_AT").parse().unwrap(),
        var("FOREIGN_SMALL_AT").parse().unwrap(),
    );
    let raw = std::fs::read(var("FOREIGN_RAW")).unwrap();
    // SAFETY: geteuid has no preconditions.
    assert_ne!(unsafe { libc::geteuid() }, 0, "the reader must not be root");

    // The premise: mincore calls an evicted file of another user's cached.
    let file = std::fs::File::open(var("FOREIGN_RAW")).unwrap();
    // SAFETY: a root-owned file no one writes while the test runs.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    // SAFETY: posix_fadvise takes integers only; `file` is open during the call.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let pages = map.len().div_ceil(4096);
    let mut vec = vec![0u8; pages];
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
    drop(map);

    let expect = |at: u64, len: usize| &raw[at as usize..at as usize + len];
    let far = big_at + (BIG as u64) * 3 / 4;

    // Loose objects. A blocking read of each first: the large object is mapped (its first
    // pages only touched, far from `far`), the small one's descriptor opened.
    let store = Store::open(Path::new(&store_dir)).unwrap();
    let dev = ImageDevice::open(&store, "img").unwrap();
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, big_at).unwrap();
    dev.read_at(&mut buf, small_at).unwrap();
    evict(Path::new(&store_dir));
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
    assert_eq!(buf, expect(far, 4096));

    // Packed small objects: not resident after eviction, resident again (through the pack's
    // descriptor) once read.
    let packed = std::env::var_os("FOREIGN_PACKED").unwrap();
    let store = Store::open(Path::new(&packed)).unwrap();
    let dev = ImageDevice::open(&store, "img").unwrap();
    dev.read_at(&mut buf, small_at).unwrap();
    evict(Path::new(&packed));
    assert!(
        dev.read_at_resident(&mut buf, small_at).is_none(),
        "an evicted packed object was taken as cached"
    );
    dev.read_at(&mut buf, small_at).unwrap();
    buf.fill(0);
    match dev.read_at_resident(&mut buf, small_at) {
        Some(Ok(())) => assert_eq!(buf, expect(small_at, 4096)),
        other => panic!("a cached packed object was not read inline: {other:?}"),
    }
    println!("foreign store: checked");
}
