//! An overlay's planned reads (`Device::plan_read`): the base plans its runs, written runs
//! are read from the data file (copied now when resident), zeros are filled.

use std::io;

use tessera_nbd::{pread_nowait, FileRead};

use super::{Overlay, State};

impl Overlay {
    /// `None` if the base cannot plan one of its runs: then `read_at` serves it all.
    pub(super) fn plan(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<Vec<FileRead>>> {
        let base = buf.as_ptr() as usize;
        let mut reads = Vec::new();
        let mut blocking = false;
        let walked = self.runs(buf, offset, |state, dst, pos| {
            let at = dst.as_ptr() as usize - base;
            match state {
                State::Base => match self.base.plan_read(dst, pos) {
                    Some(planned) => reads.extend(planned?.into_iter().map(|mut r| {
                        r.at += at;
                        r
                    })),
                    None => {
                        blocking = true;
                        // Stops the walk: the blocking path reads the whole request.
                        return Err(io::Error::from(io::ErrorKind::WouldBlock));
                    }
                },
                State::Data => {
                    if !matches!(pread_nowait(&self.data, dst, pos), Some(Ok(()))) {
                        reads.push(FileRead {
                            at,
                            len: dst.len(),
                            offset: pos,
                            file: self.data.clone(),
                        });
                    }
                }
                State::Zero => dst.fill(0),
            }
            Ok(())
        });
        match walked {
            _ if blocking => None,
            Err(e) => Some(Err(e)),
            Ok(()) => Some(Ok(reads)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    use tessera_nbd::{Device, MemDevice};

    use super::*;

    /// A base that plans every read as one file read.
    struct FileBase(Arc<File>, u64);

    impl Device for FileBase {
        fn size(&self) -> u64 {
            self.1
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.read_exact_at(buf, offset)
        }
        fn plan_read(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<Vec<FileRead>>> {
            Some(Ok(vec![FileRead {
                at: 0,
                len: buf.len(),
                offset,
                file: self.0.clone(),
            }]))
        }
    }

    fn execute(buf: &mut [u8], reads: &[FileRead]) {
        for r in reads {
            let f = File::from(r.file.as_fd().try_clone_to_owned().unwrap());
            f.read_exact_at(&mut buf[r.at..r.at + r.len], r.offset)
                .unwrap();
        }
    }

    #[test]
    fn planned_overlay_reads_match_read_at_across_base_written_and_zero_runs() {
        let size = 256u64 << 10;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&(0..size).map(|i| (i * 7 % 253) as u8).collect::<Vec<_>>())
            .unwrap();
        let base: Arc<dyn Device> = Arc::new(FileBase(Arc::new(f), size));
        let dir = tempfile::tempdir().unwrap();
        let ov = Overlay::ephemeral(base, dir.path()).unwrap();
        ov.write_at(&[0xabu8; 10000], 5000, false).unwrap();
        ov.write_at(&[0xcdu8; 4096], 64 << 10, false).unwrap();
        ov.trim(100 << 10, 8192, false).unwrap();
        for (offset, len) in [
            (0u64, 256usize << 10),
            (4096, 12288),
            (3000, 70000),
            (100 << 10, 8192),
        ] {
            let mut want = vec![0u8; len];
            ov.read_at(&mut want, offset).unwrap();
            let mut got = vec![0x11u8; len];
            let reads = ov.plan(&mut got, offset).expect("the base plans").unwrap();
            execute(&mut got, &reads);
            assert!(got == want, "planned read at {offset}+{len} differs");
        }
    }

    #[test]
    fn a_base_that_cannot_plan_leaves_the_request_to_read_at() {
        let base: Arc<dyn Device> = Arc::new(MemDevice::new(vec![9u8; 64 << 10], false));
        let dir = tempfile::tempdir().unwrap();
        let ov = Overlay::ephemeral(base, dir.path()).unwrap();
        ov.write_at(&[1u8; 8192], 8192, false).unwrap();
        let mut buf = vec![0u8; 8192];
        let reads = ov
            .plan(&mut buf, 8192)
            .expect("written blocks need no base")
            .unwrap();
        execute(&mut buf, &reads);
        assert!(buf.iter().all(|&b| b == 1));
        assert!(ov.plan(&mut vec![0u8; 16384], 4096).is_none());
    }
}
