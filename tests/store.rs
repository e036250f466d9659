//! The content store through the CLI: dedup, atomicity, verify, gc, stats. Imports here use
//! `--no-pack`, so that every object is a loose file these tests can look at; packs have
//! their own tests (`tests/pack.rs`).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::Env;

fn small_tree(env: &Env, name: &str, contents: &[(&str, &[u8])]) -> std::path::PathBuf {
    let dir = env.path(name);
    fs::create_dir_all(&dir).unwrap();
    for (file, data) in contents {
        fs::write(dir.join(file), data).unwrap();
    }
    dir
}

#[test]
fn reimporting_stores_nothing_new_and_gives_the_same_tree() {
    let env = Env::new();
    let src = env.path("src");
    common::fixture::build(&src, false);
    let first = env.import_loose(&src);
    let objects = env.files("objects");
    let mtimes: Vec<_> = objects
        .iter()
        .map(|p| fs::metadata(p).unwrap().modified().unwrap())
        .collect();
    let second = env.import_loose(&src);
    assert_eq!(first, second, "an unchanged tree must get the same id");
    assert_eq!(env.files("objects"), objects);
    let again: Vec<_> = objects
        .iter()
        .map(|p| fs::metadata(p).unwrap().modified().unwrap())
        .collect();
    assert_eq!(mtimes, again, "existing objects must not be rewritten");
    assert_eq!(env.files("trees").len(), 1);
}

#[test]
fn identical_content_is_stored_once() {
    let env = Env::new();
    let src = small_tree(
        &env,
        "src",
        &[("a", b"same bytes"), ("b", b"same bytes"), ("c", b"other")],
    );
    env.import_loose(&src);
    // "same bytes", "other" (no empty object: no empty file).
    assert_eq!(env.files("objects").len(), 2);
}

#[test]
fn objects_are_named_by_blake3_read_only_and_leave_no_temporaries() {
    let env = Env::new();
    let src = small_tree(&env, "src", &[("a", b"content")]);
    env.import_loose(&src);
    let objects = env.files("objects");
    assert_eq!(objects.len(), 1);
    let hex = blake3::hash(b"content").to_hex().to_string();
    assert!(
        objects[0].ends_with(format!("objects/{}/{}", &hex[..2], &hex[2..])),
        "{objects:?}"
    );
    assert_eq!(
        fs::metadata(&objects[0]).unwrap().permissions().mode() & 0o777,
        0o444
    );
    assert!(env.files("tmp").is_empty());
}

#[test]
fn verify_passes_on_a_healthy_store() {
    let env = Env::new();
    let src = env.path("src");
    common::fixture::build(&src, false);
    let tree = env.import_loose(&src);
    env.ok(&["image", "create", "img", "--tree", &tree]);
    env.ok(&["store", "verify"]);
}

#[test]
fn verify_detects_a_corrupted_object() {
    let env = Env::new();
    let src = small_tree(
        &env,
        "src",
        &[("a", b"precious data"), ("b", b"other data")],
    );
    env.import_loose(&src);
    let hex = blake3::hash(b"precious data").to_hex().to_string();
    let victim = env.store.join("objects").join(&hex[..2]).join(&hex[2..]);
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&victim, b"precious dat4").unwrap();
    let out = env.fails(&["store", "verify"]);
    assert!(out.contains(&format!("object {hex} is corrupt")), "{out}");
    assert!(
        out.contains("1 problems"),
        "only the damaged object is reported: {out}"
    );
}

#[test]
fn verify_detects_a_missing_object_and_a_missing_tree() {
    let env = Env::new();
    let src = small_tree(&env, "src", &[("a", b"will vanish")]);
    let tree = env.import_loose(&src);
    env.ok(&["image", "create", "img", "--tree", &tree]);
    let hex = blake3::hash(b"will vanish").to_hex().to_string();
    fs::remove_file(env.store.join("objects").join(&hex[..2]).join(&hex[2..])).unwrap();
    let out = env.fails(&["store", "verify"]);
    assert!(
        out.contains(&format!("names missing object {hex}")),
        "{out}"
    );

    fs::remove_file(env.store.join("trees").join(&tree[..2]).join(&tree[2..])).unwrap();
    let out = env.fails(&["store", "verify"]);
    assert!(
        out.contains(&format!("image \"img\" names missing tree {tree}")),
        "{out}"
    );
}

#[test]
fn gc_removes_only_unreferenced_objects_and_trees() {
    let env = Env::new();
    let kept = small_tree(
        &env,
        "kept",
        &[("shared", b"shared"), ("mine", b"kept only")],
    );
    let dropped = small_tree(
        &env,
        "dropped",
        &[("shared", b"shared"), ("mine", b"dropped only")],
    );
    let kept_tree = env.import_loose(&kept);
    env.ok(&["image", "create", "keep", "--tree", &kept_tree]);
    let dropped_tree = env.import_loose(&dropped);
    assert_eq!(env.files("objects").len(), 3);
    fs::write(env.store.join("tmp/12345-0"), b"left by a crash").unwrap();

    let dry = env.ok(&["store", "gc", "--dry-run"]);
    assert!(dry.contains("would remove 1 objects"), "{dry}");
    assert_eq!(env.files("objects").len(), 3);

    let out = env.ok(&["store", "gc"]);
    assert!(
        out.contains("removed 1 objects") && out.contains("1 trees") && out.contains("1 temporary"),
        "{out}"
    );
    let hex = |d: &[u8]| blake3::hash(d).to_hex().to_string();
    let names: Vec<String> = env
        .files("objects")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&hex(b"shared")[2..].to_owned()));
    assert!(names.contains(&hex(b"kept only")[2..].to_owned()));
    assert!(!names.contains(&hex(b"dropped only")[2..].to_owned()));
    assert!(env.files("tmp").is_empty());
    assert!(!env
        .store
        .join("trees")
        .join(&dropped_tree[..2])
        .join(&dropped_tree[2..])
        .exists());
    env.ok(&["store", "verify"]);

    // Removing the last image makes everything garbage.
    env.ok(&["image", "rm", "keep"]);
    env.ok(&["store", "gc"]);
    assert!(env.files("objects").is_empty() && env.files("trees").is_empty());
}

#[test]
fn stats_reports_the_dedup_ratio() {
    let env = Env::new();
    let a = small_tree(&env, "a", &[("x", &[7u8; 10_000]), ("y", &[7u8; 10_000])]);
    let tree = env.import_loose(&a);
    env.ok(&["image", "create", "one", "--tree", &tree]);
    env.ok(&["image", "create", "two", "--tree", &tree]);
    let out = env.ok(&["store", "stats"]);
    // 4 files of 10 000 bytes over two images, one object of 10 000 bytes.
    assert!(out.contains("objects:      1 ("), "{out}");
    assert!(out.contains("images:       2"), "{out}");
    assert!(out.contains("dedup ratio:  4.00"), "{out}");
}

#[test]
fn store_location_comes_from_the_environment() {
    let env = Env::new();
    let xdg = env.path("xdg");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["store", "stats"])
        .env_remove("TESSERA_STORE")
        .env("XDG_DATA_HOME", &xdg)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(xdg.join("tessera/objects").is_dir());

    let explicit = env.path("explicit");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["store", "stats"])
        .env("TESSERA_STORE", &explicit)
        .env("XDG_DATA_HOME", &xdg)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(explicit.join("objects").is_dir());
}

#[test]
fn verify_detects_a_corrupted_tree() {
    let env = Env::new();
    let src = small_tree(&env, "src", &[("a", b"x")]);
    let tree = env.import_loose(&src);
    let path = env.store.join("trees").join(&tree[..2]).join(&tree[2..]);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("\"mode\":", "\"mode\" :");
    fs::write(&path, text).unwrap();
    let out = env.fails(&["store", "verify"]);
    assert!(out.contains(&format!("tree {tree} is corrupt")), "{out}");
}

/// gc must not delete on partial knowledge: an unreadable image could reference anything.
#[test]
fn gc_refuses_to_run_when_an_image_is_unreadable() {
    let env = Env::new();
    let src = small_tree(&env, "src", &[("a", b"x")]);
    let tree = env.import_loose(&src);
    env.ok(&["image", "create", "good", "--tree", &tree]);
    fs::write(env.store.join("images/broken.json"), b"{not json").unwrap();
    let out = env.fails(&["store", "gc"]);
    assert!(out.contains("broken.json"), "{out}");
    assert_eq!(env.files("objects").len(), 1);
    assert_eq!(env.files("trees").len(), 1);
}

/// An import holds the store lock shared from its first object to its tree (and image), so
/// a gc started meanwhile waits instead of collecting the new, not yet referenced objects.
#[test]
fn gc_waits_for_a_writer_holding_the_store_lock() {
    let env = Env::new();
    let src = small_tree(&env, "src", &[("a", b"unreferenced")]);
    env.import_loose(&src);
    let writer = env.open_store().lock(false).unwrap();
    let mut gc = env
        .command()
        .args(["store", "gc"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        gc.try_wait().unwrap().is_none(),
        "gc ran while a writer held the lock"
    );
    assert_eq!(env.files("objects").len(), 1);
    drop(writer);
    assert!(gc.wait().unwrap().success());
    assert!(env.files("objects").is_empty());
}

/// Imports running at once may stage the same new objects; both must succeed and leave a
/// consistent store (the second rename of identical content is harmless).
#[test]
fn concurrent_imports_of_overlapping_trees() {
    let env = Env::new();
    let files: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| (format!("f{i}"), common::fixture::pseudo_random(1000 + i)))
        .collect();
    let as_refs = |skip: usize| -> Vec<(&str, &[u8])> {
        files
            .iter()
            .skip(skip)
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect()
    };
    let a = small_tree(&env, "a", &as_refs(0));
    let b = small_tree(&env, "b", &as_refs(50));
    let spawn = |dir: &std::path::Path| {
        env.command()
            .args(["import", "dir", "--no-pack"])
            .arg(dir)
            .output()
    };
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| spawn(&a));
        let tb = s.spawn(|| spawn(&b));
        (ta.join().unwrap().unwrap(), tb.join().unwrap().unwrap())
    });
    assert!(
        ra.status.success() && rb.status.success(),
        "{}{}",
        String::from_utf8_lossy(&ra.stderr),
        String::from_utf8_lossy(&rb.stderr)
    );
    assert_eq!(env.files("objects").len(), 200);
    assert!(env.files("tmp").is_empty());
    env.ok(&["store", "verify"]);
}

/// A crash mid-import leaves at most temporary files: no object under its name is partial
/// (verify re-hashes them all), no tree is written, and gc removes the leftovers.
#[test]
fn a_killed_import_leaves_no_partial_object() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    for i in 0..40u8 {
        fs::write(src.join(format!("f{i}")), vec![i; 4 << 20]).unwrap();
    }
    let mut import = env
        .command()
        .args(["import", "dir", "--no-pack"])
        .arg(&src)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it as soon as it is writing objects.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while env.files("tmp").is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    import.kill().unwrap();
    let status = import.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the import finished before it could be killed"
    );

    assert!(
        env.files("trees").is_empty(),
        "no tree without all its objects"
    );
    env.ok(&["store", "verify"]);
    env.ok(&["store", "gc"]);
    assert!(env.files("tmp").is_empty());
    // And the import can simply be run again.
    let tree = env.import_loose(&src);
    env.ok(&["image", "create", "img", "--tree", &tree]);
    env.ok(&["store", "verify"]);
}
