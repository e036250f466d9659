//! A small fixed pool of threads for device calls.
//!
//! Device reads block (pread, page faults on mmap). tokio's blocking pool
//! grows a thread per concurrently blocked task, so a client with 256
//! requests in flight gets 256 threads on a 2-core machine: measured, the
//! thread churn and context switches cost more than the reads. A fixed pool
//! sized to the machine keeps the parallelism that helps (cores, plus some
//! slack for reads that wait on the disk) and queues the rest.

use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use tokio::sync::Semaphore;

use crate::buffers::BufPool;

type Job = Box<dyn FnOnce() + Send + 'static>;

pub(crate) struct Workers {
    tx: mpsc::Sender<Job>,
    /// Reply and payload buffers, shared by all connections so that a new
    /// connection starts with warm buffers.
    pub pool: Arc<BufPool>,
    /// Server-wide in-flight byte budget (`Config::max_total_in_flight_bytes`).
    pub budget: Arc<Semaphore>,
    /// Connections being served.
    pub live: AtomicUsize,
}

impl Workers {
    pub fn new(threads: usize, budget_bytes: usize) -> Workers {
        let (tx, rx) = mpsc::channel::<Job>();
        // One thread at a time waits in recv() while holding the lock, so a
        // job wakes exactly one worker.
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            thread::Builder::new()
                .name(format!("nbd-io-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return, // pool dropped
                    };
                    job();
                })
                .expect("spawn NBD I/O thread");
        }
        Workers {
            tx,
            pool: Arc::new(BufPool::default()),
            budget: Arc::new(Semaphore::new(budget_bytes.min(Semaphore::MAX_PERMITS))),
            live: AtomicUsize::new(0),
        }
    }

    /// Runs `job` on a pool thread. Jobs must not panic out (the caller
    /// catches device panics), or the thread is lost.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        // Cannot fail: the receiver lives as long as any worker thread.
        let _ = self.tx.send(Box::new(job));
    }
}

/// Default pool size: 16 (nbdkit's default), or two per core if that is more. Only reads
/// that may wait for storage come here (devices answer resident data inline through
/// `read_at_cached`), and a deeper queue is what makes cold reads fast: a full read of a
/// cold 52k-file image took 1.76 s with 4 threads and 0.85 s with 16 on 2 cores, while
/// cached 4 KiB random reads lost about 4%.
pub(crate) fn default_threads() -> usize {
    let cores = thread::available_parallelism().map_or(2, |n| n.get());
    (2 * cores).max(16)
}
