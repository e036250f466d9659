//! Stacking trees: later layers win.
//!
//! An entry of a later layer replaces the entry at the same path; a later directory over an
//! earlier directory keeps the earlier children (only the directory's own metadata is
//! replaced), while a later non-directory over an earlier directory removes that subtree.

use std::collections::BTreeMap;

use super::{Entry, Kind, Manifest};

/// An entry of a merged tree and the index of the layer it came from (hardlink groups are
/// per layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layered {
    pub layer: usize,
    pub entry: Entry,
}

/// Merge `layers` in order; the result is sorted by path, parents before children.
pub fn merge(layers: Vec<Manifest>) -> Vec<Layered> {
    let mut merged: BTreeMap<Vec<u8>, Layered> = BTreeMap::new();
    for (layer, manifest) in layers.into_iter().enumerate() {
        for entry in manifest.entries {
            let path = entry.path.0.clone();
            let replaced_dir = merged
                .get(&path)
                .is_some_and(|old| old.entry.kind == Kind::Dir);
            if replaced_dir && entry.kind != Kind::Dir {
                remove_subtree(&mut merged, &path);
            }
            merged.insert(path, Layered { layer, entry });
        }
    }
    merged.into_values().collect()
}

/// Remove every entry strictly below `dir`: paths starting with `dir/`, a contiguous key
/// range because `0` follows `/` in byte order.
fn remove_subtree(map: &mut BTreeMap<Vec<u8>, Layered>, dir: &[u8]) {
    let mut lo = dir.to_vec();
    lo.push(b'/');
    let mut hi = dir.to_vec();
    hi.push(b'/' + 1);
    let doomed: Vec<Vec<u8>> = map.range(lo..hi).map(|(k, _)| k.clone()).collect();
    for key in doomed {
        map.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Bytes, Time};

    fn entry(path: &str, kind: Kind, mode: u16) -> Entry {
        Entry {
            path: Bytes(path.as_bytes().to_vec()),
            kind,
            mode,
            uid: 0,
            gid: 0,
            atime: Time::default(),
            mtime: Time::default(),
            ctime: Time::default(),
            crtime: None,
            xattrs: vec![],
            size: None,
            object: None,
            segments: None,
            link: None,
            target: (kind == Kind::Symlink).then(|| Bytes(b"x".to_vec())),
            rdev: None,
        }
    }

    fn paths(merged: &[Layered]) -> Vec<(String, usize)> {
        merged
            .iter()
            .map(|l| {
                (
                    String::from_utf8_lossy(&l.entry.path.0).into_owned(),
                    l.layer,
                )
            })
            .collect()
    }

    #[test]
    fn later_dir_keeps_earlier_children() {
        let a = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            entry("d", Kind::Dir, 0o700),
            entry("d/x", Kind::Fifo, 0),
        ]);
        let b = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            entry("d", Kind::Dir, 0o755),
            entry("d/y", Kind::Fifo, 0),
        ]);
        let m = merge(vec![a, b]);
        assert_eq!(
            paths(&m),
            [
                ("".into(), 1),
                ("d".into(), 1),
                ("d/x".into(), 0),
                ("d/y".into(), 1)
            ]
        );
        assert_eq!(m[1].entry.mode, 0o755);
    }

    #[test]
    fn later_file_over_dir_removes_subtree() {
        let a = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            entry("d", Kind::Dir, 0o755),
            entry("d/x", Kind::Fifo, 0),
            entry("d-sibling", Kind::Fifo, 0),
            entry("d0", Kind::Fifo, 0),
        ]);
        let b = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            entry("d", Kind::Symlink, 0o777),
        ]);
        let m = merge(vec![a, b]);
        assert_eq!(
            paths(&m),
            [
                ("".into(), 1),
                ("d".into(), 1),
                ("d-sibling".into(), 0),
                ("d0".into(), 0)
            ]
        );
    }

    #[test]
    fn later_dir_over_file_replaces_it() {
        let a = Manifest::new(vec![entry("", Kind::Dir, 0o755), entry("d", Kind::Fifo, 0)]);
        let b = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            entry("d", Kind::Dir, 0o755),
            entry("d/z", Kind::Fifo, 0),
        ]);
        let m = merge(vec![a, b]);
        assert_eq!(
            paths(&m),
            [("".into(), 1), ("d".into(), 1), ("d/z".into(), 1)]
        );
    }
}
