//! File reads of ublk READ requests, on the queue's io_uring.
//!
//! A request whose range needs file data that is not resident becomes one io_uring `READ`
//! per file range, straight into the request's buffer; the request completes when the last
//! of them does, and the queue thread takes other requests meanwhile. Each read holds its
//! file (an `Arc`), so the descriptor stays open until its completion has been reaped.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};
use tessera_nbd::FileRead;

/// The reads of one tag still in flight.
#[derive(Default)]
struct Tag {
    left: usize,
    /// Bytes the reads must return in total, and what the request completes with.
    want: u64,
    got: u64,
    /// The first failure: a negative errno from a completion.
    error: Option<i32>,
    files: Vec<Arc<dyn AsFd + Send + Sync>>,
    result: i32,
}

/// What a tag's last completion says.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every read returned all its bytes: complete the request with this result.
    Done(i32),
    /// A read failed (errno) or came back short (bytes got, wanted): complete with -EIO.
    Failed {
        errno: Option<i32>,
        got: u64,
        want: u64,
    },
}

/// The reads in flight on one queue, by tag.
pub struct InFlight {
    tags: Vec<Tag>,
}

impl InFlight {
    pub fn new(depth: usize) -> InFlight {
        InFlight {
            tags: (0..depth).map(|_| Tag::default()).collect(),
        }
    }

    /// Tags with reads in flight.
    pub fn busy(&self) -> usize {
        self.tags.iter().filter(|t| t.left > 0).count()
    }

    /// Starts `reads` into `buf` (the tag's request buffer) for `tag`, whose request then
    /// completes with `result`; `push` queues each entry on the ring, with `user_data(tag)`
    /// as its user data, and returns false if it could not. `reads` must be non-empty and
    /// lie inside `buf`, and `buf` must stay untouched until the tag's last completion.
    /// Returns the outcome at once if no read could be queued.
    pub fn start(
        &mut self,
        tag: u16,
        buf: &mut [u8],
        reads: Vec<FileRead>,
        result: i32,
        user_data: impl Fn(u16) -> u64,
        mut push: impl FnMut(squeue::Entry) -> bool,
    ) -> Option<Outcome> {
        let mut unqueued = 0;
        let t = &mut self.tags[usize::from(tag)];
        debug_assert_eq!(t.left, 0, "tag {tag} started twice");
        *t = Tag {
            left: reads.len(),
            want: reads.iter().map(|r| r.len as u64).sum(),
            result,
            ..Tag::default()
        };
        for r in reads {
            let dst = &mut buf[r.at..r.at + r.len];
            // The kernel writes `dst` after this returns: sound because the request buffer
            // is not read or freed until the tag's completions are all reaped (the queue
            // completes the request only then, and `serve_queue` drains before freeing).
            let sqe = opcode::Read::new(
                types::Fd(r.file.as_fd().as_raw_fd()),
                dst.as_mut_ptr(),
                r.len as u32,
            )
            .offset(r.offset)
            .build()
            .user_data(user_data(tag));
            t.files.push(r.file);
            if !push(sqe) {
                unqueued += 1;
            }
        }
        // A read never queued never completes: count it as failed now.
        let mut outcome = None;
        for _ in 0..unqueued {
            outcome = self.complete(tag, -libc::EIO);
        }
        outcome
    }

    /// Takes one completion of `tag` (its result: bytes read or a negative errno); returns
    /// the request's outcome once it was the tag's last.
    pub fn complete(&mut self, tag: u16, res: i32) -> Option<Outcome> {
        let t = self.tags.get_mut(usize::from(tag))?;
        if t.left == 0 {
            return None;
        }
        t.left -= 1;
        if res < 0 {
            t.error.get_or_insert(res);
        } else {
            t.got += res as u64;
        }
        if t.left > 0 {
            return None;
        }
        let t = std::mem::take(t);
        Some(match t.error {
            None if t.got == t.want => Outcome::Done(t.result),
            errno => Outcome::Failed {
                errno,
                got: t.got,
                want: t.want,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> Arc<std::fs::File> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        Arc::new(f)
    }

    /// Runs the entries `start` pushed on a real io_uring and feeds the completions back.
    fn run(flight: &mut InFlight, entries: Vec<squeue::Entry>) -> Vec<Option<Outcome>> {
        let mut ring = io_uring::IoUring::new(64).unwrap();
        for e in &entries {
            // SAFETY: every entry's buffer and descriptor are held by the test (the buffer)
            // and by `flight` (the files) until the completions below are reaped.
            unsafe { ring.submission().push(e).unwrap() };
        }
        ring.submit_and_wait(entries.len()).unwrap();
        let cqes: Vec<_> = ring.completion().collect();
        cqes.iter()
            .map(|c| flight.complete(c.user_data() as u16, c.result()))
            .collect()
    }

    #[test]
    fn a_request_completes_when_its_last_read_does_with_the_bytes_in_place() {
        let a = file_with(&[1u8; 8192]);
        let b = file_with(&(0..=255u8).cycle().take(20000).collect::<Vec<_>>());
        let mut buf = vec![0xeeu8; 16384];
        let mut flight = InFlight::new(4);
        let mut pushed = Vec::new();
        let reads = vec![
            FileRead {
                at: 0,
                len: 4096,
                offset: 4096,
                file: a.clone(),
            },
            FileRead {
                at: 8192,
                len: 8192,
                offset: 10000,
                file: b.clone(),
            },
        ];
        flight.start(3, &mut buf, reads, 16384, u64::from, |e| {
            pushed.push(e);
            true
        });
        assert_eq!(flight.busy(), 1);
        let outcomes = run(&mut flight, pushed);
        assert_eq!(
            outcomes.iter().flatten().collect::<Vec<_>>(),
            [&Outcome::Done(16384)]
        );
        assert!(
            outcomes[0].is_none(),
            "the first completion does not finish the request"
        );
        assert_eq!(flight.busy(), 0);
        assert!(buf[..4096].iter().all(|&x| x == 1));
        assert!(
            buf[4096..8192].iter().all(|&x| x == 0xee),
            "untouched between reads"
        );
        let want: Vec<u8> = (10000..18192).map(|i| (i % 256) as u8).collect();
        assert_eq!(&buf[8192..], &want[..]);
        // The tag is free again: the files are no longer held.
        assert_eq!(Arc::strong_count(&a), 1);
        assert_eq!(Arc::strong_count(&b), 1);
    }

    #[test]
    fn a_short_read_or_an_error_fails_the_request() {
        // An object shorter than the layout says: 100 bytes where 4096 are wanted.
        let short = file_with(&[7u8; 100]);
        let mut buf = vec![0u8; 8192];
        let mut flight = InFlight::new(2);
        let mut pushed = Vec::new();
        let reads = vec![
            FileRead {
                at: 0,
                len: 4096,
                offset: 0,
                file: short.clone(),
            },
            FileRead {
                at: 4096,
                len: 4096,
                offset: 0,
                file: file_with(&[1u8; 4096]),
            },
        ];
        flight.start(1, &mut buf, reads, 8192, u64::from, |e| {
            pushed.push(e);
            true
        });
        let outcomes: Vec<_> = run(&mut flight, pushed).into_iter().flatten().collect();
        assert_eq!(
            outcomes,
            [Outcome::Failed {
                errno: None,
                got: 4196,
                want: 8192
            }]
        );

        // A descriptor that cannot be read: the errno is kept.
        let dir = Arc::new(std::fs::File::open(std::env::temp_dir()).unwrap());
        let mut pushed = Vec::new();
        let reads = vec![FileRead {
            at: 0,
            len: 4096,
            offset: 0,
            file: dir,
        }];
        flight.start(0, &mut buf, reads, 4096, u64::from, |e| {
            pushed.push(e);
            true
        });
        let outcomes: Vec<_> = run(&mut flight, pushed).into_iter().flatten().collect();
        assert_eq!(
            outcomes,
            [Outcome::Failed {
                errno: Some(-libc::EISDIR),
                got: 0,
                want: 4096
            }]
        );
        // A read the ring would not take fails its request at once, after the others.
        let mut pushed = Vec::new();
        let reads = vec![
            FileRead {
                at: 0,
                len: 4096,
                offset: 0,
                file: file_with(&[1u8; 4096]),
            },
            FileRead {
                at: 4096,
                len: 4096,
                offset: 0,
                file: file_with(&[2u8; 4096]),
            },
        ];
        let now = flight.start(1, &mut buf, reads, 8192, u64::from, |e| {
            let first = pushed.is_empty();
            if first {
                pushed.push(e);
            }
            first
        });
        assert_eq!(now, None, "one read is still in flight");
        let outcomes: Vec<_> = run(&mut flight, pushed).into_iter().flatten().collect();
        assert_eq!(
            outcomes,
            [Outcome::Failed {
                errno: Some(-libc::EIO),
                got: 4096,
                want: 8192
            }]
        );
        let reads = vec![FileRead {
            at: 0,
            len: 4096,
            offset: 0,
            file: file_with(&[1u8; 4096]),
        }];
        let now = flight.start(0, &mut buf, reads, 4096, u64::from, |_| false);
        assert_eq!(
            now,
            Some(Outcome::Failed {
                errno: Some(-libc::EIO),
                got: 0,
                want: 4096
            })
        );
        assert_eq!(flight.busy(), 0);
        // A stray completion for an idle tag is ignored.
        assert_eq!(flight.complete(0, 4096), None);
    }
}
