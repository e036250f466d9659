//! The transmission phase: one reader loop decodes requests, each request runs
//! on a blocking thread against the device, and one writer task serializes the
//! replies, which go out in completion order (the spec allows any order).
//!
//! Memory is bounded per connection by a semaphore counted in bytes: a
//! request takes permits for its read buffer or write payload before the
//! reader looks at the next one, and gives them back once its reply is on the
//! socket.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, WriteHalf};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::device::{Device, Extent};
use crate::error::SessionError;
use crate::handshake::Negotiated;
use crate::io::BoxIo;
use crate::proto::*;
use crate::reply::{self, ReplyMode};
use crate::request::{self, Command, RequestHeader, Session};

/// Fixed cost charged to every request against the in-flight budget, so that
/// a flood of payload-less requests is bounded too.
const REQUEST_COST: usize = 4096;
/// Zero runs shorter than this inside a read are sent as data: a hole chunk
/// costs a header, and tiny ones only fragment the reply.
const MIN_HOLE: u64 = 4096;

/// Why transmission ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// NBD_CMD_DISC.
    Disconnect,
    /// The client closed the socket.
    Eof,
    /// Server shutdown.
    Shutdown,
    /// Writing replies failed (the client went away mid-reply).
    WriteFailed,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndReason::Disconnect => "client sent NBD_CMD_DISC",
            EndReason::Eof => "client closed the connection",
            EndReason::Shutdown => "server shutdown",
            EndReason::WriteFailed => "writing a reply failed",
        })
    }
}

/// Byte counters of one connection.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub requests: AtomicU64,
}

/// A reply ready for the socket, holding its share of the budget until sent.
struct Outgoing {
    bytes: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

/// Everything a request handler needs, cloned into each blocking task.
#[derive(Clone)]
struct Ctx {
    device: Arc<dyn Device>,
    mode: ReplyMode,
    tx: mpsc::UnboundedSender<Outgoing>,
}

pub(crate) async fn serve(
    n: Negotiated,
    config: &Config,
    shutdown: &mut watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> Result<EndReason, SessionError> {
    let extended = n.mode == ReplyMode::Extended;
    let max_len = config.block_size.max as u64;
    let session = Session {
        size: n.export.device.size(),
        eflags: n.eflags,
        structured: n.mode.structured(),
        block_status: n.block_status,
        max_len,
    };
    let (rd, wr) = tokio::io::split(n.stream);
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_replies(wr, rx, counters.clone()));
    let budget_size = config
        .max_in_flight_bytes
        .max(max_len as usize + REQUEST_COST)
        .min(Semaphore::MAX_PERMITS);
    let budget = Arc::new(Semaphore::new(budget_size));
    let ctx = Ctx {
        device: n.export.device.clone(),
        mode: n.mode,
        tx,
    };

    let hlen = request::header_len(extended);
    let reason = loop {
        let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
        tokio::select! {
            biased;
            r = rd.read_exact(&mut hdr[..hlen]) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break EndReason::Eof,
                Err(e) => return Err(e.into()),
            },
            _ = ctx.tx.closed() => break EndReason::WriteFailed,
            _ = shutdown.wait_for(|s| *s) => break EndReason::Shutdown,
        }
        let Some(h) = request::decode_request(&hdr[..hlen], extended)? else {
            unreachable!("read a full header")
        };
        // A payload we will not buffer is still read, to stay in sync, but
        // only up to a bound past which the client is cut off.
        let payload_len = h.check_payload(extended, 2 * max_len)?;
        counters
            .received
            .fetch_add((hlen as u64) + payload_len, Ordering::Relaxed);
        counters.requests.fetch_add(1, Ordering::Relaxed);

        let cost = REQUEST_COST
            + match h.kind {
                CMD_READ => h.len.min(max_len) as usize,
                _ => payload_len.min(max_len) as usize,
            };
        let permit = budget
            .clone()
            .acquire_many_owned(cost as u32)
            .await
            .expect("budget semaphore is never closed");

        let verdict = request::validate(&h, &session);
        let payload = if payload_len == 0 {
            Vec::new()
        } else if verdict.is_ok() && payload_len <= max_len {
            let mut buf = vec![0u8; payload_len as usize];
            rd.read_exact(&mut buf).await?;
            buf
        } else {
            let mut skip = (&mut rd).take(payload_len);
            let skipped = tokio::io::copy(&mut skip, &mut tokio::io::sink()).await?;
            if skipped < payload_len {
                break EndReason::Eof;
            }
            Vec::new()
        };

        match verdict {
            Ok(Command::Disc) => break EndReason::Disconnect,
            Ok(cmd) => {
                let ctx = ctx.clone();
                tokio::task::spawn_blocking(move || ctx.run(h, cmd, payload, permit));
            }
            Err(errno) => {
                let msg = format!(
                    "{} offset={} length={} flags={:#x} refused",
                    command_name(h.kind),
                    h.offset,
                    h.len,
                    h.flags
                );
                ctx.send(ctx.mode.error(h.cookie, h.offset, errno, &msg), permit);
            }
        }
    };

    // Outstanding requests still hold senders; the writer drains their
    // replies and stops when the last one is dropped.
    drop(ctx);
    match writer.await {
        Ok(Ok(())) => Ok(reason),
        // The client left while replies were in flight.
        _ => Ok(EndReason::WriteFailed),
    }
}

async fn write_replies(
    wr: WriteHalf<BoxIo>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    counters: Arc<Counters>,
) -> io::Result<()> {
    // Small replies coalesce in the buffer; large ones bypass it.
    let mut wr = BufWriter::with_capacity(64 << 10, wr);
    while let Some(out) = rx.recv().await {
        wr.write_all(&out.bytes).await?;
        counters
            .sent
            .fetch_add(out.bytes.len() as u64, Ordering::Relaxed);
        drop(out);
        if rx.is_empty() {
            wr.flush().await?;
        }
    }
    wr.flush().await?;
    // Ends TLS cleanly (close_notify) before the socket closes.
    wr.shutdown().await
}

impl Ctx {
    fn send(&self, bytes: Vec<u8>, permit: OwnedSemaphorePermit) {
        // Fails only if the writer is gone, which the reader notices.
        let _ = self.tx.send(Outgoing {
            bytes,
            _permit: permit,
        });
    }

    /// Executes one validated request on a blocking thread and queues its
    /// reply. A panicking device turns into EIO for that request only.
    fn run(self, h: RequestHeader, cmd: Command, payload: Vec<u8>, permit: OwnedSemaphorePermit) {
        let reply = catch_unwind(AssertUnwindSafe(|| self.execute(&h, cmd, payload)))
            .unwrap_or_else(|_| {
                Err((
                    Errno::Io,
                    format!("device panicked on {}", command_name(h.kind)),
                ))
            });
        let bytes = match reply {
            Ok(bytes) => bytes,
            Err((errno, msg)) => self.mode.error(h.cookie, h.offset, errno, &msg),
        };
        self.send(bytes, permit);
    }

    fn execute(
        &self,
        h: &RequestHeader,
        cmd: Command,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, (Errno, String)> {
        let dev = self.device.as_ref();
        let fast = matches!(cmd, Command::WriteZeroes { flags, .. } if flags.fast);
        let fail = |e: io::Error| (Errno::from_io(&e, fast), e.to_string());
        let ok = || self.mode.ok(h.cookie, h.offset);
        match cmd {
            Command::Read { offset, len, df } => self.read(h, offset, len, df),
            Command::Write { offset, fua, .. } => {
                dev.write_at(&payload, offset, fua).map_err(fail)?;
                Ok(ok())
            }
            Command::Flush => {
                dev.flush().map_err(fail)?;
                Ok(ok())
            }
            Command::Trim { offset, len, fua } => {
                dev.trim(offset, len, fua).map_err(fail)?;
                Ok(ok())
            }
            Command::Cache { offset, len } => {
                dev.cache(offset, len).map_err(fail)?;
                Ok(ok())
            }
            Command::WriteZeroes { offset, len, flags } => {
                dev.write_zeroes(offset, len, flags).map_err(fail)?;
                Ok(ok())
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                let extents = dev.extents(offset, len).map_err(fail)?;
                let max_desc = if self.mode == ReplyMode::Extended {
                    u64::MAX
                } else {
                    u32::MAX as u64
                };
                let desc = reply::block_descriptors(&extents, len, req_one, max_desc);
                if desc.is_empty() {
                    return Err((Errno::Io, "device reported no extents".into()));
                }
                Ok(self
                    .mode
                    .block_status(h.cookie, h.offset, BASE_ALLOCATION_ID, &desc))
            }
            Command::Disc => unreachable!("handled by the reader"),
        }
    }

    /// Builds a whole read reply in one buffer: with structured replies and
    /// without DF, zero runs of the device become hole chunks.
    fn read(
        &self,
        h: &RequestHeader,
        offset: u64,
        len: u64,
        df: bool,
    ) -> Result<Vec<u8>, (Errno, String)> {
        let dev = self.device.as_ref();
        let fail = |e: io::Error| {
            let msg = format!("read offset={offset} length={len}: {e}");
            (Errno::from_io(&e, false), msg)
        };
        if len == 0 {
            // OFFSET_DATA cannot be empty, and a structured read must not get
            // a simple reply: a lone NONE chunk says "nothing, done".
            if !self.mode.structured() {
                return Ok(self.mode.ok(h.cookie, h.offset));
            }
            let mut out = Vec::new();
            self.mode.done_chunk(&mut out, h.cookie, h.offset);
            return Ok(out);
        }
        let runs = if self.mode.structured() && !df && len >= MIN_HOLE {
            read_runs(&dev.extents(offset, len).map_err(fail)?, len)
        } else {
            vec![(len, false)]
        };

        let hl = self.mode.data_header_len();
        let data_bytes: u64 = runs.iter().filter(|r| !r.1).map(|r| r.0).sum();
        let mut out = Vec::with_capacity(runs.len() * hl + data_bytes as usize);
        let mut pos = offset;
        for (i, &(rlen, zero)) in runs.iter().enumerate() {
            let done = i + 1 == runs.len();
            if zero {
                self.mode
                    .hole(&mut out, h.cookie, h.offset, pos, rlen as u32, done);
            } else {
                self.mode
                    .data_header(&mut out, h.cookie, h.offset, pos, rlen, done);
                let start = out.len();
                out.resize(start + rlen as usize, 0);
                dev.read_at(&mut out[start..], pos).map_err(fail)?;
            }
            pos += rlen;
        }
        Ok(out)
    }
}

/// Splits a read of `len` bytes into `(length, is_zero)` runs from the
/// device's extents: short zero runs fold into data, and whatever the
/// extents do not cover is data.
fn read_runs(extents: &[(u64, Extent)], len: u64) -> Vec<(u64, bool)> {
    let mut runs: Vec<(u64, bool)> = Vec::new();
    let mut covered = 0;
    for &(elen, kind) in extents {
        if covered >= len {
            break;
        }
        let elen = elen.min(len - covered);
        if elen == 0 {
            continue;
        }
        let zero = kind.is_zero() && elen >= MIN_HOLE;
        match runs.last_mut() {
            Some((l, z)) if *z == zero => *l += elen,
            _ => runs.push((elen, zero)),
        }
        covered += elen;
    }
    if covered < len {
        match runs.last_mut() {
            Some((l, false)) => *l += len - covered,
            _ => runs.push((len - covered, false)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_fold_short_zeroes_and_fill_gaps() {
        let e = [
            (100, Extent::Data),
            (100, Extent::Hole),
            (8192, Extent::Zero),
            (50, Extent::Data),
        ];
        assert_eq!(
            read_runs(&e, 10000),
            vec![(200, false), (8192, true), (1608, false)]
        );
        assert_eq!(read_runs(&[], 10), vec![(10, false)]);
        assert_eq!(
            read_runs(&[(1 << 30, Extent::Hole)], 8192),
            vec![(8192, true)]
        );
    }
}
