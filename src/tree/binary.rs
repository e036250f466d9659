//! The binary form of a tree manifest: fixed-size little-endian records read in place from a
//! memory map, with no parse step and no allocation per entry.
//!
//! # Which form names a tree
//!
//! A tree's id stays the BLAKE3 of its format-1 JSON (see [`crate::tree`]): that is what
//! imports and `overlay commit` write to `trees/`, what existing stores hold and what a remote
//! store pushes. The binary form is derived from the JSON, one per tree, and kept beside it
//! as a cache (`treecache/` in the store): it carries the id of the JSON it came from, it is
//! written the first time a tree is loaded (or by the import that stores it) and it can be
//! deleted at any time. So tree ids never change, old stores need no migration, and nothing
//! but a local cache depends on this format; a cache of an unknown version is rebuilt.
//!
//! # Binary format 1
//!
//! All integers little-endian; every section starts at a multiple of 8 bytes because every
//! record size is a multiple of 8, and the file is exactly the header plus its sections.
//!
//! ```text
//! header, 64 bytes
//!   0  magic          8   b"tsrtree\n"
//!   8  version        u32 1
//!  12  entries        u32 number of entry records
//!  16  tree           32  BLAKE3 of the JSON manifest this was derived from (the tree id)
//!  48  objects        u32 number of object ids
//!  52  segments       u32 number of segment records
//!  56  xattrs         u32 number of xattr records
//!  60  heap           u32 bytes of the heap
//! entries   entries × 112 bytes, in the manifest's order (sorted by path, root first)
//!   0  path_off u32, 4 path_len u32      the path, in the heap
//!   8  parent   u32                      index of the parent entry (0 for the root)
//!  12  kind     u8                       0 file 1 dir 2 symlink 3 chardev 4 blockdev
//!                                        5 fifo 6 socket 7 whiteout
//!  13  flags    u8                       1 opaque, 2 has crtime, 4 has link, 8 has segments
//!  14  mode     u16
//!  16  uid u32, 20 gid u32
//!  24  atime, 32 mtime, 40 ctime, 48 crtime: seconds, i64
//!  56  atime, 60 mtime, 64 ctime, 68 crtime: nanoseconds, u32
//!  72  size     u64                      files: st_size; devices: major u32, minor u32
//!  80  link     u64                      hardlink group (flag 4)
//!  88  aux      u32                      files: object index; symlinks: target offset in the heap
//!  92  aux_len  u32                      symlinks: target length
//!  96  seg_first u32, 100 seg_count u32  the file's segments (flag 8)
//! 104  xattr_first u32, 108 xattr_count u32
//! objects   objects × 32 bytes: object ids of the files, in entry order
//! segments  segments × 16 bytes: offset u64, length u64
//! xattrs    xattrs × 16 bytes: name_off u32, name_len u32, value_off u32, value_len u32
//! heap      heap bytes: paths, symlink targets, xattr names and values
//! ```
//!
//! [`TreeView::new`] checks, in one pass without allocating, everything a reader relies on
//! not to panic or misbehave: sizes, every range inside its section, kinds, paths sorted and
//! unique, each parent an earlier directory whose path prefixes the entry's. The JSON's
//! remaining rules (checked by [`Manifest::validate`] before encoding) are trusted.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use super::{Bytes, Entry, Kind, Manifest, Segment, Time, Xattr};
use crate::store::ObjectId;

/// The binary format this version writes and reads.
pub const BINARY_FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"tsrtree\n";
const HEADER: usize = 64;
const ENTRY: usize = 112;
const OBJECT: usize = 32;
const SEGMENT: usize = 16;
const XATTR: usize = 16;

const OPAQUE: u8 = 1;
const HAS_CRTIME: u8 = 2;
const HAS_LINK: u8 = 4;
const HAS_SEGMENTS: u8 = 8;

/// Why bytes are not a usable binary manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BinaryError {
    #[error("not a binary tree manifest (bad magic or short header)")]
    Magic,
    #[error("binary tree manifest version {0} (this tessera reads {BINARY_FORMAT})")]
    Version(u32),
    #[error("binary tree manifest is {actual} bytes, its header says {expected}")]
    Length { expected: u64, actual: u64 },
    #[error("binary tree manifest entry {index}: {why}")]
    Entry { index: u32, why: &'static str },
    #[error("a manifest too large for binary format 1 ({0} over 4 GiB)")]
    TooLarge(&'static str),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn kind_code(k: Kind) -> u8 {
    match k {
        Kind::File => 0,
        Kind::Dir => 1,
        Kind::Symlink => 2,
        Kind::Chardev => 3,
        Kind::Blockdev => 4,
        Kind::Fifo => 5,
        Kind::Socket => 6,
        Kind::Whiteout => 7,
    }
}

fn kind_of(code: u8) -> Option<Kind> {
    Some(match code {
        0 => Kind::File,
        1 => Kind::Dir,
        2 => Kind::Symlink,
        3 => Kind::Chardev,
        4 => Kind::Blockdev,
        5 => Kind::Fifo,
        6 => Kind::Socket,
        7 => Kind::Whiteout,
        _ => return None,
    })
}

/// Encode a validated manifest derived from the JSON whose id is `tree`.
pub fn encode(manifest: &Manifest, tree: &ObjectId) -> Result<Vec<u8>, BinaryError> {
    let n = manifest.entries.len();
    let mut entries = Vec::with_capacity(n * ENTRY);
    let mut objects = Vec::new();
    let mut segments = Vec::new();
    let mut xattrs = Vec::new();
    let mut heap = Vec::new();
    fn put(heap: &mut Vec<u8>, b: &[u8]) -> Result<(u32, u32), BinaryError> {
        let at = u32::try_from(heap.len()).map_err(|_| BinaryError::TooLarge("heap"))?;
        heap.extend_from_slice(b);
        u32::try_from(heap.len()).map_err(|_| BinaryError::TooLarge("heap"))?;
        Ok((at, b.len() as u32))
    }
    // Parents come before children (sorted paths), so a map of directory paths so far finds them.
    let mut dirs: std::collections::HashMap<&[u8], u32> = std::collections::HashMap::new();
    for (i, e) in manifest.entries.iter().enumerate() {
        let mut r = [0u8; ENTRY];
        let (path_off, path_len) = put(&mut heap, &e.path.0)?;
        r[0..4].copy_from_slice(&path_off.to_le_bytes());
        r[4..8].copy_from_slice(&path_len.to_le_bytes());
        let parent = e.parent().map_or(0, |p| dirs.get(p).copied().unwrap_or(0));
        r[8..12].copy_from_slice(&parent.to_le_bytes());
        r[12] = kind_code(e.kind);
        r[13] = (e.opaque as u8 * OPAQUE)
            | (e.crtime.is_some() as u8 * HAS_CRTIME)
            | (e.link.is_some() as u8 * HAS_LINK)
            | (e.segments.is_some() as u8 * HAS_SEGMENTS);
        r[14..16].copy_from_slice(&e.mode.to_le_bytes());
        r[16..20].copy_from_slice(&e.uid.to_le_bytes());
        r[20..24].copy_from_slice(&e.gid.to_le_bytes());
        let crtime = e.crtime.unwrap_or_default();
        for (k, t) in [e.atime, e.mtime, e.ctime, crtime].iter().enumerate() {
            r[24 + 8 * k..32 + 8 * k].copy_from_slice(&t.0.to_le_bytes());
            r[56 + 4 * k..60 + 4 * k].copy_from_slice(&t.1.to_le_bytes());
        }
        let size = match (e.size, e.rdev) {
            (Some(s), _) => s,
            (None, Some((major, minor))) => major as u64 | (minor as u64) << 32,
            (None, None) => 0,
        };
        r[72..80].copy_from_slice(&size.to_le_bytes());
        r[80..88].copy_from_slice(&e.link.unwrap_or(0).to_le_bytes());
        let (aux, aux_len) = match (&e.object, &e.target) {
            (Some(id), _) => {
                objects.extend_from_slice(&id.0);
                ((objects.len() / OBJECT - 1) as u32, 0)
            }
            (None, Some(t)) => put(&mut heap, &t.0)?,
            (None, None) => (0, 0),
        };
        r[88..92].copy_from_slice(&aux.to_le_bytes());
        r[92..96].copy_from_slice(&aux_len.to_le_bytes());
        let segs = e.segments.as_deref().unwrap_or_default();
        r[96..100].copy_from_slice(&((segments.len() / SEGMENT) as u32).to_le_bytes());
        r[100..104].copy_from_slice(&(segs.len() as u32).to_le_bytes());
        for s in segs {
            segments.extend_from_slice(&s.0.to_le_bytes());
            segments.extend_from_slice(&s.1.to_le_bytes());
        }
        r[104..108].copy_from_slice(&((xattrs.len() / XATTR) as u32).to_le_bytes());
        r[108..112].copy_from_slice(&(e.xattrs.len() as u32).to_le_bytes());
        for x in &e.xattrs {
            let (no, nl) = put(&mut heap, &x.name.0)?;
            let (vo, vl) = put(&mut heap, &x.value.0)?;
            for v in [no, nl, vo, vl] {
                xattrs.extend_from_slice(&v.to_le_bytes());
            }
        }
        if e.kind == Kind::Dir {
            dirs.insert(&e.path.0, i as u32);
        }
        entries.extend_from_slice(&r);
    }
    let count = |len: usize, what| u32::try_from(len).map_err(|_| BinaryError::TooLarge(what));
    let mut out = Vec::with_capacity(
        HEADER + entries.len() + objects.len() + segments.len() + xattrs.len() + heap.len(),
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&BINARY_FORMAT.to_le_bytes());
    out.extend_from_slice(&count(n, "entries")?.to_le_bytes());
    out.extend_from_slice(&tree.0);
    out.extend_from_slice(&count(objects.len() / OBJECT, "objects")?.to_le_bytes());
    out.extend_from_slice(&count(segments.len() / SEGMENT, "segments")?.to_le_bytes());
    out.extend_from_slice(&count(xattrs.len() / XATTR, "xattrs")?.to_le_bytes());
    out.extend_from_slice(&count(heap.len(), "heap")?.to_le_bytes());
    for section in [entries, objects, segments, xattrs, heap] {
        out.extend_from_slice(&section);
    }
    Ok(out)
}

/// Bytes a [`TreeView`] reads: a memory map of a cache file, or an owned buffer.
pub type Backing = Arc<dyn Deref<Target = [u8]> + Send + Sync>;

/// A checked binary manifest, read in place. Cheap to clone (the bytes are shared).
#[derive(Clone)]
pub struct TreeView {
    bytes: Backing,
    tree: ObjectId,
    len: u32,
    objects_at: usize,
    segments_at: usize,
    xattrs_at: usize,
    heap_at: usize,
    heap_len: usize,
}

impl fmt::Debug for TreeView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TreeView")
            .field("tree", &self.tree)
            .field("entries", &self.len)
            .finish()
    }
}

impl TreeView {
    /// Check `bytes` (see the module documentation) and read them in place.
    pub fn new(bytes: Backing) -> Result<TreeView, BinaryError> {
        let b: &[u8] = &bytes;
        if b.len() < HEADER || &b[..8] != MAGIC {
            return Err(BinaryError::Magic);
        }
        let version = u32_at(b, 8);
        if version != BINARY_FORMAT {
            return Err(BinaryError::Version(version));
        }
        let len = u32_at(b, 12);
        let tree = ObjectId(b[16..48].try_into().expect("32 bytes"));
        let (objects, segments, xattrs, heap) = (
            u32_at(b, 48) as u64,
            u32_at(b, 52) as u64,
            u32_at(b, 56) as u64,
            u32_at(b, 60) as u64,
        );
        let expected = HEADER as u64
            + len as u64 * ENTRY as u64
            + objects * OBJECT as u64
            + segments * SEGMENT as u64
            + xattrs * XATTR as u64
            + heap;
        if expected != b.len() as u64 {
            return Err(BinaryError::Length {
                expected,
                actual: b.len() as u64,
            });
        }
        let objects_at = HEADER + len as usize * ENTRY;
        let segments_at = objects_at + objects as usize * OBJECT;
        let xattrs_at = segments_at + segments as usize * SEGMENT;
        let heap_at = xattrs_at + xattrs as usize * XATTR;
        let view = TreeView {
            tree,
            len,
            objects_at,
            segments_at,
            xattrs_at,
            heap_at,
            heap_len: heap as usize,
            bytes,
        };
        view.check(objects as u32, segments as u32, xattrs as u32)?;
        Ok(view)
    }

    fn check(&self, objects: u32, segments: u32, xattrs: u32) -> Result<(), BinaryError> {
        let in_heap = |off: u32, len: u32| off as u64 + len as u64 <= self.heap_len as u64;
        let in_range = |first: u32, n: u32, total: u32| first as u64 + n as u64 <= total as u64;
        if self.len == 0 {
            return Err(BinaryError::Entry {
                index: 0,
                why: "no root entry",
            });
        }
        let mut prev: &[u8] = &[];
        for index in 0..self.len {
            let bad = |why| Err(BinaryError::Entry { index, why });
            let r = self.record(index);
            if !in_heap(u32_at(r, 0), u32_at(r, 4)) {
                return bad("path outside the heap");
            }
            let Some(kind) = kind_of(r[12]) else {
                return bad("unknown kind");
            };
            let path = self.entry(index).path();
            let parent = u32_at(r, 8);
            if index == 0 {
                if !path.is_empty() || kind != Kind::Dir {
                    return bad("the first entry must be the root directory");
                }
            } else {
                if path <= prev {
                    return bad("paths not sorted and unique");
                }
                let pp = self.entry(parent.min(index - 1)).path();
                let under = if pp.is_empty() {
                    !path.contains(&b'/')
                } else {
                    path.len() > pp.len() + 1
                        && path.starts_with(pp)
                        && path[pp.len()] == b'/'
                        && !path[pp.len() + 1..].contains(&b'/')
                };
                if parent >= index || self.entry(parent).kind() != Kind::Dir || !under {
                    return bad("parent is not an earlier directory holding the entry");
                }
            }
            prev = path;
            match kind {
                Kind::File if u32_at(r, 88) >= objects => return bad("object index out of range"),
                Kind::Symlink if !in_heap(u32_at(r, 88), u32_at(r, 92)) => {
                    return bad("symlink target outside the heap")
                }
                _ => {}
            }
            if !in_range(u32_at(r, 96), u32_at(r, 100), segments) {
                return bad("segments out of range");
            }
            if !in_range(u32_at(r, 104), u32_at(r, 108), xattrs) {
                return bad("xattrs out of range");
            }
        }
        for i in 0..xattrs {
            let x = &self.bytes[self.xattrs_at + i as usize * XATTR..][..XATTR];
            if !in_heap(u32_at(x, 0), u32_at(x, 4)) || !in_heap(u32_at(x, 8), u32_at(x, 12)) {
                return Err(BinaryError::Entry {
                    index: self.len,
                    why: "xattr outside the heap",
                });
            }
        }
        Ok(())
    }

    /// The id of the JSON manifest this was derived from.
    pub fn tree(&self) -> &ObjectId {
        &self.tree
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn record(&self, i: u32) -> &[u8] {
        &self.bytes[HEADER + i as usize * ENTRY..][..ENTRY]
    }

    fn heap(&self, off: u32, len: u32) -> &[u8] {
        &self.bytes[self.heap_at + off as usize..][..len as usize]
    }

    /// Entry `i` (`0` is the root). Panics past [`TreeView::len`].
    pub fn entry(&self, i: u32) -> EntryRef<'_> {
        EntryRef {
            view: self,
            r: self.record(i),
        }
    }

    pub fn entries(&self) -> impl Iterator<Item = EntryRef<'_>> {
        (0..self.len).map(|i| self.entry(i))
    }

    /// The owned manifest (for tests and tools; readers use the view in place).
    pub fn to_manifest(&self) -> Manifest {
        Manifest {
            format: super::FORMAT,
            entries: self.entries().map(|e| e.to_entry()).collect(),
        }
    }
}

/// One entry of a [`TreeView`].
#[derive(Clone, Copy)]
pub struct EntryRef<'a> {
    view: &'a TreeView,
    r: &'a [u8],
}

impl<'a> EntryRef<'a> {
    pub fn path(&self) -> &'a [u8] {
        self.view.heap(u32_at(self.r, 0), u32_at(self.r, 4))
    }

    /// The last path component.
    pub fn name(&self) -> &'a [u8] {
        let p = self.path();
        // memrchr: a byte loop from the end was 4% of composing an image.
        match memchr::memrchr(b'/', p) {
            Some(i) => &p[i + 1..],
            None => p,
        }
    }

    /// Index of the parent entry (the root's is 0).
    pub fn parent(&self) -> u32 {
        u32_at(self.r, 8)
    }

    pub fn kind(&self) -> Kind {
        kind_of(self.r[12]).expect("checked by TreeView::new")
    }

    pub fn opaque(&self) -> bool {
        self.r[13] & OPAQUE != 0
    }

    pub fn mode(&self) -> u16 {
        u16::from_le_bytes([self.r[14], self.r[15]])
    }

    pub fn uid(&self) -> u32 {
        u32_at(self.r, 16)
    }

    pub fn gid(&self) -> u32 {
        u32_at(self.r, 20)
    }

    fn time(&self, k: usize) -> Time {
        Time(
            u64_at(self.r, 24 + 8 * k) as i64,
            u32_at(self.r, 56 + 4 * k),
        )
    }

    pub fn atime(&self) -> Time {
        self.time(0)
    }

    pub fn mtime(&self) -> Time {
        self.time(1)
    }

    pub fn ctime(&self) -> Time {
        self.time(2)
    }

    pub fn crtime(&self) -> Option<Time> {
        (self.r[13] & HAS_CRTIME != 0).then(|| self.time(3))
    }

    /// Files: `st_size`.
    pub fn size(&self) -> Option<u64> {
        (self.kind() == Kind::File).then(|| u64_at(self.r, 72))
    }

    pub fn rdev(&self) -> Option<(u32, u32)> {
        matches!(self.kind(), Kind::Chardev | Kind::Blockdev)
            .then(|| (u32_at(self.r, 72), u32_at(self.r, 76)))
    }

    pub fn link(&self) -> Option<u64> {
        (self.r[13] & HAS_LINK != 0).then(|| u64_at(self.r, 80))
    }

    pub fn object(&self) -> Option<ObjectId> {
        (self.kind() == Kind::File).then(|| {
            let at = self.view.objects_at + u32_at(self.r, 88) as usize * OBJECT;
            ObjectId(
                self.view.bytes[at..at + OBJECT]
                    .try_into()
                    .expect("32 bytes"),
            )
        })
    }

    pub fn target(&self) -> Option<&'a [u8]> {
        (self.kind() == Kind::Symlink)
            .then(|| self.view.heap(u32_at(self.r, 88), u32_at(self.r, 92)))
    }

    /// The data segments of a sparse file (`None` for a dense one).
    pub fn segments(&self) -> Option<impl Iterator<Item = Segment> + 'a> {
        let bytes = &self.view.bytes;
        let at = self.view.segments_at + u32_at(self.r, 96) as usize * SEGMENT;
        let raw = &bytes[at..at + u32_at(self.r, 100) as usize * SEGMENT];
        (self.r[13] & HAS_SEGMENTS != 0).then(|| {
            raw.chunks_exact(SEGMENT)
                .map(|s| Segment(u64_at(s, 0), u64_at(s, 8)))
        })
    }

    /// Extended attributes as `(name, value)`.
    pub fn xattrs(&self) -> impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let view = self.view;
        let at = view.xattrs_at + u32_at(self.r, 104) as usize * XATTR;
        let raw = &view.bytes[at..at + u32_at(self.r, 108) as usize * XATTR];
        raw.chunks_exact(XATTR).map(move |x| {
            (
                view.heap(u32_at(x, 0), u32_at(x, 4)),
                view.heap(u32_at(x, 8), u32_at(x, 12)),
            )
        })
    }

    pub fn to_entry(&self) -> Entry {
        Entry {
            path: Bytes(self.path().to_vec()),
            kind: self.kind(),
            mode: self.mode(),
            uid: self.uid(),
            gid: self.gid(),
            atime: self.atime(),
            mtime: self.mtime(),
            ctime: self.ctime(),
            crtime: self.crtime(),
            xattrs: self
                .xattrs()
                .map(|(n, v)| Xattr {
                    name: Bytes(n.to_vec()),
                    value: Bytes(v.to_vec()),
                })
                .collect(),
            size: self.size(),
            object: self.object(),
            segments: self.segments().map(|s| s.collect()),
            link: self.link(),
            target: self.target().map(|t| Bytes(t.to_vec())),
            rdev: self.rdev(),
            opaque: self.opaque(),
        }
    }
}

#[cfg(test)]
#[path = "binary_tests.rs"]
mod tests;
