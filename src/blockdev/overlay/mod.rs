//! Copy-on-write overlays: a writable device over any read-only one.
//!
//! Written blocks go to a sparse data file at their own offset (block `i` at byte
//! `i * 4096`), and a [`BlockMap`] says for each block whether it reads from the image, from
//! the data file, or as zeros. TRIM and WRITE_ZEROES only change the map (and punch the data
//! file), never reading the image. Unaligned writes read-modify-write whole blocks.
//!
//! Durability: FLUSH (and FUA) fsyncs the data file *then* atomically replaces the map
//! ([`BlockMap::save`]), so an acknowledged flush survives a crash of the server and the
//! map on disk is always one complete generation. Ephemeral overlays live in a temporary
//! directory removed when the device is dropped; persistent ones are in the store
//! ([`named`]).

pub mod detached;
mod map;
pub mod named;
mod planned;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tessera_nbd::{Device, Extent, ZeroFlags};

pub use map::{BlockMap, State};

const BS: u64 = 4096;

/// A writable view of `base` whose changes live in a directory.
pub struct Overlay {
    base: Arc<dyn Device>,
    dir: PathBuf,
    /// Shared with planned reads in flight (`planned.rs`), which hold it until reaped.
    data: Arc<File>,
    map: RwLock<BlockMap>,
    /// The in-memory map has changes the saved one lacks.
    map_dirty: AtomicBool,
    /// Serializes read-modify-write of partial blocks. Whole-block writes need no lock:
    /// overlapping requests in flight have no defined order in NBD.
    rmw: Mutex<()>,
    /// Serializes flushes; holds the generation of the map on disk.
    saved_generation: Mutex<u64>,
    persistent: bool,
    /// Connections share this device (see [`Overlay::share`]).
    shared: bool,
    description: Option<String>,
    /// Keeps a persistent overlay's lock or an ephemeral overlay's directory alive.
    _hold: Box<dyn Send + Sync>,
}

impl Overlay {
    /// A fresh overlay in a new temporary directory, removed on drop.
    pub fn ephemeral(base: Arc<dyn Device>, parent: &Path) -> io::Result<Overlay> {
        std::fs::create_dir_all(parent)?;
        let tmp = tempfile::Builder::new()
            .prefix("ephemeral-")
            .tempdir_in(parent)?;
        let dir = tmp.path().to_path_buf();
        let blocks = base.size().div_ceil(BS);
        let description = base
            .description()
            .map(|d| format!("{d} (ephemeral overlay)"));
        Overlay::open_in(
            base,
            &dir,
            BlockMap::new(blocks),
            false,
            description,
            Box::new(tmp),
        )
    }

    fn open_in(
        base: Arc<dyn Device>,
        dir: &Path,
        map: BlockMap,
        persistent: bool,
        description: Option<String>,
        hold: Box<dyn Send + Sync>,
    ) -> io::Result<Overlay> {
        let map_generation = map.generation();
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("data"))?;
        Ok(Overlay {
            base,
            dir: dir.to_path_buf(),
            data: Arc::new(data),
            map: RwLock::new(map),
            map_dirty: AtomicBool::new(false),
            rmw: Mutex::new(()),
            saved_generation: Mutex::new(map_generation),
            persistent,
            shared: false,
            description,
            _hold: hold,
        })
    }

    /// Marks this overlay as served to several connections at once. They all write the
    /// same data file and map, and a flush on any of them syncs both, so a write a client
    /// sees completed before it flushes on another connection is durable: the spec's rule
    /// for NBD_FLAG_CAN_MULTI_CONN holds, and it is advertised.
    pub fn share(mut self) -> Overlay {
        self.shared = true;
        self
    }

    /// Whether this overlay lies over exactly `device` (the same object, not equal bytes).
    pub fn base_is<T: ?Sized>(&self, device: &Arc<T>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.base), Arc::as_ptr(device))
    }

    /// Blocks that differ from the image.
    pub fn changed_blocks(&self) -> u64 {
        self.map.read().unwrap().changed_blocks()
    }

    fn read_block_into(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.map.read().unwrap().get(block) {
            State::Base => {
                let end = ((block + 1) * BS).min(self.base.size());
                let n = (end - block * BS) as usize;
                self.base.read_at(&mut buf[..n], block * BS)?;
                buf[n..].fill(0);
                Ok(())
            }
            State::Data => self.data.read_exact_at(buf, block * BS),
            State::Zero => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Mark whole blocks `first..first+n` as zeros and release their data.
    fn zero_blocks(&self, first: u64, n: u64) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        {
            let mut map = self.map.write().unwrap();
            for b in first..first + n {
                map.set(b, State::Zero);
            }
        }
        punch_hole(&self.data, first * BS, n * BS);
        Ok(())
    }

    /// Zero an arbitrary byte range: whole blocks in the map, partial ones by writing.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let first_full = offset.div_ceil(BS);
        let last_full = end / BS;
        if first_full >= last_full {
            return self.write(&vec![0u8; len as usize], offset);
        }
        if offset < first_full * BS {
            self.write(&vec![0u8; (first_full * BS - offset) as usize], offset)?;
        }
        self.zero_blocks(first_full, last_full - first_full)?;
        self.map_dirty.store(true, Ordering::Release);
        if end > last_full * BS {
            self.write(&vec![0u8; (end - last_full * BS) as usize], last_full * BS)?;
        }
        Ok(())
    }

    /// Data first, then the map entry, so a map that says `Data` never points at a write
    /// that has not reached the data file.
    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let block = pos / BS;
            let in_block = (pos % BS) as usize;
            let n = ((BS as usize - in_block) as u64).min(end - pos) as usize;
            if n == BS as usize {
                // Whole blocks: write the longest aligned run at once, without a lock.
                let whole = ((end - pos) / BS) * BS;
                let run = &buf[(pos - offset) as usize..(pos - offset + whole) as usize];
                self.data.write_all_at(run, pos)?;
                let mut map = self.map.write().unwrap();
                for b in block..block + whole / BS {
                    map.set(b, State::Data);
                }
                pos += whole;
            } else {
                let _rmw = self.rmw.lock().unwrap();
                let mut block_buf = [0u8; BS as usize];
                self.read_block_into(block, &mut block_buf)?;
                let src = &buf[(pos - offset) as usize..(pos - offset) as usize + n];
                block_buf[in_block..in_block + n].copy_from_slice(src);
                self.data.write_all_at(&block_buf, block * BS)?;
                self.map.write().unwrap().set(block, State::Data);
                pos += n as u64;
            }
            self.map_dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Everything acknowledged before this call becomes durable. The map is copied
    /// *before* the data sync, so each `Data` entry saved refers to a write that had reached
    /// the data file and is covered by the sync, even while other writes are in flight.
    fn flush_all(&self) -> io::Result<()> {
        let mut generation = self.saved_generation.lock().unwrap();
        let snapshot = (self.persistent && self.map_dirty.swap(false, Ordering::AcqRel))
            .then(|| self.map.read().unwrap().clone());
        let saved = self.data.sync_data().and_then(|()| match &snapshot {
            Some(map) => map.save(&self.dir, *generation + 1),
            None => Ok(()),
        });
        match saved {
            Ok(()) if snapshot.is_some() => *generation += 1,
            Ok(()) => {}
            Err(e) => {
                self.map_dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Overlay {
    /// Walks `buf` (the device bytes at `offset`) in runs of one [`State`]: `f(state,
    /// run's part of buf, run's device offset)`.
    fn runs(
        &self,
        buf: &mut [u8],
        offset: u64,
        mut f: impl FnMut(State, &mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let block = pos / BS;
            let max_blocks = (end - block * BS).div_ceil(BS);
            let (state, n) = self.map.read().unwrap().run(block, max_blocks);
            let run_end = ((block + n) * BS).min(end);
            f(
                state,
                &mut buf[(pos - offset) as usize..(run_end - offset) as usize],
                pos,
            )?;
            pos = run_end;
        }
        Ok(())
    }
}

impl Drop for Overlay {
    /// A client that disconnects cleanly without flushing (`nbdcopy` does not flush unless
    /// asked) still expects its completed writes to be there next time, as they would be
    /// with nbd-server or qemu-nbd writing a file: save them now. Only a crash loses
    /// unflushed writes.
    fn drop(&mut self) {
        if self.persistent && self.map_dirty.load(Ordering::Acquire) {
            if let Err(e) = self.flush_all() {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot save the overlay's writes on close");
            }
        }
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on a valid, owned descriptor; failure only means space is not freed.
    unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        );
    }
}

impl Device for Overlay {
    fn size(&self) -> u64 {
        self.base.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.runs(buf, offset, |state, dst, pos| match state {
            State::Base => self.base.read_at(dst, pos),
            State::Data => self.data.read_exact_at(dst, pos),
            State::Zero => {
                dst.fill(0);
                Ok(())
            }
        })
    }

    fn plan_read(
        &self,
        buf: &mut [u8],
        offset: u64,
    ) -> Option<io::Result<Vec<tessera_nbd::FileRead>>> {
        self.plan(buf, offset)
    }

    fn description(&self) -> Option<String> {
        self.description.clone()
    }

    fn is_read_only(&self) -> bool {
        false
    }
    fn can_flush(&self) -> bool {
        true
    }
    fn can_trim(&self) -> bool {
        true
    }
    fn can_zero(&self) -> bool {
        true
    }
    fn can_fast_zero(&self) -> bool {
        true
    }
    /// An ephemeral overlay is per connection, and a persistent one shared by several
    /// connections only when the server allows it ([`Overlay::share`]).
    fn can_multi_conn(&self) -> bool {
        self.shared
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.write(buf, offset)?;
        if fua {
            self.flush_all()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flush_all()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(
            offset,
            len,
            ZeroFlags {
                may_trim: true,
                fast: false,
                fua,
            },
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.zero_range(offset, len)?;
        if flags.fua {
            self.flush_all()?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, Extent)>> {
        let block = offset / BS;
        let max_blocks = (offset + len).div_ceil(BS) - block;
        let (state, n) = self.map.read().unwrap().run(block, max_blocks);
        let run_len = ((block + n) * BS).min(self.size()) - offset;
        match state {
            State::Data => Ok(vec![(run_len, Extent::Data)]),
            State::Zero => Ok(vec![(run_len, Extent::Zero)]),
            State::Base => {
                let mut out = self.base.extents(offset, run_len)?;
                // Clip the base's answer to the run of base blocks.
                let mut total = 0;
                out.retain_mut(|(l, _)| {
                    if total >= run_len {
                        return false;
                    }
                    *l = (*l).min(run_len - total);
                    total += *l;
                    true
                });
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests;
