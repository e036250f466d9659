//! Replies sent by reference (`splice.rs`): a device whose shared reads mix pages
//! ([`Shared::pages`]) and heap bytes ([`Shared::copied`]) at unaligned boundaries, read
//! through nbdcopy (structured replies, 4 connections of 64 requests in flight) and through
//! a raw client (simple replies, reads larger than a pipe holds, a slow reader): every byte
//! must arrive in order, and the splice path must have carried them.

mod support;

use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use support::*;
use tessera_nbd::proto::*;
use tessera_nbd::{Config, Device, ExportMap, Shared};

const SIZE: usize = 24 << 20;

/// Serves a fixed pattern; shared reads cut it at fixed boundaries of uneven spacing and
/// alternate, piece by piece, between slices of a leaked (never freed, never written) copy
/// and fresh heap copies.
struct Mixed {
    pages: &'static [u8],
    /// Starts of the pieces, from 0; the last one ends at SIZE.
    cuts: Vec<usize>,
    shared_reads: AtomicU64,
}

impl Device for Mixed {
    fn size(&self) -> u64 {
        SIZE as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let at = offset as usize;
        buf.copy_from_slice(&self.pages[at..at + buf.len()]);
        Ok(())
    }

    fn read_cached_shared(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Shared>,
    ) -> Option<std::io::Result<()>> {
        self.shared_reads.fetch_add(1, Ordering::Relaxed);
        let (mut at, end) = (offset as usize, (offset + len) as usize);
        while at < end {
            let piece = self.cuts.partition_point(|&c| c <= at) - 1;
            let next = self.cuts.get(piece + 1).map_or(end, |&c| c.min(end));
            let bytes = &self.pages[at..next];
            out.push(if piece % 2 == 0 {
                Shared::pages(Bytes::from_static(bytes))
            } else {
                Shared::copied(Bytes::copy_from_slice(bytes))
            });
            at = next;
        }
        Some(Ok(()))
    }
}

fn server(splice: bool) -> (Server, Arc<Mixed>, Vec<u8>) {
    let data = pattern_image(SIZE);
    let dev = Arc::new(Mixed {
        pages: Vec::leak(data.clone()),
        // Unaligned pieces: pages from 10 to 49 pages (the server splices a batch only
        // when it has 16 KiB of pages for each slice it must copy), heap slices from one
        // byte to a page and a bit, so that pipes fill in the middle of a piece.
        cuts: [70_001, 333, 200_003, 1, 40_967, 5000]
            .iter()
            .cycle()
            .scan(0, |at, gap| {
                let start = *at;
                *at += gap;
                Some(start)
            })
            .take_while(|&c| c < SIZE)
            .collect(),
        shared_reads: AtomicU64::new(0),
    });
    let mut exports = ExportMap::new();
    exports.insert("m", dev.clone());
    let config = Config {
        splice,
        ..Config::default()
    };
    (Server::start(exports, config), dev, data)
}

#[test]
fn nbdcopy_reads_every_byte_through_the_splice_path() {
    if !have("nbdcopy") {
        return;
    }
    let (server, dev, data) = server(true);
    let out = server.dir.path().join("copy.raw");
    let before = tessera_nbd::spliced_bytes();
    let status = Command::new("nbdcopy")
        .args([&server.uri("m"), out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        std::fs::read(&out).unwrap() == data,
        "nbdcopy's copy differs"
    );
    assert!(dev.shared_reads.load(Ordering::Relaxed) > 0);
    // Nine tenths of the bytes are pages; the pool has a pipe for each of the 4 writers.
    let spliced = tessera_nbd::spliced_bytes() - before;
    assert!(
        spliced >= SIZE as u64 / 2,
        "only {spliced} bytes were spliced"
    );
}

/// Simple replies, one request at a time and many pipelined, from one byte to 4 MiB, and a
/// reader slow enough that the socket fills mid-reply.
fn raw_reads(splice: bool) {
    let (server, _dev, data) = server(splice);
    let before = tessera_nbd::spliced_bytes();
    let (mut s, size, _) = open(&server, "m");
    assert_eq!(size, SIZE as u64);
    // Reads of up to 1 MiB are answered with shared slices; 1 MiB of them is more than a
    // pipe's 256 pages hold.
    for (offset, len) in [
        (0, 1),
        (4999, 2),
        (12345, 300_000),
        (777, 1 << 20),
        (3 << 20, 1 << 20),
        (1 << 20, 4 << 20),
    ] {
        let got = pread(&mut s, offset, len).unwrap();
        assert!(
            got == data[offset as usize..][..len as usize],
            "{len} at {offset}"
        );
    }
    let reads: Vec<(u64, u32)> = (0..40)
        .map(|i| (i * 517_003 % (20 << 20), 70_001 + i as u32 * 3000))
        .collect();
    let mut pipelined = Vec::new();
    for (i, &(offset, len)) in reads.iter().enumerate() {
        pipelined.extend(request(CMD_READ, 0, i as u64, offset, len));
    }
    s.write_all(&pipelined).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut seen = vec![false; reads.len()];
    for _ in 0..reads.len() {
        let (err, cookie) = simple_reply(&mut s);
        assert_eq!(err, 0);
        let (offset, len) = reads[cookie as usize];
        assert!(!std::mem::replace(&mut seen[cookie as usize], true));
        // Slowly, in small pieces.
        let mut got = vec![0u8; len as usize];
        for chunk in got.chunks_mut(64 << 10) {
            s.read_exact(chunk).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            got == data[offset as usize..][..len as usize],
            "{len} at {offset}"
        );
    }
    s.write_all(&request(CMD_DISC, 0, 0, 0, 0)).unwrap();
    let spliced = tessera_nbd::spliced_bytes() - before;
    if splice {
        assert!(spliced > 0, "nothing was spliced");
    }
}

#[test]
fn raw_reads_through_the_splice_path() {
    raw_reads(true);
}

#[test]
fn raw_reads_with_splicing_off() {
    raw_reads(false);
}
