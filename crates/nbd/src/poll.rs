//! Brief busy-polling of a connection's socket after its last reply went out.
//!
//! At queue depth 1 a client sends its next request a few microseconds after our reply.
//! If the server's thread sleeps in that gap, its CPU idles (a virtual CPU halts) and the
//! next request must wake it: on this project's VMs (cpuidle driver `haltpoll` with
//! `guest_halt_poll_ns` = 0) that wake-up was about half of a 4 KiB read's latency
//! (kernel-notes/idle-wakeups.md). A writer that polls the socket for a bounded time
//! first keeps its CPU awake, and the event loop then finds the request without sleeping.
//!
//! The cost is CPU, so a connection polls only when polling can pay:
//! - only after replies that answered every request read, when the client is waiting
//!   for them before it sends more, and only while the reader is waiting on the socket;
//! - only for a client that has kept at most one request in flight for its last
//!   [`SHALLOW_STREAK`] requests: a deeper queue keeps the server awake by itself, and
//!   polling in its short lulls took CPU that the client needed;
//! - a poll that saw no request before its budget ran out makes the connection skip the
//!   next polls, twice as many each time (an idle or slow client costs a poll now and
//!   then); one that did resets that;
//! - at most half the CPUs poll at once, server-wide, however many clients qualify;
//! - not while other connections have sent requests in the last [`CONTENDED_MS`]: then
//!   the CPUs are busy with several clients, and a poll only took CPU from them (two fio
//!   jobs at queue depth 1 on two CPUs: 30-35k IOPS polling, 34-43k without).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::transmission::Counters;

/// Most polls skipped after misses in a row.
const MAX_SKIP: u32 = 256;
/// Requests in a row that found nothing else in flight before a connection polls.
const SHALLOW_STREAK: u32 = 32;
/// How long after requests on two connections interleaved nobody polls.
const CONTENDED_MS: u32 = 10;

/// The connection that last reported a request, server-wide (each reports at most once
/// per millisecond); 0 before the first.
static LAST_ID: AtomicU32 = AtomicU32::new(0);
/// When a connection reported a request after another one had ([`now_ms`]).
static CONTENDED_AT: AtomicU32 = AtomicU32::new(0);
static NEXT_ID: AtomicU32 = AtomicU32::new(1);

/// What the reader tells the writer's [`Poller`].
pub(crate) struct ReaderState {
    /// Tells this connection's requests from others' in [`LAST_ID`].
    id: u32,
    /// When this connection last reported a request to [`LAST_ID`] ([`now_ms`]).
    reported_ms: AtomicU32,
    /// The reader waits for a request with nothing buffered.
    waiting: AtomicBool,
    /// Requests read and not yet answered on the socket.
    in_flight: AtomicUsize,
    /// Requests in a row that arrived with no other in flight (saturating).
    shallow: AtomicU32,
}

impl Default for ReaderState {
    fn default() -> Self {
        ReaderState {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            reported_ms: AtomicU32::new(0),
            waiting: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            shallow: AtomicU32::new(0),
        }
    }
}

impl ReaderState {
    /// The reader is about to wait for the next request; `buffered` says whether it
    /// already holds bytes of it.
    pub fn waiting(&self, buffered: bool) {
        self.waiting.store(!buffered, Ordering::Release);
    }

    /// The reader has a request header.
    pub fn arrived(&self) {
        self.waiting.store(false, Ordering::Release);
        // Once per millisecond per connection: busy clients do not all write the shared
        // words on every request.
        let now = now_ms();
        if self.reported_ms.swap(now, Ordering::Relaxed) != now {
            let last = LAST_ID.swap(self.id, Ordering::Relaxed);
            if last != self.id && last != 0 {
                CONTENDED_AT.store(now, Ordering::Relaxed);
            }
        }
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let streak = if before == 0 {
            self.shallow.load(Ordering::Relaxed).saturating_add(1)
        } else {
            0
        };
        self.shallow.store(streak, Ordering::Relaxed);
    }
}

/// The polling state of one connection, owned by its writer.
pub(crate) struct Poller {
    fd: RawFd,
    budget: Duration,
    /// Polls still to skip.
    skip: u32,
    /// Skips set after the next miss.
    backoff: u32,
    reader: Arc<ReaderState>,
    /// Where polls that saw a request and polls that ran out of budget are counted.
    counters: Arc<Counters>,
}

impl Poller {
    /// `fd` must stay open as long as the poller: it belongs to the connection's stream.
    pub fn new(fd: RawFd, budget: Duration, counters: Arc<Counters>) -> Poller {
        Poller {
            fd,
            budget,
            skip: 0,
            backoff: 1,
            reader: Arc::default(),
            counters,
        }
    }

    /// What the reader updates.
    pub fn reader(&self) -> Arc<ReaderState> {
        self.reader.clone()
    }

    /// `n` replies went out; `more` says whether another is queued. Polls if the client
    /// now waits for these replies before it sends more (see the module's notes).
    pub fn sent(&mut self, n: usize, more: impl Fn() -> bool) {
        let r = &self.reader;
        let answered_all = r.in_flight.fetch_sub(n, Ordering::AcqRel) == n;
        if !answered_all || r.shallow.load(Ordering::Relaxed) < SHALLOW_STREAK || more() {
            return;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return;
        }
        if now_ms().wrapping_sub(CONTENDED_AT.load(Ordering::Relaxed)) <= CONTENDED_MS {
            return;
        }
        let Some(_slot) = PollSlot::take() else {
            return;
        };
        self.poll(more);
    }

    /// Poll until the socket is readable, `more` says there is a reply to send, the
    /// reader stops waiting, or the budget runs out. Returns whether a request came.
    fn poll(&mut self, more: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        loop {
            if !self.reader.waiting.load(Ordering::Acquire) || more() {
                return false;
            }
            if readable(self.fd) {
                self.backoff = 1;
                self.counters.polls_hit.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            if start.elapsed() >= self.budget {
                self.counters.polls_missed.fetch_add(1, Ordering::Relaxed);
                self.skip = self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_SKIP);
                return false;
            }
            // Lets a client thread that shares this CPU run (it is the one we wait for)
            // while keeping the CPU from idling.
            std::thread::yield_now();
        }
    }
}

/// Connections polling now, server-wide.
static POLLING: AtomicUsize = AtomicUsize::new(0);

/// Leave at least half the CPUs (and one async thread of the usual four) to everything
/// else, however many clients poll.
fn max_pollers() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)))
}

/// A share of [`max_pollers`], given back on drop.
struct PollSlot;

impl PollSlot {
    fn take() -> Option<PollSlot> {
        POLLING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_pollers()).then_some(n + 1)
            })
            .ok()
            .map(|_| PollSlot)
    }
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        POLLING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Milliseconds of the coarse monotonic clock (the vDSO's: no syscall), wrapping.
fn now_ms() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000) as u32
}

/// Whether `fd` has bytes to read or was closed (or cannot be polled), without blocking.
fn readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack, timeout 0: poll only fills `revents`.
    unsafe { libc::poll(&mut p, 1, 0) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// The polling slots are server-wide: tests that poll take turns.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn counts(c: &Counters) -> (u64, u64) {
        (
            c.polls_hit.load(Ordering::Relaxed),
            c.polls_missed.load(Ordering::Relaxed),
        )
    }

    /// A poller whose client has sent `SHALLOW_STREAK` requests one at a time, each
    /// answered while the reader was busy (so none of them polled).
    fn primed(server: &UnixStream) -> (Poller, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let mut p = Poller::new(
            server.as_raw_fd(),
            Duration::from_millis(2),
            counters.clone(),
        );
        for _ in 0..SHALLOW_STREAK {
            p.reader.arrived();
            p.sent(1, || false);
        }
        assert_eq!(counts(&counters), (0, 0));
        (p, counters)
    }

    /// As if no other connection had sent a request for a while.
    fn uncontended() {
        CONTENDED_AT.store(now_ms().wrapping_sub(CONTENDED_MS + 1), Ordering::Relaxed);
    }

    /// One more request answered, then the reader waits on an empty buffer.
    fn answer(p: &mut Poller) {
        p.reader.arrived();
        uncontended();
        p.reader.waiting(false);
        p.sent(1, || false);
    }

    #[test]
    fn a_request_already_sent_is_a_hit() {
        let _serial = serial();
        let (server, mut client) = UnixStream::pair().unwrap();
        let (mut p, counters) = primed(&server);
        client.write_all(b"x").unwrap();
        answer(&mut p);
        assert_eq!(counts(&counters), (1, 0));
    }

    #[test]
    fn misses_back_off_twice_as_long_each_time_and_a_hit_resets() {
        let _serial = serial();
        let (server, mut client) = UnixStream::pair().unwrap();
        let (mut p, counters) = primed(&server);
        answer(&mut p); // miss: skip the next one
        assert_eq!(counts(&counters), (0, 1));
        answer(&mut p);
        assert_eq!(counts(&counters), (0, 1));
        answer(&mut p); // miss: skip the next two
        assert_eq!(counts(&counters), (0, 2));
        answer(&mut p);
        answer(&mut p);
        assert_eq!(counts(&counters), (0, 2));
        client.write_all(b"x").unwrap();
        answer(&mut p); // hit
        assert_eq!(counts(&counters), (1, 2));
        let mut byte = [0u8];
        std::io::Read::read_exact(&mut &server, &mut byte).unwrap();
        answer(&mut p); // miss again, after a hit: skip only the next one
        answer(&mut p);
        assert_eq!(counts(&counters), (1, 3));
        answer(&mut p);
        assert_eq!(counts(&counters), (1, 4));
    }

    #[test]
    fn no_poll_while_requests_are_in_flight_or_queued_or_the_reader_is_busy() {
        let _serial = serial();
        let (server, mut client) = UnixStream::pair().unwrap();
        client.write_all(b"x").unwrap();
        let (mut p, counters) = primed(&server);

        // Two requests in flight, one answered: the client is not waiting.
        p.reader.arrived();
        p.reader.arrived();
        p.reader.waiting(false);
        p.sent(1, || false);
        p.sent(1, || false);
        assert_eq!(counts(&counters), (0, 0), "a deep queue ends the streak");
        for _ in 0..SHALLOW_STREAK {
            p.reader.arrived();
            p.sent(1, || false);
        }

        // Another reply is queued.
        uncontended();
        p.reader.arrived();
        p.reader.waiting(false);
        p.sent(1, || true);
        // The reader holds the next request's bytes already.
        p.reader.arrived();
        p.reader.waiting(true);
        p.sent(1, || false);
        assert_eq!(counts(&counters), (0, 0));
        answer(&mut p);
        assert_eq!(counts(&counters), (1, 0));
    }

    #[test]
    fn no_poll_while_another_connection_sends_requests() {
        let _serial = serial();
        let (server, mut client) = UnixStream::pair().unwrap();
        let (mut p, counters) = primed(&server);
        client.write_all(b"x").unwrap();
        let other = ReaderState::default();
        other.arrived();
        p.reader.arrived();
        p.reader.waiting(false);
        p.sent(1, || false);
        assert_eq!(counts(&counters), (0, 0), "requests interleaved just now");
        answer(&mut p);
        assert_eq!(counts(&counters), (1, 0), "and a while ago");
    }

    #[test]
    fn polling_slots_are_bounded_and_given_back() {
        let _serial = serial();
        let slots: Vec<_> = std::iter::from_fn(PollSlot::take).take(1000).collect();
        assert!(!slots.is_empty() && slots.len() <= max_pollers());
        assert!(PollSlot::take().is_none());
        drop(slots);
        assert!(PollSlot::take().is_some());
    }
}
