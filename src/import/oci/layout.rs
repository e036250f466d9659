//! Reading an OCI image layout: `oci-layout`, `index.json` → manifest → config and layer
//! blobs, every blob checked against its descriptor's size and sha256 digest.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Manifests and configs are small JSON documents; a descriptor claiming more is refused.
const MAX_JSON: u64 = 16 << 20;
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    pub architecture: String,
    pub os: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Config {
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ContainerConfig {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RootFs {
    pub diff_ids: Vec<String>,
}

/// Which manifest of the index to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selector {
    Only,
    Tag(String),
    Digest(String),
}

/// Split `DIR[:TAG|@DIGEST]`. A path that exists as a directory is taken whole.
pub(crate) fn parse_reference(reference: &str) -> (PathBuf, Selector) {
    if Path::new(reference).is_dir() {
        return (reference.into(), Selector::Only);
    }
    if let Some((dir, digest)) = reference.rsplit_once('@') {
        return (dir.into(), Selector::Digest(digest.to_owned()));
    }
    match reference.rsplit_once(':') {
        Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => {
            (dir.into(), Selector::Tag(tag.to_owned()))
        }
        _ => (reference.into(), Selector::Only),
    }
}

/// An opened layout directory.
pub(crate) struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn open(dir: &Path) -> Result<Layout, String> {
        let marker = dir.join("oci-layout");
        let text = std::fs::read(&marker).map_err(|e| {
            format!(
                "not an OCI image layout: cannot read {}: {e}",
                marker.display()
            )
        })?;
        #[derive(Deserialize)]
        struct Marker {
            #[serde(rename = "imageLayoutVersion")]
            version: String,
        }
        let m: Marker =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", marker.display()))?;
        if !m.version.starts_with("1.") {
            return Err(format!("unsupported imageLayoutVersion {:?}", m.version));
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
        })
    }

    /// The path of the blob `digest`, which must be `sha256:` and 64 lowercase hex digits
    /// (anything else could name a file outside `blobs/`).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, String> {
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("unsupported digest algorithm in {digest:?} (only sha256)"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!("malformed digest {digest:?}"));
        }
        Ok(self.dir.join("blobs/sha256").join(hex))
    }

    /// Open the blob of `d`, checking its size on disk against the descriptor.
    pub fn open_blob(&self, d: &Descriptor) -> Result<File, String> {
        let path = self.blob_path(&d.digest)?;
        let f = File::open(&path).map_err(|e| format!("blob {}: {e}", d.digest))?;
        let len = f
            .metadata()
            .map_err(|e| format!("blob {}: {e}", d.digest))?
            .len();
        if len != d.size {
            return Err(format!(
                "blob {} is {len} bytes, its descriptor says {}",
                d.digest, d.size
            ));
        }
        Ok(f)
    }

    /// Read and verify a small JSON blob.
    fn json<T: for<'de> Deserialize<'de>>(&self, d: &Descriptor, what: &str) -> Result<T, String> {
        if d.size > MAX_JSON {
            return Err(format!("{what} {} claims {} bytes", d.digest, d.size));
        }
        let mut bytes = Vec::new();
        self.open_blob(d)?
            .take(MAX_JSON)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("blob {}: {e}", d.digest))?;
        check_digest(&d.digest, &Sha256::digest(&bytes))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{what} {}: {e}", d.digest))
    }

    /// The image manifest `selector` picks (through nested indexes, by platform).
    pub fn manifest(&self, selector: &Selector) -> Result<(Descriptor, Manifest), String> {
        let path = self.dir.join("index.json");
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let index: Index =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut chosen = pick(&index.manifests, selector)?;
        for _ in 0..4 {
            if !is_index(&chosen.media_type) {
                if !is_manifest(&chosen.media_type) {
                    return Err(format!(
                        "{} has unsupported media type {:?}",
                        chosen.digest, chosen.media_type
                    ));
                }
                let m: Manifest = self.json(&chosen, "manifest")?;
                return Ok((chosen, m));
            }
            let nested: Index = self.json(&chosen, "index")?;
            let _ = nested.media_type;
            chosen = pick_platform(&nested.manifests)?;
        }
        Err("indexes nested too deeply".into())
    }

    pub fn config(&self, d: &Descriptor) -> Result<Config, String> {
        self.json(d, "config")
    }
}

fn is_index(t: &str) -> bool {
    t == "application/vnd.oci.image.index.v1+json"
        || t == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn is_manifest(t: &str) -> bool {
    t == "application/vnd.oci.image.manifest.v1+json"
        || t == "application/vnd.docker.distribution.manifest.v2+json"
}

/// Whether a layer of media type `t` is a (possibly compressed) tar this importer reads.
pub(crate) fn is_layer(t: &str) -> bool {
    t.starts_with("application/vnd.oci.image.layer.")
        && !t.contains("encrypted")
        && t.contains(".tar")
        || t.starts_with("application/vnd.docker.image.rootfs.")
}

fn pick(manifests: &[Descriptor], selector: &Selector) -> Result<Descriptor, String> {
    let tags = || {
        let t: Vec<_> = manifests
            .iter()
            .map(|d| {
                d.annotations
                    .get(REF_NAME)
                    .cloned()
                    .unwrap_or_else(|| d.digest.clone())
            })
            .collect();
        t.join(", ")
    };
    let found: Vec<&Descriptor> = match selector {
        Selector::Only => manifests.iter().collect(),
        Selector::Tag(tag) => manifests
            .iter()
            .filter(|d| d.annotations.get(REF_NAME) == Some(tag))
            .collect(),
        Selector::Digest(digest) => manifests.iter().filter(|d| &d.digest == digest).collect(),
    };
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] if manifests.is_empty() => Err("index.json lists no manifests".into()),
        [] => Err(format!(
            "no manifest matches {selector:?}; the index has: {}",
            tags()
        )),
        _ => Err(format!(
            "index.json lists several manifests; pick one with DIR:TAG or DIR@DIGEST: {}",
            tags()
        )),
    }
}

/// The manifest of a multi-platform index for this machine (linux and its architecture),
/// or the only one.
fn pick_platform(manifests: &[Descriptor]) -> Result<Descriptor, String> {
    if let [one] = manifests {
        return Ok(one.clone());
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    manifests
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .cloned()
        .ok_or_else(|| format!("the image index has no manifest for linux/{arch}"))
}

/// Compare a computed sha256 with a descriptor's digest.
pub(crate) fn check_digest(expected: &str, actual: &[u8]) -> Result<(), String> {
    let actual = format!("sha256:{}", hex::encode(actual));
    if actual == expected {
        Ok(())
    } else {
        Err(format!(
            "digest mismatch: the descriptor says {expected}, the content hashes to {actual}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(
            parse_reference("/no/such/dir:latest"),
            ("/no/such/dir".into(), Selector::Tag("latest".into()))
        );
        assert_eq!(
            parse_reference("x@sha256:ab"),
            ("x".into(), Selector::Digest("sha256:ab".into()))
        );
        assert_eq!(
            parse_reference("/no/such/dir"),
            ("/no/such/dir".into(), Selector::Only)
        );
    }

    #[test]
    fn digests_cannot_escape_blobs() {
        let l = Layout { dir: "/l".into() };
        assert!(l.blob_path("sha256:../../etc/passwd").is_err());
        assert!(l.blob_path(&format!("sha512:{}", "0".repeat(128))).is_err());
        assert!(l.blob_path(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(l.blob_path(&format!("sha256:{}", "a".repeat(64))).is_ok());
    }
}
