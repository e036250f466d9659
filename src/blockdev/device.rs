//! A synthesized image as the block device every frontend serves (NBD, ublk) and that
//! overlays and `overlay commit` stack on.

use std::io;
use std::sync::{Mutex, OnceLock};

use tessera_nbd::{Device, Extent, FileRead};

use super::metadata::MetadataBudget;
use super::ImageDevice;
use crate::image::{ImageError, ImageRecord};
use crate::store::Store;

/// Compose the image and lay it out: the expensive step. Its metadata is generated as reads
/// reach it and by the background thread right after (then the composed tree is dropped); it
/// is held under `budget` and, once dropped, laid out again the same way when next read.
fn synthesize(
    store: &Store,
    record: &ImageRecord,
    budget: &MetadataBudget,
) -> Result<ImageDevice, ImageError> {
    let (layout, meta, objects) = crate::image::build_on_demand(store, record)?;
    let (again_store, again_record) = (store.clone(), record.clone());
    let regenerate = Box::new(move || {
        let started = std::time::Instant::now();
        let (_, meta, _) =
            crate::image::build_on_demand(&again_store, &again_record).map_err(|e| {
                tracing::error!(image = %again_record.name, error = %anyhow::Error::from(e),
                    "cannot generate the image's metadata again");
                io::Error::other(format!(
                    "cannot generate the metadata of image {:?} again",
                    again_record.name
                ))
            })?;
        tracing::debug!(image = %again_record.name, ms = started.elapsed().as_millis() as u64,
            "generated dropped metadata again");
        Ok(meta)
    });
    let dev = ImageDevice::budgeted(store, layout, meta, objects, budget, regenerate);
    // The first reads need a few units; generating the rest right away, off the read path,
    // gives the tree's memory back instead of keeping it for as long as the image is served.
    dev.metadata_slot().complete_later();
    Ok(dev)
}

/// An [`ImageDevice`] plus what clients are told about it.
///
/// An image whose record knows its device size is synthesized on its first read, not when
/// opened: an export that is listed, probed or opened but never read costs its record and
/// nothing per file. Older records (no `device_size`) are synthesized when opened.
pub struct ImageExport {
    name: String,
    size: u64,
    dev: OnceLock<ImageDevice>,
    /// What the first read needs to synthesize; held while synthesizing, so concurrent
    /// first reads wait for one build. A failed build is not kept: the next read retries.
    pending: Mutex<Option<(Store, ImageRecord, MetadataBudget)>>,
    description: String,
    fingerprint: String,
}

impl ImageExport {
    /// Opens `name`: synthesizes it now if its record does not give the device size, else
    /// on the first read.
    pub fn open(store: &Store, name: &str, budget: &MetadataBudget) -> anyhow::Result<Self> {
        let record = crate::image::load(store, name)?;
        let dev = OnceLock::new();
        let size = match record.device_size {
            Some(size) => {
                // Refuse now what would fail at the first read: missing or damaged trees.
                for id in &record.trees {
                    crate::image::load_tree_view(store, id)?;
                }
                size
            }
            None => {
                let d = synthesize(store, &record, budget)?;
                let size = d.size();
                let _ = dev.set(d);
                size
            }
        };
        Ok(ImageExport {
            name: name.to_owned(),
            size,
            description: record.describe(),
            fingerprint: record.fingerprint(),
            pending: Mutex::new(
                (dev.get().is_none()).then(|| (store.clone(), record, budget.clone())),
            ),
            dev,
        })
    }

    /// The synthesized device, synthesizing it on first use.
    fn dev(&self) -> io::Result<&ImageDevice> {
        if let Some(dev) = self.dev.get() {
            return Ok(dev);
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dev) = self.dev.get() {
            return Ok(dev);
        }
        let (store, record, budget) = pending.as_ref().expect("pending until synthesized");
        let started = std::time::Instant::now();
        let dev = synthesize(store, record, budget).map_err(|e| {
            tracing::error!(image = %self.name, error = %anyhow::Error::from(e), "cannot synthesize");
            io::Error::other(format!("cannot synthesize image {:?}", self.name))
        })?;
        if dev.size() != self.size {
            // A record from a synthesizer that sized images differently: clients were told
            // another size, so serving these bytes would be wrong.
            tracing::error!(image = %self.name, recorded = self.size, synthesized = dev.size(),
                "synthesized size differs from the recorded device size");
            return Err(io::Error::other(format!(
                "image {:?} synthesizes to {} bytes, its record says {}",
                self.name,
                dev.size(),
                self.size
            )));
        }
        *pending = None;
        tracing::debug!(image = %self.name, us = started.elapsed().as_micros() as u64,
            "ready for its first read");
        Ok(self.dev.get_or_init(|| dev))
    }

    /// Whether the image has been synthesized (its metadata is in memory).
    pub fn is_synthesized(&self) -> bool {
        self.dev.get().is_some()
    }

    /// The image's name (as it was when synthesized).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Identity of the image's bytes, which overlays are bound to.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

impl Device for ImageExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.dev()?.read_at(buf, offset)
    }

    /// Metadata and zeroes are in memory, so reads touching only those are
    /// answered inline; file data is mmapped store objects that may need the
    /// disk, so any data piece sends the read to an I/O thread.
    /// Before the first read has synthesized the image, nothing is in memory: the read goes
    /// to an I/O thread, which synthesizes it.
    fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        self.dev.get()?.read_at_resident(buf, offset)
    }

    fn read_cached_shared(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<tessera_nbd::Shared>,
    ) -> Option<io::Result<()>> {
        self.dev.get()?.read_resident_shared(offset, len, out)
    }

    /// Like `read_at_cached`: before the first read has synthesized the image, the
    /// blocking path synthesizes it.
    fn plan_read(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<Vec<FileRead>>> {
        self.dev.get()?.plan_read(buf, offset)
    }

    fn description(&self) -> Option<String> {
        Some(self.description.clone())
    }

    // Read-only, no cache of our own: every connection sees the same bytes,
    // so multi-conn is safe (the kernel client needs it for >1 connection).
    fn can_multi_conn(&self) -> bool {
        true
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, Extent)>> {
        Ok(self
            .dev()?
            .extents(offset, len)?
            .into_iter()
            .map(|e| (e.len, if e.zero { Extent::Hole } else { Extent::Data }))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::background::wait_for;
    use crate::image::CreateOptions;

    #[test]
    fn synthesized_on_first_read_with_the_bytes_of_an_eager_build() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tree = crate::demo::store_demo_tree(&store).unwrap();
        let (record, _) =
            crate::image::create(&store, "lazy", &[tree], &CreateOptions::default()).unwrap();
        assert!(record.device_size.is_some());

        let budget = MetadataBudget::unbounded();
        let export = ImageExport::open(&store, "lazy", &budget).unwrap();
        assert!(!export.is_synthesized(), "opening synthesizes nothing");
        assert_eq!(Device::size(&export), record.device_size.unwrap());

        let eager = ImageDevice::open(&store, "lazy").unwrap();
        let (mut lazy_bytes, mut eager_bytes) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        for offset in (0..eager.size()).step_by(1 << 20) {
            let n = (eager.size() - offset).min(1 << 20) as usize;
            export.read_at(&mut lazy_bytes[..n], offset).unwrap();
            eager.read_at(&mut eager_bytes[..n], offset).unwrap();
            assert!(lazy_bytes[..n] == eager_bytes[..n], "at {offset}");
        }
        assert!(export.is_synthesized());

        // The background thread finishes what reads did not reach and drops the tree; the
        // budget then counts what is left, as much as an eager build holds.
        let meta = export.dev.get().unwrap().meta.if_held().unwrap();
        let eager_bytes = eager.meta.if_held().unwrap().memory_bytes() as u64;
        wait_for("the budget to count completed metadata", || {
            budget.stats().held_bytes == eager_bytes
        });
        assert!(meta.is_complete());
    }

    /// Under a budget smaller than one image's metadata, reading two images in turn drops
    /// and generates their metadata again, with the same bytes every time; a read that
    /// may not block is sent to the blocking path while the metadata is dropped.
    #[test]
    fn dropped_metadata_is_generated_again_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tree = crate::demo::store_demo_tree(&store).unwrap();
        let opts = CreateOptions::default();
        crate::image::create(&store, "a", std::slice::from_ref(&tree), &opts).unwrap();
        crate::image::create(&store, "b", &[tree], &opts).unwrap();
        let eager = |name: &str| {
            let dev = ImageDevice::open(&store, name).unwrap();
            let mut bytes = vec![0u8; dev.size() as usize];
            dev.read_at(&mut bytes, 0).unwrap();
            bytes
        };
        let (want_a, want_b) = (eager("a"), eager("b"));
        assert!(want_a != want_b, "names seed the UUID and hashes");

        let budget = MetadataBudget::new(1);
        let a = ImageExport::open(&store, "a", &budget).unwrap();
        let b = ImageExport::open(&store, "b", &budget).unwrap();
        let read_all = |export: &ImageExport| {
            let mut bytes = vec![0u8; Device::size(export) as usize];
            for (i, chunk) in bytes.chunks_mut(1 << 20).enumerate() {
                export.read_at(chunk, (i << 20) as u64).unwrap();
            }
            bytes
        };
        for round in 0..3 {
            assert!(read_all(&a) == want_a, "a, round {round}");
            // The superblock is metadata: a held copy answers without blocking.
            assert!(a.read_at_cached(&mut [0u8; 4096], 0).is_some());
            assert!(read_all(&b) == want_b, "b, round {round}");
            assert!(
                a.read_at_cached(&mut [0u8; 4096], 0).is_none(),
                "a's metadata was dropped for b's: the read must go where it may block"
            );
        }
        let stats = budget.stats();
        assert_eq!(stats.held_images, 1, "{stats:?}");
        assert!(
            stats.evictions >= 5 && stats.regenerations >= 4,
            "{stats:?}"
        );
        drop((a, b));
        // The background thread may hold a slot for as long as it completes it.
        wait_for("dropped exports to give their bytes back", || {
            budget.stats().held_bytes == 0
        });
    }

    #[test]
    fn records_without_a_device_size_are_synthesized_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tree = crate::demo::store_demo_tree(&store).unwrap();
        let (mut record, _) =
            crate::image::create(&store, "old", &[tree], &CreateOptions::default()).unwrap();
        record.device_size = None;
        store
            .write_image_bytes("old", &serde_json::to_vec(&record).unwrap())
            .unwrap();
        let export = ImageExport::open(&store, "old", &MetadataBudget::unbounded()).unwrap();
        assert!(export.is_synthesized());
    }
}
