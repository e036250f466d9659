//! Building a tree from archive entries in archive order, with the rules `tar -x` follows
//! and the checks it should:
//!
//! - Paths: a leading `/` and `.` components are dropped (`/etc/x`, `./etc/x` → `etc/x`,
//!   as GNU tar does without `-P`); a `..` component, a NUL byte or a component over 255
//!   bytes is an error naming the entry. `.`/`./`/`/` name the root directory.
//! - Duplicates: the later entry wins, as with `tar -x`. A later directory over a directory
//!   keeps the earlier children; a later non-directory over a directory drops its subtree.
//! - Parents: a directory missing from the archive is created (mode 0755, owner 0:0, times
//!   of the entry that needed it); a parent that is a symlink or any other non-directory is
//!   an error naming the entry (nothing is extracted, so this is the only way an entry
//!   could be written "through" a symlink).
//! - Hardlinks must name an earlier non-directory entry of the same archive (or, for an
//!   OCI layer, of a lower layer, whose entry is then copied: hardlink groups do not span
//!   trees); a link to a missing or later entry is an error. Linked entries share one
//!   inode and so the first member's metadata, as on disk.

use std::collections::{BTreeMap, BTreeSet};

use crate::tree::{Bytes, Entry, Kind, Manifest, Time};

/// Entries by path.
pub(crate) type Tree = BTreeMap<Vec<u8>, Entry>;

/// Longest name of one path component ext4 (and Linux) accepts.
const NAME_MAX: usize = 255;

/// A tree under construction, plus what an OCI layer says about the layers below it.
#[derive(Default)]
pub(crate) struct Layer {
    pub entries: Tree,
    /// Directories created only because an entry needed a parent.
    pub implicit: BTreeSet<Vec<u8>>,
    /// Paths deleted from lower layers (`.wh.NAME`).
    pub whiteouts: BTreeSet<Vec<u8>>,
    /// Directories whose lower contents are hidden (`.wh..wh..opq`).
    pub opaque: BTreeSet<Vec<u8>>,
    next_link: u64,
}

/// Normalize an archive path as described in the module documentation.
pub(crate) fn normalize(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.contains(&0) {
        return Err("the path contains a NUL byte".into());
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("the path has a '..' component".into()),
            c if c.len() > NAME_MAX => {
                return Err(format!(
                    "a path component is {} bytes long; the limit is {NAME_MAX}",
                    c.len()
                ))
            }
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// The proper ancestors of `path`, outermost first (`a`, `a/b` for `a/b/c`), root excluded.
fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'/')
        .map(move |(i, _)| &path[..i])
}

/// Remove everything strictly below `dir` from `tree`.
pub(crate) fn remove_below(tree: &mut Tree, dir: &[u8]) {
    if dir.is_empty() {
        tree.retain(|p, _| p.is_empty());
        return;
    }
    let mut lo = dir.to_vec();
    lo.push(b'/');
    let mut hi = dir.to_vec();
    hi.push(b'/' + 1);
    let doomed: Vec<Vec<u8>> = tree.range(lo..hi).map(|(p, _)| p.clone()).collect();
    for p in doomed {
        tree.remove(&p);
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::File => "a regular file",
        Kind::Dir => "a directory",
        Kind::Symlink => "a symlink",
        Kind::Chardev => "a character device",
        Kind::Blockdev => "a block device",
        Kind::Fifo => "a fifo",
        Kind::Socket => "a socket",
        Kind::Whiteout => "a whiteout",
    }
}

impl Layer {
    /// Add `entry` (path already normalized). `lower` is the tree this layer goes over, for
    /// the parent checks of an OCI layer.
    pub fn add(&mut self, entry: Entry, lower: Option<&Tree>) -> Result<(), String> {
        let path = entry.path.0.clone();
        self.parents(&path, entry.mtime, lower)?;
        match self.entries.get(&path) {
            Some(old) if old.kind == Kind::Dir && entry.kind != Kind::Dir => {
                remove_below(&mut self.entries, &path)
            }
            _ => {}
        }
        self.implicit.remove(&path);
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Add a hardlink at `path` to the earlier entry `target` (both normalized).
    pub fn add_hardlink(
        &mut self,
        path: Vec<u8>,
        target: &[u8],
        lower: Option<&Tree>,
    ) -> Result<(), String> {
        let shown = || String::from_utf8_lossy(target).into_owned();
        if path == target && self.entries.contains_key(&path) {
            return Ok(());
        }
        let (mut entry, from_lower) = match self.entries.get(target) {
            Some(t) => (t.clone(), false),
            None => match lower.and_then(|l| l.get(target)) {
                Some(t) if !self.whiteouts.contains(target) => (t.clone(), true),
                _ => {
                    return Err(format!(
                        "hardlink to {:?}, which is not an earlier entry of the archive",
                        shown()
                    ))
                }
            },
        };
        if entry.kind == Kind::Dir {
            return Err(format!("hardlink to {:?}, which is a directory", shown()));
        }
        if from_lower {
            entry.link = None;
        } else {
            let link = match entry.link {
                Some(l) => l,
                None => {
                    let l = self.next_link;
                    self.next_link += 1;
                    self.entries.get_mut(target).expect("looked up").link = Some(l);
                    l
                }
            };
            entry.link = Some(link);
        }
        entry.path = Bytes(path);
        self.add(entry, lower)
    }

    /// Create missing parents of `path`; refuse a parent that is not a directory.
    fn parents(&mut self, path: &[u8], time: Time, lower: Option<&Tree>) -> Result<(), String> {
        if path.is_empty() {
            return Ok(());
        }
        for dir in std::iter::once(&b""[..]).chain(ancestors(path)) {
            if let Some(e) = self.entries.get(dir) {
                if e.kind != Kind::Dir {
                    return Err(format!(
                        "its parent {:?} is {} in the tree, not a directory",
                        String::from_utf8_lossy(dir),
                        kind_name(e.kind)
                    ));
                }
                continue;
            }
            if let Some(e) = lower.and_then(|l| l.get(dir)) {
                if e.kind != Kind::Dir && !self.whiteouts.contains(dir) {
                    return Err(format!(
                        "its parent {:?} is {} in a lower layer, not a directory",
                        String::from_utf8_lossy(dir),
                        kind_name(e.kind)
                    ));
                }
            }
            self.entries.insert(dir.to_vec(), implicit_dir(dir, time));
            self.implicit.insert(dir.to_vec());
        }
        Ok(())
    }

    /// Record a `.wh.NAME` whiteout at `path` (the deleted path, normalized).
    pub fn whiteout(&mut self, path: Vec<u8>) {
        self.whiteouts.insert(path);
    }

    /// Record a `.wh..wh..opq` marker in `dir`.
    pub fn opaque(&mut self, dir: Vec<u8>) {
        self.opaque.insert(dir);
    }

    /// The manifest of this layer alone (whiteouts dropped), with the root directory.
    pub fn into_manifest(mut self) -> Manifest {
        self.entries
            .entry(Vec::new())
            .or_insert_with(|| implicit_dir(b"", Time::default()));
        manifest(self.entries)
    }
}

/// A directory made for an entry whose parent the archive lacks.
pub(crate) fn implicit_dir(path: &[u8], time: Time) -> Entry {
    Entry {
        path: Bytes(path.to_vec()),
        kind: Kind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        atime: time,
        mtime: time,
        ctime: time,
        crtime: None,
        xattrs: Vec::new(),
        size: None,
        object: None,
        segments: None,
        link: None,
        target: None,
        rdev: None,
        opaque: false,
    }
}

/// A manifest of `tree`: hardlink groups left with one member are dropped and the rest
/// renumbered in path order, so the same archive always gives the same bytes.
pub(crate) fn manifest(tree: Tree) -> Manifest {
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for e in tree.values() {
        if let Some(l) = e.link {
            *count.entry(l).or_default() += 1;
        }
    }
    let mut renumber: BTreeMap<u64, u64> = BTreeMap::new();
    let entries = tree
        .into_values()
        .map(|mut e| {
            e.link = e.link.filter(|l| count[l] > 1).map(|l| {
                let next = renumber.len() as u64;
                *renumber.entry(l).or_insert(next)
            });
            e
        })
        .collect();
    Manifest::new(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(path: &str) -> Entry {
        let mut e = implicit_dir(path.as_bytes(), Time(5, 0));
        e.kind = Kind::Fifo;
        e.mode = 0o644;
        e
    }

    #[test]
    fn normalizes_like_gnu_tar() {
        assert_eq!(normalize(b"/etc//x/./y/").unwrap(), b"etc/x/y");
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert!(normalize(b"a/../b").unwrap_err().contains(".."));
        assert!(normalize(&[b'a'; 256]).unwrap_err().contains("256"));
        assert!(normalize(&[b'a'; 255]).is_ok());
    }

    #[test]
    fn parents_are_made_and_checked() {
        let mut l = Layer::default();
        l.add(fifo("a/b/c"), None).unwrap();
        assert!(l.implicit.contains(&b"a/b"[..]));
        let mut link = fifo("s");
        link.kind = Kind::Symlink;
        link.target = Some(Bytes(b"/etc".to_vec()));
        l.add(link, None).unwrap();
        let err = l.add(fifo("s/passwd"), None).unwrap_err();
        assert!(err.contains("\"s\" is a symlink"), "{err}");
    }

    #[test]
    fn later_wins_and_non_dir_over_dir_drops_subtree() {
        let mut l = Layer::default();
        l.add(fifo("d/x"), None).unwrap();
        l.add(fifo("d"), None).unwrap();
        let m = l.into_manifest();
        let paths: Vec<_> = m.entries.iter().map(|e| e.path.0.clone()).collect();
        assert_eq!(paths, vec![b"".to_vec(), b"d".to_vec()]);
        m.validate().unwrap();
    }

    #[test]
    fn hardlinks_need_an_earlier_entry() {
        let mut l = Layer::default();
        assert!(l
            .add_hardlink(b"b".to_vec(), b"a", None)
            .unwrap_err()
            .contains("not an earlier entry"));
        l.add(fifo("a"), None).unwrap();
        l.add_hardlink(b"b".to_vec(), b"a", None).unwrap();
        l.add_hardlink(b"c".to_vec(), b"b", None).unwrap();
        // Replacing one name leaves the others linked.
        l.add(fifo("a"), None).unwrap();
        let m = l.into_manifest();
        let links: Vec<_> = m.entries.iter().map(|e| e.link).collect();
        assert_eq!(links, vec![None, None, Some(0), Some(0)]);
    }
}
