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

use super::binary::TreeView;
use super::{Entry, Kind, Manifest};

/// An entry of a merged tree and the index of the layer it came from (hardlink groups are
/// per layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layered {
    pub layer: usize,
    pub entry: Entry,
}

/// What merging reads of a layer: its entries' paths, kinds and opaque flags, by index.
pub trait Layer {
    fn entry_count(&self) -> usize;
    fn path(&self, i: u32) -> &[u8];
    fn kind(&self, i: u32) -> Kind;
    fn opaque(&self, i: u32) -> bool;
}

impl Layer for Manifest {
    fn entry_count(&self) -> usize {
        self.entries.len()
    }
    fn path(&self, i: u32) -> &[u8] {
        &self.entries[i as usize].path.0
    }
    fn kind(&self, i: u32) -> Kind {
        self.entries[i as usize].kind
    }
    fn opaque(&self, i: u32) -> bool {
        self.entries[i as usize].opaque
    }
}

impl Layer for TreeView {
    fn entry_count(&self) -> usize {
        self.len()
    }
    fn path(&self, i: u32) -> &[u8] {
        self.entry(i).path()
    }
    fn kind(&self, i: u32) -> Kind {
        self.entry(i).kind()
    }
    fn opaque(&self, i: u32) -> bool {
        self.entry(i).opaque()
    }
}

/// One entry of a merged tree: entry `index` of layer `layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub layer: u32,
    pub index: u32,
}

/// Merge `layers` in order; the result is sorted by path, parents before children.
pub fn merge(layers: Vec<Manifest>) -> Vec<Layered> {
    let picks = merge_picks(&layers);
    let mut layers: Vec<Vec<Option<Entry>>> = layers
        .into_iter()
        .map(|m| m.entries.into_iter().map(Some).collect())
        .collect();
    picks
        .into_iter()
        .map(|p| Layered {
            layer: p.layer as usize,
            entry: layers[p.layer as usize][p.index as usize]
                .take()
                .expect("each entry is picked at most once"),
        })
        .collect()
}

/// Merge `layers` in order without copying entries: which entry of which layer is at each
/// path of the result, sorted by path, parents before children.
pub fn merge_picks<L: Layer>(layers: &[L]) -> Vec<Pick> {
    let mut merged = Vec::new();
    for layer in 0..layers.len() {
        merged = merge_two(layers, merged, layer as u32);
    }
    merged
}

/// One linear pass over two path-sorted lists. A directory of `lower` replaced by a
/// non-directory of `upper` is remembered, and `lower` entries below it are dropped: they
/// come later in path order than the directory itself, since a prefix sorts first.
fn merge_two<L: Layer>(layers: &[L], lower: Vec<Pick>, layer: u32) -> Vec<Pick> {
    let up = &layers[layer as usize];
    let n = up.entry_count() as u32;
    let path = |p: Pick| layers[p.layer as usize].path(p.index);
    let mut out = Vec::with_capacity(lower.len().max(n as usize));
    let mut removed: HashSet<&[u8]> = HashSet::new();
    let mut whiteouts: HashSet<&[u8]> = HashSet::new();
    let mut lower = lower.into_iter().peekable();
    let mut u = 0u32;
    loop {
        let order = match (lower.peek(), u < n) {
            (None, false) => break,
            (Some(_), false) => Ordering::Less,
            (None, true) => Ordering::Greater,
            (Some(&l), true) => path(l).cmp(up.path(u)),
        };
        if order == Ordering::Equal {
            let l = lower.next().expect("peeked");
            let lower_layer = &layers[l.layer as usize];
            if lower_layer.kind(l.index) == Kind::Dir && (up.kind(u) != Kind::Dir || up.opaque(u)) {
                removed.insert(path(l));
            }
        }
        if order != Ordering::Less {
            let p = up.path(u);
            // Whiteouts (and their children, which validation forbids) never pass.
            if up.kind(u) == Kind::Whiteout {
                whiteouts.insert(p);
            } else if whiteouts.is_empty() || !under_any(p, &whiteouts) {
                out.push(Pick { layer, index: u });
            }
            u += 1;
        } else {
            let l = lower.next().expect("peeked");
            if removed.is_empty() || !under_any(path(l), &removed) {
                out.push(l);
            }
        }
    }
    out
}

/// Whether any proper ancestor of `path` is in `dirs`.
fn under_any(path: &[u8], dirs: &HashSet<&[u8]>) -> bool {
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

    /// Merging the binary forms in place picks exactly the entries merging manifests keeps.
    fn views_agree(layers: Vec<Manifest>) {
        use crate::store::ObjectId;
        use crate::tree::binary::{encode, TreeView};
        let views: Vec<TreeView> = layers
            .iter()
            .map(|m| TreeView::new(std::sync::Arc::new(encode(m, &ObjectId::of(b"")).unwrap())))
            .collect::<Result<_, _>>()
            .unwrap();
        let picked: Vec<Layered> = merge_picks(&views)
            .into_iter()
            .map(|p| Layered {
                layer: p.layer as usize,
                entry: views[p.layer as usize].entry(p.index).to_entry(),
            })
            .collect();
        assert_eq!(picked, merge(layers));
    }

    #[test]
    fn merging_views_agrees_with_merging_manifests() {
        let mut opaque = entry("d", Kind::Dir, 0o700);
        opaque.opaque = true;
        let layers = [
            Manifest::new(vec![
                entry("", Kind::Dir, 0o755),
                entry("d", Kind::Dir, 0o755),
                entry("d-x", Kind::Dir, 0o755),
                entry("d-x/y", Kind::Fifo, 0),
                entry("d/e", Kind::Dir, 0o755),
                entry("d/e/f", Kind::Fifo, 0),
                entry("g", Kind::Dir, 0o755),
                entry("g/h", Kind::Fifo, 0),
                entry("k", Kind::Fifo, 0),
            ]),
            Manifest::new(vec![
                entry("", Kind::Dir, 0o700),
                opaque,
                entry("d/new", Kind::Fifo, 0),
                whiteout("g"),
                entry("k", Kind::Dir, 0o755),
                entry("k/z", Kind::Fifo, 0),
            ]),
            Manifest::new(vec![
                entry("", Kind::Dir, 0o755),
                entry("d-x", Kind::Fifo, 0),
                entry("g", Kind::Socket, 0),
            ]),
        ];
        for n in 1..=layers.len() {
            views_agree(layers[..n].to_vec());
        }
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
