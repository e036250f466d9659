//! Which way should a read reply's payload reach the socket? Copy through a buffer
//! (pread + writev of header and data), `sendfile`, or `splice` through a pipe.
//!
//! `cargo run --release -p tessera-nbd --example send_paths [FILE]`
//!
//! Sends a cached file over a Unix stream socket to a thread that drains it, in chunks of
//! the sizes clients really ask for (4 KiB random reads, 128 KiB guest readahead, 256 KiB
//! nbdcopy, 1 MiB), each preceded by a 16-byte reply header as the server sends it.
//! Prints GiB/s per method and size. A measurement, not a test.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const FILE_SIZE: u64 = 512 << 20;

fn sendfile_all(sock: &UnixStream, file: &File, mut off: u64, mut len: usize) -> io::Result<()> {
    while len > 0 {
        let mut o = off as libc::off_t;
        // SAFETY: both descriptors are open for the duration of the call; `o` is a valid
        // out-parameter.
        let n = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut o, len) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        off += n as u64;
        len -= n as usize;
    }
    Ok(())
}

fn splice_all(
    sock: &UnixStream,
    file: &File,
    pipe: (i32, i32),
    off: u64,
    len: usize,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let mut o = (off + done as u64) as libc::loff_t;
        // SAFETY: valid descriptors; `o` is a valid in/out offset for the file side.
        let n = unsafe {
            libc::splice(
                file.as_raw_fd(),
                &mut o,
                pipe.1,
                std::ptr::null_mut(),
                len - done,
                libc::SPLICE_F_MOVE,
            )
        };
        if n <= 0 {
            return Err(io::Error::last_os_error());
        }
        let mut left = n as usize;
        while left > 0 {
            // SAFETY: valid descriptors; no offsets for pipe or socket.
            let m = unsafe {
                libc::splice(
                    pipe.0,
                    std::ptr::null_mut(),
                    sock.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_MOVE,
                )
            };
            if m <= 0 {
                return Err(io::Error::last_os_error());
            }
            left -= m as usize;
        }
        done += n as usize;
    }
    Ok(())
}

fn run(method: &str, file: &File, chunk: usize, random: bool) -> io::Result<f64> {
    let (mut tx, mut rx) = UnixStream::pair()?;
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        while rx.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
    });
    let mut pipe = [0i32; 2];
    // SAFETY: `pipe` has room for the two descriptors pipe(2) writes.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let mut buf = vec![0u8; chunk];
    let header = [0u8; 16];
    let chunks = FILE_SIZE / chunk as u64;
    let mut state = 0x2545F4914F6CDD1Du64;
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        for i in 0..chunks.min(4096) {
            let idx = if random {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % chunks
            } else {
                i
            };
            let off = idx * chunk as u64;
            match method {
                "copy" => {
                    file.read_exact_at(&mut buf, off)?;
                    let mut bufs = [IoSlice::new(&header), IoSlice::new(&buf)];
                    let mut slices: &mut [IoSlice] = &mut bufs;
                    while !slices.is_empty() {
                        let n = tx.write_vectored(slices)?;
                        IoSlice::advance_slices(&mut slices, n);
                    }
                }
                "sendfile" => {
                    tx.write_all(&header)?;
                    sendfile_all(&tx, file, off, chunk)?;
                }
                _ => {
                    tx.write_all(&header)?;
                    splice_all(&tx, file, (pipe[0], pipe[1]), off, chunk)?;
                }
            }
            sent += chunk as u64;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(tx);
    drain.join().unwrap();
    // SAFETY: closing the pipe descriptors we created.
    unsafe {
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
    Ok(sent as f64 / secs / (1u64 << 30) as f64)
}

fn main() -> io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/var/tmp/send_paths.bin".into());
    if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) < FILE_SIZE {
        let mut f = File::create(&path)?;
        let block: Vec<u8> = (0..1 << 20).map(|i| (i * 7) as u8).collect();
        for _ in 0..FILE_SIZE >> 20 {
            f.write_all(&block)?;
        }
    }
    let file = File::open(&path)?;
    let mut warm = vec![0u8; 1 << 20];
    for i in 0..FILE_SIZE >> 20 {
        file.read_exact_at(&mut warm, i << 20)?;
    }
    println!(
        "{:<10} {:>8} {:>10} {:>10} {:>10}",
        "pattern", "chunk", "copy", "sendfile", "splice"
    );
    for (random, chunk) in [
        (true, 4 << 10),
        (true, 128 << 10),
        (false, 256 << 10),
        (false, 1 << 20),
    ] {
        let r: Vec<f64> = ["copy", "sendfile", "splice"]
            .iter()
            .map(|m| run(m, &file, chunk, random))
            .collect::<io::Result<_>>()?;
        println!(
            "{:<10} {:>7}K {:>8.2}G/s {:>8.2}G/s {:>8.2}G/s",
            if random { "random" } else { "sequential" },
            chunk >> 10,
            r[0],
            r[1],
            r[2]
        );
    }
    Ok(())
}
