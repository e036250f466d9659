//! `plan` sizes an image without emitting it: it must report exactly what `build` reports
//! (device size, every count, the same errors), on the kitchen sink, on the shapes that
//! make directories and extent trees grow (htrees with an index level, deep extent trees,
//! several groups, slow symlinks, xattr blocks) and on random trees.

mod common;
use common::*;
use proptest::prelude::*;
use tessera_ext4::{build, plan, DataHandle, FileData, FsTree, NodeKind, Options};

fn assert_plan_matches_build(fx: &Fixture, opts: &Options) {
    let planned = plan(&fx.tree, opts);
    match build(&fx.tree, opts) {
        Ok(layout) => {
            let p = planned.expect("plan fails where build succeeds");
            assert_eq!(p.size, layout.size());
            assert_eq!(p.stats, layout.stats());
        }
        Err(e) => assert_eq!(
            planned
                .expect_err("plan succeeds where build fails")
                .to_string(),
            e.to_string()
        ),
    }
}

#[test]
fn kitchen_sink_at_its_own_size_and_at_fixed_sizes() {
    let fx = kitchen_sink();
    assert_plan_matches_build(&fx, &options(None));
    for size in [64 << 20, 1 << 30, (3 << 30) + 12345] {
        assert_plan_matches_build(&fx, &options(Some(size)));
    }
    // Too small: both name the same size needed.
    assert_plan_matches_build(&fx, &options(Some(1 << 20)));
}

#[test]
fn htrees_with_an_index_level_and_deep_extent_trees() {
    let mut fx = Fixture::new();
    // 2 000 entries: an htree with one level; 60 000 long names: the root overflows.
    let small = fx.dir(FsTree::ROOT, "small");
    for i in 0..2000 {
        fx.file(small, &format!("name{i}"), &[]);
    }
    let big = fx.dir(FsTree::ROOT, "big");
    for i in 0..60_000 {
        fx.node(
            big,
            &format!("fifo-with-a-long-name-{i:08}"),
            NodeKind::Fifo,
            0o600,
        );
    }
    // 3 000 one-block extents: a tree of extent blocks outside the inode.
    let segs: Vec<(u64, u64)> = (0..3000u64).map(|i| (i * 8192, 4096)).collect();
    fx.sparse(FsTree::ROOT, "holey", 3000 * 8192, &segs);
    fx.symlink(FsTree::ROOT, "slow", &"t/".repeat(100));
    let x = fx.file(FsTree::ROOT, "xattrs", b"x");
    fx.xattr(x, "user.big", &[7; 3000]);
    assert_plan_matches_build(&fx, &options(None));
    // Many groups: superblock backups split the allocation.
    assert_plan_matches_build(&fx, &options(Some(5 << 30)));
    // Too few inodes: the same error.
    let few = Options {
        inodes: Some(100),
        ..options(None)
    };
    assert_plan_matches_build(&fx, &few);
}

#[derive(Debug, Clone)]
enum Item {
    File(usize),
    Dir(Vec<(String, Item)>),
    Symlink(usize),
    Fifo,
    Xattr(usize),
}

fn item() -> impl Strategy<Value = Item> {
    let leaf = prop_oneof![
        (0usize..300_000).prop_map(Item::File),
        (1usize..300).prop_map(Item::Symlink),
        Just(Item::Fifo),
        (1usize..4000).prop_map(Item::Xattr),
    ];
    // Up to ~300 entries per directory: past one linear block (about 150 of these names).
    leaf.prop_recursive(2, 200, 100, |inner| {
        prop::collection::vec(("[a-zA-Z0-9._-]{1,40}", inner), 0..300).prop_map(Item::Dir)
    })
}

fn materialize(fx: &mut Fixture, parent: u32, entries: &[(String, Item)]) {
    let mut used = std::collections::HashSet::new();
    for (name, item) in entries {
        if !used.insert(name.clone()) || name == "lost+found" || name == "." || name == ".." {
            continue;
        }
        match item {
            Item::File(len) => {
                // Neither side reads file bytes: no object behind the handle.
                let file = FileData {
                    handle: DataHandle(0),
                    size: *len as u64,
                    segments: None,
                };
                fx.node(parent, name, NodeKind::File(file), 0o644);
            }
            Item::Dir(children) => {
                let d = fx.dir(parent, name);
                materialize(fx, d, children);
            }
            Item::Symlink(len) => {
                fx.symlink(parent, name, &"s".repeat(*len));
            }
            Item::Fifo => {
                fx.node(parent, name, NodeKind::Fifo, 0o600);
            }
            Item::Xattr(len) => {
                let n = fx.node(parent, name, NodeKind::Fifo, 0o600);
                fx.xattr(n, "user.v", &vec![1; *len]);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(16),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_trees_plan_as_they_build(
        entries in prop::collection::vec(("[a-zA-Z0-9._-]{1,40}", item()), 0..200),
        // Up to five block groups: more groups add only copies of the same inode-table and
        // bitmap work, which in a debug build made this test take minutes.
        size in prop::option::of(1u64 << 20..640 << 20),
    ) {
        let mut fx = Fixture::new();
        materialize(&mut fx, FsTree::ROOT, &entries);
        assert_plan_matches_build(&fx, &options(size));
    }
}
