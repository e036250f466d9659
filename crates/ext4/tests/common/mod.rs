//! Test helpers: build trees whose file data live in memory, write images, run e2fsprogs.
#![allow(dead_code)]

pub mod verify;

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use tessera_ext4::{
    build, DataHandle, FileData, FsTree, Layout, Metadata, Node, NodeId, NodeKind, Options, Piece,
    Pieces, Segment, Timestamp, Xattr,
};

/// A tree plus the bytes behind each data handle.
pub struct Fixture {
    pub tree: FsTree,
    pub objects: Vec<Vec<u8>>,
}

pub fn meta(mode: u16) -> Metadata {
    let t = Timestamp {
        sec: 1_700_000_000,
        nsec: 123_456_789,
    };
    Metadata {
        mode,
        uid: 1000,
        gid: 100,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        xattrs: Vec::new(),
    }
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture {
            tree: FsTree::new(meta(0o755)),
            objects: Vec::new(),
        }
    }

    pub fn dir(&mut self, parent: NodeId, name: &str) -> NodeId {
        self.tree
            .add(
                parent,
                name.as_bytes(),
                Node {
                    kind: NodeKind::Dir(Vec::new()),
                    meta: meta(0o755),
                },
            )
            .unwrap()
    }

    pub fn file(&mut self, parent: NodeId, name: &str, data: &[u8]) -> NodeId {
        let handle = DataHandle(self.objects.len() as u32);
        self.objects.push(data.to_vec());
        let f = FileData {
            handle,
            size: data.len() as u64,
            segments: None,
        };
        self.tree
            .add(
                parent,
                name.as_bytes(),
                Node {
                    kind: NodeKind::File(f),
                    meta: meta(0o644),
                },
            )
            .unwrap()
    }

    /// A sparse file of `size` bytes whose `segments` hold data (filled with a pattern).
    pub fn sparse(
        &mut self,
        parent: NodeId,
        name: &str,
        size: u64,
        segments: &[(u64, u64)],
    ) -> NodeId {
        let handle = DataHandle(self.objects.len() as u32);
        let mut obj = Vec::new();
        for &(off, len) in segments {
            obj.extend((0..len).map(|i| ((off + i) % 251) as u8));
        }
        self.objects.push(obj);
        let segs = segments
            .iter()
            .map(|&(offset, len)| Segment { offset, len })
            .collect();
        let f = FileData {
            handle,
            size,
            segments: Some(segs),
        };
        self.tree
            .add(
                parent,
                name.as_bytes(),
                Node {
                    kind: NodeKind::File(f),
                    meta: meta(0o600),
                },
            )
            .unwrap()
    }

    pub fn symlink(&mut self, parent: NodeId, name: &str, target: &str) -> NodeId {
        let n = Node {
            kind: NodeKind::Symlink(target.as_bytes().to_vec()),
            meta: meta(0o777),
        };
        self.tree.add(parent, name.as_bytes(), n).unwrap()
    }

    pub fn node(&mut self, parent: NodeId, name: &str, kind: NodeKind, mode: u16) -> NodeId {
        self.tree
            .add(
                parent,
                name.as_bytes(),
                Node {
                    kind,
                    meta: meta(mode),
                },
            )
            .unwrap()
    }

    pub fn xattr(&mut self, node: NodeId, name: &str, value: &[u8]) {
        self.tree.node_mut(node).meta.xattrs.push(Xattr {
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
        });
    }
}

pub fn options(size: Option<u64>) -> Options {
    Options {
        size,
        inodes: None,
        uuid: *b"tessera-test-uid",
        label: b"test".to_vec(),
        hash_seed: *b"0123456789abcdef",
        checksum_seed: 0x1234_5678,
        timestamp: 1_700_000_000,
    }
}

/// The bytes `pieces` stand for, file data from `objects`.
pub fn bytes_of(pieces: Pieces<'_>, objects: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Meta(m) => out.extend_from_slice(&m.to_vec()),
            Piece::Data {
                handle,
                offset,
                len,
            } => out.extend_from_slice(
                &objects[handle.0 as usize][offset as usize..(offset + len) as usize],
            ),
            Piece::Zero(n) => out.resize(out.len() + n as usize, 0),
        }
    }
    out
}

/// Write the image through `Layout::pieces`, leaving zero ranges as holes.
pub fn write_image(layout: &Layout, objects: &[Vec<u8>], path: &Path) {
    let mut f = File::create(path).unwrap();
    f.set_len(layout.size()).unwrap();
    let mut pos = 0u64;
    for piece in layout.pieces(0, layout.size()) {
        match piece {
            Piece::Meta(m) => {
                f.seek(SeekFrom::Start(pos)).unwrap();
                f.write_all(&m.to_vec()).unwrap();
            }
            Piece::Data {
                handle,
                offset,
                len,
            } => {
                let obj = &objects[handle.0 as usize];
                f.seek(SeekFrom::Start(pos)).unwrap();
                f.write_all(&obj[offset as usize..(offset + len) as usize])
                    .unwrap();
            }
            Piece::Zero(_) => {}
        }
        pos += piece.len();
    }
    assert_eq!(pos, layout.size());
}

pub fn build_image(fx: &Fixture, opts: &Options, path: &Path) -> Layout {
    let layout = build(&fx.tree, opts).unwrap();
    write_image(&layout, &fx.objects, path);
    layout
}

pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("TESSERA_REQUIRE_PEERS").is_some() {
            panic!("{tool} is required (TESSERA_REQUIRE_PEERS is set) but not installed");
        }
        eprintln!("SKIPPED: {tool} not installed");
    }
    ok
}

/// `e2fsck -fn`: must exit 0 and print nothing but its pass headers and summary.
pub fn e2fsck_clean(path: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(path)
        .output()
        .expect("run e2fsck");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| {
            !(l.starts_with("Pass ")
                || l.starts_with("e2fsck ")
                || (l.contains(" files (") && l.ends_with(" blocks"))
                || l.trim().is_empty()
                || l.starts_with("Checking ")
                || l.ends_with(": clean"))
        })
        .collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "e2fsck -fn {} reported problems (exit {:?}):\n{text}",
        path.display(),
        out.status.code()
    );
}

/// A small tree with one of everything: every node kind, hardlinks across directories,
/// in-inode and block xattrs, long and non-ASCII names, deep paths, times outside 1970-2038.
pub fn kitchen_sink() -> Fixture {
    let mut fx = Fixture::new();
    let d = fx.dir(FsTree::ROOT, "dir");
    let f = fx.file(d, "hello.txt", b"hello world\n");
    fx.file(FsTree::ROOT, "empty", b"");
    fx.file(
        FsTree::ROOT,
        "blocks",
        &(0..3 * 4096 + 5)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<_>>(),
    );
    let other = fx.dir(FsTree::ROOT, "other");
    fx.tree.link(other, b"hardlink", f).unwrap();
    fx.symlink(FsTree::ROOT, "fast", "dir/hello.txt");
    fx.symlink(FsTree::ROOT, "slow", &"x/".repeat(100));
    fx.node(
        FsTree::ROOT,
        "null",
        NodeKind::CharDev { major: 1, minor: 3 },
        0o666,
    );
    fx.node(
        FsTree::ROOT,
        "nvme",
        NodeKind::BlockDev {
            major: 259,
            minor: 70000,
        },
        0o660,
    );
    fx.node(FsTree::ROOT, "fifo", NodeKind::Fifo, 0o644);
    fx.node(FsTree::ROOT, "sock", NodeKind::Socket, 0o755);
    fx.node(FsTree::ROOT, "setuid", NodeKind::Fifo, 0o4755);
    fx.xattr(f, "user.small", b"1");
    fx.xattr(f, "trusted.t", b"tt");
    let big = fx.file(FsTree::ROOT, "big-xattrs", b"x");
    fx.xattr(big, "user.big", &[9u8; 300]);
    fx.xattr(
        big,
        "security.capability",
        &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    fx.file(FsTree::ROOT, "ünïcødé ファイル", b"utf8");
    fx.file(FsTree::ROOT, &"n".repeat(255), b"long name");
    let mut deep = FsTree::ROOT;
    for i in 0..40 {
        deep = fx.dir(deep, &format!("level{i}"));
    }
    fx.file(deep, "bottom", b"deep");
    // Times before 1970 and after 2038.
    let old = fx.file(FsTree::ROOT, "old", b"1969");
    fx.tree.node_mut(old).meta.mtime = tessera_ext4::Timestamp {
        sec: -86_400,
        nsec: 1,
    };
    let future = fx.file(FsTree::ROOT, "future", b"2100");
    fx.tree.node_mut(future).meta.mtime = tessera_ext4::Timestamp {
        sec: 4_102_444_800,
        nsec: 999_999_999,
    };
    fx
}
