//! Packs as the read path sees them: one descriptor and one mapping per pack file for the
//! whole process, shared by every object in it and every image naming those objects (see
//! `store::pack` for why packs exist).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use memmap2::Mmap;

use super::resident::{Mapping, Window};
use crate::store::pack::{PackIndex, Packed};
use crate::store::{ObjectId, Store};

/// An open, mapped pack.
#[derive(Debug)]
pub(in crate::blockdev) struct Pack {
    file: Arc<File>,
    map: Arc<Mapping>,
}

impl Pack {
    /// Asks the kernel to read `start..end` of the pack into the page cache, without
    /// waiting (errors ignored: it is a hint).
    pub fn advise(&self, start: u64, end: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise takes integers only; the descriptor is kept open by
        // `self.file` for the duration of the call.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                start as libc::off_t,
                (end - start) as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }

    /// The window of the pack holding one object, or `None` if the index entry does not fit
    /// the pack as mapped (a damaged pack: the object is read from its loose file instead).
    pub fn window(&self, offset: u64, len: u64) -> Option<Window> {
        Window::packed(self.map.clone(), self.file.clone(), offset, len)
    }
}

/// Each object's pack (opened and mapped once for the process while any object uses it)
/// and range there, for the objects of one image: consecutive objects mostly share a pack,
/// so the process-wide table is asked once per pack, not once per object. A pack that
/// cannot be opened leaves its objects loose, with a warning.
pub(in crate::blockdev) struct Opener {
    opened: Vec<(Arc<PackIndex>, Option<Arc<Pack>>)>,
}

impl Opener {
    pub fn new() -> Opener {
        Opener { opened: Vec::new() }
    }

    pub fn open(&mut self, packed: Option<Packed>) -> Option<(Arc<Pack>, u64, u64)> {
        let packed = packed?;
        let pack = match self
            .opened
            .iter()
            .find(|(index, _)| Arc::ptr_eq(index, &packed.index))
        {
            Some((_, pack)) => pack.clone(),
            None => {
                let path = packed.index.pack_path();
                let pack = open(path)
                    .inspect_err(|e| {
                        tracing::warn!(pack = %path.display(), error = %e, "cannot open a pack; reading its objects loose")
                    })
                    .ok();
                self.opened.push((packed.index.clone(), pack.clone()));
                pack
            }
        }?;
        Some((pack, packed.offset, packed.len))
    }
}

/// Where object `id` of the store at `root` is packed now, as a window of its pack: for an
/// object that was loose when its image was laid out and whose loose file is gone since
/// (`store pack` and `store gc` remove the loose copies of packed objects). `None` if no
/// pack of the store holds it.
pub(in crate::blockdev) fn relocate(root: &Path, id: &ObjectId) -> Option<Window> {
    // One store per root for the process, so that its list of packs is read once and again
    // only when `packs/` changes, however many objects moved.
    static STORES: OnceLock<Mutex<HashMap<PathBuf, Store>>> = OnceLock::new();
    let store = {
        let mut stores = STORES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match stores.get(root) {
            Some(s) => s.clone(),
            None => {
                let s = Store::open(root).ok()?;
                stores.insert(root.to_path_buf(), s.clone());
                s
            }
        }
    };
    let (pack, offset, len) = Opener::new().open(store.packs().find(id))?;
    pack.window(offset, len)
}

/// The pack at `path`, opened and mapped once for the process while any object uses it.
fn open(path: &Path) -> io::Result<Arc<Pack>> {
    static LIVE: OnceLock<Mutex<HashMap<PathBuf, Weak<Pack>>>> = OnceLock::new();
    let mut live = LIVE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(pack) = live.get(path).and_then(Weak::upgrade) {
        return Ok(pack);
    }
    live.retain(|_, w| w.strong_count() > 0);
    let pack = Arc::new(map(path)?);
    live.insert(path.to_path_buf(), Arc::downgrade(&pack));
    Ok(pack)
}

fn map(path: &Path) -> io::Result<Pack> {
    let file = File::open(path)?;
    // SAFETY: packs are store files, immutable once named: written under tmp/, renamed into
    // place read-only and never modified or truncated (gc only unlinks, which keeps the
    // mapping valid). Every window is bounds-checked against the mapping's length.
    let map = unsafe { Mmap::map(&file) }?;
    Ok(Pack {
        map: Arc::new(Mapping::new(map, file.metadata()?.uid())),
        file: Arc::new(file),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    use crate::blockdev::planned::tests::{evict, plan_and_read};
    use crate::blockdev::ImageDevice;
    use crate::image::CreateOptions;
    use crate::store::Store;

    /// The whole device, read with `read_at` in chunks that cut pieces at odd places.
    fn read_all(dev: &ImageDevice) -> Vec<u8> {
        let mut out = vec![0u8; dev.size() as usize];
        for (i, chunk) in out.chunks_mut(300 << 10).enumerate() {
            dev.read_at(chunk, i as u64 * (300 << 10)).unwrap();
        }
        out
    }

    /// A store holding the demo image "demo", every object loose.
    fn demo_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tree = crate::demo::store_demo_tree(&store).unwrap();
        crate::image::create(&store, "demo", &[tree], &CreateOptions::default()).unwrap();
        (dir, store)
    }

    fn packed_objects(dev: &ImageDevice) -> usize {
        dev.objects
            .get()
            .iter()
            .filter(|o| o.packed.is_some())
            .count()
    }

    #[test]
    fn objects_packed_after_they_were_opened_loose_are_read_from_their_pack() {
        use crate::blockdev::object::{Backing, Object};
        let (dir, store) = demo_store();
        let dev = ImageDevice::open(&store, "demo").unwrap();
        let want = read_all(&dev);
        let small: Vec<_> = dev
            .objects
            .get()
            .iter()
            .filter(|o| matches!(o.backing.get(), Some(Backing::Small { .. })))
            .cloned()
            .collect();
        assert!(
            small.len() > 1,
            "the demo image has small objects: {} of {}",
            small.len(),
            dev.objects.get().len()
        );

        // No server leases the image: packing removes every packed object's loose copy.
        let report = crate::upkeep::pack(&store, &[]).unwrap();
        assert_eq!(report.loose_copies, report.pack.as_ref().unwrap().len());
        // The descriptor bound closed them all; reads must find the packed copies.
        for o in &small {
            if let Some(Backing::Small { fd, .. }) = o.backing.get() {
                fd.close();
            }
        }
        assert!(read_all(&dev) == want, "reads after packing differ");
        assert!(
            small.iter().all(|o| o.moved.get().is_some()),
            "a small object was read from somewhere other than its pack"
        );
        let mut buf = vec![0u8; 4096];
        let inline = (0..dev.size())
            .step_by(4096)
            .filter(|&at| dev.read_at_resident(&mut buf, at).is_some())
            .count();
        assert_eq!(
            inline as u64,
            dev.size() / 4096,
            "moved objects are no longer read inline"
        );

        // One never opened before: its backing is its window of the pack.
        let id = small[0].id;
        let fresh = Object::new(id, Arc::from(dir.path()));
        let len = store.object_len(&id).unwrap() as usize;
        let mut bytes = vec![0u8; len];
        fresh.read(&mut bytes, 0, true).unwrap();
        assert_eq!(crate::store::ObjectId::of(&bytes), id);
        assert!(matches!(fresh.backing.get(), Some(Backing::Mapped(_))));

        // Not packed and gone: the error names the object, as before.
        std::fs::remove_dir_all(dir.path().join("packs")).unwrap();
        let gone = Object::new(id, Arc::from(dir.path()));
        let err = gone.read(&mut bytes, 0, false).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    }

    #[test]
    fn a_packed_image_reads_the_same_bytes_every_way() {
        let (dir, store) = demo_store();
        let loose = ImageDevice::open(&store, "demo").unwrap();
        let want = read_all(&loose);
        assert_eq!(packed_objects(&loose), 0);
        drop(loose);

        let report = crate::upkeep::pack(&store, &[]).unwrap();
        let index = report.pack.expect("the demo image has small objects");
        let dev = ImageDevice::open(&store, "demo").unwrap();
        assert_eq!(packed_objects(&dev), index.len());
        // Cold: blocking reads, then planned reads (ublk) from the pack at its offsets.
        evict(dir.path());
        assert!(
            read_all(&dev) == want,
            "blocking reads of a packed image differ"
        );
        evict(dir.path());
        let mut planned = vec![0u8; want.len()];
        let mut file_reads = 0;
        for (i, chunk) in planned.chunks_mut(300 << 10).enumerate() {
            file_reads += plan_and_read(&dev, chunk, i as u64 * (300 << 10));
        }
        assert!(file_reads > 0, "nothing was left to the planned reads");
        assert!(planned == want, "planned reads of a packed image differ");
        // Warm: the inline paths, copied and shared.
        let mut buf = vec![0u8; 300 << 10];
        for (i, expect) in want.chunks(300 << 10).enumerate() {
            let at = i as u64 * (300 << 10);
            let got = &mut buf[..expect.len()];
            dev.read_at_resident(got, at).expect("resident").unwrap();
            assert!(got == expect, "resident read at {at} differs");
            let mut slices = Vec::new();
            dev.read_resident_shared(at, expect.len() as u64, &mut slices)
                .expect("resident")
                .unwrap();
            assert!(slices.concat() == expect, "shared read at {at} differs");
        }
        drop(dev);

        let verifying = store.clone().verifying_reads(true);
        let dev = ImageDevice::open(&verifying, "demo").unwrap();
        assert!(
            read_all(&dev) == want,
            "verified reads of a packed image differ"
        );
        drop(dev);

        // A damaged pack: verified reads fail rather than return its bytes.
        let (_, offset, _) = index.entries().max_by_key(|e| e.2).unwrap();
        let pack = std::fs::OpenOptions::new()
            .write(true)
            .open(index.pack_path())
            .unwrap();
        pack.write_all_at(b"X", offset).unwrap();
        let dev = ImageDevice::open(&verifying, "demo").unwrap();
        let failed = (0..dev.size())
            .step_by(4096)
            .filter(|&at| dev.read_at(&mut buf[..4096], at).is_err())
            .count();
        assert!(
            failed > 0,
            "a damaged packed object was served under --verify"
        );
    }
}
