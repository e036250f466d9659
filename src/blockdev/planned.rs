//! Reads whose file data the frontend reads itself (ublk over io_uring): the same walk over
//! layout pieces as every read ([`ImageDevice::fill`]), with data pieces copied when
//! resident and otherwise returned as file reads.

use std::io;

use tessera_nbd::FileRead;

use super::object::direct::Direct;
use super::ImageDevice;

impl ImageDevice {
    /// Fills `buf` (the device bytes at `offset`) with metadata, zeros and resident file
    /// data, and returns the file reads that complete it. `None`: some piece needs the
    /// blocking path ([`ImageDevice::read_at`]); `buf` may then be partly written.
    pub fn plan_read(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<Vec<FileRead>>> {
        let base = buf.as_ptr() as usize;
        let mut reads = Vec::new();
        let mut failed = None;
        let walked = self.fill(buf, offset, false, |object, out, at| {
            match object.plan(out, at, self.verify) {
                Ok(Direct::Done) => Some(()),
                Ok(Direct::Read { file, base: start }) => {
                    reads.push(FileRead {
                        at: out.as_ptr() as usize - base,
                        len: out.len(),
                        offset: start + at,
                        file,
                    });
                    Some(())
                }
                Ok(Direct::Blocking) => None,
                Err(e) => {
                    failed = Some(e);
                    None
                }
            }
        });
        match walked {
            Err(e) => Some(Err(e)),
            Ok(false) => failed.map(Err),
            Ok(true) => {
                if reads.is_empty() {
                    self.reached(offset, buf.len() as u64);
                } else {
                    // As a blocking read would: start the kernel on the other objects of
                    // this range and, for a sequential reader, of the next ones.
                    self.prefetch(offset, buf.len() as u64);
                }
                Some(Ok(reads))
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::os::fd::AsRawFd;
    use std::path::Path;

    use super::*;
    use crate::image::CreateOptions;
    use crate::store::Store;

    /// Drops every file under `dir` from the page cache, so reads of it would wait on disk.
    pub(in crate::blockdev) fn evict(dir: &Path) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                evict(&path);
            } else if let Ok(f) = std::fs::File::open(&path) {
                f.sync_all().unwrap();
                // SAFETY: posix_fadvise takes integers only; `f` is open during the call.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
        }
    }

    /// Runs the planned reads the way the ublk queue would, with `pread` for io_uring.
    pub(in crate::blockdev) fn plan_and_read(
        dev: &ImageDevice,
        buf: &mut [u8],
        offset: u64,
    ) -> usize {
        let reads = dev.plan_read(buf, offset).expect("plannable").unwrap();
        for r in &reads {
            let file = std::fs::File::from(r.file.as_fd().try_clone_to_owned().unwrap());
            std::os::unix::fs::FileExt::read_exact_at(
                &file,
                &mut buf[r.at..r.at + r.len],
                r.offset,
            )
            .unwrap();
        }
        reads.len()
    }

    #[test]
    fn planned_reads_give_the_bytes_of_read_at_cold_and_warm() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tree = crate::demo::store_demo_tree(&store).unwrap();
        crate::image::create(&store, "demo", &[tree], &CreateOptions::default()).unwrap();
        let dev = ImageDevice::open(&store, "demo").unwrap();
        evict(dir.path());

        // Chunks at odd offsets that cut pieces (metadata, zeros, small and mapped objects).
        let size = dev.size();
        let chunks: Vec<(u64, usize)> = (0..size)
            .step_by(300 << 10)
            .map(|o| (o + 3 * 4096, 257 << 10))
            .filter(|&(o, n)| o + n as u64 <= size)
            .collect();
        let mut cold_reads = 0;
        for pass in ["cold", "warm"] {
            let mut reads = 0;
            for &(offset, n) in &chunks {
                let mut want = vec![0u8; n];
                let mut got = vec![0xa5u8; n];
                reads += plan_and_read(&dev, &mut got, offset);
                dev.read_at(&mut want, offset).unwrap();
                assert!(
                    got == want,
                    "{pass}: bytes at {offset}+{n} differ from read_at"
                );
            }
            if pass == "cold" {
                cold_reads = reads;
            } else {
                // read_at above brought every object into the page cache: all copied inline.
                assert_eq!(reads, 0, "warm pass still planned file reads");
            }
        }
        // Evicted objects are left to the caller, not read on the planning thread.
        assert!(cold_reads > 0, "no file reads planned for evicted objects");
    }

    #[test]
    fn reads_past_the_end_are_errors_not_plans() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tree = crate::demo::store_demo_tree(&store).unwrap();
        crate::image::create(&store, "demo", &[tree], &CreateOptions::default()).unwrap();
        let dev = ImageDevice::open(&store, "demo").unwrap();
        let mut buf = vec![0u8; 8192];
        assert!(matches!(
            dev.plan_read(&mut buf, dev.size() - 4096),
            Some(Err(_))
        ));
    }
}
