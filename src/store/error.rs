use std::io;
use std::path::{Path, PathBuf};

use super::ObjectId;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("object {id} is missing from the store ({path})")]
    MissingObject { id: ObjectId, path: PathBuf },
    #[error("tree {id} is missing from the store")]
    MissingTree { id: ObjectId },
    #[error("no tree id starts with {prefix:?}")]
    NoSuchTree { prefix: String },
    #[error("tree id prefix {prefix:?} is ambiguous: {count} trees match")]
    AmbiguousTree { prefix: String, count: usize },
    #[error("invalid tree id {text:?}: expected 4 to 64 lowercase hex digits")]
    BadTreeId { text: String },
    #[error("the outboard of object {id} ({path}) is invalid")]
    BadOutboard {
        id: ObjectId,
        path: PathBuf,
        #[source]
        source: super::OutboardError,
    },
    #[error("pack index {path} is damaged: {why}")]
    BadPack { path: PathBuf, why: String },
    #[error("pack {pack} holds a corrupt copy of object {id}: it hashes to {actual}")]
    CorruptPackedObject {
        pack: PathBuf,
        id: ObjectId,
        actual: ObjectId,
    },
    #[error("no image named {name:?}")]
    MissingImage { name: String },
    #[error("content changed while being stored: expected {expected}, got {actual}")]
    HashMismatch {
        expected: ObjectId,
        actual: ObjectId,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find a store directory: none of --store, $TESSERA_STORE, $XDG_DATA_HOME or $HOME is set")]
    NoLocation,
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An error and its causes, `: `-separated (for log lines and reports).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
