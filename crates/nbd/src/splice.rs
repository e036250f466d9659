//! Replies sent without copying their data, on plain sockets: `vmsplice` puts references
//! to a reply's pages ([`Shared::pages`]: mapped immutable files) into a pipe, and `splice`
//! moves them on into the socket, which since Linux 6.5 attaches the pages to its buffers
//! instead of copying them (`MSG_SPLICE_PAGES`, for Unix and TCP sockets alike). The
//! client's own copy out of its socket is the only one left. Older kernels copy inside
//! `splice`, which is no worse than `writev`.
//!
//! Chunk headers and other heap bytes go into the pipe with `write`, a copy: the heap
//! memory is reused once the reply is sent, while the pipe or the socket may still hold
//! references to whatever was spliced.
//!
//! Pipes come from a process-wide pool of at most [`MAX_PIPES`]: a farm has thousands of
//! connections, and each pipe costs two descriptors and counts against its user's pipe
//! memory (`fs.pipe-user-pages-soft`). A writer takes one for a batch of replies and gives
//! it back empty; when none is free, the batch goes out with `writev` as before.
//!
//! [`Shared::pages`]: crate::Shared::pages

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Pipes alive at most, in use or idle.
const MAX_PIPES: usize = 64;
/// Asked of each pipe (`F_SETPIPE_SZ`; `fs.pipe-max-size` is 1 MiB by default): room
/// for a few 256 KiB replies, so one `splice` moves a whole batch.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// Page slices passed to one `vmsplice` at most.
const MAX_IOV: usize = 64;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass, which is live.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A smaller pipe (refused: over the user's pipe memory) only means more syscalls.
        // SAFETY: F_SETPIPE_SZ on a descriptor we own; no memory is passed.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Pipe { read, write })
    }
}

struct Pool {
    idle: Vec<Pipe>,
    alive: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    idle: Vec::new(),
    alive: 0,
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pipe taken from the pool: given back on drop if it is known empty, else closed.
struct Taken {
    pipe: Option<Pipe>,
    empty: bool,
}

impl Taken {
    fn take() -> io::Result<Option<Taken>> {
        let idle = {
            let mut pool = pool();
            match pool.idle.pop() {
                Some(pipe) => Some(pipe),
                None if pool.alive >= MAX_PIPES => return Ok(None),
                None => {
                    pool.alive += 1;
                    None
                }
            }
        };
        let pipe = match idle {
            Some(pipe) => pipe,
            None => Pipe::new().inspect_err(|_| pool().alive -= 1)?,
        };
        Ok(Some(Taken {
            pipe: Some(pipe),
            empty: true,
        }))
    }

    fn pipe(&self) -> &Pipe {
        self.pipe.as_ref().expect("held until dropped")
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let pipe = self.pipe.take().expect("held until dropped");
        let mut pool = pool();
        if self.empty {
            pool.idle.push(pipe);
        } else {
            // Bytes of a failed send may be left in it: never let another reply follow them.
            pool.alive -= 1;
            drop(pool);
            drop(pipe);
        }
    }
}

/// What [`Splicer::send`] did.
#[derive(Debug)]
pub(crate) enum Sent {
    /// Every byte is on the socket, in order.
    All,
    /// Nothing was sent: no pipe was free. The caller writes the bytes itself.
    NoPipe,
    /// Nothing was sent: this socket or kernel does not splice (the error says why). The
    /// caller writes the bytes itself and should not try again on this connection.
    Unsupported(io::Error),
}

/// One connection's socket, for splicing into: a duplicate of its descriptor registered
/// for writability, so the writer can wait for room as the stream's own writes do.
pub(crate) struct Splicer {
    socket: AsyncFd<OwnedFd>,
}

impl Splicer {
    /// For the plain socket `fd` (never a TLS connection's: its bytes must be encrypted).
    pub(crate) fn new(fd: RawFd) -> io::Result<Splicer> {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open; no memory passed.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the duplicate was just made and is owned by nobody else.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        // SAFETY: an OwnedFd's descriptor stays open and the same until it is dropped,
        // which only the AsyncFd does.
        let socket = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }?;
        Ok(Splicer { socket })
    }

    /// Sends `parts` in order: `(bytes, pages)`, where `pages` marks bytes that may be
    /// sent by reference (see the module comment).
    pub(crate) async fn send(&self, parts: &[(&[u8], bool)]) -> io::Result<Sent> {
        let Some(mut taken) = Taken::take()? else {
            return Ok(Sent::NoPipe);
        };
        let mut at = Cursor { part: 0, offset: 0 };
        let (mut in_pipe, mut on_socket) = (0usize, 0usize);
        loop {
            // Fill the pipe until it is full or every part is in.
            while let Some(first) = at.rest(parts) {
                taken.empty = false;
                match push(taken.pipe(), parts, at.part, first) {
                    Ok(n) => {
                        in_pipe += n;
                        at.advance(parts, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && in_pipe > 0 => break,
                    Err(e) if on_socket == 0 && unsupported(&e) => return Ok(Sent::Unsupported(e)),
                    Err(e) => return Err(e),
                }
            }
            if in_pipe == 0 {
                taken.empty = true;
                return Ok(Sent::All);
            }
            // Drain it into the socket.
            while in_pipe > 0 {
                let mut ready = self.socket.writable().await?;
                let spliced = ready.try_io(|socket| {
                    // SAFETY: splice between two descriptors we hold open; no memory passed.
                    cvt(unsafe {
                        libc::splice(
                            taken.pipe().read.as_raw_fd(),
                            std::ptr::null_mut(),
                            socket.as_raw_fd(),
                            std::ptr::null_mut(),
                            in_pipe,
                            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                        )
                    })
                });
                match spliced {
                    Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(Ok(n)) => {
                        in_pipe -= n;
                        on_socket += n;
                    }
                    Ok(Err(e)) if on_socket == 0 && unsupported(&e) => {
                        return Ok(Sent::Unsupported(e))
                    }
                    Ok(Err(e)) => return Err(e),
                    // Not writable after all; readiness was cleared: wait again.
                    Err(_) => {}
                }
            }
        }
    }
}

static SPLICED: AtomicU64 = AtomicU64::new(0);

/// Bytes this process has handed to sockets by reference, over all connections (each
/// connection's share is in its "connection closed" log line).
pub fn spliced_bytes() -> u64 {
    SPLICED.load(Ordering::Relaxed)
}

pub(crate) fn count_spliced(n: u64) {
    SPLICED.fetch_add(n, Ordering::Relaxed);
}

/// Moves what one call can of `parts` into the pipe, from `first` (the rest of part
/// `part`): a `vmsplice` of the run of page parts starting there, or a `write` of a part
/// that must be copied.
fn push(pipe: &Pipe, parts: &[(&[u8], bool)], part: usize, first: &[u8]) -> io::Result<usize> {
    let fd = pipe.write.as_raw_fd();
    if !parts[part].1 {
        // SAFETY: writes from a live slice of the given length.
        return cvt(unsafe { libc::write(fd, first.as_ptr().cast(), first.len()) });
    }
    let mut iov = [iovec(first); MAX_IOV];
    let mut n = 1;
    for &(bytes, pages) in &parts[part + 1..] {
        if !pages || n == MAX_IOV {
            break;
        }
        if !bytes.is_empty() {
            iov[n] = iovec(bytes);
            n += 1;
        }
    }
    // SAFETY: the first `n` iovecs point into `parts`, which outlive the call; the caller
    // vouches (Shared::pages) that the pages never change, so the references the pipe
    // keeps stay right after this returns.
    cvt(unsafe { libc::vmsplice(fd, iov.as_ptr(), n, libc::SPLICE_F_NONBLOCK) })
}

/// Where the next byte to send is: a part and an offset in it.
struct Cursor {
    part: usize,
    offset: usize,
}

impl Cursor {
    /// The rest of the current part (skipping empty ones), or `None` at the end.
    fn rest<'a>(&mut self, parts: &[(&'a [u8], bool)]) -> Option<&'a [u8]> {
        while self.part < parts.len() {
            let bytes = parts[self.part].0;
            if self.offset < bytes.len() {
                return Some(&bytes[self.offset..]);
            }
            self.part += 1;
            self.offset = 0;
        }
        None
    }

    fn advance(&mut self, parts: &[(&[u8], bool)], mut n: usize) {
        while n > 0 {
            let left = parts[self.part].0.len() - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.part += 1;
            self.offset = 0;
        }
    }
}

fn iovec(bytes: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    }
}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Errors that mean "this socket or kernel does not splice", not "the connection failed".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM)
    )
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// Parts of pages larger than a pipe (so `vmsplice` stops in the middle of one) and
    /// small heap parts between them, to a socket read slowly from another thread.
    #[test]
    fn sends_every_byte_in_order() {
        let data: &'static [u8] = Vec::leak(
            (0..5u32 << 20)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        );
        let heap: Vec<Vec<u8>> = (0..6).map(|i| vec![i as u8 + 1; 3000 + i * 777]).collect();
        let mut parts: Vec<(&[u8], bool)> = Vec::new();
        let mut at = 0;
        for (i, len) in [3 << 20, 5, 4096, 1 << 20, 1, 700_001]
            .into_iter()
            .enumerate()
        {
            parts.push((&data[at..at + len], true));
            parts.push((&heap[i], false));
            at += len;
        }
        let want: Vec<u8> = parts.iter().flat_map(|(b, _)| b.iter().copied()).collect();

        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let reader = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut got = Vec::new();
            let mut buf = vec![0u8; 100_000];
            loop {
                std::thread::sleep(std::time::Duration::from_micros(300));
                match theirs.read(&mut buf).unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let sent = rt.block_on(async {
            let splicer = Splicer::new(ours.as_raw_fd()).unwrap();
            splicer.send(&parts).await.unwrap()
        });
        assert!(matches!(sent, Sent::All), "{sent:?}");
        drop(ours);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the bytes differ");
    }

    #[test]
    fn cursor_walks_parts_and_skips_empty_ones() {
        let parts: [(&[u8], bool); 4] =
            [(b"ab", false), (b"", true), (b"cde", true), (b"f", false)];
        let mut at = Cursor { part: 0, offset: 0 };
        assert_eq!(at.rest(&parts), Some(&b"ab"[..]));
        at.advance(&parts, 3);
        assert_eq!(at.rest(&parts), Some(&b"de"[..]));
        at.advance(&parts, 3);
        assert_eq!(at.rest(&parts), None);
    }
}
