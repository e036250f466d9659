//! Importers: turn a source of files into objects and a tree manifest in the store.

mod content;
mod dir;
mod meta;
mod readdir;
mod sparse;
mod xattr;

use std::io;
use std::path::{Path, PathBuf};

pub use dir::{import_dir, ImportSummary};

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
