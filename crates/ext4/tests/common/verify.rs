//! Compare a fixture tree with what a reader sees: the kernel through a loop mount, or the
//! independent `ext4-view` crate reading the image file.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tessera_ext4::{FsTree, NodeId, NodeKind};

use super::{build_image, e2fsck_clean, options, Fixture};

/// Expected bytes `off..off+len` of file `node` (zeros in holes).
pub fn expected(fx: &Fixture, node: NodeId, off: u64, len: usize) -> Vec<u8> {
    let NodeKind::File(f) = &fx.tree.node(node).kind else {
        panic!("not a file")
    };
    let obj = &fx.objects[f.handle.0 as usize];
    let mut out = vec![0u8; len];
    let segs = match &f.segments {
        Some(s) => s.iter().map(|s| (s.offset, s.len)).collect(),
        None => vec![(0, f.size)],
    };
    let mut obj_at = 0u64;
    for (so, sl) in segs {
        let (from, to) = (so.max(off), (so + sl).min(off + len as u64));
        if from < to {
            let src = (obj_at + from - so) as usize;
            out[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&obj[src..src + (to - from) as usize]);
        }
        obj_at += sl;
    }
    out
}

/// Every (path, node) of the tree, depth first; `lost+found` included only if in the tree.
pub fn walk(tree: &FsTree) -> Vec<(PathBuf, NodeId)> {
    let mut out = vec![(PathBuf::from("/"), FsTree::ROOT)];
    let mut i = 0;
    while i < out.len() {
        let (p, n) = out[i].clone();
        if let NodeKind::Dir(entries) = &tree.node(n).kind {
            for e in entries {
                out.push((p.join(std::ffi::OsStr::from_bytes(&e.name)), e.node));
            }
        }
        i += 1;
    }
    out
}

fn link_counts(tree: &FsTree) -> HashMap<NodeId, u64> {
    let mut c = HashMap::new();
    for (_, n) in walk(tree).into_iter().skip(1) {
        *c.entry(n).or_insert(0) += 1;
    }
    c
}

fn subdirs(tree: &FsTree, n: NodeId) -> u64 {
    match &tree.node(n).kind {
        NodeKind::Dir(e) => e
            .iter()
            .filter(|e| matches!(tree.node(e.node).kind, NodeKind::Dir(_)))
            .count() as u64,
        _ => 0,
    }
}

fn dev_major_minor(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// Check everything under `root` (a mounted image) against the fixture.
pub fn kernel_view(fx: &Fixture, root: &Path) {
    let links = link_counts(&fx.tree);
    let mut seen = 0;
    for (path, node) in walk(&fx.tree) {
        let full = root.join(path.strip_prefix("/").unwrap());
        let n = fx.tree.node(node);
        let md = fs::symlink_metadata(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()));
        let m = &n.meta;
        assert_eq!(
            md.mode() & 0o7777,
            m.mode as u32,
            "mode of {}",
            path.display()
        );
        assert_eq!(
            (md.uid(), md.gid()),
            (m.uid, m.gid),
            "owner of {}",
            path.display()
        );
        assert_eq!(
            (md.mtime(), md.mtime_nsec() as u32),
            (m.mtime.sec, m.mtime.nsec),
            "mtime of {}",
            path.display()
        );
        assert_eq!(
            (md.ctime(), md.ctime_nsec() as u32),
            (m.ctime.sec, m.ctime.nsec),
            "ctime of {}",
            path.display()
        );
        assert_eq!(
            (md.atime(), md.atime_nsec() as u32),
            (m.atime.sec, m.atime.nsec),
            "atime of {}",
            path.display()
        );
        let ft = md.file_type();
        match &n.kind {
            NodeKind::Dir(_) => {
                assert!(ft.is_dir(), "{} is a dir", path.display());
                let extra = (node == FsTree::ROOT
                    && fx.tree.lookup(FsTree::ROOT, b"lost+found").is_none())
                    as u64;
                let want = 2 + subdirs(&fx.tree, node) + extra;
                assert_eq!(
                    md.nlink(),
                    if want >= 65000 { 1 } else { want },
                    "nlink of {}",
                    path.display()
                );
            }
            NodeKind::File(f) => {
                assert!(ft.is_file(), "{} is a file", path.display());
                assert_eq!(md.len(), f.size, "size of {}", path.display());
                assert_eq!(md.nlink(), links[&node], "nlink of {}", path.display());
                let mut file = fs::File::open(&full).unwrap();
                let mut off = 0u64;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let k = file.read(&mut buf).unwrap();
                    if k == 0 {
                        break;
                    }
                    assert!(
                        buf[..k] == expected(fx, node, off, k)[..],
                        "content of {} at {off}",
                        path.display()
                    );
                    off += k as u64;
                }
                assert_eq!(off, f.size);
            }
            NodeKind::Symlink(t) => {
                assert!(ft.is_symlink());
                assert_eq!(
                    fs::read_link(&full).unwrap().as_os_str().as_bytes(),
                    &t[..],
                    "target of {}",
                    path.display()
                );
            }
            NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                assert!(ft.is_char_device() || ft.is_block_device());
                assert_eq!(
                    ft.is_char_device(),
                    matches!(n.kind, NodeKind::CharDev { .. })
                );
                assert_eq!(
                    dev_major_minor(md.rdev()),
                    (*major, *minor),
                    "rdev of {}",
                    path.display()
                );
            }
            NodeKind::Fifo => assert!(ft.is_fifo()),
            NodeKind::Socket => assert!(ft.is_socket()),
        }
        let mut want: Vec<(Vec<u8>, Vec<u8>)> = m
            .xattrs
            .iter()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect();
        want.sort();
        let mut got: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(&full)
            .unwrap()
            .map(|name| {
                let v = xattr::get(&full, &name).unwrap().unwrap_or_default();
                (name.as_bytes().to_vec(), v)
            })
            .collect();
        got.sort();
        assert_eq!(got, want, "xattrs of {}", path.display());
        seen += 1;
    }
    assert!(seen > 0);
}

/// Check the image with the `ext4-view` crate (checksums verified by that reader).
pub fn ext4_view(fx: &Fixture, image: &Path) {
    let fs = ext4_view::Ext4::load_from_path(image).expect("ext4-view loads the image");
    for (path, node) in walk(&fx.tree) {
        let Some(p) = path.to_str() else { continue };
        let n = fx.tree.node(node);
        // ext4-view 1.0 reads the 32-bit seconds with `i32::try_from(u32)` and so rejects any
        // time before 1970 or past 2038; the kernel check covers those nodes.
        let m = &n.meta;
        if [m.atime, m.mtime, m.ctime, m.crtime]
            .iter()
            .any(|t| !(0..1 << 31).contains(&t.sec))
        {
            continue;
        }
        let md = fs
            .symlink_metadata(p)
            .unwrap_or_else(|e| panic!("ext4-view {p}: {e}"));
        assert_eq!(md.mode() & 0o7777, n.meta.mode, "ext4-view mode of {p}");
        assert_eq!(
            (md.uid(), md.gid()),
            (n.meta.uid, n.meta.gid),
            "ext4-view owner of {p}"
        );
        let mt = md.modified();
        assert_eq!(
            (mt.seconds(), mt.nanoseconds()),
            (n.meta.mtime.sec, n.meta.mtime.nsec),
            "ext4-view mtime of {p}"
        );
        match &n.kind {
            NodeKind::File(f) if f.size <= 64 << 20 => {
                assert_eq!(
                    fs.read(p).unwrap(),
                    expected(fx, node, 0, f.size as usize),
                    "ext4-view content of {p}"
                );
            }
            NodeKind::Symlink(t) => {
                let target = fs.read_link(p).unwrap();
                let got: &[u8] = target.as_ref();
                assert_eq!(got, &t[..], "ext4-view target of {p}");
            }
            NodeKind::Dir(entries) => {
                let count = fs.read_dir(p).unwrap().count();
                let extra = if node == FsTree::ROOT
                    && fx.tree.lookup(FsTree::ROOT, b"lost+found").is_none()
                {
                    3
                } else {
                    2
                };
                assert_eq!(count, entries.len() + extra, "ext4-view entries of {p}");
            }
            _ => {}
        }
    }
}

/// A loop mount that is unmounted on drop.
pub struct Mount {
    pub dir: tempfile::TempDir,
}

impl Mount {
    pub fn new(image: &Path, opts: &str) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-o", &format!("loop,{opts}")])
            .arg(image)
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mount -o loop,{opts} {} failed",
            image.display()
        );
        Mount { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Whether loop mounts are possible here (root); skips loudly, or fails under TESSERA_REQUIRE_PEERS.
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
    if !root {
        if std::env::var_os("TESSERA_REQUIRE_PEERS").is_some() {
            panic!("loop-mount tests need root (TESSERA_REQUIRE_PEERS is set)");
        }
        eprintln!("SKIPPED: loop-mount tests need root");
    }
    root
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Kernel log lines about ext4 errors since `mark` (a `dmesg` line count).
pub fn dmesg_mark() -> usize {
    dmesg().len()
}

pub fn ext4_errors_since(mark: usize) -> Vec<String> {
    dmesg()
        .into_iter()
        .skip(mark)
        .filter(|l| {
            l.contains("EXT4-fs error") || l.contains("EXT4-fs warning") || l.contains("checksum")
        })
        .collect()
}

fn dmesg() -> Vec<String> {
    let out = Command::new("dmesg").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

/// Build `fx` into an image and check it with every reader: `e2fsck -fn`, the kernel
/// (read-only loop mount, no EXT4-fs errors in dmesg) and ext4-view.
pub fn check_all_readers(fx: &Fixture, size: Option<u64>, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(name);
    build_image(fx, &options(size), &img);
    e2fsck_clean(&img);
    let mark = dmesg_mark();
    {
        let m = Mount::new(&img, "ro");
        kernel_view(fx, m.path());
    }
    assert_eq!(ext4_errors_since(mark), Vec::<String>::new());
    ext4_view(fx, &img);
    reader_view(fx, &img);
}

/// An image file as the reader's device.
pub struct ImageFile(pub fs::File);

impl tessera_ext4::read::ReadAt for ImageFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }
}

/// Check the image with our own reader (`tessera_ext4::read`): every path of the tree with
/// its kind, metadata (all four times to the nanosecond, xattrs), size, contents and
/// sparseness, link target, device numbers and hardlinks; nothing else but a synthesized
/// `lost+found`.
pub fn reader_view(fx: &Fixture, image: &Path) {
    use tessera_ext4::read::{Filesystem, InodeKind};
    let fs = Filesystem::open(ImageFile(fs::File::open(image).unwrap())).expect("reader opens");
    let got = fs.walk().expect("reader walks the tree");
    let mut by_path: HashMap<Vec<u8>, &tessera_ext4::read::WalkEntry> =
        got.iter().map(|e| (e.path.clone(), e)).collect();
    let mut ino_of_node: HashMap<NodeId, u32> = HashMap::new();
    let links = link_counts(&fx.tree);
    for (path, node) in walk(&fx.tree) {
        let rel = path
            .strip_prefix("/")
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        let p = path.display().to_string();
        let e = by_path
            .remove(&rel)
            .unwrap_or_else(|| panic!("reader lacks {p}"));
        let n = fx.tree.node(node);
        let mut want_meta = n.meta.clone();
        want_meta.xattrs.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(e.inode.meta, want_meta, "reader metadata of {p}");
        if let Some(ino) = ino_of_node.insert(node, e.inode.ino) {
            assert_eq!(ino, e.inode.ino, "reader: hardlinks of {p} are one inode");
        }
        match (&n.kind, e.inode.kind) {
            (NodeKind::File(f), InodeKind::File) => {
                assert_eq!(e.inode.size, f.size, "reader size of {p}");
                assert_eq!(
                    e.inode.links as u64, links[&node],
                    "reader link count of {p}"
                );
                let extents = fs.extents(&e.inode).unwrap();
                let mut buf = vec![0u8; f.size as usize];
                fs.read_file(&e.inode, &extents, &mut buf, 0).unwrap();
                assert!(
                    buf == expected(fx, node, 0, f.size as usize),
                    "reader content of {p}"
                );
                let mapped: u64 = extents.iter().map(|x| x.len * 4096).sum();
                let want: u64 = match &f.segments {
                    Some(s) => s.iter().map(|s| s.len.div_ceil(4096) * 4096).sum(),
                    None => f.size.div_ceil(4096) * 4096,
                };
                assert_eq!(mapped, want, "reader: mapped bytes of {p}");
            }
            (NodeKind::Dir(_), InodeKind::Dir) => {}
            (NodeKind::Symlink(t), InodeKind::Symlink) => {
                assert_eq!(
                    &fs.symlink_target(&e.inode).unwrap(),
                    t,
                    "reader target of {p}"
                );
            }
            (NodeKind::CharDev { major, minor }, InodeKind::CharDev { major: a, minor: b })
            | (NodeKind::BlockDev { major, minor }, InodeKind::BlockDev { major: a, minor: b }) => {
                assert_eq!((*major, *minor), (a, b), "reader device numbers of {p}");
            }
            (NodeKind::Fifo, InodeKind::Fifo) | (NodeKind::Socket, InodeKind::Socket) => {}
            (want, got) => panic!("reader kind of {p}: {got:?}, want {want:?}"),
        }
    }
    if fx.tree.lookup(FsTree::ROOT, b"lost+found").is_none() {
        by_path
            .remove(&b"lost+found"[..])
            .expect("a synthesized lost+found");
    }
    assert!(
        by_path.is_empty(),
        "reader sees extra paths: {:?}",
        by_path.keys()
    );
}
