//! Metadata generated on demand reads the same bytes as metadata generated up front: block
//! for block, in any order, from several threads at once, on the kitchen-sink tree, on a
//! tree with an htree directory, extent trees and a superblock backup, and on random trees.
//! Case count: `PROPTEST_CASES` (default 12).

mod common;
use common::*;
use proptest::prelude::*;
use tessera_ext4::{build, build_on_demand, FsTree, Layout, MetadataBlocks, Options};

/// The bytes of `offset..offset + len` with metadata from `meta`.
fn read(
    layout: &Layout,
    meta: &MetadataBlocks,
    objects: &[Vec<u8>],
    offset: u64,
    len: u64,
) -> Vec<u8> {
    bytes_of(layout.pieces_with(meta, offset, len), objects)
}

/// Block numbers `0..n` in an order that jumps around, different per `seed`.
fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut order: Vec<u64> = (0..n).collect();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

/// Reads every block of an on-demand layout of `tree` in a shuffled order, then ranges that
/// straddle blocks, and compares each with the up-front build; then generates the rest and
/// compares the whole image.
fn agree(tree: &FsTree, objects: &[Vec<u8>], opts: &Options, seed: u64) {
    let whole = {
        let mut built = build(tree, opts).unwrap();
        let meta = built.take_metadata();
        read(&built, &meta, objects, 0, built.size())
    };
    let (map, meta) = build_on_demand(tree.clone(), opts).unwrap();
    assert_eq!(map.size() as usize, whole.len());
    assert_eq!(map.stats(), build(tree, opts).unwrap().stats());
    let blocks = map.size() / 4096;
    for b in shuffled(blocks, seed) {
        let got = read(&map, &meta, objects, b * 4096, 4096);
        let want = &whole[(b * 4096) as usize..][..4096];
        assert!(got == want, "block {b} differs");
    }
    let (map, meta) = build_on_demand(tree.clone(), opts).unwrap();
    for (i, b) in shuffled(blocks, seed + 1).into_iter().take(64).enumerate() {
        let (off, len) = (b * 4096 + 1000 + i as u64, 4096 * (i as u64 % 5) + 3000);
        let got = read(&map, &meta, objects, off, len);
        let end = (off + len).min(whole.len() as u64) as usize;
        assert!(got == whole[off as usize..end], "bytes {off}+{len} differ");
    }
    meta.generate_all();
    assert!(meta.is_complete());
    assert!(read(&map, &meta, objects, 0, map.size()) == whole);
}

#[test]
fn kitchen_sink_reads_the_same_on_demand() {
    let fx = kitchen_sink();
    agree(&fx.tree, &fx.objects, &options(None), 1);
}

/// Enough entries for an htree directory, files with extent trees (many sparse segments),
/// and a device of two groups so there is a superblock backup and a second inode table.
#[test]
fn htree_extent_trees_and_two_groups_read_the_same_on_demand() {
    let mut fx = Fixture::new();
    let d = fx.dir(FsTree::ROOT, "many");
    for i in 0..600 {
        fx.file(
            d,
            &format!("file-with-a-longish-name-{i:04}"),
            &[i as u8; 100],
        );
    }
    let segs: Vec<(u64, u64)> = (0..40).map(|i| (i * 3 * 4096, 4096)).collect();
    fx.sparse(FsTree::ROOT, "fragmented", 130 * 4096, &segs);
    fx.symlink(FsTree::ROOT, "slow", &"t/".repeat(100));
    let opts = options(Some(160 << 20));
    agree(&fx.tree, &fx.objects, &opts, 7);
}

/// Readers on several threads reaching the same units at once all get the right bytes.
#[test]
fn concurrent_first_reads_agree() {
    let fx = kitchen_sink();
    let opts = options(None);
    let mut built = build(&fx.tree, &opts).unwrap();
    let built_meta = built.take_metadata();
    let whole = read(&built, &built_meta, &fx.objects, 0, built.size());
    let (map, meta) = build_on_demand(fx.tree.clone(), &opts).unwrap();
    let blocks = map.size() / 4096;
    std::thread::scope(|s| {
        for t in 0..4 {
            let (map, meta, fx, whole) = (&map, &meta, &fx, &whole);
            s.spawn(move || {
                for b in shuffled(blocks, t) {
                    let got = read(map, meta, &fx.objects, b * 4096, 4096);
                    assert!(got == whole[(b * 4096) as usize..][..4096], "block {b}");
                }
            });
        }
    });
}

/// Until generated, the metadata keeps the tree; afterwards it holds what a build holds.
#[test]
fn generating_all_drops_the_tree() {
    let fx = kitchen_sink();
    let opts = options(None);
    let (_, meta) = build_on_demand(fx.tree.clone(), &opts).unwrap();
    assert!(!meta.is_complete());
    let before = meta.memory_bytes();
    meta.generate_all();
    assert!(meta.is_complete());
    let built = build(&fx.tree, &opts).unwrap().take_metadata();
    assert_eq!(meta.memory_bytes(), built.memory_bytes());
    assert!(
        before > meta.memory_bytes(),
        "the tree counted until dropped: {before} then {}",
        meta.memory_bytes()
    );
}

#[derive(Debug, Clone)]
enum Item {
    File(usize),
    Dir(Vec<(String, Item)>),
    Symlink(String),
    Xattr(usize),
}

fn item() -> impl Strategy<Value = Item> {
    let leaf = prop_oneof![
        (0usize..20_000).prop_map(Item::File),
        "[a-z/.]{1,200}".prop_map(Item::Symlink),
        (0usize..400).prop_map(Item::Xattr),
    ];
    leaf.prop_recursive(4, 300, 60, |inner| {
        prop::collection::vec(("[a-z0-9]{1,40}", inner), 0..60).prop_map(Item::Dir)
    })
}

fn materialize(fx: &mut Fixture, parent: tessera_ext4::NodeId, entries: &[(String, Item)]) {
    let mut used = std::collections::HashSet::new();
    for (name, item) in entries {
        if !used.insert(name.clone()) || name == "lost+found" {
            continue;
        }
        match item {
            Item::File(len) => {
                fx.file(parent, name, &vec![*len as u8; *len]);
            }
            Item::Dir(children) => {
                let d = fx.dir(parent, name);
                materialize(fx, d, children);
            }
            Item::Symlink(t) => {
                fx.symlink(parent, name, t);
            }
            Item::Xattr(len) => {
                let n = fx.file(parent, name, b"x");
                fx.xattr(n, "user.v", &vec![7u8; *len]);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_trees_read_the_same_on_demand(
        entries in prop::collection::vec(("[a-z0-9]{1,40}", item()), 0..80),
        seed in any::<u64>(),
    ) {
        let mut fx = Fixture::new();
        materialize(&mut fx, FsTree::ROOT, &entries);
        agree(&fx.tree, &fx.objects, &options(None), seed);
    }
}
