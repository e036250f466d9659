//! `tessera import oci`: layouts with several layers, whiteouts and opaque directories,
//! built here (tar crate, gzip/zstd, sha256), imported, and compared with the expected
//! merged tree — and through the kernel with umoci's unpacking of the same layout.

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use common::{snapshot, Env, LoopMount};
use serde_json::json;
use sha2::{Digest, Sha256};
use tessera::image;
use tessera::tree::{Kind, Manifest};

#[derive(Clone, Copy)]
enum Comp {
    None,
    Gzip,
    Zstd,
}

/// An OCI layout being written: blobs, and the manifests index.json will list.
struct Layout {
    dir: PathBuf,
    manifests: Vec<serde_json::Value>,
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl Layout {
    fn new(dir: PathBuf) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir,
            manifests: Vec::new(),
        }
    }

    fn blob(&self, bytes: &[u8]) -> (String, usize) {
        let d = sha(bytes);
        std::fs::write(self.blob_path(&d), bytes).unwrap();
        (d, bytes.len())
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap())
    }

    /// Add an image tagged `tag` of `layers` (uncompressed tars); returns the layer digests.
    fn image(&mut self, tag: &str, layers: &[(Vec<u8>, Comp)]) -> Vec<String> {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, comp) in layers {
            diff_ids.push(sha(tar));
            let (bytes, mt) = match comp {
                Comp::None => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
                Comp::Gzip => {
                    let mut e =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    e.write_all(tar).unwrap();
                    (
                        e.finish().unwrap(),
                        "application/vnd.oci.image.layer.v1.tar+gzip",
                    )
                }
                Comp::Zstd => (
                    zstd::encode_all(&tar[..], 3).unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                ),
            };
            let (d, size) = self.blob(&bytes);
            descs.push(json!({"mediaType": mt, "digest": d, "size": size}));
        }
        let config = json!({
            "architecture": "amd64", "os": "linux",
            "config": {"User": "1000:1000", "Env": ["PATH=/usr/bin", "LANG=C.UTF-8"],
                       "Entrypoint": ["/usr/bin/tool"], "Cmd": ["--help"], "WorkingDir": "/etc"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let (cd, cs) = self.blob(&serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": descs,
        });
        let (md, ms) = self.blob(&serde_json::to_vec(&manifest).unwrap());
        self.manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": self.manifests});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        descs
            .iter()
            .map(|d| d["digest"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// A tar built entry by entry.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }
    fn dir(mut self, path: &str, mode: u32) -> Tar {
        let mut h = Tar::header(tar::EntryType::Directory, mode, 0);
        self.0.append_data(&mut h, path, &b""[..]).unwrap();
        self
    }
    fn file(mut self, path: &str, data: &str) -> Tar {
        let mut h = Tar::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        self.0.append_data(&mut h, path, data.as_bytes()).unwrap();
        self
    }
    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Tar {
        let mut h = Tar::header(kind, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    fn done(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn base_layer() -> Vec<u8> {
    Tar::new()
        .dir("etc", 0o755)
        .file("etc/keep", "keep")
        .file("etc/gone", "gone")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/tool", "v1")
        .dir("usr/lib", 0o755)
        .file("usr/lib/libx.so", "lib")
        .link(tar::EntryType::Symlink, "lib", "usr/lib")
        .dir("opq", 0o755)
        .file("opq/a", "a")
        .dir("opq/sub", 0o755)
        .file("opq/sub/b", "b")
        .dir("dir-deleted", 0o755)
        .file("dir-deleted/x", "x")
        .file("hl1", "shared")
        .link(tar::EntryType::Link, "hl2", "hl1")
        .dir("var", 0o700)
        .dir("var/cache", 0o755)
        .file("var/cache/old", "old")
        .done()
}

fn layers() -> Vec<(Vec<u8>, Comp)> {
    layers_with(Comp::Zstd)
}

/// The three layers; the second compressed with `second` (umoci 0.4 reads no zstd).
fn layers_with(second: Comp) -> Vec<(Vec<u8>, Comp)> {
    let l2 = Tar::new()
        .dir("etc", 0o750)
        .file("etc/.wh.gone", "")
        .dir("opq", 0o755)
        .file("opq/.wh..wh..opq", "")
        .file("opq/new", "new")
        .file("usr/bin/tool", "v2")
        .file(".wh.dir-deleted", "")
        .file(".wh.hl2", "")
        // No var/ or var/cache/ headers: they keep the lower layer's metadata.
        .file("var/cache/new", "new")
        .done();
    let l3 = Tar::new()
        .dir("dir-deleted", 0o711)
        .file("dir-deleted/y", "y")
        .file(".wh.never-existed", "")
        .done();
    vec![(base_layer(), Comp::Gzip), (l2, second), (l3, Comp::None)]
}

const EXPECTED: &[&str] = &[
    "",
    "dir-deleted",
    "dir-deleted/y",
    "etc",
    "etc/keep",
    "hl1",
    "lib",
    "opq",
    "opq/new",
    "usr",
    "usr/bin",
    "usr/bin/tool",
    "usr/lib",
    "usr/lib/libx.so",
    "var",
    "var/cache",
    "var/cache/new",
    "var/cache/old",
];

fn import(env: &Env, reference: &str, name: Option<&str>) -> String {
    let mut args = vec!["import", "oci", reference];
    if let Some(n) = name {
        args.extend(["--name", n]);
    }
    env.ok(&args).trim().to_owned()
}

fn paths(m: &Manifest) -> Vec<String> {
    m.entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.path.0).into_owned())
        .collect()
}

fn mode(m: &Manifest, path: &str) -> u16 {
    m.entries
        .iter()
        .find(|e| e.path.0 == path.as_bytes())
        .unwrap()
        .mode
}

#[test]
fn layers_whiteouts_and_opaque_dirs_merge_as_oci_says() {
    let env = Env::new();
    let mut layout = Layout::new(env.path("layout"));
    layout.image("v1", &layers());
    let reference = format!("{}:v1", layout.dir.display());
    let top = import(&env, &reference, Some("app"));
    let m = env.manifest(&top);
    assert_eq!(paths(&m), EXPECTED);
    assert_eq!(mode(&m, "etc"), 0o750);
    assert_eq!(
        mode(&m, "var"),
        0o700,
        "implicit dirs keep the lower metadata"
    );
    assert_eq!(mode(&m, "dir-deleted"), 0o711);
    let tool = m
        .entries
        .iter()
        .find(|e| e.path.0 == b"usr/bin/tool")
        .unwrap();
    assert_eq!(tool.object, Some(tessera::store::ObjectId::of(b"v2")));
    assert!(
        m.entries.iter().all(|e| e.link.is_none()),
        "hl2 was deleted"
    );
    assert_eq!(
        m.entries.iter().find(|e| e.path.0 == b"lib").unwrap().kind,
        Kind::Symlink
    );

    // The run configuration is in the image record.
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.store.join("images/app.json")).unwrap()).unwrap();
    assert_eq!(
        record["runtime"],
        json!({"user": "1000:1000", "env": ["PATH=/usr/bin", "LANG=C.UTF-8"],
               "entrypoint": ["/usr/bin/tool"], "cmd": ["--help"], "working_dir": "/etc"})
    );
    let shown = env.ok(&["image", "show", "app"]);
    assert!(
        shown.contains(r#""entrypoint":["/usr/bin/tool"]"#),
        "{shown}"
    );

    // Every object went into one pack: the top image's in the order it reads them, then
    // those only lower layers name.
    assert!(
        env.files("objects").is_empty(),
        "objects were written loose"
    );
    let store = tessera::store::Store::open(&env.store).unwrap();
    let built = image::build(&store, &image::load(&store, "app").unwrap()).unwrap();
    let offset = |id| store.packs().find(&id).expect("packed").offset;
    let top_offsets: Vec<u64> = image::read_order(&built.layout, &built.objects)
        .into_iter()
        .map(offset)
        .collect();
    assert!(top_offsets.is_sorted(), "{top_offsets:?}");
    let lower_only =
        ["gone", "v1", "x"].map(|d| offset(tessera::store::ObjectId::of(d.as_bytes())));
    assert!(
        lower_only.iter().all(|o| o > top_offsets.last().unwrap()),
        "{lower_only:?} after {top_offsets:?}"
    );

    // Idempotent: the same trees, nothing new stored.
    let files = env.files("");
    assert_eq!(import(&env, &reference, None), top);
    assert_eq!(env.files(""), files);
}

/// Images sharing base layers share those layers' trees; the chain tree of the base alone
/// is the base layer's content.
#[test]
fn images_sharing_a_base_layer_share_its_tree() {
    let env = Env::new();
    let mut layout = Layout::new(env.path("layout"));
    layout.image("full", &layers());
    layout.image("base", &[(base_layer(), Comp::Gzip)]);
    let out = env
        .command()
        .args(["import", "oci"])
        .arg(format!("{}:full", layout.dir.display()))
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let base_tree = import(&env, &format!("{}:base", layout.dir.display()), None);
    assert!(
        stderr.contains(&format!("-> tree {base_tree}")),
        "the first layer of `full` should be tree {base_tree}: {stderr}"
    );
    // Several tags and no tag given: a clear error listing them.
    let err = env.fails(&["import", "oci", layout.dir.to_str().unwrap()]);
    assert!(err.contains("full") && err.contains("base"), "{err}");
}

fn assert_refused(env: &Env, reference: &str, needles: &[&str]) {
    let err = env.fails(&["import", "oci", reference]);
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    assert!(env.files("trees").is_empty(), "a tree was stored");
    assert!(env.files("objects").is_empty(), "an object was stored");
}

#[test]
fn a_corrupted_blob_is_refused_and_nothing_is_stored() {
    let env = Env::new();
    let mut layout = Layout::new(env.path("layout"));
    let digests = layout.image("v1", &layers());
    let path = layout.blob_path(&digests[2]);
    let mut bytes = std::fs::read(&path).unwrap();
    // The uncompressed third layer: dir header, file header, then dir-deleted/y's data.
    assert_eq!(bytes[1024], b'y');
    bytes[1024] = b'z';
    std::fs::write(&path, bytes).unwrap();
    assert_refused(
        &env,
        &format!("{}:v1", layout.dir.display()),
        &[&digests[2], "digest mismatch"],
    );
}

/// A corrupted gzip layer breaks decompression; the digest check still names the cause.
#[test]
fn a_corrupted_compressed_layer_is_reported_as_a_digest_mismatch() {
    let env = Env::new();
    let mut layout = Layout::new(env.path("layout"));
    let digests = layout.image("v1", &layers());
    let path = layout.blob_path(&digests[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    assert_refused(
        &env,
        &format!("{}:v1", layout.dir.display()),
        &[&digests[0], "digest mismatch"],
    );
}

#[test]
fn a_wrong_diff_id_is_refused() {
    let env = Env::new();
    let mut layout = Layout::new(env.path("layout"));
    // Build with one layer's tar, then point the config at another's: rewrite by hand.
    let tar = base_layer();
    layout.image("v1", &[(tar.clone(), Comp::Gzip)]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.dir.join("index.json")).unwrap()).unwrap();
    let md = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.blob_path(&md)).unwrap()).unwrap();
    let cd = manifest["config"]["digest"].as_str().unwrap().to_owned();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.blob_path(&cd)).unwrap()).unwrap();
    config["rootfs"]["diff_ids"][0] = json!(sha(b"something else"));
    let (cd, cs) = layout.blob(&serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = json!(cd);
    manifest["config"]["size"] = json!(cs);
    let (md, ms) = layout.blob(&serde_json::to_vec(&manifest).unwrap());
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms}]});
    std::fs::write(
        layout.dir.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    assert_refused(
        &env,
        layout.dir.to_str().unwrap(),
        &["diff_id", "digest mismatch"],
    );
}

#[test]
fn an_entry_through_a_lower_layers_symlink_is_refused() {
    let env = Env::new();
    let mut layout = Layout::new(env.path("layout"));
    let evil = Tar::new().file("lib/evil.so", "evil").done();
    layout.image("v1", &[(base_layer(), Comp::Gzip), (evil, Comp::Gzip)]);
    assert_refused(
        &env,
        &format!("{}:v1", layout.dir.display()),
        &["lib/evil.so", "\"lib\" is a symlink in a lower layer"],
    );
}

/// Whiteouts in the first layer have nothing to delete: they are ignored.
#[test]
fn whiteouts_in_the_first_layer_are_ignored() {
    let env = Env::new();
    let mut layout = Layout::new(env.path("layout"));
    let l1 = Tar::new()
        .file(".wh.nothing", "")
        .dir("d", 0o755)
        .file("d/.wh..wh..opq", "")
        .file("d/f", "f")
        .done();
    layout.image("v1", &[(l1, Comp::None)]);
    let m = env.manifest(&import(&env, layout.dir.to_str().unwrap(), None));
    assert_eq!(paths(&m), ["", "d", "d/f"]);
}

/// The kernel sees the same tree as umoci's own unpacking of the layout (the oracle), and
/// skopeo accepts the layout the test wrote.
#[test]
fn the_mounted_image_matches_umoci() {
    if !common::can_run(
        "the_mounted_image_matches_umoci",
        true,
        &["umoci", "skopeo", "mount", "e2fsck"],
    ) {
        return;
    }
    let env = Env::new();
    let mut layout = Layout::new(env.path("layout"));
    layout.image("v1", &layers_with(Comp::Gzip));
    let reference = format!("{}:v1", layout.dir.display());
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("skopeo").args(["inspect", &format!("oci:{reference}")]));
    let oracle = env.path("umoci");
    run(Command::new("umoci")
        .args(["raw", "unpack", "--image", &reference])
        .arg(&oracle));

    import(&env, &reference, Some("app"));
    let img = env.path("app.img");
    env.ok(&[
        OsStr::new("image"),
        OsStr::new("export"),
        OsStr::new("app"),
        img.as_os_str(),
    ]);
    common::e2fsck_clean(&img);
    let mount = LoopMount::new(&img, &env.path("mnt"), "ro,noatime");
    snapshot::assert_same(
        &snapshot::as_extracted(&oracle),
        &snapshot::as_extracted(&mount.dir),
    );
    let expected: Vec<Vec<u8>> = EXPECTED.iter().map(|p| p.as_bytes().to_vec()).collect();
    assert_eq!(
        snapshot::as_extracted(&mount.dir)
            .into_keys()
            .collect::<Vec<_>>(),
        expected
    );
}

/// Hardlink groups do not span trees: a link to a lower layer's file is a copy of it.
#[test]
fn a_hardlink_to_a_lower_layer_becomes_a_copy() {
    let env = Env::new();
    let mut layout = Layout::new(env.path("layout"));
    let l2 = Tar::new()
        .link(tar::EntryType::Link, "etc/keep-link", "etc/keep")
        .done();
    layout.image("v1", &[(base_layer(), Comp::Gzip), (l2, Comp::Gzip)]);
    let m = env.manifest(&import(&env, layout.dir.to_str().unwrap(), None));
    let e = m
        .entries
        .iter()
        .find(|e| e.path.0 == b"etc/keep-link")
        .unwrap();
    assert_eq!(e.object, Some(tessera::store::ObjectId::of(b"keep")));
    assert_eq!(e.link, None);
    // The lower layer's own hardlink pair is still one inode.
    let links: Vec<_> = m.entries.iter().filter_map(|e| e.link).collect();
    assert_eq!(links, [0, 0]);
}

/// A multi-platform index: the manifest for this machine's architecture is imported.
#[test]
fn a_multi_platform_index_picks_this_machine() {
    if std::env::consts::ARCH != "x86_64" {
        return;
    }
    let env = Env::new();
    let mut layout = Layout::new(env.path("layout"));
    layout.image("arm", &[(Tar::new().file("arm", "arm").done(), Comp::None)]);
    layout.image("amd", &[(Tar::new().file("amd", "amd").done(), Comp::None)]);
    let mut manifests = layout.manifests.clone();
    manifests[0]["platform"] = json!({"architecture": "arm64", "os": "linux"});
    manifests[1]["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let nested = json!({"schemaVersion": 2, "manifests": manifests});
    let (d, size) = layout.blob(&serde_json::to_vec(&nested).unwrap());
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": size}]});
    std::fs::write(
        layout.dir.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let m = env.manifest(&import(&env, layout.dir.to_str().unwrap(), None));
    assert_eq!(paths(&m), ["", "amd"]);
}
