//! Named images: create/list/show/rm, merge order, reproducibility, composing without
//! reading file contents. Images are read back with `ext4-view`, which needs no root.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::Env;

fn tree(env: &Env, name: &str, files: &[(&str, &str)]) -> String {
    let dir = env.path(name);
    for (path, content) in files {
        let p = dir.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        if let Some(target) = content.strip_prefix("->") {
            std::os::unix::fs::symlink(target, &p).unwrap();
        } else if path.ends_with('/') {
            fs::create_dir_all(&p).unwrap();
        } else {
            fs::write(&p, content).unwrap();
        }
    }
    env.import(&dir)
}

fn export(env: &Env, image: &str) -> PathBuf {
    let out = env.path(&format!("{image}.img"));
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        image.as_ref(),
        out.as_os_str(),
    ]);
    out
}

fn read(img: &Path, path: &str) -> Option<String> {
    let fs = common::ext4view::load_file(img);
    fs.read_to_string(path).ok()
}

#[test]
fn later_trees_win() {
    let env = Env::new();
    let a = tree(
        &env,
        "a",
        &[
            ("f", "from a"),
            ("d/x", "a's x"),
            ("g/sub/deep", "gone"),
            ("only-a", "a"),
        ],
    );
    let b = tree(
        &env,
        "b",
        &[
            ("f", "from b"),
            ("d/y", "b's y"),
            ("g", "now a file"),
            ("only-b", "b"),
        ],
    );
    env.ok(&["image", "create", "ab", "--tree", &a, "--tree", &b]);
    env.ok(&["image", "create", "ba", "--tree", &b, "--tree", &a]);
    let ab = export(&env, "ab");
    assert_eq!(read(&ab, "/f").as_deref(), Some("from b"));
    assert_eq!(
        read(&ab, "/d/x").as_deref(),
        Some("a's x"),
        "directories merge"
    );
    assert_eq!(read(&ab, "/d/y").as_deref(), Some("b's y"));
    assert_eq!(
        read(&ab, "/g").as_deref(),
        Some("now a file"),
        "a later file replaces a directory"
    );
    assert_eq!(read(&ab, "/g/sub/deep"), None, "and its whole subtree");
    assert_eq!(read(&ab, "/only-a").as_deref(), Some("a"));
    assert_eq!(read(&ab, "/only-b").as_deref(), Some("b"));

    let ba = export(&env, "ba");
    assert_eq!(read(&ba, "/f").as_deref(), Some("from a"));
    assert_eq!(
        read(&ba, "/g/sub/deep").as_deref(),
        Some("gone"),
        "a later directory replaces a file"
    );
}

#[test]
fn a_later_symlink_replaces_a_directory() {
    let env = Env::new();
    let a = tree(&env, "a", &[("lib/x", "x")]);
    let b = tree(&env, "b", &[("lib", "->usr/lib")]);
    env.ok(&["image", "create", "img", "--tree", &a, "--tree", &b]);
    let img = export(&env, "img");
    let fs = common::ext4view::load_file(&img);
    assert_eq!(fs.read_link("/lib").unwrap().as_ref(), b"usr/lib");
}

/// Composing reads manifests only: with every object gone, creating and showing an image
/// still work; only reading its data fails, naming the missing object.
#[test]
fn composing_reads_no_file_contents() {
    let env = Env::new();
    let t = tree(
        &env,
        "src",
        &[("big", &"data".repeat(10_000)), ("dir/small", "s")],
    );
    // Loose and packed, every object's bytes are gone.
    fs::remove_dir_all(env.store.join("objects")).unwrap();
    fs::remove_dir_all(env.store.join("packs")).unwrap();
    fs::remove_dir_all(env.path("src")).unwrap();
    env.ok(&["image", "create", "img", "--tree", &t]);
    let show = env.ok(&["image", "show", "img"]);
    assert!(show.contains("objects:  2"), "{show}");
    let out = env.path("img.img");
    let err = env.fails(&[
        "image".as_ref(),
        "export".as_ref(),
        "img".as_ref(),
        out.as_os_str(),
    ]);
    assert!(
        err.contains("objects/"),
        "the error names the missing object: {err}"
    );
}

#[test]
fn list_show_and_rm() {
    let env = Env::new();
    let t = tree(&env, "src", &[("f", "x")]);
    env.ok(&[
        "image", "create", "first", "--tree", &t, "--size", "96M", "--label", "LBL",
    ]);
    env.ok(&["image", "create", "second", "--tree", &t]);
    let list = env.ok(&["image", "list"]);
    assert!(
        list.starts_with("first\t1 tree(s)\tsize 96.0 MiB\nsecond\t1 tree(s)\tsize auto"),
        "{list}"
    );
    let show = env.ok(&["image", "show", "first"]);
    assert!(
        show.contains("label:    LBL") && show.contains(&t) && show.contains("(100663296 bytes)"),
        "{show}"
    );

    let err = env.fails(&["image", "create", "first", "--tree", &t]);
    assert!(err.contains("already exists"), "{err}");
    let err = env.fails(&["image", "create", "../evil", "--tree", &t]);
    assert!(err.contains("invalid image name"), "{err}");
    let missing = "0".repeat(64);
    let err = env.fails(&["image", "create", "third", "--tree", &missing]);
    assert!(err.contains(&format!("tree {missing} is missing")), "{err}");
    let err = env.fails(&["image", "create", "third", "--tree", "abc"]);
    assert!(err.contains("invalid tree id"), "{err}");
    let err = env.fails(&["image", "create", "third", "--tree", "ffff0"]);
    assert!(err.contains("no tree id starts with \"ffff0\""), "{err}");
    env.ok(&["image", "create", "by-prefix", "--tree", &t[..8]]);
    assert!(env.ok(&["image", "show", "by-prefix"]).contains(&t));

    env.ok(&["image", "rm", "first"]);
    env.ok(&["image", "rm", "by-prefix"]);
    assert_eq!(env.ok(&["image", "list"]).lines().count(), 1);
    let err = env.fails(&["image", "rm", "first"]);
    assert!(err.contains("no image named \"first\""), "{err}");
}

#[test]
fn export_is_sparse_sized_and_reproducible() {
    let env = Env::new();
    let t = tree(&env, "src", &[("f", "hello")]);
    env.ok(&["image", "create", "img", "--tree", &t, "--size", "512M"]);
    let one = export(&env, "img");
    let meta = fs::metadata(&one).unwrap();
    assert_eq!(meta.len(), 512 << 20);
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "zeros are holes, not written: {} blocks",
        meta.blocks()
    );
    let two = env.path("again.img");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "img".as_ref(),
        two.as_os_str(),
    ]);
    assert!(
        fs::read(&one).unwrap() == fs::read(&two).unwrap(),
        "the same image is the same bytes"
    );

    env.ok(&["image", "create", "other", "--tree", &t, "--size", "512M"]);
    let other = export(&env, "other");
    let uuid = |p: &Path| *common::ext4view::load_file(p).uuid().as_bytes();
    assert_ne!(uuid(&one), uuid(&other), "the uuid derives from the name");
}

#[test]
fn import_with_name_creates_the_image() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), "named").unwrap();
    env.ok(&[
        "import".as_ref(),
        "dir".as_ref(),
        src.as_os_str(),
        "--name".as_ref(),
        "named".as_ref(),
    ]);
    let img = export(&env, "named");
    assert_eq!(read(&img, "/f").as_deref(), Some("named"));
}

#[test]
fn too_small_a_size_is_a_clear_error() {
    let env = Env::new();
    let t = tree(&env, "src", &[("f", &"x".repeat(3 << 20))]);
    let err = env.fails(&["image", "create", "img", "--tree", &t, "--size", "1M"]);
    assert!(
        err.contains("cannot create image \"img\"") && err.contains("too small"),
        "{err}"
    );
    assert!(!env.store.join("images/img.json").exists());
}
