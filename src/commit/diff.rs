//! What a guest changed: the overlay's filesystem, walked, against the base image's merged
//! tree, as a tree of changes to stack over the base's trees.
//!
//! # What counts as a change
//! An entry is emitted when its path is new, or when any of these differ from the base
//! entry: kind, permission bits, owner, mtime, crtime (when the inode records one),
//! xattrs (as a set), file contents (object and sparse segments), symlink target, device
//! numbers, or hardlink grouping. Not changes, because the kernel alters them as a side
//! effect of other operations: atime (reads), ctime (any metadata update, including a
//! link count change), directory sizes (entries come and go), and a `lost+found` the base
//! lacked while it is empty (the synthesizer creates it; `e2fsck` may touch it).
//!
//! A changed entry's parents are emitted too (a tree names every ancestor), with the
//! overlay's metadata, which changes nothing when they did not change. A base path gone
//! from the overlay becomes a whiteout, at its topmost missing path only. A directory whose
//! inode number differs from the base's was deleted and re-created: it is emitted `opaque`
//! with its whole subtree (and no whiteouts below it); the guest may also have reused the
//! inode number, in which case the per-entry comparison gives the same result.
//!
//! Hardlinks: the paths of one overlay inode are one group. A group is emitted whole, as a
//! link group of the new tree, unless every path is unchanged and was already one group of
//! one base layer.

use std::collections::{HashMap, HashSet};

use tessera_ext4::read::{InodeKind, WalkEntry};

use crate::store::ObjectId;
use crate::tree::merge::Layered;
use crate::tree::{Bytes, Entry, Kind, Segment, Time, Xattr};

/// File contents and link targets of the overlay, read on demand.
pub(crate) trait Source {
    type Error;
    /// The file's object and segments; `base` is the base entry at the same path, if any,
    /// which an implementation may reuse when it can prove the data unchanged.
    fn content(
        &mut self,
        w: &WalkEntry,
        base: Option<&Entry>,
    ) -> Result<(ObjectId, Option<Vec<Segment>>), Self::Error>;
    fn target(&mut self, w: &WalkEntry) -> Result<Vec<u8>, Self::Error>;
}

/// The tree of changes and what it holds.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// Sorted by path, root first; a valid manifest's entries.
    pub entries: Vec<Entry>,
    pub added: usize,
    pub changed: usize,
    pub deleted: usize,
}

struct Candidate {
    entry: Entry,
    ino: u32,
    in_base: bool,
    differs: bool,
    emit: bool,
    /// Counted as added/changed (not only there as a parent).
    counted: bool,
}

fn time(t: tessera_ext4::Timestamp) -> Time {
    Time(t.sec, t.nsec)
}

fn kind(k: InodeKind) -> (Kind, Option<(u32, u32)>) {
    match k {
        InodeKind::File => (Kind::File, None),
        InodeKind::Dir => (Kind::Dir, None),
        InodeKind::Symlink => (Kind::Symlink, None),
        InodeKind::CharDev { major, minor } => (Kind::Chardev, Some((major, minor))),
        InodeKind::BlockDev { major, minor } => (Kind::Blockdev, Some((major, minor))),
        InodeKind::Fifo => (Kind::Fifo, None),
        InodeKind::Socket => (Kind::Socket, None),
    }
}

fn sorted_xattrs(x: &[Xattr]) -> Vec<&Xattr> {
    let mut v: Vec<&Xattr> = x.iter().collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// A segment list covering the whole file is a dense file.
fn normalized(segments: &Option<Vec<Segment>>, size: Option<u64>) -> Option<&[Segment]> {
    match segments.as_deref() {
        Some([only]) if only.0 == 0 && Some(only.1) == size => None,
        other => other,
    }
}

/// Equal in everything that counts as a change (see the module documentation).
fn same(e: &Entry, b: &Entry) -> bool {
    e.kind == b.kind
        && e.mode == b.mode
        && e.uid == b.uid
        && e.gid == b.gid
        && e.mtime == b.mtime
        // The synthesizer writes ctime where a tree has no crtime.
        && e.crtime.is_none_or(|c| c == b.crtime.unwrap_or(b.ctime))
        && sorted_xattrs(&e.xattrs) == sorted_xattrs(&b.xattrs)
        && e.size == b.size
        && e.object == b.object
        && normalized(&e.segments, e.size) == normalized(&b.segments, b.size)
        && e.target == b.target
        && e.rdev == b.rdev
}

fn parent(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => &[],
    }
}

/// Whether any proper ancestor of `path` is in `dirs`.
fn under_any(path: &[u8], dirs: &HashSet<Vec<u8>>) -> bool {
    if dirs.is_empty() || path.is_empty() {
        return false;
    }
    dirs.contains(&b""[..])
        || path
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'/')
            .any(|(i, _)| dirs.contains(&path[..i]))
}

/// Compare the overlay's walk (`over`, path-sorted, as [`Filesystem::walk`] returns) with
/// the base image's merged entries; `base_inos` are the inode numbers of the base image's
/// own filesystem by path.
///
/// [`Filesystem::walk`]: tessera_ext4::read::Filesystem::walk
pub(crate) fn changes<S: Source>(
    over: &[WalkEntry],
    base: &[Layered],
    base_inos: &HashMap<Vec<u8>, u32>,
    source: &mut S,
) -> Result<Changes, S::Error> {
    let base_by_path: HashMap<&[u8], &Layered> =
        base.iter().map(|l| (&l.entry.path.0[..], l)).collect();
    let over_paths: HashMap<&[u8], usize> = over
        .iter()
        .enumerate()
        .map(|(i, w)| (&w.path[..], i))
        .collect();
    let mut opaque: HashSet<Vec<u8>> = HashSet::new();
    let mut cands: Vec<Candidate> = Vec::with_capacity(over.len());
    let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
    for (i, w) in over.iter().enumerate() {
        let synthesized_lost_found = w.path == b"lost+found"
            && w.inode.kind == InodeKind::Dir
            && !base_by_path.contains_key(&b"lost+found"[..])
            && !over
                .get(i + 1)
                .is_some_and(|n| n.path.starts_with(b"lost+found/"));
        if synthesized_lost_found {
            continue;
        }
        let b = if under_any(&w.path, &opaque) {
            None
        } else {
            base_by_path.get(&w.path[..]).map(|l| &l.entry)
        };
        let mut entry = entry_of(w, b, source)?;
        if w.inode.kind == InodeKind::Dir
            && b.is_some_and(|b| b.kind == Kind::Dir)
            && base_inos
                .get(&w.path)
                .is_some_and(|&ino| ino != w.inode.ino)
        {
            entry.opaque = true;
            opaque.insert(w.path.clone());
        }
        let differs = entry.opaque || b.is_none_or(|b| !same(&entry, b));
        index.insert(w.path.clone(), cands.len());
        cands.push(Candidate {
            entry,
            ino: w.inode.ino,
            in_base: b.is_some(),
            differs,
            emit: differs,
            counted: differs,
        });
    }
    link_groups(&mut cands, &base_by_path, &opaque);

    // Whiteouts: base paths gone from the overlay, below a directory that is still there.
    let mut whiteouts = Vec::new();
    for l in base.iter().skip(1) {
        let p = &l.entry.path.0[..];
        if over_paths.contains_key(p) || under_any(p, &opaque) {
            continue;
        }
        let dir = parent(p);
        let parent_is_dir = over_paths
            .get(dir)
            .is_some_and(|&i| over[i].inode.kind == InodeKind::Dir);
        if parent_is_dir {
            whiteouts.push(whiteout(p));
        }
    }

    // Parents of everything emitted.
    let mut need: Vec<Vec<u8>> = cands
        .iter()
        .filter(|c| c.emit)
        .map(|c| c.entry.path.0.clone())
        .chain(whiteouts.iter().map(|w| w.path.0.clone()))
        .collect();
    while let Some(p) = need.pop() {
        if p.is_empty() {
            continue;
        }
        let dir = parent(&p).to_vec();
        if let Some(&i) = index.get(&dir) {
            if !cands[i].emit {
                cands[i].emit = true;
                need.push(dir);
            }
        }
    }
    if let Some(root) = cands.first_mut() {
        root.emit = true;
    }

    let mut out = Changes {
        deleted: whiteouts.len(),
        ..Changes::default()
    };
    for c in &cands {
        if c.counted {
            if c.in_base {
                out.changed += 1;
            } else {
                out.added += 1;
            }
        }
    }
    out.entries = cands
        .into_iter()
        .filter(|c| c.emit)
        .map(|c| c.entry)
        .chain(whiteouts)
        .collect();
    out.entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Emit every path of an overlay inode with several paths when any of them changed or they
/// were not one base group; give emitted groups a link id (the overlay inode number).
fn link_groups(
    cands: &mut [Candidate],
    base: &HashMap<&[u8], &Layered>,
    opaque: &HashSet<Vec<u8>>,
) {
    let mut groups: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, c) in cands.iter().enumerate() {
        if c.entry.kind != Kind::Dir {
            groups.entry(c.ino).or_default().push(i);
        }
    }
    for members in groups.values().filter(|m| m.len() > 1) {
        let base_group = |i: &usize| {
            let p = &cands[*i].entry.path.0[..];
            if under_any(p, opaque) {
                return None;
            }
            base.get(p)
                .and_then(|l| l.entry.link.map(|link| (l.layer, link)))
        };
        let first = base_group(&members[0]);
        let kept = first.is_some()
            && members
                .iter()
                .all(|i| !cands[*i].differs && base_group(i) == first);
        if kept {
            continue;
        }
        for &i in members {
            let c = &mut cands[i];
            c.entry.link = Some(c.ino as u64);
            if !c.emit {
                c.emit = true;
                c.counted = true;
            }
        }
    }
}

fn whiteout(path: &[u8]) -> Entry {
    Entry {
        path: Bytes(path.to_vec()),
        kind: Kind::Whiteout,
        mode: 0,
        uid: 0,
        gid: 0,
        atime: Time::default(),
        mtime: Time::default(),
        ctime: Time::default(),
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

/// The tree entry for an overlay path (no link group yet).
fn entry_of<S: Source>(
    w: &WalkEntry,
    base: Option<&Entry>,
    source: &mut S,
) -> Result<Entry, S::Error> {
    let m = &w.inode.meta;
    let (kind, rdev) = kind(w.inode.kind);
    let mut e = Entry {
        path: Bytes(w.path.clone()),
        kind,
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
        atime: time(m.atime),
        mtime: time(m.mtime),
        ctime: time(m.ctime),
        crtime: w.inode.has_crtime.then(|| time(m.crtime)),
        xattrs: m
            .xattrs
            .iter()
            .map(|x| Xattr {
                name: Bytes(x.name.clone()),
                value: Bytes(x.value.clone()),
            })
            .collect(),
        size: None,
        object: None,
        segments: None,
        link: None,
        target: None,
        rdev,
        opaque: false,
    };
    match kind {
        Kind::File => {
            let (object, segments) = source.content(w, base)?;
            e.size = Some(w.inode.size);
            e.object = Some(object);
            e.segments = segments;
        }
        Kind::Symlink => e.target = Some(Bytes(source.target(w)?)),
        _ => {}
    }
    Ok(e)
}
