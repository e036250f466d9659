//! The archive and manifest parsers under generated inputs on the stable toolchain, with the
//! driver of `crates/nbd/fuzz/checks/driver.rs`: replay `fuzz/corpus/NAME/`, then mutate
//! seeds for a few seconds. Parsers may refuse anything; they must not panic, and what
//! they accept must be a valid tree that survives a round trip.

mod common;
#[path = "../crates/nbd/fuzz/checks/driver.rs"]
mod driver;

use std::path::PathBuf;

use tessera::import::Packing;
use tessera::store::Store;
use tessera::tree::Manifest;

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name)
}

/// A GNU header with every numeric field filled in, as real archivers write them.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// A small tar with a directory, a file, a symlink and a hardlink, made by the `tar` crate.
fn seed_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut h, "etc/", std::io::empty()).unwrap();
    let mut h = header(tar::EntryType::Regular, 0o644, 5);
    b.append_data(&mut h, "etc/hostname", &b"host\n"[..])
        .unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "etc/link", "hostname").unwrap();
    let mut h = header(tar::EntryType::Link, 0o644, 0);
    b.append_link(&mut h, "etc/hard", "etc/hostname").unwrap();
    b.into_inner().unwrap()
}

#[test]
fn tar_import() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let bar = indicatif::ProgressBar::hidden();
    // The seed must import: otherwise mutations only exercise the refusal paths.
    tessera::import::import_tar(
        &store,
        &seed_tar()[..],
        "seed.tar",
        Packing::default(),
        &bar,
    )
    .expect("the seed tar imports");
    let check = |input: &[u8]| {
        if let Ok(summary) =
            tessera::import::import_tar(&store, input, "fuzz.tar", Packing::default(), &bar)
        {
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

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A `.deb`: `debian-binary`, a gzip `control.tar.gz` with a control file and a
/// postinst, and the seed tar as `data.tar.gz`.
fn seed_deb() -> Vec<u8> {
    let mut control = tar::Builder::new(Vec::new());
    let text = b"Package: fuzz\nVersion: 1.0\nArchitecture: amd64\nDescription: seed\n";
    let mut h = header(tar::EntryType::Regular, 0o644, text.len() as u64);
    control.append_data(&mut h, "./control", &text[..]).unwrap();
    let script = b"#!/bin/sh\nexit 0\n";
    let mut h = header(tar::EntryType::Regular, 0o755, script.len() as u64);
    control
        .append_data(&mut h, "./postinst", &script[..])
        .unwrap();
    let control = gzip(&control.into_inner().unwrap());
    let data = gzip(&seed_tar());
    let mut deb = ar::Builder::new(Vec::new());
    for (name, bytes) in [
        ("debian-binary", &b"2.0\n"[..]),
        ("control.tar.gz", &control[..]),
        ("data.tar.gz", &data[..]),
    ] {
        let header = ar::Header::new(name.as_bytes().to_vec(), bytes.len() as u64);
        deb.append(&header, bytes).unwrap();
    }
    deb.into_inner().unwrap()
}

/// Every tree an importer made parses and serializes back to its own bytes.
fn assert_round_trip(store: &Store, tree: &tessera::store::ObjectId) {
    let bytes = store.read_tree_bytes(tree).unwrap();
    let manifest = Manifest::from_bytes(&bytes).expect("an imported tree parses");
    assert_eq!(manifest.to_bytes(), bytes, "and serializes back to itself");
}

#[test]
fn deb_import() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let file = dir.path().join("fuzz.deb");
    let bar = indicatif::ProgressBar::hidden();
    std::fs::write(&file, seed_deb()).unwrap();
    let seeded = tessera::import::import_debs(
        &store,
        std::slice::from_ref(&file),
        Packing::default(),
        &bar,
    )
    .expect("the seed package imports");
    assert_round_trip(&store, &seeded.packages[0].summary.tree);
    let check = |input: &[u8]| {
        std::fs::write(&file, input).unwrap();
        if let Ok(imported) = tessera::import::import_debs(
            &store,
            std::slice::from_ref(&file),
            Packing::default(),
            &bar,
        ) {
            for p in &imported.packages {
                assert_round_trip(&store, &p.summary.tree);
            }
        }
    };
    let n = driver::run("deb", &corpus("deb"), &[seed_deb()], 16 << 10, check);
    assert!(n > 0);
}

/// An OCI layout around `manifest` (the fuzzed bytes): the seed tar as a gzip layer, a
/// config naming its diff_id, and an index.json pointing at the manifest by its real
/// digest, so the input reaches the manifest parser instead of failing a digest check.
fn write_layout(dir: &std::path::Path, manifest: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    put(&gzip(&seed_tar()));
    put(&seed_config());
    let (digest, size) = put(manifest);
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{size},"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#
    );
    std::fs::write(dir.join("index.json"), index).unwrap();
}

fn seed_config() -> Vec<u8> {
    let diff_id = sha256_hex(&seed_tar());
    format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{diff_id}"]}}}}"#
    )
    .into_bytes()
}

fn seed_manifest() -> Vec<u8> {
    let layer = gzip(&seed_tar());
    let config = seed_config();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{}","size":{}}}]}}"#,
        sha256_hex(&config),
        config.len(),
        sha256_hex(&layer),
        layer.len()
    )
    .into_bytes()
}

#[test]
fn oci_import() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let bar = indicatif::ProgressBar::hidden();
    // The seed must import: otherwise mutations only exercise the refusal paths.
    let layout = dir.path().join("seed");
    write_layout(&layout, &seed_manifest());
    let seeded =
        tessera::import::import_oci(&store, layout.to_str().unwrap(), Packing::default(), &bar)
            .expect("the seed layout imports");
    assert_round_trip(&store, &seeded.summary.tree);
    let n = std::cell::Cell::new(0u64);
    let check = |input: &[u8]| {
        n.set(n.get() + 1);
        let layout = dir.path().join(format!("l{}", n.get()));
        write_layout(&layout, input);
        if let Ok(imported) =
            tessera::import::import_oci(&store, layout.to_str().unwrap(), Packing::default(), &bar)
        {
            assert_round_trip(&store, &imported.summary.tree);
        }
        let _ = std::fs::remove_dir_all(&layout);
    };
    let runs = driver::run("oci", &corpus("oci"), &[seed_manifest()], 8 << 10, check);
    assert!(runs > 0);
}
