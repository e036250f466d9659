//! Why a filesystem cannot be read.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ReadError {
    #[error("reading the {what} at byte {offset}")]
    Io {
        what: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("not an ext2/3/4 filesystem (superblock magic {magic:#06x}, want 0xef53)")]
    NotExt4 { magic: u16 },
    #[error("the filesystem uses {feature}, which this reader does not support")]
    Unsupported { feature: &'static str },
    #[error("the journal needs recovery (feature needs_recovery): mount and cleanly unmount the filesystem, or run e2fsck, before reading it")]
    NeedsRecovery,
    #[error("inode {ino}: {why}")]
    InodeUnsupported { ino: u32, why: &'static str },
    #[error("corrupt {what}: {why}")]
    Corrupt { what: &'static str, why: String },
}

impl ReadError {
    pub(crate) fn corrupt(what: &'static str, why: impl Into<String>) -> ReadError {
        ReadError::Corrupt {
            what,
            why: why.into(),
        }
    }
}
