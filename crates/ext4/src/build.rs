//! From a tree and options to a [`Layout`]: number the inodes, prepare every inode's content,
//! pick a geometry, allocate blocks ([`crate::plan`]), then generate the metadata bytes
//! ([`crate::generate`]), all at once or as reads reach them.

use crate::checksum;
use crate::dir::{self, Dirent};
use crate::generate::Generator;
use crate::hash::seed_words;
use crate::inode::{self, InodeFields};
use crate::layout::{Meta, MetaStore};
use crate::plan::{Geometry, INODE_SIZE};
use crate::superblock::FIRST_INO;
use crate::xattr;
use crate::{
    DataHandle, Error, FsTree, Layout, MetadataBlocks, NodeId, NodeKind, Options, Timestamp,
    BLOCK_SIZE,
};

const BS: usize = BLOCK_SIZE as usize;
pub(crate) const ROOT_INO: u32 = 2;
const LOST_FOUND_INO: u32 = FIRST_INO;
/// ext4's link count limit; directories beyond it use `dir_nlink` (count 1).
const LINK_MAX: u64 = 65000;
/// Blocks mke2fs gives lost+found, so e2fsck can reconnect files without allocating.
const LOST_FOUND_BLOCKS: usize = 4;

/// Lay out `tree` as an ext4 filesystem, generating all of its metadata.
pub fn build(tree: &FsTree, opts: &Options) -> Result<Layout, Error> {
    let (mut layout, mut meta, generator) = lay_out(tree, opts)?;
    generator.generate_all(tree, &mut meta);
    meta.finish();
    layout.meta = Meta::Held(meta);
    Ok(layout)
}

/// Lay out `tree` as [`build`] does, generating only the metadata every read needs
/// (superblocks, group descriptors, bitmaps): the rest is generated when a read through
/// [`Layout::pieces_with`] first reaches it, from `tree`, which the returned metadata keeps
/// until [`MetadataBlocks::generate_all`]. The bytes read are [`build`]'s.
pub fn build_on_demand(tree: FsTree, opts: &Options) -> Result<(Layout, MetadataBlocks), Error> {
    let (layout, meta, generator) = lay_out(&tree, opts)?;
    Ok((layout, MetadataBlocks::on_demand(meta, tree, generator)))
}

/// The block map of `tree` with the metadata that costs nothing to keep (superblocks,
/// group descriptors, bitmaps) in a store with a slot for every other block, and what
/// generates the rest.
fn lay_out(tree: &FsTree, opts: &Options) -> Result<(Layout, MetaStore, Generator), Error> {
    let s = size_up(tree, opts)?;
    let place = s.prep.allocate(&s.geo);
    check_fits(place.end, &s.geo, s.size, s.min_size)?;
    Ok(Generator::new(s.prep, s.geo, place, s.size, s.min_size))
}

/// A tree prepared, with the geometry it gets: everything but where blocks go.
pub(crate) struct Sized {
    pub prep: Prepared,
    pub geo: Geometry,
    pub size: u64,
    pub min_size: u64,
}

/// Whether blocks allocated up to `end` fit in `geo`.
pub(crate) fn check_fits(end: u64, geo: &Geometry, size: u64, min_size: u64) -> Result<(), Error> {
    if end > geo.blocks {
        return Err(Error::TooSmall {
            size,
            needed: min_size,
        });
    }
    Ok(())
}

/// Number and prepare every inode of `tree` and choose the geometry: the minimum size the
/// tree needs, and the size and inode count it gets. Does not check that it fits a size
/// given in `opts` ([`check_fits`] does, after allocation).
pub(crate) fn size_up(tree: &FsTree, opts: &Options) -> Result<Sized, Error> {
    if opts.label.len() > 16 {
        return Err(Error::LabelTooLong);
    }
    let prep = Prepared::new(tree, opts)?;
    let needed_inodes = prep.max_ino as u64;
    if let Some(n) = opts.inodes {
        if (n as u64) < needed_inodes {
            return Err(Error::TooManyFiles {
                needed: needed_inodes,
                available: n as u64,
            });
        }
    }
    // One rule for the inode count at a given size, used both to find the minimum size
    // and for the final geometry, so the minimum we report really fits.
    let headroom = needed_inodes + needed_inodes / 4 + 64;
    let geometry_for = |size: u64| match opts.inodes {
        Some(n) => Geometry::new(size, n as u64),
        None => Geometry::new(size, headroom.max(size / 16384))
            .or_else(|_| Geometry::new(size, needed_inodes)),
    };
    let min_size = prep.min_size(&geometry_for)?;
    let size = opts.size.unwrap_or_else(|| Options::default_size(min_size));
    let geo = geometry_for(size)?;
    if geo.inodes() < needed_inodes {
        return Err(Error::TooManyFiles {
            needed: needed_inodes,
            available: geo.inodes(),
        });
    }
    Ok(Sized {
        prep,
        geo,
        size,
        min_size,
    })
}

/// What an inode holds besides its fields.
pub(crate) enum Content {
    /// Nothing outside `i_block` (fast symlinks, devices, fifos, sockets). Boxed: few
    /// inodes have one, and it would make every inode's content 60 bytes.
    Inline(Box<[u8; 60]>),
    /// This many generated blocks: a directory's or a slow symlink's target, made when
    /// they are needed ([`Prepared::content_blocks`]).
    Sized(u64),
    /// File data: `segs` are (first logical block, block count) ranges, all backed by
    /// consecutive blocks of the object behind `handle`. Empty for an empty file.
    Data {
        handle: DataHandle,
        object_len: u64,
        segs: Segs,
    },
}

/// A file's data ranges as (first logical block, block count).
pub(crate) enum Segs {
    /// One range from block 0 of this many blocks (none if 0): a dense file, most files,
    /// held without an allocation.
    Dense(u64),
    /// A sparse file's ranges.
    Sparse(Box<[(u64, u64)]>),
}

impl Segs {
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let (dense, sparse) = match self {
            Segs::Dense(0) => (None, &[][..]),
            Segs::Dense(n) => (Some((0, *n)), &[][..]),
            Segs::Sparse(s) => (None, &s[..]),
        };
        dense.into_iter().chain(sparse.iter().copied())
    }
}

impl Content {
    pub fn blocks(&self) -> u64 {
        match self {
            Content::Inline(_) => 0,
            Content::Sized(n) => *n,
            Content::Data { segs, .. } => segs.iter().map(|s| s.1).sum(),
        }
    }
}

/// The fields an inode gets from preparing it; owner and times are read from its tree
/// node again when it is written (holding all of [`InodeFields`] per inode was half of the
/// memory of planning a large tree).
struct Fields {
    mode: u16,
    links: u16,
    flags: u32,
    size: u64,
}

pub(crate) struct Ino {
    pub ino: u32,
    /// The tree node the inode was made from; `None` for a lost+found made up here.
    pub node: Option<NodeId>,
    fields: Fields,
    pub content: Content,
    /// Encoded extended attributes; boxed and `None` without any, as most inodes are.
    xattrs: Option<Box<xattr::Encoded>>,
    pub is_dir: bool,
}

impl Ino {
    /// The external xattr block, still unsealed, if the xattrs did not fit in the inode.
    pub fn xattr_block(&self) -> Option<&Vec<u8>> {
        self.xattrs.as_ref()?.block.as_ref()
    }

    fn inline_xattrs(&self) -> &[u8] {
        self.xattrs.as_ref().map_or(&[], |x| &x.inline)
    }
}

/// Every inode numbered and sized, with what it takes to write its blocks later: the
/// numbering and each directory's entries in name order. Holds no reference to the tree,
/// which is passed again to generate blocks, so that it can be kept beside the tree.
pub(crate) struct Prepared {
    pub opts: Options,
    /// Root first, then inodes `FIRST_INO..=max_ino` in order.
    pub inodes: Vec<Ino>,
    pub max_ino: u32,
    /// Per tree node: its inode number and its parent node.
    ino_of: Vec<u32>,
    parent: Vec<NodeId>,
    /// Each directory's entry indices in name order, all directories in one table:
    /// directory `d`'s are `sorted[sorted_at[d]..][..its entry count]`.
    sorted: Vec<u32>,
    sorted_at: Vec<u32>,
    /// The tree has no lost+found: the root lists the one made up here.
    lost_found_made_up: bool,
}

fn file_type(kind: &NodeKind) -> u8 {
    match kind {
        NodeKind::File(_) => dir::FT_REG,
        NodeKind::Dir(_) => dir::FT_DIR,
        NodeKind::Symlink(_) => dir::FT_LNK,
        NodeKind::CharDev { .. } => dir::FT_CHR,
        NodeKind::BlockDev { .. } => dir::FT_BLK,
        NodeKind::Fifo => dir::FT_FIFO,
        NodeKind::Socket => dir::FT_SOCK,
    }
}

/// Path of `node` for error messages, following the parent links found while numbering.
fn path_of(tree: &FsTree, parent: &[NodeId], node: NodeId) -> String {
    let mut parts = Vec::new();
    let mut n = node;
    while n != FsTree::ROOT && parent[n as usize] != NodeId::MAX {
        let p = parent[n as usize];
        if let NodeKind::Dir(entries) = &tree.node(p).kind {
            if let Some(e) = entries.iter().find(|e| e.node == n) {
                parts.push(String::from_utf8_lossy(&e.name).into_owned());
            }
        }
        n = p;
    }
    parts.reverse();
    format!("/{}", parts.join("/"))
}

/// The entries of directory `d` in name order, as written to its blocks.
fn dirents<'t>(
    nodes: &'t [crate::Node],
    d: NodeId,
    sorted: &[u32],
    sorted_at: &[u32],
    ino_of: &[u32],
) -> Vec<Dirent<'t>> {
    let NodeKind::Dir(entries) = &nodes[d as usize].kind else {
        unreachable!()
    };
    let at = sorted_at[d as usize] as usize;
    sorted[at..at + entries.len()]
        .iter()
        .map(|&i| {
            let e = &entries[i as usize];
            Dirent {
                name: &e.name,
                ino: ino_of[e.node as usize],
                ftype: file_type(&nodes[e.node as usize].kind),
            }
        })
        .collect()
}

impl Prepared {
    fn new(tree: &FsTree, opts: &Options) -> Result<Prepared, Error> {
        let nodes = tree.nodes();
        if !matches!(nodes[0].kind, NodeKind::Dir(_)) {
            return Err(Error::RootNotDir);
        }
        // Number inodes: root is 2, lost+found 11, then each directory's children in name
        // order, directories visited depth first, so a directory's entries are neighbours.
        let mut ino_of = vec![0u32; nodes.len()];
        let mut parent = vec![NodeId::MAX; nodes.len()];
        let mut links = vec![0u64; nodes.len()];
        let mut order: Vec<NodeId> = Vec::with_capacity(nodes.len());
        ino_of[0] = ROOT_INO;
        let lost_found = tree.lookup(FsTree::ROOT, b"lost+found");
        if let Some(lf) = lost_found {
            if !matches!(nodes[lf as usize].kind, NodeKind::Dir(_)) {
                return Err(Error::LostFoundNotDir);
            }
            ino_of[lf as usize] = LOST_FOUND_INO;
        }
        let mut next = LOST_FOUND_INO + 1;
        let mut stack = vec![FsTree::ROOT];
        let mut sorted: Vec<u32> = Vec::with_capacity(nodes.len());
        let mut sorted_at = vec![0u32; nodes.len()];
        let mut subdirs = Vec::new();
        while let Some(d) = stack.pop() {
            let NodeKind::Dir(entries) = &nodes[d as usize].kind else {
                unreachable!()
            };
            let at = sorted.len();
            sorted_at[d as usize] = at as u32;
            sorted.extend(0..entries.len() as u32);
            let kids = &mut sorted[at..];
            kids.sort_by(|&a, &b| entries[a as usize].name.cmp(&entries[b as usize].name));
            let kids = &sorted[at..];
            subdirs.clear();
            for (k, &i) in kids.iter().enumerate() {
                let e = &entries[i as usize];
                let child = e.node;
                let bad_path = || {
                    format!(
                        "{}/{}",
                        path_of(tree, &parent, d).trim_end_matches('/'),
                        String::from_utf8_lossy(&e.name)
                    )
                };
                if e.name.len() > crate::MAX_NAME_LEN {
                    return Err(Error::NameTooLong { path: bad_path() });
                }
                if crate::tree::invalid_name(&e.name) {
                    return Err(Error::InvalidName { name: bad_path() });
                }
                if k > 0 && entries[kids[k - 1] as usize].name == e.name {
                    return Err(Error::DuplicateName { path: bad_path() });
                }
                if child as usize >= nodes.len() || child == FsTree::ROOT {
                    return Err(Error::DirectoryHardlink { path: bad_path() });
                }
                links[child as usize] += 1;
                if links[child as usize] > 1 {
                    if matches!(nodes[child as usize].kind, NodeKind::Dir(_)) {
                        return Err(Error::DirectoryHardlink { path: bad_path() });
                    }
                    continue;
                }
                parent[child as usize] = d;
                if ino_of[child as usize] == 0 {
                    ino_of[child as usize] = next;
                    next = next.checked_add(1).ok_or(Error::TooManyFiles {
                        needed: u64::MAX,
                        available: 0,
                    })?;
                }
                order.push(child);
                if matches!(nodes[child as usize].kind, NodeKind::Dir(_)) {
                    subdirs.push(child);
                }
            }
            stack.extend(subdirs.iter().rev());
        }
        let max_ino = next - 1;

        let hash_seed = seed_words(&opts.hash_seed);
        let mut by_ino: Vec<Option<NodeId>> = vec![None; (max_ino - LOST_FOUND_INO + 1) as usize];
        for &n in &order {
            by_ino[(ino_of[n as usize] - LOST_FOUND_INO) as usize] = Some(n);
        }

        let make = |node: NodeId, ino: u32| -> Result<Ino, Error> {
            let n = &nodes[node as usize];
            let path = || path_of(tree, &parent, node);
            let m = &n.meta;
            let mut fields = Fields {
                mode: m.mode & 0o7777,
                links: links[node as usize].max(1) as u16,
                flags: 0,
                size: 0,
            };
            if links[node as usize] > LINK_MAX && !matches!(n.kind, NodeKind::Dir(_)) {
                return Err(Error::TooManyLinks {
                    path: path(),
                    links: links[node as usize],
                });
            }
            let content = match &n.kind {
                NodeKind::Dir(entries) => {
                    // Sizing needs only the names, in any order: no entry list is built.
                    let made_up = (node == FsTree::ROOT && lost_found.is_none())
                        .then_some(&b"lost+found"[..]);
                    let subdirs = entries
                        .iter()
                        .filter(|e| matches!(nodes[e.node as usize].kind, NodeKind::Dir(_)))
                        .count() as u64
                        + made_up.is_some() as u64;
                    fields.links = if subdirs + 2 >= LINK_MAX {
                        1
                    } else {
                        (subdirs + 2) as u16
                    };
                    let names = entries.iter().map(|e| &e.name[..]).chain(made_up);
                    let (n, indexed) = dir::shape(names, &hash_seed);
                    let content = Content::Sized(n as u64);
                    fields.mode |= inode::S_IFDIR;
                    fields.size = content.blocks() * BLOCK_SIZE;
                    fields.flags =
                        inode::EXT4_EXTENTS_FL | if indexed { inode::EXT4_INDEX_FL } else { 0 };
                    content
                }
                NodeKind::Symlink(target) => {
                    fields.mode |= inode::S_IFLNK;
                    fields.size = target.len() as u64;
                    if target.is_empty()
                        || target.len() > crate::MAX_SYMLINK_LEN
                        || target.contains(&0)
                    {
                        return Err(Error::SymlinkTooLong {
                            path: path(),
                            len: target.len(),
                        });
                    }
                    if target.len() < 60 {
                        let mut blk = [0u8; 60];
                        blk[..target.len()].copy_from_slice(target);
                        Content::Inline(Box::new(blk))
                    } else {
                        fields.flags = inode::EXT4_EXTENTS_FL;
                        Content::Sized(1)
                    }
                }
                NodeKind::CharDev { major, minor } => {
                    fields.mode |= inode::S_IFCHR;
                    Content::Inline(Box::new(inode::device_block(*major, *minor)))
                }
                NodeKind::BlockDev { major, minor } => {
                    fields.mode |= inode::S_IFBLK;
                    Content::Inline(Box::new(inode::device_block(*major, *minor)))
                }
                NodeKind::Fifo => {
                    fields.mode |= inode::S_IFIFO;
                    Content::Inline(Box::new([0; 60]))
                }
                NodeKind::Socket => {
                    fields.mode |= inode::S_IFSOCK;
                    Content::Inline(Box::new([0; 60]))
                }
                NodeKind::File(f) => {
                    fields.mode |= inode::S_IFREG;
                    fields.size = f.size;
                    fields.flags = inode::EXT4_EXTENTS_FL;
                    if f.size.div_ceil(BLOCK_SIZE) >= u32::MAX as u64 {
                        return Err(Error::FileTooLarge {
                            path: path(),
                            size: f.size,
                        });
                    }
                    let segs =
                        file_segments(f).map_err(|why| Error::BadSegments { path: path(), why })?;
                    let object_len = match &f.segments {
                        None => f.size,
                        Some(s) => s.iter().map(|s| s.len).sum(),
                    };
                    Content::Data {
                        handle: f.handle,
                        object_len,
                        segs,
                    }
                }
            };
            let enc = xattr::encode(&m.xattrs, &path)?;
            Ok(Ino {
                ino,
                node: Some(node),
                fields,
                content,
                xattrs: (!enc.inline.is_empty() || enc.block.is_some()).then(|| Box::new(enc)),
                is_dir: matches!(n.kind, NodeKind::Dir(_)),
            })
        };

        let mut inodes = Vec::with_capacity(by_ino.len() + 1);
        inodes.push(make(FsTree::ROOT, ROOT_INO)?);
        match lost_found {
            Some(lf) => inodes.push(make(lf, LOST_FOUND_INO)?),
            None => inodes.push(synthetic_lost_found()),
        }
        for (i, n) in by_ino.iter().enumerate().skip(1) {
            let node = n.expect("inode numbers are dense");
            inodes.push(make(node, LOST_FOUND_INO + i as u32)?);
        }
        Ok(Prepared {
            opts: opts.clone(),
            inodes,
            max_ino,
            ino_of,
            parent,
            sorted,
            sorted_at,
            lost_found_made_up: lost_found.is_none(),
        })
    }

    /// Heap bytes held, roughly (xattrs and sparse files' ranges not counted).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.inodes.capacity() * std::mem::size_of::<Ino>()
            + (self.ino_of.capacity()
                + self.parent.capacity()
                + self.sorted.capacity()
                + self.sorted_at.capacity())
                * 4
    }

    /// The generated blocks of entry `idx` of `inodes` (a directory or a slow symlink), in
    /// logical order: `content.blocks()` of them.
    pub(crate) fn content_blocks(&self, tree: &FsTree, idx: usize) -> Vec<Vec<u8>> {
        let ino = &self.inodes[idx];
        let seed = checksum::inode_seed(self.opts.checksum_seed, ino.ino, 0);
        let hash_seed = seed_words(&self.opts.hash_seed);
        let Some(node) = ino.node else {
            let (mut blocks, _) = dir::build(LOST_FOUND_INO, ROOT_INO, &[], &hash_seed, seed);
            blocks.extend((1..LOST_FOUND_BLOCKS).map(|_| dir::empty_block(seed)));
            return blocks;
        };
        let nodes = tree.nodes();
        match &nodes[node as usize].kind {
            NodeKind::Dir(_) => {
                let mut kids = dirents(nodes, node, &self.sorted, &self.sorted_at, &self.ino_of);
                if node == FsTree::ROOT && self.lost_found_made_up {
                    kids.push(Dirent {
                        name: b"lost+found",
                        ino: LOST_FOUND_INO,
                        ftype: dir::FT_DIR,
                    });
                }
                let parent_ino = if node == FsTree::ROOT {
                    ROOT_INO
                } else {
                    self.ino_of[self.parent[node as usize] as usize]
                };
                dir::build(ino.ino, parent_ino, &kids, &hash_seed, seed).0
            }
            NodeKind::Symlink(target) => {
                let mut b = vec![0u8; BS];
                b[..target.len()].copy_from_slice(target);
                vec![b]
            }
            _ => unreachable!("only directories and slow symlinks have generated blocks"),
        }
    }

    /// All of `ino`'s fields but those its content decides at emit time.
    pub(crate) fn inode_fields(&self, tree: &FsTree, ino: &Ino) -> InodeFields {
        let f = &ino.fields;
        let mut out = InodeFields {
            mode: f.mode,
            links: f.links,
            flags: f.flags,
            size: f.size,
            inline_xattrs: ino.inline_xattrs().to_vec(),
            ..Default::default()
        };
        match ino.node {
            Some(node) => {
                let m = &tree.node(node).meta;
                out.uid = m.uid;
                out.gid = m.gid;
                out.atime = m.atime;
                out.ctime = m.ctime;
                out.mtime = m.mtime;
                out.crtime = m.crtime;
            }
            None => {
                let t = Timestamp {
                    sec: self.opts.timestamp,
                    nsec: 0,
                };
                (out.atime, out.ctime, out.mtime, out.crtime) = (t, t, t, t);
            }
        }
        out
    }
}

/// Data segments of a file as (first logical block, block count), validated.
fn file_segments(f: &crate::FileData) -> Result<Segs, &'static str> {
    let Some(segs) = &f.segments else {
        return Ok(Segs::Dense(f.size.div_ceil(BLOCK_SIZE)));
    };
    let mut out = Vec::with_capacity(segs.len());
    let mut prev_end = 0;
    for s in segs {
        let end = s.offset.checked_add(s.len).ok_or("segment overflows")?;
        if s.offset % BLOCK_SIZE != 0 {
            return Err("segment offset is not a multiple of 4096");
        }
        if s.len == 0 {
            return Err("empty segment");
        }
        if s.offset < prev_end {
            return Err("segments overlap or are out of order");
        }
        if end > f.size {
            return Err("segment extends past the end of the file");
        }
        if s.len % BLOCK_SIZE != 0 && end != f.size {
            return Err("segment length is not a multiple of 4096 and does not end the file");
        }
        out.push((s.offset / BLOCK_SIZE, s.len.div_ceil(BLOCK_SIZE)));
        prev_end = end;
    }
    Ok(Segs::Sparse(out.into_boxed_slice()))
}

pub(crate) fn set_bits(bm: &mut [u8], from: u64, to: u64) {
    for bit in from..to {
        bm[(bit / 8) as usize] |= 1 << (bit % 8);
    }
}

/// A lost+found for a tree without one; its times are the image's timestamp
/// ([`Prepared::inode_fields`]).
fn synthetic_lost_found() -> Ino {
    let fields = Fields {
        mode: inode::S_IFDIR | 0o700,
        links: 2,
        size: (LOST_FOUND_BLOCKS * BS) as u64,
        flags: inode::EXT4_EXTENTS_FL,
    };
    Ino {
        ino: LOST_FOUND_INO,
        node: None,
        fields,
        content: Content::Sized(LOST_FOUND_BLOCKS as u64),
        xattrs: None,
        is_dir: true,
    }
}

/// Inode 1 (bad blocks) as mke2fs writes it: empty, with times.
pub(crate) fn bad_blocks_inode(timestamp: i64, fs_seed: u32) -> [u8; INODE_SIZE as usize] {
    let t = Timestamp {
        sec: timestamp,
        nsec: 0,
    };
    InodeFields {
        atime: t,
        ctime: t,
        mtime: t,
        ..Default::default()
    }
    .encode(1, fs_seed)
}
