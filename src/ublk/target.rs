//! One queue of a ublk device: the kernel's I/O descriptors turned into calls on the same
//! [`Device`] an NBD connection gets.
//!
//! A READ is planned ([`Device::plan_read`]): metadata, zeros and file data whose pages are
//! resident (a `mincore` check of a mapped object, an `RWF_NOWAIT` pread of a small one)
//! are copied into the request's buffer on the queue thread; what would wait on the disk
//! becomes io_uring `READ`s from the store object straight into that buffer, on the
//! queue's own ring ([`super::reads`]), and the request completes when the last of them
//! does, while the queue takes other requests. Devices that cannot plan (overlays,
//! `--verify`, objects still being fetched from a remote store) are read synchronously
//! here, as are writes, flushes, discards and write-zeroes: an overlay's cold base read or
//! its `fsync` holds up the queue. The copy count is the same either way: one, from the
//! page cache into the buffer the kernel then copies to the bio's pages.

use std::sync::Arc;

use libublk::io::{with_task_io_ring_mut, BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkIORes, UblkUringData};
use tessera_nbd::{Device, FileRead, ZeroFlags};

use super::reads::{InFlight, Outcome};

/// Sector size of the ublk protocol, whatever the logical block size.
const SECTOR_SHIFT: u32 = 9;

/// The result a ublk completion carries: bytes done, or a negative errno.
fn errno(e: &std::io::Error) -> i32 {
    -e.raw_os_error().unwrap_or(libc::EIO)
}

/// Serves one request: `op_flags`, `start_sector` and `nr_sectors` as the kernel put them
/// in the descriptor, `buf` the request's buffer (at least `nr_sectors` sectors long for
/// reads and writes). Returns the completion result.
pub fn handle(
    dev: &dyn Device,
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &mut [u8],
) -> i32 {
    let op = op_flags & 0xff;
    let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
    let offset = start_sector << SECTOR_SHIFT;
    let len = u64::from(nr_sectors) << SECTOR_SHIFT;
    if op != sys::UBLK_IO_OP_FLUSH && offset.checked_add(len).is_none_or(|end| end > dev.size()) {
        return -libc::EINVAL;
    }
    let bytes = len as usize;
    let done = |r: std::io::Result<()>, n: usize| match r {
        Ok(()) => n as i32,
        Err(e) => errno(&e),
    };
    match op {
        sys::UBLK_IO_OP_READ => match buf.get_mut(..bytes) {
            Some(b) => done(dev.read_at(b, offset), bytes),
            None => -libc::EINVAL,
        },
        sys::UBLK_IO_OP_WRITE if dev.is_read_only() => -libc::EROFS,
        sys::UBLK_IO_OP_WRITE => match buf.get(..bytes) {
            Some(b) => done(dev.write_at(b, offset, fua), bytes),
            None => -libc::EINVAL,
        },
        sys::UBLK_IO_OP_FLUSH if dev.can_flush() => done(dev.flush(), 0),
        // A read-only device has nothing to flush.
        sys::UBLK_IO_OP_FLUSH => 0,
        sys::UBLK_IO_OP_DISCARD if dev.can_trim() => done(dev.trim(offset, len, fua), 0),
        sys::UBLK_IO_OP_WRITE_ZEROES if dev.can_zero() => {
            let flags = ZeroFlags {
                may_trim: op_flags & sys::UBLK_IO_F_NOUNMAP == 0,
                fast: false,
                fua,
            };
            done(dev.write_zeroes(offset, len, flags), 0)
        }
        _ => -libc::EOPNOTSUPP,
    }
}

/// How a READ goes: completed now (`Now`), or through file reads on the queue's ring.
pub enum Read {
    Now(i32),
    Files(Vec<FileRead>),
}

/// Plans a READ (`start_sector`, `nr_sectors` from the descriptor) into `buf`: what the
/// device has in memory or in the page cache is copied now; the rest becomes file reads.
/// A device that cannot plan the range (see [`Device::plan_read`]) reads it here, blocking.
pub fn plan(dev: &dyn Device, start_sector: u64, nr_sectors: u32, buf: &mut [u8]) -> Read {
    let offset = start_sector << SECTOR_SHIFT;
    let len = u64::from(nr_sectors) << SECTOR_SHIFT;
    if offset.checked_add(len).is_none_or(|end| end > dev.size()) {
        return Read::Now(-libc::EINVAL);
    }
    let Some(b) = buf.get_mut(..len as usize) else {
        return Read::Now(-libc::EINVAL);
    };
    match dev.plan_read(b, offset) {
        Some(Ok(reads)) if reads.is_empty() => Read::Now(len as i32),
        Some(Ok(reads)) => Read::Files(reads),
        Some(Err(e)) => Read::Now(errno(&e)),
        None => Read::Now(match dev.read_at(b, offset) {
            Ok(()) => len as i32,
            Err(e) => errno(&e),
        }),
    }
}

/// The queue thread's body: fetches requests until the device is stopped.
pub fn serve_queue(qid: u16, udev: &UblkDev, dev: Arc<dyn Device>) {
    let mut bufs = udev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, udev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(qid, error = %e, "cannot set up the ublk queue");
            return;
        }
    };
    let mut flight = InFlight::new(bufs.len());
    // For the log at the end: how many requests came, and how many waited on file reads.
    let (mut requests, mut on_ring, mut file_reads) = (0u64, 0u64, 0u64);
    let complete = |q: &UblkQueue, tag: u16, buf: &[u8], res: i32| {
        if let Err(e) =
            q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res)))
        {
            tracing::error!(qid, tag, error = %e, "cannot complete a ublk request");
        }
    };
    let finish = |q: &UblkQueue, tag: u16, buf: &[u8], outcome: Outcome| match outcome {
        Outcome::Done(res) => complete(q, tag, buf, res),
        Outcome::Failed { errno, got, want } => {
            let iod = q.get_iod(tag);
            tracing::warn!(
                qid,
                tag,
                start = iod.start_sector,
                sectors = iod.nr_sectors,
                errno,
                got,
                want,
                "a file read of a ublk request failed or came back short"
            );
            complete(q, tag, buf, -libc::EIO);
        }
    };
    queue.wait_and_handle_io(|q: &UblkQueue, tag, ctx| {
        let buf = bufs[tag as usize].as_mut_slice();
        if ctx.is_tgt_io() {
            if let Some(outcome) = flight.complete(tag, ctx.result()) {
                finish(q, tag, buf, outcome);
            }
            return;
        }
        let iod = q.get_iod(tag);
        let (op_flags, start, sectors) = (iod.op_flags, iod.start_sector, iod.nr_sectors);
        requests += 1;
        let res = if op_flags & 0xff == sys::UBLK_IO_OP_READ {
            match plan(&*dev, start, sectors, buf) {
                Read::Now(res) => res,
                Read::Files(reads) => {
                    on_ring += 1;
                    file_reads += reads.len() as u64;
                    let len = (sectors as i32) << SECTOR_SHIFT;
                    let data = |tag| UblkIOCtx::build_user_data(tag, sys::UBLK_IO_OP_READ, 0, true);
                    let now = flight.start(tag, buf, reads, len, data, |sqe| {
                        // Only a failed io_uring_enter while the ring is full fails here.
                        q.ublk_submit_sqe_sync(sqe)
                            .map_err(|e| {
                                tracing::error!(qid, tag, error = %e, "cannot queue a ublk file read")
                            })
                            .is_ok()
                    });
                    if let Some(outcome) = now {
                        finish(q, tag, buf, outcome);
                    }
                    return;
                }
            }
        } else {
            handle(&*dev, op_flags, start, sectors, buf)
        };
        if res < 0 && res != -libc::EOPNOTSUPP {
            tracing::warn!(
                qid,
                tag,
                op = op_flags & 0xff,
                start,
                sectors,
                res,
                "ublk request failed"
            );
        }
        complete(q, tag, buf, res);
    });
    // The queue is down, but the kernel may still be writing into request buffers: reap
    // those reads before the buffers are freed.
    let mut left = flight.busy();
    if left > 0 {
        tracing::info!(qid, tags = left, "waiting for file reads in flight");
    }
    while left > 0 {
        let reaped = with_task_io_ring_mut(|ring: &mut io_uring::IoUring| {
            if let Err(e) = ring.submit_and_wait(1) {
                tracing::error!(qid, error = %e, "cannot wait for ublk file reads");
                return None;
            }
            Some(
                ring.completion()
                    .map(|c| (c.user_data(), c.result()))
                    .collect::<Vec<_>>(),
            )
        });
        let Some(reaped) = reaped else { break };
        for (data, res) in reaped {
            if data & (UblkUringData::Target as u64) != 0 {
                flight.complete(UblkIOCtx::user_data_to_tag(data) as u16, res);
            }
        }
        left = flight.busy();
    }
    // If waiting failed, leak the buffers rather than free memory the kernel may write.
    if left > 0 {
        std::mem::forget(bufs);
    }
    tracing::info!(qid, requests, on_ring, file_reads, "ublk queue stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::Mutex;

    /// A writable RAM disk that records the calls it gets.
    struct Ram {
        data: Mutex<Vec<u8>>,
        calls: Mutex<Vec<String>>,
        writable: bool,
    }

    impl Ram {
        fn new(size: usize, writable: bool) -> Ram {
            Ram {
                data: Mutex::new((0..size).map(|i| (i % 251) as u8).collect()),
                calls: Mutex::default(),
                writable,
            }
        }
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
    }

    impl Device for Ram {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn is_read_only(&self) -> bool {
            !self.writable
        }
        fn can_flush(&self) -> bool {
            self.writable
        }
        fn can_trim(&self) -> bool {
            self.writable
        }
        fn can_zero(&self) -> bool {
            self.writable
        }
        fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
            self.log(format!("write {offset} {} fua={fua}", buf.len()));
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.log("flush".into());
            Ok(())
        }
        fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
            self.log(format!("trim {offset} {len} fua={fua}"));
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, f: ZeroFlags) -> io::Result<()> {
            self.log(format!(
                "zero {offset} {len} may_trim={} fua={}",
                f.may_trim, f.fua
            ));
            Ok(())
        }
    }

    const SIZE: usize = 1 << 20;

    #[test]
    fn reads_fill_the_request_buffer_and_return_the_byte_count() {
        let dev = Ram::new(SIZE, false);
        let mut buf = vec![0u8; 64 << 10];
        let res = handle(&dev, sys::UBLK_IO_OP_READ, 24, 8, &mut buf);
        assert_eq!(res, 4096);
        let want: Vec<u8> = (24 * 512..24 * 512 + 4096)
            .map(|i| (i % 251) as u8)
            .collect();
        assert_eq!(&buf[..4096], &want[..]);
    }

    #[test]
    fn reads_of_a_device_without_plans_are_read_in_place() {
        let dev = Ram::new(SIZE, false);
        let mut buf = vec![0u8; 8192];
        assert!(matches!(plan(&dev, 8, 16, &mut buf), Read::Now(8192)));
        let want: Vec<u8> = (4096..4096 + 8192).map(|i| (i % 251) as u8).collect();
        assert_eq!(buf, want);
        let last = (SIZE / 512) as u64;
        assert!(matches!(plan(&dev, last - 8, 16, &mut buf), Read::Now(e) if e == -libc::EINVAL));
        assert!(matches!(plan(&dev, 0, 32, &mut buf), Read::Now(e) if e == -libc::EINVAL));
    }

    #[test]
    fn requests_past_the_end_are_refused_not_served() {
        let dev = Ram::new(SIZE, true);
        let mut buf = vec![0u8; 8192];
        let last = (SIZE / 512) as u64;
        assert_eq!(
            handle(&dev, sys::UBLK_IO_OP_READ, last - 8, 8, &mut buf),
            4096
        );
        assert_eq!(
            handle(&dev, sys::UBLK_IO_OP_READ, last - 4, 8, &mut buf),
            -libc::EINVAL
        );
        assert_eq!(
            handle(&dev, sys::UBLK_IO_OP_DISCARD, u64::MAX >> 9, 8, &mut buf),
            -libc::EINVAL
        );
        // A buffer shorter than the request is the caller's bug, not a panic.
        assert_eq!(
            handle(&dev, sys::UBLK_IO_OP_READ, 0, 32, &mut buf),
            -libc::EINVAL
        );
    }

    #[test]
    fn read_only_devices_refuse_writes_and_take_flushes() {
        let dev = Ram::new(SIZE, false);
        let mut buf = vec![7u8; 4096];
        assert_eq!(
            handle(&dev, sys::UBLK_IO_OP_WRITE, 0, 8, &mut buf),
            -libc::EROFS
        );
        assert_eq!(handle(&dev, sys::UBLK_IO_OP_FLUSH, 0, 0, &mut buf), 0);
        assert_eq!(
            handle(&dev, sys::UBLK_IO_OP_DISCARD, 0, 8, &mut buf),
            -libc::EOPNOTSUPP
        );
        assert!(dev.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn fua_flush_discard_and_nounmap_reach_the_device() {
        let dev = Ram::new(SIZE, true);
        let mut buf = vec![9u8; 8192];
        let fua = sys::UBLK_IO_F_FUA;
        assert_eq!(
            handle(&dev, sys::UBLK_IO_OP_WRITE | fua, 16, 16, &mut buf),
            8192
        );
        assert_eq!(handle(&dev, sys::UBLK_IO_OP_WRITE, 0, 8, &mut buf), 4096);
        assert_eq!(handle(&dev, sys::UBLK_IO_OP_FLUSH, 0, 0, &mut buf), 0);
        assert_eq!(handle(&dev, sys::UBLK_IO_OP_DISCARD, 64, 64, &mut buf), 0);
        let nounmap = sys::UBLK_IO_F_NOUNMAP;
        assert_eq!(
            handle(&dev, sys::UBLK_IO_OP_WRITE_ZEROES | nounmap, 8, 8, &mut buf),
            0
        );
        assert_eq!(
            handle(&dev, sys::UBLK_IO_OP_WRITE_ZEROES | fua, 8, 8, &mut buf),
            0
        );
        assert_eq!(
            *dev.calls.lock().unwrap(),
            [
                "write 8192 8192 fua=true",
                "write 0 4096 fua=false",
                "flush",
                "trim 32768 32768 fua=false",
                "zero 4096 4096 may_trim=false fua=false",
                "zero 4096 4096 may_trim=true fua=true",
            ]
        );
        let mut back = vec![0u8; 8192];
        assert_eq!(handle(&dev, sys::UBLK_IO_OP_READ, 16, 16, &mut back), 8192);
        assert!(back.iter().all(|&b| b == 9));
    }
}
