//! What finding the pieces of one 4 KiB read costs: 1 000 000 random lookups in the block
//! map of a 6 000-file layout (BENCHMARKS.md, "a delta-coded block map").
//!
//!   cargo run --release -p tessera-ext4 --example lookup

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{options, Fixture};
use tessera_ext4::{build, FsTree, Piece};

fn main() {
    let mut fx = Fixture::new();
    for d in 0..600 {
        let dir = fx.dir(FsTree::ROOT, &format!("d{d}"));
        for f in 0..10 {
            fx.file(
                dir,
                &format!("f{f}"),
                &vec![1u8; 100 + (d * 37 + f * 911) % 9000],
            );
        }
    }
    let layout = build(&fx.tree, &options(None)).unwrap();
    let blocks = layout.size() / 4096;
    let mut state = 1u64;
    let mut data = 0u64;
    let lookups = 1_000_000;
    let started = Instant::now();
    for _ in 0..lookups {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // The first 60 MiB: where the files are, not the free space after them.
        let offset = (state >> 20) % blocks * 4096 % (60 << 20);
        for piece in layout.pieces(offset, 4096) {
            if let Piece::Data { len, .. } = piece {
                data += len;
            }
        }
    }
    println!(
        "{:.0} ns per 4 KiB lookup; block map {} bytes ({} bytes of file data seen)",
        started.elapsed().as_nanos() as f64 / lookups as f64,
        layout.block_map_bytes(),
        data
    );
}
