use crate::{Error, FsTree, Layout, Options};

/// Lay out `tree` as an ext4 filesystem.
pub fn build(_tree: &FsTree, _opts: &Options) -> Result<Layout, Error> {
    todo!("ext4 synthesizer in progress")
}
