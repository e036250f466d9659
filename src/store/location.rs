//! Where the store lives when no `--store` is given.

use std::path::PathBuf;

use super::StoreError;

/// `flag`, else `$TESSERA_STORE`, else `$XDG_DATA_HOME/tessera`, else
/// `$HOME/.local/share/tessera`. Empty variables count as unset.
pub fn resolve(flag: Option<PathBuf>) -> Result<PathBuf, StoreError> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    flag.or_else(|| var("TESSERA_STORE"))
        .or_else(|| var("XDG_DATA_HOME").map(|d| d.join("tessera")))
        .or_else(|| var("HOME").map(|h| h.join(".local/share/tessera")))
        .ok_or(StoreError::NoLocation)
}
