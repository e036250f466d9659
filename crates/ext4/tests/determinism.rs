//! Output is a pure function of tree and options.

mod common;
use common::*;
use tessera_ext4::{build, FsTree, Layout};

fn image_bytes(layout: &Layout, objects: &[Vec<u8>]) -> Vec<u8> {
    bytes_of(layout.pieces(0, layout.size()), objects)
}

fn sample() -> Fixture {
    let mut fx = Fixture::new();
    let d = fx.dir(FsTree::ROOT, "etc");
    fx.file(d, "hostname", b"tessera\n");
    fx.file(d, "big", &vec![3u8; 100_000]);
    fx.symlink(FsTree::ROOT, "link", "etc/hostname");
    for i in 0..300 {
        fx.file(d, &format!("conf-{i}"), format!("value {i}\n").as_bytes());
    }
    fx
}

#[test]
fn pinned_digest_of_a_reference_image() {
    let fx = sample();
    let bytes = image_bytes(&build(&fx.tree, &options(None)).unwrap(), &fx.objects);
    let digest = format!("{:08x}", crc32c::crc32c(&bytes));
    // If this changes on purpose (a layout change), update the pin and say why in the commit.
    assert_eq!((bytes.len(), digest.as_str()), (PINNED_LEN, PINNED_DIGEST));
}

const PINNED_LEN: usize = 68_886_528;
const PINNED_DIGEST: &str = "78d06e1f";

#[test]
fn only_the_superblocks_change_with_the_uuid() {
    let fx = sample();
    let a = build(&fx.tree, &options(None)).unwrap();
    let mut opts = options(None);
    opts.uuid = *b"another-uuid-abc";
    let b = build(&fx.tree, &opts).unwrap();
    let (ia, ib) = (image_bytes(&a, &fx.objects), image_bytes(&b, &fx.objects));
    assert_eq!(ia.len(), ib.len());
    let differing: Vec<usize> = (0..ia.len() / 4096)
        .filter(|&blk| ia[blk * 4096..][..4096] != ib[blk * 4096..][..4096])
        .collect();
    assert_eq!(
        differing,
        vec![0],
        "blocks other than the primary superblock differ"
    );
}

#[test]
fn pieces_of_any_range_agree_with_the_whole_image() {
    let fx = sample();
    let layout = build(&fx.tree, &options(None)).unwrap();
    let whole = image_bytes(&layout, &fx.objects);
    let mut state = 12345u64;
    for _ in 0..500 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (state >> 20) % layout.size();
        let len = (state >> 5) % 70_000;
        let got = bytes_of(layout.pieces(off, len), &fx.objects);
        let end = (off + len).min(layout.size()) as usize;
        assert_eq!(got, whole[off as usize..end], "range {off}+{len}");
    }
    assert_eq!(layout.pieces(layout.size(), 10).count(), 0);
}

/// A server keeps the block map and drops the metadata under memory pressure, then reads
/// with metadata taken from a fresh build of the same tree.
#[test]
fn metadata_taken_out_and_rebuilt_reads_the_same_bytes() {
    let fx = sample();
    let whole = image_bytes(&build(&fx.tree, &options(None)).unwrap(), &fx.objects);
    let mut map = build(&fx.tree, &options(None)).unwrap();
    let kept = map.take_metadata();
    assert!(map.memory_bytes() < build(&fx.tree, &options(None)).unwrap().memory_bytes());
    let rebuilt = build(&fx.tree, &options(None)).unwrap().take_metadata();
    for meta in [&kept, &rebuilt] {
        assert!(bytes_of(map.pieces_with(meta, 0, map.size()), &fx.objects) == whole);
    }
}
