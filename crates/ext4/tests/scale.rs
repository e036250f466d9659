//! Large and unusual shapes: htree directories, sparse and huge files, deep extent trees,
//! multi-group images with superblock backups in the middle of file data.

mod common;
use common::verify::*;
use common::*;
use std::process::Command;
use tessera_ext4::FsTree;

#[test]
fn directory_with_50_000_entries_is_an_htree() {
    if !have("e2fsck") || !can_mount() {
        return;
    }
    let mut fx = Fixture::new();
    let d = fx.dir(FsTree::ROOT, "big");
    for i in 0..50_000 {
        fx.file(d, &format!("entry-{i:05}-{}", "x".repeat(i % 40)), &[]);
    }
    check_all_readers(&fx, None, "htree.img");
}

#[test]
fn htree_hash_matches_debugfs() {
    if !have("debugfs") {
        return;
    }
    let mut fx = Fixture::new();
    let d = fx.dir(FsTree::ROOT, "d");
    for i in 0..2000 {
        fx.file(d, &format!("name{i}"), &[]);
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("h.img");
    build_image(&fx, &options(None), &img);
    // debugfs prints the index (hash -> block) and, for each leaf, every name with the hash
    // e2fsprogs computes for it with the filesystem's seed. Each name must fall inside its
    // leaf's range [index hash, next index hash): that proves our hash and seed handling.
    let out = Command::new("debugfs")
        .arg("-R")
        .arg("htree /d")
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut index: Vec<(u32, u32)> = Vec::new();
    for l in text.lines().filter(|l| l.starts_with("Entry #")) {
        let hash = u32::from_str_radix(
            l.split("Hash 0x")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap(),
            16,
        )
        .unwrap();
        let block: u32 = l.rsplit("block ").next().unwrap().trim().parse().unwrap();
        if !index.iter().any(|&(_, b)| b == block) {
            index.push((hash, block));
        }
    }
    assert!(index.len() >= 8, "{text}");
    let range = |block: u32| {
        let i = index.iter().position(|&(_, b)| b == block).unwrap();
        let lo = index[i].0 & !1;
        let hi = index
            .get(i + 1)
            .map_or(u64::MAX, |&(h, _)| (h & !1) as u64 + 1);
        (lo as u64, hi)
    };
    let mut checked = 0;
    let mut current = None;
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("Reading directory block ") {
            current = Some(range(rest.split(',').next().unwrap().parse().unwrap()));
            continue;
        }
        let Some((lo, hi)) = current else { continue };
        for tok in l
            .split_whitespace()
            .filter(|t| t.starts_with("0x") && t.contains('-'))
        {
            let h = u64::from_str_radix(&tok[2..10], 16).unwrap();
            assert!(
                lo <= h && h < hi,
                "hash {tok} outside leaf range {lo:#x}..{hi:#x}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2000, "{text}");
}

#[test]
fn sparse_5_gib_file_and_thousands_of_holes() {
    if !have("e2fsck") || !can_mount() {
        return;
    }
    let mut fx = Fixture::new();
    // 5 GiB, data only at a few places including past 4 GiB.
    fx.sparse(
        FsTree::ROOT,
        "sparse-5g",
        (5 << 30) - 100,
        &[
            (0, 4096),
            (1 << 30, 8192),
            ((4 << 30) + 4096, 4096 * 3),
            ((5 << 30) - 4096, 3996),
        ],
    );
    // 3000 single-block extents separated by holes: a two-level extent tree.
    let segs: Vec<(u64, u64)> = (0..3000u64).map(|i| (i * 8192, 4096)).collect();
    fx.sparse(FsTree::ROOT, "holey", 3000 * 8192, &segs);
    fx.sparse(FsTree::ROOT, "all-hole", 1 << 20, &[]);
    check_all_readers(&fx, None, "sparse.img");
}

#[test]
fn multi_group_image_with_a_file_over_4_gib() {
    if !have("e2fsck") || !can_mount() {
        return;
    }
    let mut fx = Fixture::new();
    // A dense 4 GiB + 8 KiB + 123 B file is too large to keep in memory for the test, so
    // it is sparse in the fixture only where the test can afford it: data around the 4 GiB
    // boundary and at the end; the allocation (and so the superblock-backup splitting of
    // its blocks) is the same as for a dense file of that size since holes are tested above.
    let size = (4u64 << 30) + 8192 + 123;
    fx.sparse(
        FsTree::ROOT,
        "past-4g",
        size,
        &[
            (0, 1 << 20),
            ((4 << 30) - 4096, 8192),
            ((4 << 30) + 8192, 123),
        ],
    );
    // 200 MiB of dense data crossing the group 1 and 3 backups and the 128 MiB extent limit.
    let dense: Vec<u8> = (0..200u64 << 20).map(|i| (i * 7 % 256) as u8).collect();
    fx.file(FsTree::ROOT, "dense-200m", &dense);
    for i in 0..100 {
        fx.file(
            FsTree::ROOT,
            &format!("small-{i}"),
            format!("{i}").as_bytes(),
        );
    }
    check_all_readers(&fx, Some(6 << 30), "groups.img");
}
