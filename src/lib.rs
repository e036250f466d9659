//! tessera: ext4 block devices synthesized on the fly from a content-addressed store.
//!
//! Data flows import → [`store`] → [`tree`] → [`image`] → ext4 layout (`tessera_ext4`) →
//! [`blockdev`] → frontends (NBD, [`ublk`], raw export). [`upkeep`] (gc, stats, verify) sits
//! above the store and the images it walks.

pub mod alloc;
pub mod blockdev;
pub mod cli;
pub mod commit;
pub mod demo;
pub mod image;
pub mod import;
pub mod serve;
pub mod store;
pub mod tree;
pub mod ublk;
pub mod upkeep;
