//! The whole tree: every path with its inode, parents before children, and hardlinks
//! recognized by inode number.

use super::{Filesystem, Inode, InodeKind, ReadAt, ReadError};

const ROOT_INO: u32 = 2;

/// One path of the tree. Hardlinked paths share `inode.ino`. `inode.meta.xattrs` is filled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkEntry {
    /// `/`-separated, relative; `""` is the root.
    pub path: Vec<u8>,
    pub inode: Inode,
}

impl<R: ReadAt> Filesystem<R> {
    /// Every entry reachable from the root, sorted by path bytes (so parents come first).
    /// Each inode is read once; a directory reached twice is refused as corrupt.
    pub fn walk(&self) -> Result<Vec<WalkEntry>, ReadError> {
        let mut root = self.inode(ROOT_INO)?;
        if root.kind != InodeKind::Dir {
            return Err(ReadError::corrupt("root inode", "not a directory"));
        }
        root.meta.xattrs = self.xattrs(&root)?;
        let mut out = vec![WalkEntry {
            path: Vec::new(),
            inode: root,
        }];
        let mut seen: std::collections::HashMap<u32, Inode> = std::collections::HashMap::new();
        let mut i = 0;
        while i < out.len() {
            if out[i].inode.kind == InodeKind::Dir {
                let dir = out[i].inode.clone();
                let dir_path = out[i].path.clone();
                for e in self.read_dir(&dir)? {
                    let inode = match seen.get(&e.ino) {
                        Some(inode) if inode.kind == InodeKind::Dir => {
                            return Err(ReadError::corrupt(
                                "directory",
                                format!("directory inode {} has two names", e.ino),
                            ))
                        }
                        Some(inode) => inode.clone(),
                        None => {
                            let mut inode = self.inode(e.ino)?;
                            inode.meta.xattrs = self.xattrs(&inode)?;
                            seen.insert(e.ino, inode.clone());
                            inode
                        }
                    };
                    let path = if dir_path.is_empty() {
                        e.name
                    } else {
                        [&dir_path[..], b"/", &e.name].concat()
                    };
                    out.push(WalkEntry { path, inode });
                }
            }
            i += 1;
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }
}
