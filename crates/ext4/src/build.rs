//! From a tree and options to a [`Layout`]: number the inodes, prepare every inode's content,
//! pick a geometry, allocate blocks ([`crate::plan`]), then emit the metadata bytes.

use crate::checksum;
use crate::dir::{self, Dirent};
use crate::extent;
use crate::hash::seed_words;
use crate::inode::{self, InodeFields};
use crate::layout::{MetaStore, Region, RegionKind};
use crate::placement::Placement;
use crate::plan::{Geometry, BLOCKS_PER_GROUP, DESC_SIZE, INODE_SIZE};
use crate::regions::RegionTable;
use crate::superblock::{self, GroupDesc, Totals, FIRST_INO};
use crate::xattr;
use crate::{
    DataHandle, Error, FsTree, Layout, NodeId, NodeKind, Options, Stats, Timestamp, BLOCK_SIZE,
};

const BS: usize = BLOCK_SIZE as usize;
const ROOT_INO: u32 = 2;
const LOST_FOUND_INO: u32 = FIRST_INO;
/// ext4's link count limit; directories beyond it use `dir_nlink` (count 1).
const LINK_MAX: u64 = 65000;
/// Blocks mke2fs gives lost+found, so e2fsck can reconnect files without allocating.
const LOST_FOUND_BLOCKS: usize = 4;

/// Lay out `tree` as an ext4 filesystem.
pub fn build(tree: &FsTree, opts: &Options) -> Result<Layout, Error> {
    let s = size_up(tree, opts, Blocks::Write)?;
    let place = s.prep.allocate(&s.geo);
    check_fits(place.end, &s.geo, s.size, s.min_size)?;
    Ok(s.prep.emit(&s.geo, &place, s.size, s.min_size))
}

/// Whether [`Prepared`] writes the generated blocks of directories and slow symlinks or
/// only counts them: counting is enough to size and check an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blocks {
    Write,
    Count,
}

/// A tree prepared, with the geometry it gets: everything but where blocks go.
pub(crate) struct Sized<'a> {
    pub prep: Prepared<'a>,
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
pub(crate) fn size_up<'a>(
    tree: &'a FsTree,
    opts: &'a Options,
    blocks: Blocks,
) -> Result<Sized<'a>, Error> {
    if opts.label.len() > 16 {
        return Err(Error::LabelTooLong);
    }
    let prep = Prepared::new(tree, opts, blocks)?;
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
    /// Generated blocks: directory blocks or a slow symlink's target.
    Meta(Vec<Vec<u8>>),
    /// As many generated blocks as `Meta` would hold, not written ([`Blocks::Count`]).
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
            Content::Meta(b) => b.len() as u64,
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
    node: Option<NodeId>,
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

pub(crate) struct Prepared<'a> {
    opts: &'a Options,
    tree: &'a FsTree,
    /// Root first, then inodes `FIRST_INO..=max_ino` in order.
    pub inodes: Vec<Ino>,
    pub max_ino: u32,
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

impl<'a> Prepared<'a> {
    fn new(tree: &'a FsTree, opts: &'a Options, write: Blocks) -> Result<Prepared<'a>, Error> {
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
        // Each directory's entry indices in name order, all directories in one table:
        // directory `d`'s are `sorted[sorted_at[d]..][..its entry count]`.
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
                if e.name.is_empty()
                    || e.name == b"."
                    || e.name == b".."
                    || e.name.contains(&b'/')
                    || e.name.contains(&0)
                {
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
        let fs_seed = opts.checksum_seed;
        let mut by_ino: Vec<Option<NodeId>> = vec![None; (max_ino - LOST_FOUND_INO + 1) as usize];
        for &n in &order {
            by_ino[(ino_of[n as usize] - LOST_FOUND_INO) as usize] = Some(n);
        }

        let dirents = |d: NodeId| -> Vec<Dirent<'_>> {
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
        };

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
                NodeKind::Dir(_) => {
                    let mut kids = dirents(node);
                    if node == FsTree::ROOT && lost_found.is_none() {
                        kids.push(Dirent {
                            name: b"lost+found",
                            ino: LOST_FOUND_INO,
                            ftype: dir::FT_DIR,
                        });
                    }
                    let subdirs = kids.iter().filter(|k| k.ftype == dir::FT_DIR).count() as u64;
                    fields.links = if subdirs + 2 >= LINK_MAX {
                        1
                    } else {
                        (subdirs + 2) as u16
                    };
                    let parent_ino = if node == FsTree::ROOT {
                        ROOT_INO
                    } else {
                        ino_of[parent[node as usize] as usize]
                    };
                    let (content, indexed) = match write {
                        Blocks::Write => {
                            let (blocks, indexed) = dir::build(
                                ino,
                                parent_ino,
                                &kids,
                                &hash_seed,
                                checksum::inode_seed(fs_seed, ino, 0),
                            );
                            (Content::Meta(blocks), indexed)
                        }
                        Blocks::Count => {
                            let (n, indexed) = dir::shape(&kids, &hash_seed);
                            (Content::Sized(n as u64), indexed)
                        }
                    };
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
                    } else if write == Blocks::Count {
                        fields.flags = inode::EXT4_EXTENTS_FL;
                        Content::Sized(1)
                    } else {
                        fields.flags = inode::EXT4_EXTENTS_FL;
                        let mut b = vec![0u8; BS];
                        b[..target.len()].copy_from_slice(target);
                        Content::Meta(vec![b])
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
            None => inodes.push(synthetic_lost_found(opts)),
        }
        for (i, n) in by_ino.iter().enumerate().skip(1) {
            let node = n.expect("inode numbers are dense");
            inodes.push(make(node, LOST_FOUND_INO + i as u32)?);
        }
        Ok(Prepared {
            opts,
            tree,
            inodes,
            max_ino,
        })
    }

    /// All of `ino`'s fields but those its content decides at emit time.
    fn inode_fields(&self, ino: &Ino) -> InodeFields {
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
                let m = &self.tree.node(node).meta;
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

    fn emit(&self, geo: &Geometry, place: &Placement, size: u64, min_size: u64) -> Layout {
        let fs_seed = self.opts.checksum_seed;
        let mut out = Emitter::default();
        let ipg = geo.inodes_per_group;

        // Inode tables: only the blocks holding used inodes; the rest reads as zeros. Each
        // inode is encoded straight into its slot.
        let used_in = |g: u64| (self.max_ino as u64).saturating_sub(g * ipg).min(ipg);
        let mut tables: Vec<Vec<u8>> = (0..geo.groups)
            .map(|g| vec![0u8; (used_in(g) * INODE_SIZE).div_ceil(BLOCK_SIZE) as usize * BS])
            .collect();
        let mut put_inode = |ino: u32, bytes: &[u8; INODE_SIZE as usize]| {
            let (g, at) = (
                (ino as u64 - 1) / ipg,
                ((ino as u64 - 1) % ipg * INODE_SIZE) as usize,
            );
            tables[g as usize][at..at + INODE_SIZE as usize].copy_from_slice(bytes);
        };
        put_inode(1, &bad_blocks_inode(self.opts.timestamp, fs_seed));

        // Inodes: final fields, content blocks, extent trees, xattr blocks.
        for (idx, ino) in self.inodes.iter().enumerate() {
            let mut f = self.inode_fields(ino);
            let runs = place.runs(idx);
            let seed = checksum::inode_seed(fs_seed, ino.ino, 0);
            match &ino.content {
                Content::Inline(blk) => f.i_block = **blk,
                content => {
                    let extents = self.extents(idx, runs);
                    let (root, nodes) = extent::build(&extents, &place.tree_blocks(idx), seed);
                    f.i_block = root;
                    for (at, b) in nodes {
                        out.meta(at, b);
                    }
                    match content {
                        Content::Meta(blocks) => {
                            let mut it = blocks.iter();
                            for &(start, len) in runs {
                                out.meta_blocks(
                                    start,
                                    it.by_ref().take(len as usize).map(|b| &b[..]),
                                );
                            }
                        }
                        Content::Data {
                            handle, object_len, ..
                        } => {
                            let mut object_block = 0u64;
                            for &(start, len) in runs {
                                let offset = object_block * BLOCK_SIZE;
                                let data_len = (len * BLOCK_SIZE).min(object_len - offset);
                                out.regions.extend(Region::split(
                                    start,
                                    len,
                                    RegionKind::Data {
                                        handle: *handle,
                                        offset,
                                        data_len,
                                    },
                                ));
                                object_block += len;
                            }
                        }
                        Content::Inline(_) | Content::Sized(_) => {
                            unreachable!("emitting needs written blocks")
                        }
                    }
                }
            }
            let mut blocks = ino.content.blocks() + place.tree_blocks[idx].1 as u64;
            if let (Some(block), Some(at)) = (ino.xattr_block(), place.xattr_blocks[idx]) {
                let mut b = block.clone();
                xattr::seal_block(&mut b, at, fs_seed);
                out.meta(at, b);
                f.file_acl = at;
                blocks += 1;
            }
            f.sectors = blocks * (BLOCK_SIZE / 512);
            put_inode(ino.ino, &f.encode(ino.ino, fs_seed));
        }
        for (g, table) in tables.into_iter().enumerate() {
            if !table.is_empty() {
                out.meta(place.inode_tables[g], table);
            }
        }

        // Bitmaps and group descriptors.
        let mut used_ranges: Vec<(u64, u64)> = place.used.clone();
        used_ranges.extend(geo.super_ranges());
        used_ranges.sort_unstable();
        let mut ranges = used_ranges.iter().peekable();
        let mut descs = Vec::with_capacity(geo.groups as usize);
        let mut dirs_in = vec![0u32; geo.groups as usize];
        for ino in self.inodes.iter().filter(|i| i.is_dir) {
            dirs_in[((ino.ino as u64 - 1) / ipg) as usize] += 1;
        }
        let (mut free_blocks, mut free_inodes) = (0u64, 0u64);
        for g in 0..geo.groups {
            let (gstart, glen) = (geo.group_start(g), geo.group_len(g));
            let mut bm = vec![0u8; BS];
            set_bits(&mut bm, glen, BLOCKS_PER_GROUP);
            let mut used = 0;
            while let Some(&&(s, l)) = ranges.peek() {
                if s >= gstart + glen {
                    break;
                }
                let (from, to) = (s.max(gstart), (s + l).min(gstart + glen));
                if from < to {
                    set_bits(&mut bm, from - gstart, to - gstart);
                    used += to - from;
                }
                if s + l > gstart + glen {
                    break; // continues into the next group
                }
                ranges.next();
            }
            let bb_csum = checksum::crc(fs_seed, &bm);
            out.meta_shared(place.block_bitmaps[g as usize], bm);

            let iused = used_in(g);
            let mut im = vec![0u8; BS];
            set_bits(&mut im, 0, iused);
            set_bits(&mut im, ipg, BLOCKS_PER_GROUP);
            let ib_csum = checksum::crc(fs_seed, &im[..(ipg / 8) as usize]);
            out.meta_shared(place.inode_bitmaps[g as usize], im);

            let d = GroupDesc {
                block_bitmap: place.block_bitmaps[g as usize],
                inode_bitmap: place.inode_bitmaps[g as usize],
                inode_table: place.inode_tables[g as usize],
                free_blocks: (glen - used) as u32,
                free_inodes: (ipg - iused) as u32,
                used_dirs: dirs_in[g as usize],
                itable_unused: (ipg - iused) as u32,
                block_bitmap_csum: bb_csum,
                inode_bitmap_csum: ib_csum,
            };
            free_blocks += glen - used;
            free_inodes += ipg - iused;
            descs.push(d);
        }
        let mut gdt = vec![0u8; (geo.gdt_blocks * BLOCK_SIZE) as usize];
        for (g, d) in descs.iter().enumerate() {
            d.encode(g as u32, fs_seed, &mut gdt[g * DESC_SIZE as usize..]);
        }
        let totals = Totals {
            free_blocks,
            free_inodes,
        };
        for (start, _) in geo.super_ranges() {
            let g = start / BLOCKS_PER_GROUP;
            let mut b = vec![0u8; BS + gdt.len()];
            let at = if g == 0 { 1024 } else { 0 };
            b[at..at + 1024].copy_from_slice(&superblock::encode(geo, self.opts, totals, g));
            b[BS..].copy_from_slice(&gdt);
            out.meta(start, b);
        }

        let metadata_bytes = out.generated;
        out.meta.finish();
        let data_blocks = out
            .regions
            .iter()
            .filter(|r| matches!(r.kind(), RegionKind::Data { .. }))
            .map(|r| r.len())
            .sum();
        let mut regions = out.regions;
        regions.sort_unstable_by_key(|r| r.start());
        Layout {
            size: size / BLOCK_SIZE * BLOCK_SIZE,
            regions: RegionTable::new(&regions),
            meta: out.meta,
            stats: Stats {
                blocks: geo.blocks,
                free_blocks,
                inodes: geo.inodes(),
                free_inodes,
                groups: geo.groups,
                metadata_bytes,
                data_blocks,
                min_size,
            },
        }
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

fn set_bits(bm: &mut [u8], from: u64, to: u64) {
    for bit in from..to {
        bm[(bit / 8) as usize] |= 1 << (bit % 8);
    }
}

/// A lost+found for a tree without one; its times are the image's timestamp
/// ([`Prepared::inode_fields`]).
fn synthetic_lost_found(opts: &Options) -> Ino {
    let seed = checksum::inode_seed(opts.checksum_seed, LOST_FOUND_INO, 0);
    let (mut blocks, _) = dir::build(
        LOST_FOUND_INO,
        ROOT_INO,
        &[],
        &seed_words(&opts.hash_seed),
        seed,
    );
    blocks.extend((1..LOST_FOUND_BLOCKS).map(|_| dir::empty_block(seed)));
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
        content: Content::Meta(blocks),
        xattrs: None,
        is_dir: true,
    }
}

/// Inode 1 (bad blocks) as mke2fs writes it: empty, with times.
fn bad_blocks_inode(timestamp: i64, fs_seed: u32) -> [u8; INODE_SIZE as usize] {
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

/// Collects regions and the metadata behind them.
#[derive(Default)]
struct Emitter {
    regions: Vec<Region>,
    meta: MetaStore,
    /// Bytes of metadata generated (before compression and sharing).
    generated: u64,
}

impl Emitter {
    fn meta(&mut self, start: u64, bytes: Vec<u8>) {
        debug_assert_eq!(bytes.len() % BS, 0);
        self.meta_blocks(start, bytes.chunks(BS));
    }

    /// Like `meta`, for consecutive blocks held apart (no copy into one buffer first).
    fn meta_blocks<'b>(&mut self, start: u64, blocks: impl IntoIterator<Item = &'b [u8]>) {
        let (mut first, mut count) = (None, 0u64);
        for block in blocks {
            let i = self.meta.push(block);
            first.get_or_insert(i);
            count += 1;
        }
        self.generated += count * BS as u64;
        let first = first.expect("at least one block");
        self.regions
            .extend(Region::split(start, count, RegionKind::Meta { first }));
    }

    /// Like `meta` for one block, but an all-zero block needs no region at all.
    fn meta_shared(&mut self, start: u64, bytes: Vec<u8>) {
        if bytes.iter().any(|&b| b != 0) {
            self.meta(start, bytes);
        }
    }
}
