//! A small built-in tree with one of every kind of entry, for `tessera demo` and tests.

use crate::store::{ObjectId, Store, StoreError};
use crate::tree::{Bytes, Entry, Kind, Manifest, Segment, Time, Xattr};

/// 2024-01-01T00:00:00Z: demo timestamps are fixed so the demo tree id is too.
const EPOCH: i64 = 1_704_067_200;
const MIB: u64 = 1 << 20;

/// Store the demo tree's objects and manifest; returns the tree id.
pub fn store_demo_tree(store: &Store) -> Result<ObjectId, StoreError> {
    let mut entries = vec![
        dir("", 0o755),
        dir("bin", 0o755),
        dir("data", 0o755),
        dir("dev", 0o755),
        dir("docs", 0o755),
    ];

    let readme = b"This filesystem was synthesized by tessera from its content store.\n\
        No byte of it existed as an ext4 image before you read it.\n";
    entries.push(file(store, "README", 0o644, readme)?);
    entries.push(file(
        store,
        "bin/hello",
        0o755,
        b"#!/bin/sh\necho hello from tessera\n",
    )?);
    entries.push(file(store, "empty", 0o644, b"")?);
    entries.push(file(
        store,
        "docs/ünïcödé.txt",
        0o644,
        "Grüße aus dem Speicher\n".as_bytes(),
    )?);

    let mut random = vec![0u8; MIB as usize];
    blake3::Hasher::new_derive_key("tessera demo random")
        .finalize_xof()
        .fill(&mut random);
    for path in ["data/random.bin", "bin/random-link"] {
        let mut e = file(store, path, 0o640, &random)?;
        e.link = Some(0);
        entries.push(e);
    }

    // 64 MiB logical, 8 KiB of data: a block at the start and one in the middle.
    let mut sparse = file(store, "data/sparse.img", 0o600, &[0x5a; 8192])?;
    sparse.size = Some(64 * MIB);
    sparse.segments = Some(vec![Segment(0, 4096), Segment(32 * MIB, 4096)]);
    entries.push(sparse);

    let mut motd = file(store, "motd", 0o644, b"Welcome.\n")?;
    motd.xattrs.push(Xattr {
        name: Bytes(b"user.comment".to_vec()),
        value: Bytes(b"set by tessera demo".to_vec()),
    });
    entries.push(motd);

    let mut link = base("latest", Kind::Symlink, 0o777);
    link.target = Some(Bytes(b"data/random.bin".to_vec()));
    entries.push(link);
    let mut null = base("dev/null", Kind::Chardev, 0o666);
    null.rdev = Some((1, 3));
    entries.push(null);
    entries.push(base("dev/fifo", Kind::Fifo, 0o600));

    let manifest = Manifest::new(entries);
    debug_assert!(manifest.validate().is_ok(), "{:?}", manifest.validate());
    store.put_tree_bytes(&manifest.to_bytes())
}

fn base(path: &str, kind: Kind, mode: u16) -> Entry {
    let t = Time(EPOCH, 123_456_789);
    Entry {
        path: Bytes(path.as_bytes().to_vec()),
        kind,
        mode,
        uid: 0,
        gid: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: Some(t),
        xattrs: Vec::new(),
        size: None,
        object: None,
        segments: None,
        link: None,
        target: None,
        rdev: None,
        opaque: false,
    }
}

fn dir(path: &str, mode: u16) -> Entry {
    base(path, Kind::Dir, mode)
}

fn file(store: &Store, path: &str, mode: u16, data: &[u8]) -> Result<Entry, StoreError> {
    let mut e = base(path, Kind::File, mode);
    e.size = Some(data.len() as u64);
    e.object = Some(store.put_object_bytes(data)?);
    Ok(e)
}
