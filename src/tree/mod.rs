//! Tree manifests: the metadata of every entry of a directory tree, with file contents named
//! by store object ids. A manifest is stored in `trees/` under the BLAKE3 of its bytes.
//!
//! # Format 1
//!
//! Compact JSON (pretty-printed here):
//!
//! ```json
//! {
//!   "format": 1,
//!   "entries": [
//!     {"path": "", "kind": "dir", "mode": 493, "uid": 0, "gid": 0,
//!      "atime": [1700000000, 123456789], "mtime": [1700000000, 0], "ctime": [1700000000, 0],
//!      "crtime": [1700000000, 0]},
//!     {"path": "bin/ping", "kind": "file", "mode": 493, "uid": 0, "gid": 0, "atime": …,
//!      "size": 90352, "object": "af13…64 hex digits", "link": 0,
//!      "xattrs": [{"name": "security.capability", "value": {"hex": "0100000200200000…"}}]},
//!     {"path": "var/disk", "kind": "file", …, "size": 1073741824, "object": "…",
//!      "segments": [[0, 4096], [1048576, 8192]]},
//!     {"path": "lib64", "kind": "symlink", …, "target": "usr/lib64"},
//!     {"path": "dev/null", "kind": "chardev", …, "rdev": [1, 3]}
//!   ]
//! }
//! ```
//!
//! - `path`: relative, `/`-separated, no `.`/`..`/empty components; `""` is the root, which
//!   is always present and a directory. Entries are sorted by path bytes, unique, and every
//!   entry's parent is a `dir` entry of the same manifest.
//! - `kind`: `file`, `dir`, `symlink`, `chardev`, `blockdev`, `fifo` or `socket`.
//! - `mode`: permission bits including setuid/setgid/sticky (`0o7777`).
//! - times: `[seconds since the epoch, nanoseconds]`; `crtime` only when known.
//! - byte strings (`path`, `target`, xattr `name` and `value`): a JSON string when the
//!   bytes are UTF-8, else `{"hex": "…"}`.
//! - files: `size` (logical, `st_size`) and `object` (always present, the empty object for an
//!   empty file). Sparse files also have `segments`, `[offset, length]` pairs of the data
//!   ranges in increasing order, offsets 4 KiB aligned, lengths multiples of 4 KiB except a
//!   segment ending at `size`; the object holds the segments' bytes back to back.
//! - `link`: hardlink group; non-directory entries sharing a group are one inode (the
//!   metadata of the first one in path order is used).
//! - `rdev`: `[major, minor]` of a device.
//!
//! ## Deletions (layers over other layers)
//!
//! A tree stacked over others ([`merge`]) can remove what they hold:
//!
//! - `"kind": "whiteout"`: the lower entry at this path, and everything below it, is gone.
//!   A whiteout has `mode`, `uid`, `gid` and times like every entry (written as zeros, not
//!   used), and no xattrs, `link` or kind-specific field; it never has children. A whiteout
//!   over nothing does nothing.
//! - `"opaque": true` on a `dir`: the lower directory's children are dropped (the directory
//!   was deleted and re-created); only this tree's children of it remain. Written only when
//!   true, so manifests without deletions keep their bytes and ids.
//!
//! Merging applies both; whiteouts never reach the synthesizer, and a tree used alone
//! behaves as if merged over nothing.
//!
//! # Binary form
//!
//! Readers that only look (composing images) use [`binary::TreeView`], a fixed-layout
//! binary form of the same manifest read in place from a memory map. It is derived from the
//! JSON and cached per tree; the JSON stays the tree's identity (see [`binary`] for why).

pub mod binary;
mod bytes;
pub mod merge;

use serde::{Deserialize, Serialize};

pub use bytes::Bytes;

use crate::store::ObjectId;

/// The manifest format this version writes and reads.
pub const FORMAT: u32 = 1;

/// Seconds since the epoch and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Time(pub i64, pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Chardev,
    Blockdev,
    Fifo,
    Socket,
    /// Removes the lower layers' entry at this path (see "Deletions" above).
    Whiteout,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: Bytes,
    pub value: Bytes,
}

/// A data range of a sparse file: `[offset, length]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment(pub u64, pub u64);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: Bytes,
    pub kind: Kind,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crtime: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<Vec<Segment>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<(u32, u32)>,
    /// A directory whose lower children are dropped (see "Deletions" above).
    #[serde(default, skip_serializing_if = "is_false")]
    pub opaque: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Entry {
    /// Bytes of the file's object: the sum of its segments, or its size. 0 for non-files.
    pub fn data_len(&self) -> u64 {
        match &self.segments {
            Some(segs) => segs.iter().map(|s| s.1).sum(),
            None => self.size.unwrap_or(0),
        }
    }

    /// The parent's path; `None` for the root.
    pub fn parent(&self) -> Option<&[u8]> {
        let p = &self.path.0;
        if p.is_empty() {
            return None;
        }
        Some(match p.iter().rposition(|&b| b == b'/') {
            Some(i) => &p[..i],
            None => &[],
        })
    }

    /// The last path component.
    pub fn name(&self) -> &[u8] {
        let p = &self.path.0;
        match p.iter().rposition(|&b| b == b'/') {
            Some(i) => &p[i + 1..],
            None => p,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub entries: Vec<Entry>,
}

/// Why bytes are not a valid manifest.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("tree manifest is not valid JSON")]
    Json(#[from] serde_json::Error),
    #[error("unsupported tree manifest format {0} (this tessera reads format {FORMAT})")]
    Format(u32),
    #[error("tree entry {path:?}: {why}")]
    Invalid { path: Bytes, why: &'static str },
    #[error(transparent)]
    Binary(#[from] binary::BinaryError),
}

impl Manifest {
    /// A manifest of `entries`, which are sorted here; call [`Manifest::validate`] after.
    pub fn new(mut entries: Vec<Entry>) -> Self {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Manifest {
            format: FORMAT,
            entries,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Manifest, TreeError> {
        #[derive(Deserialize)]
        struct Header {
            format: u32,
        }
        let manifest: Manifest = match serde_json::from_slice(bytes) {
            Ok(m) => m,
            // A newer format may not parse as this one: say so rather than what failed.
            Err(e) => match serde_json::from_slice::<Header>(bytes) {
                Ok(h) if h.format != FORMAT => return Err(TreeError::Format(h.format)),
                _ => return Err(e.into()),
            },
        };
        if manifest.format != FORMAT {
            return Err(TreeError::Format(manifest.format));
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Check the invariants listed in the module documentation.
    pub fn validate(&self) -> Result<(), TreeError> {
        let mut dirs = std::collections::HashSet::new();
        let mut links = std::collections::HashMap::new();
        for (i, e) in self.entries.iter().enumerate() {
            let bad = |why| {
                Err(TreeError::Invalid {
                    path: e.path.clone(),
                    why,
                })
            };
            if i == 0 && (!e.path.0.is_empty() || e.kind != Kind::Dir || e.opaque) {
                return bad("the first entry must be the root directory, path \"\", not opaque");
            }
            if i > 0 {
                if self.entries[i - 1].path >= e.path {
                    return bad("entries must be sorted by path and unique");
                }
                if e.path
                    .0
                    .split(|&b| b == b'/')
                    .any(|c| c.is_empty() || c == b"." || c == b"..")
                    || e.path.0.contains(&0)
                {
                    return bad("path has an empty, '.' or '..' component or a NUL byte");
                }
                if !dirs.contains(e.parent().unwrap_or_default()) {
                    return bad("parent directory is not in the manifest");
                }
            }
            if e.mode & !0o7777 != 0 {
                return bad("mode has bits outside 0o7777");
            }
            let times = [Some(e.atime), Some(e.mtime), Some(e.ctime), e.crtime];
            if times.iter().flatten().any(|t| t.1 >= 1_000_000_000) {
                return bad("nanoseconds out of range");
            }
            let is = |want: bool, have: bool| want == have;
            let file = e.kind == Kind::File;
            let dev = matches!(e.kind, Kind::Chardev | Kind::Blockdev);
            if !is(file, e.size.is_some()) || !is(file, e.object.is_some()) {
                return bad("files, and only files, have a size and an object");
            }
            if !file && e.segments.is_some() {
                return bad("only files have segments");
            }
            if !is(e.kind == Kind::Symlink, e.target.is_some()) {
                return bad("symlinks, and only symlinks, have a target");
            }
            if e.target
                .as_ref()
                .is_some_and(|t| t.0.is_empty() || t.0.contains(&0))
            {
                return bad("a symlink target is not empty and has no NUL byte");
            }
            if e.xattrs
                .iter()
                .any(|x| x.name.0.is_empty() || x.name.0.contains(&0))
            {
                return bad("an xattr name is not empty and has no NUL byte");
            }
            if e.kind == Kind::Whiteout && (!e.xattrs.is_empty() || e.link.is_some()) {
                return bad("a whiteout has no xattrs and no hardlink group");
            }
            if e.opaque && e.kind != Kind::Dir {
                return bad("only directories are opaque");
            }
            if !is(dev, e.rdev.is_some()) {
                return bad("devices, and only devices, have rdev");
            }
            if let Some(segs) = &e.segments {
                check_segments(segs, e.size.unwrap_or(0)).or_else(bad)?;
            }
            if let Some(link) = e.link {
                if e.kind == Kind::Dir {
                    return bad("directories cannot be hardlinked");
                }
                if *links.entry(link).or_insert(e.kind) != e.kind {
                    return bad("hardlinked entries must have the same kind");
                }
            }
            if e.kind == Kind::Dir {
                dirs.insert(e.path.0.as_slice());
            }
        }
        if self.entries.is_empty() {
            return Err(TreeError::Invalid {
                path: Bytes::default(),
                why: "the manifest has no root entry",
            });
        }
        Ok(())
    }
}

fn check_segments(segs: &[Segment], size: u64) -> Result<(), &'static str> {
    const BLOCK: u64 = 4096;
    let mut end = 0;
    for s in segs {
        let seg_end = s.0.checked_add(s.1).ok_or("segment overflows")?;
        if s.0 % BLOCK != 0 || s.0 < end || s.1 == 0 || seg_end > size {
            return Err(
                "segments must be 4 KiB aligned, increasing, non-empty and within the size",
            );
        }
        if s.1 % BLOCK != 0 && seg_end != size {
            return Err("only a segment ending at the file size may have a partial block");
        }
        end = seg_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
