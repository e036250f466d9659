//! The input: a file tree whose regular-file contents are opaque handles.
//!
//! The synthesizer never sees file bytes. A regular file is a `DataHandle` chosen by the
//! caller plus the file's logical size and, for sparse files, the list of data segments.
//! The object behind a handle holds the segments' bytes back to back, so segment `i`
//! starts in the object at the sum of the lengths of segments `0..i`.

use crate::{Error, Name};

/// Index of a node in an [`FsTree`]. The root directory is always node 0.
pub type NodeId = u32;

/// Opaque reference to a file's data, chosen by the caller (e.g. an index into its object
/// table). 32 bits, as inode numbers are: a layout keeps one per file extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataHandle(pub u32);

/// Seconds since the Unix epoch (may be negative or past 2038) plus nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// One extended attribute, with its full name (`user.foo`, `security.capability`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// Ownership, permissions, times and xattrs shared by every kind of node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// Permission bits including setuid/setgid/sticky (`0o7777`); the file type comes from the kind.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    pub xattrs: Vec<Xattr>,
}

/// A range of a sparse file that holds data; everything outside all segments is a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Logical offset in the file; a multiple of the 4 KiB block size.
    pub offset: u64,
    /// Length in bytes; a multiple of 4 KiB unless the segment ends at the end of the file.
    pub len: u64,
}

/// A regular file's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileData {
    pub handle: DataHandle,
    /// Logical file size (`st_size`).
    pub size: u64,
    /// Data segments in increasing order, or `None` for a dense file (one segment `0..size`).
    pub segments: Option<Vec<Segment>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    File(FileData),
    /// Children in any order; names are unique, at most 255 bytes, without `/` or NUL.
    Dir(Vec<DirEntry>),
    Symlink(Vec<u8>),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Name,
    pub node: NodeId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub meta: Metadata,
}

/// A name no directory entry can have: empty, `.`, `..`, or holding `/` or NUL.
pub(crate) fn invalid_name(name: &[u8]) -> bool {
    name.is_empty() || name == b"." || name == b".." || has_slash_or_nul(name)
}

/// Eight bytes at a time: every name of an image is checked when it is sized, and a byte
/// loop was a tenth of `image create`'s instructions.
fn has_slash_or_nul(name: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Exact for "some byte is zero": a borrow can only start at a zero byte.
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS != 0;
    let has_either = |x: u64| has_zero(x) | has_zero(x ^ (ONES * b'/' as u64));
    let mut words = name.chunks_exact(8);
    for w in &mut words {
        if has_either(u64::from_le_bytes(w.try_into().expect("8 bytes"))) {
            return true;
        }
    }
    // The tail, filled up with a byte that is neither.
    let mut last = [1u8; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    has_either(u64::from_le_bytes(last))
}

/// A directory tree. Hardlinks are several directory entries naming the same non-directory node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsTree {
    nodes: Vec<Node>,
}

impl FsTree {
    /// A tree holding only an empty root directory.
    pub fn new(root: Metadata) -> Self {
        FsTree {
            nodes: vec![Node {
                kind: NodeKind::Dir(Vec::new()),
                meta: root,
            }],
        }
    }

    /// Like [`FsTree::new`], with room for `nodes` nodes (the root included) allocated up
    /// front: a caller that knows the count saves the copies of a growing table.
    pub fn with_capacity(root: Metadata, nodes: usize) -> Self {
        let mut tree = FsTree {
            nodes: Vec::with_capacity(nodes.max(1)),
        };
        tree.nodes.push(Node {
            kind: NodeKind::Dir(Vec::new()),
            meta: root,
        });
        tree
    }

    pub const ROOT: NodeId = 0;

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    /// Add a new node without linking it anywhere yet.
    pub fn add_node(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        (self.nodes.len() - 1) as NodeId
    }

    /// Create `name` in directory `parent` as a new node.
    pub fn add(&mut self, parent: NodeId, name: &[u8], node: Node) -> Result<NodeId, Error> {
        let id = self.add_node(node);
        self.link(parent, name, id)?;
        Ok(id)
    }

    /// Add a directory entry `name` in `parent` naming the existing node `target`.
    pub fn link(&mut self, parent: NodeId, name: &[u8], target: NodeId) -> Result<(), Error> {
        if invalid_name(name) {
            return Err(Error::InvalidName {
                name: String::from_utf8_lossy(name).into_owned(),
            });
        }
        if name.len() > crate::MAX_NAME_LEN {
            return Err(Error::NameTooLong {
                path: String::from_utf8_lossy(name).into_owned(),
            });
        }
        match &mut self.nodes[parent as usize].kind {
            NodeKind::Dir(entries) => {
                entries.push(DirEntry {
                    name: Name::new(name),
                    node: target,
                });
                Ok(())
            }
            _ => Err(Error::NotADirectory { node: parent }),
        }
    }

    /// Find a child of `dir` by name.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &self.nodes[dir as usize].kind {
            NodeKind::Dir(entries) => entries.iter().find(|e| e.name == name).map(|e| e.node),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_a_slash_or_nul_anywhere_are_invalid() {
        for len in 1..40 {
            let ok = vec![b'a'; len];
            assert!(!invalid_name(&ok), "{len}");
            for at in 0..len {
                for (bad, then) in [(b'/', 0x80u8), (0, 0xff), (b'/', b'.'), (0, 1)] {
                    let mut name = ok.clone();
                    name[at] = bad;
                    if at + 1 < len {
                        name[at + 1] = then;
                    }
                    assert!(invalid_name(&name), "{name:?}");
                }
            }
        }
        for fine in [
            &b"..."[..],
            b".a",
            "caf\u{e9}\u{2f00}.txt".as_bytes(),
            &[0xff; 255],
        ] {
            assert!(!invalid_name(fine), "{fine:?}");
        }
        for bad in [&b""[..], b".", b".."] {
            assert!(invalid_name(bad), "{bad:?}");
        }
    }
}
