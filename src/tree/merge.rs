//! Stacking trees: later layers win.
//!
//! An entry of a later layer replaces the entry at the same path; a later directory over an
//! earlier directory keeps the earlier children (only the directory's own metadata is
//! replaced), while a later non-directory over an earlier directory removes that subtree.
//! A whiteout removes the earlier entry and its subtree and is itself dropped; an opaque
//! directory drops the earlier directory's children (see "Deletions" in [`crate::tree`]).
//! The result holds no whiteout, whatever the layers hold.
//! Merging is linear in the number of entries: manifests are sorted by path.

use std::cmp::Ordering;
use std::collections::HashSet;

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
    let mut merged = Vec::new();
    for (layer, manifest) in layers.into_iter().enumerate() {
        merged = merge_two(merged, layer, manifest.entries);
    }
    merged
}

/// One linear pass over two path-sorted lists. A directory of `lower` replaced by a
/// non-directory of `upper` is remembered, and `lower` entries below it are dropped: they
/// come later in path order than the directory itself, since a prefix sorts first.
fn merge_two(lower: Vec<Layered>, layer: usize, upper: Vec<Entry>) -> Vec<Layered> {
    let mut out = Vec::with_capacity(lower.len().max(upper.len()));
    let mut removed: HashSet<Vec<u8>> = HashSet::new();
    let mut whiteouts: HashSet<Vec<u8>> = HashSet::new();
    let mut lower = lower.into_iter().peekable();
    let mut upper = upper.into_iter().peekable();
    loop {
        let order = match (lower.peek(), upper.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(l), Some(u)) => l.entry.path.cmp(&u.path),
        };
        if order == Ordering::Equal {
            let l = lower.next().expect("peeked");
            let u = upper.peek().expect("peeked");
            if l.entry.kind == Kind::Dir && (u.kind != Kind::Dir || u.opaque) {
                removed.insert(l.entry.path.0);
            }
        }
        let take_upper = order != Ordering::Less;
        if take_upper {
            let entry = upper.next().expect("peeked");
            // Whiteouts (and their children, which validation forbids) never pass.
            if entry.kind != Kind::Whiteout && !under_any(&entry.path.0, &whiteouts) {
                out.push(Layered { layer, entry });
            } else if entry.kind == Kind::Whiteout {
                whiteouts.insert(entry.path.0);
            }
        } else {
            let l = lower.next().expect("peeked");
            if removed.is_empty() || !under_any(&l.entry.path.0, &removed) {
                out.push(l);
            }
        }
    }
    out
}

/// Whether any proper ancestor of `path` is in `dirs`.
fn under_any(path: &[u8], dirs: &HashSet<Vec<u8>>) -> bool {
    path.iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'/')
        .any(|(i, _)| dirs.contains(&path[..i]))
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
            opaque: false,
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
    fn removal_spares_siblings_that_sort_inside_the_subtree() {
        // "d-x" sorts between "d" and "d/..."; it must survive d's removal.
        let a = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            entry("d", Kind::Dir, 0o755),
            entry("d-x", Kind::Dir, 0o755),
            entry("d-x/y", Kind::Fifo, 0),
            entry("d/e", Kind::Dir, 0o755),
            entry("d/e/f", Kind::Fifo, 0),
        ]);
        let b = Manifest::new(vec![entry("", Kind::Dir, 0o755), entry("d", Kind::Fifo, 0)]);
        let c = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            entry("d-x", Kind::Dir, 0o700),
        ]);
        let m = merge(vec![a, b, c]);
        assert_eq!(
            paths(&m),
            [
                ("".into(), 2),
                ("d".into(), 1),
                ("d-x".into(), 2),
                ("d-x/y".into(), 0)
            ]
        );
    }

    fn whiteout(path: &str) -> Entry {
        entry(path, Kind::Whiteout, 0)
    }

    #[test]
    fn whiteout_removes_the_entry_and_its_subtree_and_is_dropped() {
        let a = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            entry("d", Kind::Dir, 0o755),
            entry("d-x", Kind::Fifo, 0),
            entry("d/e", Kind::Dir, 0o755),
            entry("d/e/f", Kind::Fifo, 0),
            entry("g", Kind::Fifo, 0),
        ]);
        let b = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            whiteout("d"),
            whiteout("g"),
            whiteout("never-existed"),
        ]);
        let m = merge(vec![a, b]);
        assert_eq!(paths(&m), [("".into(), 1), ("d-x".into(), 0)]);
        // A later layer can bring the path back.
        let c = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            entry("g", Kind::Socket, 0),
        ]);
        let a = Manifest::new(vec![entry("", Kind::Dir, 0o755), entry("g", Kind::Fifo, 0)]);
        let b = Manifest::new(vec![entry("", Kind::Dir, 0o755), whiteout("g")]);
        assert_eq!(
            paths(&merge(vec![a, b, c])),
            [("".into(), 2), ("g".into(), 2)]
        );
    }

    #[test]
    fn whiteouts_of_a_single_tree_are_dropped() {
        let a = Manifest::new(vec![entry("", Kind::Dir, 0o755), whiteout("x")]);
        assert_eq!(paths(&merge(vec![a])), [("".into(), 0)]);
    }

    #[test]
    fn opaque_dir_drops_lower_children_only() {
        let a = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            entry("d", Kind::Dir, 0o755),
            entry("d/old", Kind::Fifo, 0),
            entry("d/sub", Kind::Dir, 0o755),
            entry("d/sub/deep", Kind::Fifo, 0),
            entry("d0", Kind::Fifo, 0),
        ]);
        let mut d = entry("d", Kind::Dir, 0o700);
        d.opaque = true;
        let b = Manifest::new(vec![
            entry("", Kind::Dir, 0o755),
            d,
            entry("d/new", Kind::Fifo, 0),
        ]);
        assert!(b.validate().is_ok());
        let m = merge(vec![a, b]);
        assert_eq!(
            paths(&m),
            [
                ("".into(), 1),
                ("d".into(), 1),
                ("d/new".into(), 1),
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
