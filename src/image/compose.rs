//! From merged manifests to the synthesizer's input, and the synthesized layout.

use std::collections::HashMap;
use std::time::Instant;

use tessera_ext4::{
    DataHandle, FileData, FsTree, Layout, Metadata, Node, NodeId, NodeKind, Options, Segment,
    Timestamp,
};

use super::{merged_entries, ImageError, ImageRecord};
use crate::store::{ObjectId, Store};
use crate::tree::merge::Layered;
use crate::tree::{Entry, Kind, Time};

/// An [`FsTree`] whose `DataHandle(i)` is the object `objects[i]`.
#[derive(Debug)]
pub struct Composed {
    pub tree: FsTree,
    pub objects: Vec<ObjectId>,
}

/// A synthesized image: the layout and its handle table.
#[derive(Debug)]
pub struct Built {
    pub layout: Layout,
    pub objects: Vec<ObjectId>,
}

/// Merge the image's trees and lay them out as ext4. Reads manifests only.
pub fn build(store: &Store, record: &ImageRecord) -> Result<Built, ImageError> {
    let start = Instant::now();
    let merged = merged_entries(store, record)?;
    let loaded = start.elapsed();
    let composed = compose(&record.name, &merged)?;
    let composed_at = start.elapsed();
    let layout = tessera_ext4::build(&composed.tree, &options(record)).map_err(|source| {
        ImageError::Ext4 {
            name: record.name.clone(),
            source,
        }
    })?;
    tracing::debug!(
        image = %record.name,
        entries = merged.len(),
        load_ms = loaded.as_millis() as u64,
        compose_ms = (composed_at - loaded).as_millis() as u64,
        layout_ms = (start.elapsed() - composed_at).as_millis() as u64,
        "synthesized"
    );
    Ok(Built {
        layout,
        objects: composed.objects,
    })
}

fn options(record: &ImageRecord) -> Options {
    Options {
        size: record.size,
        inodes: record.inodes,
        uuid: record.uuid,
        label: record.label.as_bytes().to_vec(),
        hash_seed: record.hash_seed,
        checksum_seed: record.checksum_seed,
        timestamp: record.created,
    }
}

/// Turn merged entries (sorted, parents first, as [`crate::tree::merge::merge`] returns) into
/// an [`FsTree`]. Entries of one hardlink group of one layer become one node; identical
/// objects share one handle.
pub fn compose(image: &str, merged: &[Layered]) -> Result<Composed, ImageError> {
    let root = merged.first().expect("a merged tree has a root");
    let mut tree = FsTree::new(metadata(&root.entry));
    let mut dirs: HashMap<&[u8], NodeId> = HashMap::from([(&b""[..], FsTree::ROOT)]);
    let mut links: HashMap<(usize, u64), NodeId> = HashMap::new();
    let mut handles: HashMap<ObjectId, u64> = HashMap::new();
    let mut objects = Vec::new();
    for Layered { layer, entry } in &merged[1..] {
        let err = |source| ImageError::Entry {
            name: image.to_owned(),
            path: entry.path.clone(),
            source,
        };
        let parent = *dirs
            .get(entry.parent().expect("only the root has no parent"))
            .expect("merged trees list parents first");
        if let Some(&node) = entry.link.and_then(|l| links.get(&(*layer, l))) {
            tree.link(parent, entry.name(), node).map_err(err)?;
            continue;
        }
        let mut handle = |id: ObjectId| {
            DataHandle(*handles.entry(id).or_insert_with(|| {
                objects.push(id);
                objects.len() as u64 - 1
            }))
        };
        let kind = node_kind(entry, &mut handle);
        let node = tree
            .add(
                parent,
                entry.name(),
                Node {
                    kind,
                    meta: metadata(entry),
                },
            )
            .map_err(err)?;
        if entry.kind == Kind::Dir {
            dirs.insert(&entry.path.0, node);
        }
        if let Some(link) = entry.link {
            links.insert((*layer, link), node);
        }
    }
    Ok(Composed { tree, objects })
}

fn node_kind(e: &Entry, handle: &mut impl FnMut(ObjectId) -> DataHandle) -> NodeKind {
    let (major, minor) = e.rdev.unwrap_or_default();
    match e.kind {
        Kind::File => NodeKind::File(FileData {
            handle: handle(e.object.expect("validated: files have an object")),
            size: e.size.expect("validated: files have a size"),
            segments: e.segments.as_ref().map(|segs| {
                segs.iter()
                    .map(|s| Segment {
                        offset: s.0,
                        len: s.1,
                    })
                    .collect()
            }),
        }),
        Kind::Dir => NodeKind::Dir(Vec::new()),
        Kind::Symlink => NodeKind::Symlink(
            e.target
                .clone()
                .expect("validated: symlinks have a target")
                .0,
        ),
        Kind::Chardev => NodeKind::CharDev { major, minor },
        Kind::Blockdev => NodeKind::BlockDev { major, minor },
        Kind::Fifo => NodeKind::Fifo,
        Kind::Socket => NodeKind::Socket,
        Kind::Whiteout => unreachable!("merging drops whiteouts"),
    }
}

fn ts(t: Time) -> Timestamp {
    Timestamp {
        sec: t.0,
        nsec: t.1,
    }
}

/// The entry's metadata; an unknown creation time becomes the change time.
fn metadata(e: &Entry) -> Metadata {
    Metadata {
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        atime: ts(e.atime),
        mtime: ts(e.mtime),
        ctime: ts(e.ctime),
        crtime: ts(e.crtime.unwrap_or(e.ctime)),
        xattrs: e
            .xattrs
            .iter()
            .map(|x| tessera_ext4::Xattr {
                name: x.name.0.clone(),
                value: x.value.0.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{merge, Bytes, Manifest};

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: Bytes(path.as_bytes().to_vec()),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            atime: Time(1, 0),
            mtime: Time(2, 0),
            ctime: Time(3, 0),
            crtime: None,
            xattrs: vec![],
            size: None,
            object: None,
            segments: None,
            link: None,
            target: None,
            rdev: None,
            opaque: false,
        }
    }

    fn file(path: &str, content: &[u8], link: Option<u64>) -> Entry {
        let mut e = entry(path, Kind::File);
        e.size = Some(content.len() as u64);
        e.object = Some(ObjectId::of(content));
        e.link = link;
        e
    }

    #[test]
    fn links_share_a_node_and_equal_objects_share_a_handle() {
        let m = Manifest::new(vec![
            entry("", Kind::Dir),
            entry("d", Kind::Dir),
            file("a", b"one", Some(0)),
            file("d/b", b"one", Some(0)),
            file("c", b"one", None),
            file("e", b"two", None),
        ]);
        let composed = compose("t", &merge::merge(vec![m])).unwrap();
        let tree = &composed.tree;
        let d = tree.lookup(FsTree::ROOT, b"d").unwrap();
        let a = tree.lookup(FsTree::ROOT, b"a").unwrap();
        assert_eq!(tree.lookup(d, b"b"), Some(a));
        let c = tree.lookup(FsTree::ROOT, b"c").unwrap();
        assert_ne!(a, c);
        let handle = |n| match &tree.node(n).kind {
            NodeKind::File(f) => f.handle,
            other => panic!("{other:?}"),
        };
        assert_eq!(handle(a), handle(c));
        assert_eq!(composed.objects.len(), 2);
        assert_eq!(composed.objects[handle(a).0 as usize], ObjectId::of(b"one"));
    }

    #[test]
    fn link_groups_are_per_layer() {
        let lower = Manifest::new(vec![entry("", Kind::Dir), file("a", b"x", Some(0))]);
        let upper = Manifest::new(vec![entry("", Kind::Dir), file("b", b"x", Some(0))]);
        let composed = compose("t", &merge::merge(vec![lower, upper])).unwrap();
        let t = &composed.tree;
        assert_ne!(t.lookup(FsTree::ROOT, b"a"), t.lookup(FsTree::ROOT, b"b"));
    }

    #[test]
    fn unknown_crtime_falls_back_to_ctime() {
        let m = metadata(&entry("x", Kind::Fifo));
        assert_eq!(m.crtime, Timestamp { sec: 3, nsec: 0 });
    }
}
