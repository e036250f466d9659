//! An exact ext4 synthesizer.
//!
//! Input: an [`FsTree`] whose regular files are opaque [`DataHandle`]s, plus [`Options`]
//! (size, inode count, UUID, label, seeds, timestamps). Output: a [`Layout`] that says, for
//! any byte range of the device, which parts are generated metadata, which are slices of a
//! file's data object and which are zeros. The crate knows nothing of stores, files on disk
//! or sockets, and is deterministic: the same tree and options give the same bytes.
//! [`plan`] answers what `build` would (fits or not, size, counts) without the bytes;
//! [`build_on_demand`] returns the same layout with its metadata generated as reads reach it.
//!
//! Every file's data starts on a 4 KiB block boundary and runs contiguously (split only
//! where a superblock backup or the 128 MiB extent limit forces it), so image block `p + i`
//! is block `i` of the file's object and readers of different images share object pages.
//!
//! The on-disk format follows the kernel's `Documentation/filesystems/ext4/` and
//! e2fsprogs' `lib/ext2fs`; the structure modules cite the sections they implement.

mod build;
mod checksum;
mod dir;
mod error;
mod extent;
mod generate;
mod hash;
mod inode;
mod layout;
mod le;
mod name;
mod placement;
mod plan;
pub mod read;
mod regions;
mod summary;
mod superblock;
mod tree;
mod xattr;

pub use build::{build, build_on_demand};
pub use error::Error;
pub use layout::{Layout, MetaSlice, MetadataBlocks, Piece, Pieces, Stats};
pub use name::Name;
pub use summary::{plan, Summary};
pub use tree::{
    DataHandle, DirEntry, FileData, FsTree, Metadata, Node, NodeId, NodeKind, Segment, Timestamp,
    Xattr,
};

/// The only block size we emit: 4 KiB, the page size, so image blocks align with object pages.
pub const BLOCK_SIZE: u64 = 4096;
/// ext4's limit on a directory entry name.
pub const MAX_NAME_LEN: usize = 255;
/// Linux's limit on a symlink target (PATH_MAX - 1).
pub const MAX_SYMLINK_LEN: usize = 4095;

/// Geometry and identity of the filesystem to synthesize. Nothing here is read from a clock
/// or an RNG: the caller decides, so output is reproducible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Device size in bytes (rounded down to a whole block). `None`: the tree's needs plus
    /// headroom for a read-write mount (see [`Options::default_size`]).
    pub size: Option<u64>,
    /// Number of inodes. `None`: the tree's inodes plus headroom.
    pub inodes: Option<u32>,
    pub uuid: [u8; 16],
    /// Volume label, at most 16 bytes.
    pub label: Vec<u8>,
    /// Seed of the directory-index hash (`s_hash_seed`).
    pub hash_seed: [u8; 16],
    /// Seed of all metadata checksums (`s_checksum_seed`, feature `metadata_csum_seed`), so
    /// the metadata does not change when only the UUID does.
    pub checksum_seed: u32,
    /// Creation time of the filesystem (superblock times, lost+found defaults).
    pub timestamp: i64,
}

impl Options {
    /// Headroom added to a tree's needs when no size is given: a quarter more, at least 64 MiB.
    pub fn default_size(needed_bytes: u64) -> u64 {
        let extra = (needed_bytes / 4).max(64 << 20);
        (needed_bytes + extra).div_ceil(BLOCK_SIZE) * BLOCK_SIZE
    }
}
