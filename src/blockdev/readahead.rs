//! Readahead across store objects for sequential readers, on a thread of its own.
//!
//! A raw image is one file, and the kernel reads ahead in it; an image here is thousands of
//! small objects, and the kernel's readahead stops at each one's end. So once a reader is
//! seen reading sequentially, the objects of the next [`WINDOW`] bytes of the image are
//! opened and handed to the kernel (`posix_fadvise`/`madvise` `WILLNEED`), and the window
//! moves on whenever the reader is past its middle, resident reads included: reads that
//! readahead made resident are answered inline and would otherwise never move it.
//!
//! The walk runs on one process-wide thread, not on the I/O threads that serve requests:
//! when every I/O thread walked the objects ahead of its own request, they queued on the
//! same objects' locks in the same order, and each request waited for the objects after
//! it to be opened before its own bytes were read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};

use tessera_ext4::{Layout, Piece};

use super::object::{Object, Pack};
use super::NO_METADATA;

/// How far ahead of a sequential reader objects are read ahead.
pub(super) const WINDOW: u64 = 16 << 20;

/// Walks queued at most; a walk that does not fit is dropped (readahead is a hint).
const QUEUE: usize = 256;

/// One device's sequential stream: how far its objects were handed to the walker.
#[derive(Debug, Default)]
pub(super) struct Readahead {
    /// Objects up to this device offset are queued for readahead; 0: no stream.
    until: AtomicU64,
}

/// A range of one image whose objects are to be read ahead.
struct Walk {
    layout: Arc<Layout>,
    objects: Arc<[Arc<Object>]>,
    from: u64,
    to: u64,
}

impl Readahead {
    /// A blocking read found sequential ended at `end`: move the window on if the read is
    /// past its middle, or start a new one at `end` if the read is outside it (another
    /// reader, or this one moved).
    pub fn start(&self, end: u64, layout: &Arc<Layout>, objects: &Arc<[Arc<Object>]>) {
        let until = self.until.load(Ordering::Relaxed);
        if until >= end && until - end <= WINDOW {
            self.reached(end, layout, objects);
        } else {
            self.advance(until, end, end, layout, objects);
        }
    }

    /// Any read ended at `end`: if a stream is running and the read is past the middle
    /// of its window, move the window on. One relaxed load for every other read.
    pub fn reached(&self, end: u64, layout: &Arc<Layout>, objects: &Arc<[Arc<Object>]>) {
        let until = self.until.load(Ordering::Relaxed);
        if until == 0 || end > until || until - end > WINDOW / 2 {
            return;
        }
        self.advance(until, until, end, layout, objects);
    }

    /// Queue the objects of `from..end + WINDOW`, unless another thread moved the window
    /// since it was seen ending at `seen`.
    fn advance(
        &self,
        seen: u64,
        from: u64,
        end: u64,
        layout: &Arc<Layout>,
        objects: &Arc<[Arc<Object>]>,
    ) {
        let to = end.saturating_add(WINDOW).min(layout.size());
        if to <= from
            || self
                .until
                .compare_exchange(seen, to, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let walk = Walk {
            layout: layout.clone(),
            objects: objects.clone(),
            from,
            to,
        };
        if let Err(TrySendError::Full(_)) = walker().try_send(walk) {
            tracing::trace!("readahead queue full; a window is skipped");
        }
    }
}

/// The queue of the walker thread, started on first use.
fn walker() -> &'static SyncSender<Walk> {
    static QUEUE_TX: OnceLock<SyncSender<Walk>> = OnceLock::new();
    QUEUE_TX.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("readahead".into())
            .spawn(move || walk_all(rx))
            .expect("spawn the readahead thread");
        tx
    })
}

fn walk_all(rx: Receiver<Walk>) {
    for walk in rx {
        let pieces = walk
            .layout
            .pieces_with(&NO_METADATA, walk.from, walk.to - walk.from);
        prefetch_pieces(&walk.objects, pieces);
    }
}

/// Asks the kernel to read the data pieces among `pieces` (see `Object::prefetch`). Pieces
/// that follow each other in one pack (an image's small objects, once packed) are asked
/// for as one range: one call for a run of objects rather than one per object.
pub(super) fn prefetch_pieces<'a>(
    objects: &[Arc<Object>],
    pieces: impl Iterator<Item = Piece<'a>>,
) {
    /// Bytes of a pack between two pieces that still make one run (padding, a few
    /// objects of another image).
    const GAP: u64 = 64 << 10;
    let mut run: Option<(&Arc<Pack>, u64, u64)> = None;
    for piece in pieces {
        let Piece::Data {
            handle,
            offset,
            len,
        } = piece
        else {
            continue;
        };
        let Some(object) = objects.get(handle.0 as usize) else {
            continue;
        };
        match object.pack_span(offset, len) {
            Some((pack, start, end)) => match &mut run {
                Some((p, s, e)) if Arc::ptr_eq(p, pack) && start >= *s && start <= *e + GAP => {
                    *e = (*e).max(end);
                }
                _ => {
                    if let Some((p, s, e)) = run.replace((pack, start, end)) {
                        p.advise(s, e);
                    }
                }
            },
            None => object.prefetch(offset, len),
        }
    }
    if let Some((p, s, e)) = run {
        p.advise(s, e);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use indicatif::ProgressBar;

    use super::*;
    use crate::blockdev::planned::tests::evict;
    use crate::blockdev::ImageDevice;
    use crate::image::CreateOptions;
    use crate::store::Store;

    /// An image of `files` small files of 40 KiB, each its own object.
    fn image_of_small_files(files: usize, size: Option<u64>) -> (tempfile::TempDir, ImageDevice) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for i in 0..files {
            let mut bytes = vec![0u8; 40 << 10];
            blake3::Hasher::new_derive_key("readahead test")
                .update(&i.to_le_bytes())
                .finalize_xof()
                .fill(&mut bytes);
            std::fs::write(src.join(format!("f{i:03}")), bytes).unwrap();
        }
        let store = Store::open(&dir.path().join("store")).unwrap();
        let tree = crate::import::import_dir(
            &store,
            &src,
            crate::import::Packing::Loose,
            &ProgressBar::hidden(),
        )
        .unwrap()
        .tree;
        let options = CreateOptions {
            size,
            ..Default::default()
        };
        crate::image::create(&store, "small", &[tree], &options).unwrap();
        let dev = ImageDevice::open(&store, "small").unwrap();
        (dir, dev)
    }

    /// The device offset of one block of each file's data, in image order.
    fn data_blocks(dev: &ImageDevice) -> Vec<u64> {
        let mut at = 0;
        let mut blocks = Vec::new();
        for piece in dev.layout.pieces_with(&NO_METADATA, 0, dev.size()) {
            if matches!(piece, Piece::Data { offset: 0, .. }) {
                blocks.push(at);
            }
            at += piece.len();
        }
        blocks
    }

    fn resident(dev: &ImageDevice, at: u64) -> bool {
        let mut buf = vec![0u8; 4096];
        matches!(dev.read_at_resident(&mut buf, at), Some(Ok(())))
    }

    #[test]
    fn a_sequential_reader_gets_the_objects_ahead_read_in() {
        let (dir, dev) = image_of_small_files(48, None);
        let blocks = data_blocks(&dev);
        assert_eq!(blocks.len(), 48);
        let (first, last) = (blocks[0], *blocks.last().unwrap());
        assert!(last - first < WINDOW / 2, "the files lie within one window");
        evict(dir.path());
        assert!(
            blocks.iter().all(|&b| !resident(&dev, b)),
            "eviction left objects in the page cache"
        );

        // Two reads in a row over the first file: the second is sequential.
        let mut buf = vec![0u8; 4096];
        dev.read_at(&mut buf, first).unwrap();
        dev.read_at(&mut buf, first + 4096).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let behind = |dev: &ImageDevice| blocks[1..].iter().filter(|&&b| !resident(dev, b)).count();
        while behind(&dev) > 0 {
            assert!(
                Instant::now() < deadline,
                "{} of 47 files ahead of a sequential reader were not read ahead",
                behind(&dev)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_random_read_reads_nothing_ahead() {
        let (dir, dev) = image_of_small_files(8, None);
        let blocks = data_blocks(&dev);
        evict(dir.path());
        let mut buf = vec![0u8; 4096];
        dev.read_at(&mut buf, blocks[0]).unwrap();
        dev.read_at(&mut buf, blocks[2]).unwrap();
        assert_eq!(dev.readahead.until.load(Ordering::Relaxed), 0);
        std::thread::sleep(Duration::from_millis(200));
        assert!(!resident(&dev, blocks[1]) && !resident(&dev, blocks[7]));
    }

    #[test]
    fn reads_past_the_middle_of_the_window_move_it_on() {
        let (_dir, dev) = image_of_small_files(2, Some(256 << 20));
        let until = || dev.readahead.until.load(Ordering::Relaxed);
        let mut buf = vec![0u8; 4096];
        dev.read_at(&mut buf, 4 << 20).unwrap();
        dev.read_at(&mut buf, (4 << 20) + 4096).unwrap();
        let started = until();
        assert_eq!(started, (4 << 20) + 8192 + WINDOW);

        // Resident reads (zeros here) before the middle leave the window; past it, move it.
        dev.read_at_resident(&mut buf, started - WINDOW / 2 - 8192)
            .unwrap()
            .unwrap();
        assert_eq!(until(), started);
        let end = started - WINDOW / 2 + 4096;
        dev.read_at_resident(&mut buf, end - 4096).unwrap().unwrap();
        assert_eq!(until(), end + WINDOW);
        // A read beyond the window is no part of the stream.
        dev.read_at_resident(&mut buf, 200 << 20).unwrap().unwrap();
        assert_eq!(until(), end + WINDOW);
        // A sequential reader elsewhere (behind it here) starts a window of its own.
        dev.read_at(&mut buf, 1 << 20).unwrap();
        dev.read_at(&mut buf, (1 << 20) + 4096).unwrap();
        assert_eq!(until(), (1 << 20) + 8192 + WINDOW);
        let end = (1 << 20) + 8192;
        // Near the end of the device the window stops there.
        dev.read_at(&mut buf, dev.size() - 8192).unwrap();
        dev.read_at(&mut buf, dev.size() - 4096).unwrap();
        assert_eq!(
            until(),
            end + WINDOW,
            "no stream starts at the device's end"
        );
    }
}
