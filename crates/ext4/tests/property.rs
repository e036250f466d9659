//! Random trees → image → e2fsck clean, kernel mount and ext4-view agree with the tree.
//! Case count: `PROPTEST_CASES` (default 12, kept modest for CI).

mod common;
use common::verify::*;
use common::*;
use proptest::prelude::*;
use tessera_ext4::{FsTree, NodeId, NodeKind};

#[derive(Debug, Clone)]
enum Item {
    File(Vec<u8>, u16),
    Sparse(u64, Vec<(u64, u64)>),
    Dir(Vec<(String, Item)>),
    Symlink(String),
    Fifo,
    Dev(u32, u32),
    /// Hardlink to the n-th file created so far (modulo count).
    Link(usize),
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,12}",
        "[a-zA-Z0-9._-]{1,60}",
        "[ä-ü€ファイル]{1,20}",
        Just("x".repeat(255)),
    ]
}

fn item() -> impl Strategy<Value = Item> {
    let leaf = prop_oneof![
        (prop::collection::vec(any::<u8>(), 0..20_000), 0u16..0o7777)
            .prop_map(|(d, m)| Item::File(d, m)),
        (1u64..200, prop::collection::vec((0u64..50, 1u64..4), 0..20)).prop_map(
            |(blocks, segs)| {
                // Turn random (gap, len) pairs into ordered, aligned segments inside the file.
                let mut out = Vec::new();
                let mut at = 0;
                for (gap, len) in segs {
                    let off = at + gap * 4096;
                    out.push((off, len * 4096));
                    at = off + len * 4096;
                }
                Item::Sparse((at / 4096).max(blocks) * 4096, out)
            }
        ),
        "[a-z/.]{1,200}".prop_map(Item::Symlink),
        Just(Item::Fifo),
        (0u32..4096, 0u32..1_000_000).prop_map(|(a, b)| Item::Dev(a, b)),
        (0usize..50).prop_map(Item::Link),
    ];
    leaf.prop_recursive(4, 200, 30, |inner| {
        prop::collection::vec((name(), inner), 0..30).prop_map(Item::Dir)
    })
}

fn materialize(
    fx: &mut Fixture,
    parent: NodeId,
    entries: &[(String, Item)],
    files: &mut Vec<NodeId>,
) {
    let mut used = std::collections::HashSet::new();
    for (name, item) in entries {
        if !used.insert(name.clone()) || name == "lost+found" || name == "." || name == ".." {
            continue;
        }
        match item {
            Item::File(d, mode) => {
                let n = fx.file(parent, name, d);
                fx.tree.node_mut(n).meta.mode = *mode;
                if d.len() % 3 == 0 {
                    fx.xattr(n, "user.len", d.len().to_string().as_bytes());
                }
                files.push(n);
            }
            Item::Sparse(size, segs) => {
                let n = fx.sparse(parent, name, *size, segs);
                files.push(n);
            }
            Item::Dir(children) => {
                let d = fx.dir(parent, name);
                materialize(fx, d, children, files);
            }
            Item::Symlink(t) => {
                fx.symlink(parent, name, t);
            }
            Item::Fifo => {
                fx.node(parent, name, NodeKind::Fifo, 0o600);
            }
            Item::Dev(a, b) => {
                fx.node(
                    parent,
                    name,
                    NodeKind::CharDev {
                        major: *a,
                        minor: *b,
                    },
                    0o600,
                );
            }
            Item::Link(i) if !files.is_empty() => {
                let target = files[i % files.len()];
                fx.tree.link(parent, name.as_bytes(), target).unwrap();
            }
            Item::Link(_) => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_trees_check_clean_and_read_back(entries in prop::collection::vec((name(), item()), 0..40)) {
        if !have("e2fsck") || !can_mount() {
            return Ok(());
        }
        let mut fx = Fixture::new();
        let mut files = Vec::new();
        materialize(&mut fx, FsTree::ROOT, &entries, &mut files);
        check_all_readers(&fx, None, "prop.img");
    }
}
