//! Named image records, stored as `images/NAME.json`.
//!
//! # Format 1
//!
//! ```json
//! {"format": 1, "name": "web", "trees": ["af13…", "09bc…"], "size": 4294967296,
//!  "inodes": null, "label": "web", "created": 1763888400,
//!  "uuid": "4d1e…32 hex digits", "hash_seed": "…32 hex digits", "checksum_seed": 2830213391}
//! ```
//!
//! An image imported with `import oci --name` also has `"runtime": {"user": …, "env": […],
//! "entrypoint": […], "cmd": […], "working_dir": …}` (absent fields omitted); records
//! without it load as before.
//!
//! Records written since the synthesizer became lazy also have `"device_size"`: the size
//! in bytes the image was synthesized at when created (see [`ImageRecord::device_size`]).
//!
//! `trees` are merged in order (see [`crate::tree::merge`]). `size` and `inodes` are `null`
//! when the synthesizer picks them. `created` (seconds since the epoch) is the filesystem's
//! timestamp. `uuid`, `hash_seed` and `checksum_seed` derive from the BLAKE3 of the name
//! and the trees, so the same image is the same bytes every time it is served.

use serde::{Deserialize, Serialize};

use crate::store::ObjectId;

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub format: u32,
    pub name: String,
    pub trees: Vec<ObjectId>,
    pub size: Option<u64>,
    pub inodes: Option<u32>,
    pub label: String,
    pub created: i64,
    #[serde(with = "hex16")]
    pub uuid: [u8; 16],
    #[serde(with = "hex16")]
    pub hash_seed: [u8; 16],
    pub checksum_seed: u32,
    /// The device size in bytes as synthesized when the image was created (`size`, or what
    /// the synthesizer picked), so a server can tell clients the size before it synthesizes
    /// anything. Derived, not an option: absent in older records, which are synthesized
    /// when opened instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_size: Option<u64>,
    /// How to run the image, from an OCI image config (`import oci`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
}

/// The run configuration of an OCI image (its config's `config` object): recorded, not
/// used by tessera itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

/// Identity derived from the name and the trees: (uuid, hash seed, checksum seed).
pub fn derive_identity(name: &str, trees: &[ObjectId]) -> ([u8; 16], [u8; 16], u32) {
    let mut h = blake3::Hasher::new_derive_key("tessera image identity v1");
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    for t in trees {
        h.update(&t.0);
    }
    let mut out = [0u8; 36];
    h.finalize_xof().fill(&mut out);
    let mut uuid: [u8; 16] = out[..16].try_into().expect("16 bytes");
    // RFC 9562 version 8 (custom) and variant bits, so tools show a well-formed UUID.
    uuid[6] = (uuid[6] & 0x0f) | 0x80;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let hash_seed = out[16..32].try_into().expect("16 bytes");
    let checksum_seed = u32::from_le_bytes(out[32..36].try_into().expect("4 bytes"));
    (uuid, hash_seed, checksum_seed)
}

/// Format a UUID the usual way, `8-4-4-4-12` hex digits.
pub fn format_uuid(uuid: &[u8; 16]) -> String {
    let h = hex::encode(uuid);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

mod hex16 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 16];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

impl ImageRecord {
    /// BLAKE3 of everything that determines the synthesized bytes (not the creation time), so
    /// an overlay refuses an image re-created with other trees or options under the same name.
    pub fn fingerprint(&self) -> String {
        let identity = serde_json::json!({
            "trees": self.trees,
            "size": self.size,
            "inodes": self.inodes,
            "label": self.label,
            "uuid": self.uuid,
            "hash_seed": self.hash_seed,
            "checksum_seed": self.checksum_seed,
        });
        blake3::hash(identity.to_string().as_bytes()).to_hex()[..32].to_owned()
    }

    /// One line for NBD_INFO_DESCRIPTION and `nbdinfo`.
    pub fn describe(&self) -> String {
        let label = if self.label.is_empty() {
            String::new()
        } else {
            format!(" label {:?},", self.label)
        };
        format!(
            "tessera ext4 image {:?}:{label} {} tree(s), uuid {}",
            self.name,
            self.trees.len(),
            format_uuid(&self.uuid)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_deterministic_and_depends_on_inputs() {
        let t = [ObjectId::of(b"a")];
        assert_eq!(derive_identity("x", &t), derive_identity("x", &t));
        assert_ne!(derive_identity("x", &t).0, derive_identity("y", &t).0);
        assert_ne!(derive_identity("x", &t).0, derive_identity("x", &[]).0);
    }

    #[test]
    fn uuid_format() {
        assert_eq!(
            format_uuid(&[0xab; 16]),
            "abababab-abab-abab-abab-abababababab"
        );
    }
}
