//! From merged manifests to the synthesizer's input, and the synthesized layout.

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use tessera_ext4::{
    DataHandle, FileData, FsTree, Layout, Metadata, MetadataBlocks, Node, NodeId, NodeKind,
    Options, Segment, Summary, Timestamp,
};

use super::{load_tree_view, ImageError, ImageRecord};
use crate::store::{ObjectId, Store};
use crate::tree::binary::{EntryRef, TreeView};
use crate::tree::merge::{self, Pick};
use crate::tree::{Bytes, Kind, Time};

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

/// What [`plan`] learns without synthesizing: the image lays out, its size and counts.
#[derive(Debug, Clone, Copy)]
pub struct Planned {
    pub summary: Summary,
    /// Distinct objects the image's files point at.
    pub objects: usize,
}

/// Merge the image's trees and lay them out as ext4. Reads manifests only.
pub fn build(store: &Store, record: &ImageRecord) -> Result<Built, ImageError> {
    let (layout, objects) = lay_out(store, record, "synthesized", |tree, opts| {
        tessera_ext4::build(&tree, opts)
    })?;
    Ok(Built { layout, objects })
}

/// Lay out the image as [`build`] does, generating its metadata as reads reach it (see
/// [`tessera_ext4::build_on_demand`]): its first read waits for the block map, not for every
/// inode table and directory.
pub fn build_on_demand(
    store: &Store,
    record: &ImageRecord,
) -> Result<(Layout, MetadataBlocks, Vec<ObjectId>), ImageError> {
    let ((layout, meta), objects) = lay_out(
        store,
        record,
        "laid out (metadata on demand)",
        tessera_ext4::build_on_demand,
    )?;
    Ok((layout, meta, objects))
}

/// The distinct objects of `layout` (whose handles index `objects`) in the order a reader
/// of the whole image meets them: the order to pack them in.
pub fn read_order(layout: &Layout, objects: &[ObjectId]) -> Vec<ObjectId> {
    let mut order = Vec::new();
    let mut seen = rustc_hash::FxHashSet::default();
    for piece in layout.pieces(0, layout.size()) {
        if let tessera_ext4::Piece::Data { handle, .. } = piece {
            let id = objects[handle.0 as usize];
            if seen.insert(id) {
                order.push(id);
            }
        }
    }
    order
}

/// [`read_order`] of the image `record` describes, its trees given as `layers` rather
/// than read from the store: an import packs a tree's objects before it stores the tree.
pub fn read_order_of(
    record: &ImageRecord,
    layers: &[TreeView],
) -> Result<Vec<ObjectId>, ImageError> {
    let picks = merge::merge_picks(layers);
    let composed = compose(&record.name, layers, &picks)?;
    let (layout, _meta) = tessera_ext4::build_on_demand(composed.tree, &options(record))
        .map_err(|source| ext4_error(record, source))?;
    Ok(read_order(&layout, &composed.objects))
}

/// Check that the image lays out as ext4 and find its size and counts, as [`build`] would,
/// without generating its metadata.
pub fn plan(store: &Store, record: &ImageRecord) -> Result<Planned, ImageError> {
    let (summary, objects) = lay_out(store, record, "planned", |tree, opts| {
        tessera_ext4::plan(&tree, opts)
    })?;
    Ok(Planned {
        summary,
        objects: objects.len(),
    })
}

/// Load and compose `record`'s trees, then run `step` (the synthesizer's `build`,
/// `build_on_demand` or `plan`) on the tree, logging how long each part took under `what`.
/// Returns what `step` made and the objects behind the tree's data handles.
fn lay_out<T>(
    store: &Store,
    record: &ImageRecord,
    what: &str,
    step: impl FnOnce(FsTree, &Options) -> Result<T, tessera_ext4::Error>,
) -> Result<(T, Vec<ObjectId>), ImageError> {
    let start = Instant::now();
    let (composed, entries, loaded) = load_and_compose(store, record)?;
    let composed_at = start.elapsed();
    let out = step(composed.tree, &options(record)).map_err(|source| ext4_error(record, source))?;
    tracing::debug!(
        image = %record.name,
        entries,
        load_ms = loaded.as_millis() as u64,
        compose_ms = (composed_at - loaded).as_millis() as u64,
        ext4_ms = (start.elapsed() - composed_at).as_millis() as u64,
        "{what}"
    );
    Ok((out, composed.objects))
}

fn ext4_error(record: &ImageRecord, source: tessera_ext4::Error) -> ImageError {
    ImageError::Ext4 {
        name: record.name.clone(),
        source,
    }
}

/// The merged tree of `record`, the number of merged entries and the time loading took.
fn load_and_compose(
    store: &Store,
    record: &ImageRecord,
) -> Result<(Composed, usize, Duration), ImageError> {
    let start = Instant::now();
    let layers = record
        .trees
        .iter()
        .map(|id| load_tree_view(store, id))
        .collect::<Result<Vec<_>, _>>()?;
    let picks = merge::merge_picks(&layers);
    let loaded = start.elapsed();
    Ok((compose(&record.name, &layers, &picks)?, picks.len(), loaded))
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

/// Turn merged entries (`picks` into `layers`, sorted, parents first, as
/// [`merge::merge_picks`] returns them) into an [`FsTree`], reading the layers in place.
/// Entries of one hardlink group of one layer become one node; identical objects share one
/// handle.
pub fn compose(image: &str, layers: &[TreeView], picks: &[Pick]) -> Result<Composed, ImageError> {
    let root = picks.first().expect("a merged tree has a root");
    // Sized for every pick up front: growing the tables copied them and rehashed the map.
    let mut tree = FsTree::with_capacity(
        metadata(&layers[root.layer as usize].entry(root.index)),
        picks.len(),
    );
    // The node of each directory entry that made it into the tree, per layer; a directory
    // replaced by an upper layer's is found by path instead.
    let mut dir_nodes: Vec<Vec<NodeId>> = layers.iter().map(|_| Vec::new()).collect();
    dir_nodes[root.layer as usize] = vec![NodeId::MAX; layers[root.layer as usize].len()];
    dir_nodes[root.layer as usize][root.index as usize] = FsTree::ROOT;
    let mut dirs_by_path: FxHashMap<&[u8], NodeId> = FxHashMap::default();
    dirs_by_path.insert(&b""[..], FsTree::ROOT);
    let mut links: FxHashMap<(u32, u64), NodeId> = FxHashMap::default();
    let mut handles: FxHashMap<ObjectId, u32> =
        FxHashMap::with_capacity_and_hasher(picks.len(), Default::default());
    let mut objects = Vec::with_capacity(picks.len());
    for &Pick { layer, index } in &picks[1..] {
        let view = &layers[layer as usize];
        let entry = view.entry(index);
        let err = |source| ImageError::Entry {
            name: image.to_owned(),
            path: Bytes(entry.path().to_vec()),
            source,
        };
        let nodes = &mut dir_nodes[layer as usize];
        if nodes.is_empty() {
            *nodes = vec![NodeId::MAX; view.len()];
        }
        let parent = match nodes[entry.parent() as usize] {
            NodeId::MAX => {
                let path = view.entry(entry.parent()).path();
                *dirs_by_path
                    .get(path)
                    .expect("merged trees list parents first")
            }
            node => node,
        };
        if let Some(&node) = entry.link().and_then(|l| links.get(&(layer, l))) {
            tree.link(parent, entry.name(), node).map_err(err)?;
            continue;
        }
        let mut handle = |id: ObjectId| {
            DataHandle(*handles.entry(id).or_insert_with(|| {
                objects.push(id);
                // Fewer objects than nodes, whose ids are 32 bits.
                objects.len() as u32 - 1
            }))
        };
        let kind = node_kind(&entry, &mut handle);
        let node = tree
            .add(
                parent,
                entry.name(),
                Node {
                    kind,
                    meta: metadata(&entry),
                },
            )
            .map_err(err)?;
        if entry.kind() == Kind::Dir {
            dir_nodes[layer as usize][index as usize] = node;
            // Only a directory of a lower layer replaced by an upper one is found by path.
            if layers.len() > 1 {
                dirs_by_path.insert(entry.path(), node);
            }
        }
        if let Some(link) = entry.link() {
            links.insert((layer, link), node);
        }
    }
    Ok(Composed { tree, objects })
}

fn node_kind(e: &EntryRef<'_>, handle: &mut impl FnMut(ObjectId) -> DataHandle) -> NodeKind {
    let (major, minor) = e.rdev().unwrap_or_default();
    match e.kind() {
        Kind::File => NodeKind::File(FileData {
            handle: handle(e.object().expect("files have an object")),
            size: e.size().expect("files have a size"),
            segments: e.segments().map(|segs| {
                segs.map(|s| Segment {
                    offset: s.0,
                    len: s.1,
                })
                .collect()
            }),
        }),
        Kind::Dir => NodeKind::Dir(Vec::new()),
        Kind::Symlink => NodeKind::Symlink(e.target().expect("symlinks have a target").to_vec()),
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
fn metadata(e: &EntryRef<'_>) -> Metadata {
    Metadata {
        mode: e.mode(),
        uid: e.uid(),
        gid: e.gid(),
        atime: ts(e.atime()),
        mtime: ts(e.mtime()),
        ctime: ts(e.ctime()),
        crtime: ts(e.crtime().unwrap_or(e.ctime())),
        xattrs: e
            .xattrs()
            .map(|(name, value)| tessera_ext4::Xattr {
                name: name.to_vec(),
                value: value.to_vec(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{binary, Entry, Manifest};

    fn compose_manifests(layers: Vec<Manifest>) -> Result<Composed, ImageError> {
        let views: Vec<TreeView> = layers
            .iter()
            .map(|m| {
                let bytes = binary::encode(m, &ObjectId::of(&m.to_bytes())).unwrap();
                TreeView::new(std::sync::Arc::new(bytes)).unwrap()
            })
            .collect();
        compose("t", &views, &merge::merge_picks(&views))
    }

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
        let composed = compose_manifests(vec![m]).unwrap();
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
        let composed = compose_manifests(vec![lower, upper]).unwrap();
        let t = &composed.tree;
        assert_ne!(t.lookup(FsTree::ROOT, b"a"), t.lookup(FsTree::ROOT, b"b"));
    }

    #[test]
    fn unknown_crtime_falls_back_to_ctime() {
        let m = Manifest::new(vec![entry("", Kind::Dir)]);
        let bytes = binary::encode(&m, &ObjectId::of(b"")).unwrap();
        let view = TreeView::new(std::sync::Arc::new(bytes)).unwrap();
        let meta = metadata(&view.entry(0));
        assert_eq!(meta.crtime, Timestamp { sec: 3, nsec: 0 });
    }
}
