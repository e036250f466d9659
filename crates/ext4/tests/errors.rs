//! Bad input gives a clear error naming the cause.

mod common;
use common::*;
use tessera_ext4::{build, DataHandle, Error, FileData, FsTree, Node, NodeKind, Segment};

#[test]
fn names_over_255_bytes_are_rejected_by_the_tree() {
    let mut fx = Fixture::new();
    let node = Node {
        kind: NodeKind::Fifo,
        meta: meta(0o644),
    };
    let err = fx
        .tree
        .add(FsTree::ROOT, "n".repeat(256).as_bytes(), node)
        .unwrap_err();
    assert!(matches!(err, Error::NameTooLong { .. }), "{err}");
}

#[test]
fn names_over_255_bytes_inserted_directly_are_rejected_by_build() {
    let mut fx = Fixture::new();
    let d = fx.dir(FsTree::ROOT, "d");
    let f = fx.file(d, "ok", b"x");
    if let NodeKind::Dir(e) = &mut fx.tree.node_mut(d).kind {
        e[0].name = vec![b'a'; 300].into();
    }
    let _ = f;
    let err = build(&fx.tree, &options(None)).unwrap_err();
    assert!(
        matches!(&err, Error::NameTooLong { path } if path.starts_with("/d/aaa")),
        "{err}"
    );
}

#[test]
fn more_files_than_inodes() {
    let mut fx = Fixture::new();
    for i in 0..100 {
        fx.file(FsTree::ROOT, &format!("f{i}"), b"");
    }
    let mut opts = options(None);
    opts.inodes = Some(50);
    let err = build(&fx.tree, &opts).unwrap_err();
    assert_eq!(
        err,
        Error::TooManyFiles {
            needed: 111,
            available: 50
        }
    );
    assert!(err.to_string().contains("needs 111 inodes"));
}

#[test]
fn size_too_small_names_the_size_needed() {
    let mut fx = Fixture::new();
    fx.file(FsTree::ROOT, "big", &vec![1u8; 8 << 20]);
    let err = build(&fx.tree, &options(Some(4 << 20))).unwrap_err();
    let Error::TooSmall { size, needed } = err else {
        panic!("{err}")
    };
    assert_eq!(size, 4 << 20);
    // The reported minimum really is enough, and a block less is not.
    assert!(build(&fx.tree, &options(Some(needed))).is_ok());
    assert!(needed > 8 << 20);
}

#[test]
fn duplicate_names_and_directory_hardlinks() {
    let mut fx = Fixture::new();
    let f = fx.file(FsTree::ROOT, "a", b"");
    fx.tree.link(FsTree::ROOT, b"a", f).unwrap();
    assert!(matches!(
        build(&fx.tree, &options(None)),
        Err(Error::DuplicateName { .. })
    ));

    let mut fx = Fixture::new();
    let d = fx.dir(FsTree::ROOT, "d");
    fx.tree.link(FsTree::ROOT, b"again", d).unwrap();
    assert!(matches!(
        build(&fx.tree, &options(None)),
        Err(Error::DirectoryHardlink { .. })
    ));
}

#[test]
fn bad_segments_and_symlinks() {
    let mut fx = Fixture::new();
    let f = FileData {
        handle: DataHandle(0),
        size: 10_000,
        segments: Some(vec![Segment {
            offset: 100,
            len: 10,
        }]),
    };
    fx.tree
        .add(
            FsTree::ROOT,
            b"s",
            Node {
                kind: NodeKind::File(f),
                meta: meta(0o644),
            },
        )
        .unwrap();
    let err = build(&fx.tree, &options(None)).unwrap_err();
    assert!(
        matches!(&err, Error::BadSegments { path, .. } if path == "/s"),
        "{err}"
    );

    let mut fx = Fixture::new();
    fx.symlink(FsTree::ROOT, "l", &"x".repeat(4096));
    assert!(matches!(
        build(&fx.tree, &options(None)),
        Err(Error::SymlinkTooLong { len: 4096, .. })
    ));
}

#[test]
fn lost_found_must_be_a_directory() {
    let mut fx = Fixture::new();
    fx.file(FsTree::ROOT, "lost+found", b"");
    assert_eq!(
        build(&fx.tree, &options(None)).unwrap_err(),
        Error::LostFoundNotDir
    );
}

#[test]
fn label_too_long() {
    let mut opts = options(None);
    opts.label = b"seventeen-bytes!!".to_vec();
    assert_eq!(
        build(&Fixture::new().tree, &opts).unwrap_err(),
        Error::LabelTooLong
    );
}
