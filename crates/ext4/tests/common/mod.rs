//! Test helpers: build trees whose file data live in memory, write images, run e2fsprogs.
#![allow(dead_code)]

pub mod verify;

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use tessera_ext4::{
    build, DataHandle, FileData, FsTree, Layout, Metadata, Node, NodeId, NodeKind, Options, Piece,
    Segment, Timestamp, Xattr,
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
        let handle = DataHandle(self.objects.len() as u64);
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
        let handle = DataHandle(self.objects.len() as u64);
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
