//! The archive and manifest parsers under generated inputs on the stable toolchain, with the
//! driver of `crates/nbd/fuzz/checks/driver.rs`: replay `fuzz/corpus/NAME/`, then mutate
//! seeds for a few seconds. Parsers may refuse anything; they must not panic, and what
//! they accept must be a valid tree that survives a round trip.

mod common;
#[path = "../crates/nbd/fuzz/checks/driver.rs"]
mod driver;

use std::path::PathBuf;

use tessera::store::Store;
use tessera::tree::Manifest;

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name)
}

/// A small tar with a directory, a file, a symlink and a hardlink, made by the `tar` crate.
fn seed_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "etc/", std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(5);
    b.append_data(&mut h, "etc/hostname", &b"host\n"[..])
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "etc/link", "hostname").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "etc/hard", "etc/hostname").unwrap();
    b.into_inner().unwrap()
}

#[test]
fn tar_import() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let bar = indicatif::ProgressBar::hidden();
    let check = |input: &[u8]| {
        if let Ok(summary) = tessera::import::import_tar(&store, input, "fuzz.tar", &bar) {
            let bytes = store.read_tree_bytes(&summary.tree).unwrap();
            let manifest = Manifest::from_bytes(&bytes).expect("an imported tree parses");
            assert_eq!(manifest.to_bytes(), bytes, "and serializes back to itself");
        }
    };
    let n = driver::run("tar", &corpus("tar"), &[seed_tar()], 16 << 10, check);
    assert!(n > 0);
}

#[test]
fn manifest_decoder() {
    let env = common::Env::new();
    let src = env.path("src");
    common::fixture::build(&src, false);
    let tree = env.import(&src);
    let seed = env
        .open_store()
        .read_tree_bytes(&tree.parse().unwrap())
        .unwrap();
    let check = |input: &[u8]| {
        if let Ok(manifest) = Manifest::from_bytes(input) {
            let again = Manifest::from_bytes(&manifest.to_bytes()).expect("re-parses");
            assert_eq!(again.to_bytes(), manifest.to_bytes());
        }
    };
    let n = driver::run("manifest", &corpus("manifest"), &[seed], 64 << 10, check);
    assert!(n > 0);
}
