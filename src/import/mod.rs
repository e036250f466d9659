//! Importers: turn a source of files into objects and a tree manifest in the store.

mod content;
pub mod deb;
mod dir;
pub(crate) mod intake;
mod meta;
pub mod oci;
mod readdir;
mod sparse;
pub mod tar;
mod xattr;

use std::io;
use std::path::{Path, PathBuf};

pub use self::deb::{import_debs, ImportedDebs};
pub use self::oci::import_oci;
pub use self::tar::{import_tar, ArchiveError};
pub use dir::{import_dir, ImportSummary};
pub use intake::Packing;

use crate::store::pack::PackIndex;
use crate::store::StoreError;

/// Why an import failed. Nothing is named in the store for a failed file: objects appear
/// atomically, and the tree is written only after every file is stored.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} changed while it was being imported")]
    Changed { path: PathBuf },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
}

impl ImportError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        ImportError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The pack an import wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackSummary {
    pub name: String,
    pub objects: usize,
    /// Bytes of the pack file.
    pub bytes: u64,
}

impl PackSummary {
    pub(crate) fn of(index: &PackIndex) -> PackSummary {
        PackSummary {
            name: index.name().to_owned(),
            objects: index.len(),
            bytes: index.pack_len(),
        }
    }
}
