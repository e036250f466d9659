use thiserror::Error;

/// Why a tree cannot be laid out as ext4 with the given options.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid file name {name:?}: empty, '.', '..', or containing '/' or NUL")]
    InvalidName { name: String },
    #[error("name too long for ext4 (over 255 bytes): {path}")]
    NameTooLong { path: String },
    #[error("duplicate directory entry: {path}")]
    DuplicateName { path: String },
    #[error("node {node} is not a directory")]
    NotADirectory { node: u32 },
    #[error("the root of the tree is not a directory")]
    RootNotDir,
    #[error("hardlink to a directory is not allowed: {path}")]
    DirectoryHardlink { path: String },
    #[error("symlink target of {len} bytes is empty or too long (at most 4095): {path}")]
    SymlinkTooLong { path: String, len: usize },
    #[error("extended attributes of {path} do not fit in the inode and one 4 KiB block")]
    XattrTooLarge { path: String },
    #[error("unsupported extended attribute name {name:?} on {path}")]
    XattrName { path: String, name: String },
    #[error("bad data segments for {path}: {why}")]
    BadSegments { path: String, why: &'static str },
    #[error("file too large for ext4 with 4 KiB blocks ({size} bytes): {path}")]
    FileTooLarge { path: String, size: u64 },
    #[error("too many hardlinks ({links}, at most 65000): {path}")]
    TooManyLinks { path: String, links: u64 },
    #[error("/lost+found exists in the tree but is not a directory")]
    LostFoundNotDir,
    #[error("the tree needs {needed} inodes but the image has only {available}")]
    TooManyFiles { needed: u64, available: u64 },
    #[error("inode count {inodes} is too large for {groups} block groups (at most {max})")]
    TooManyInodes { inodes: u64, groups: u64, max: u64 },
    #[error("image size {size} bytes is too small: the tree needs at least {needed} bytes")]
    TooSmall { size: u64, needed: u64 },
    #[error("image size {size} bytes is too large (at most 16 TiB)")]
    TooLarge { size: u64 },
    #[error("label longer than 16 bytes")]
    LabelTooLong,
}
