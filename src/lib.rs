//! tessera: ext4 block devices synthesized on the fly from a content-addressed store.
