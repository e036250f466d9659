//! One thread for the work of served images that no read should wait for: generating the
//! rest of an image's on-demand metadata, looking up the objects behind its data handles,
//! freeing metadata the budget dropped. A burst of first reads queues this work instead
//! of starting a thread per image, and each first read returns without it.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// How long the queue stays empty after some work before the memory that work freed (the
/// composed trees of completed images, dropped metadata) is given back. Not after every
/// job: through a burst of first reads the next image reuses it. Nor never: after a burst
/// of 1 000 first reads the server kept 108 instead of 85 bytes per file, freed but
/// resident, since no client left after the thread had caught up.
const IDLE_BEFORE_TRIM: Duration = Duration::from_millis(250);

/// How often an idle background thread looks for large blocks kept for reuse
/// (`crate::alloc`) to give back.
const QUIET_CHECK: Duration = Duration::from_secs(1);

/// Runs `job` on the background thread, after the jobs queued before it; on the caller's
/// thread if that thread could not be started.
pub(crate) fn later(job: impl FnOnce() + Send + 'static) {
    static QUEUE: LazyLock<Option<Mutex<mpsc::Sender<Job>>>> = LazyLock::new(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("tessera-metadata".into())
            .spawn(move || run(rx));
        match spawned {
            Ok(_) => Some(Mutex::new(tx)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the background thread; its work is done inline");
                None
            }
        }
    });
    let job: Job = Box::new(job);
    let unsent = match &*QUEUE {
        Some(queue) => queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .err()
            .map(|e| e.0),
        None => Some(job),
    };
    if let Some(job) = unsent {
        job();
    }
}

fn run(rx: mpsc::Receiver<Job>) {
    loop {
        match rx.recv_timeout(QUIET_CHECK) {
            Ok(job) => job(),
            Err(RecvTimeoutError::Timeout) => {
                // Large blocks freed since by connections alone (a client's big requests)
                // are kept for reuse too: given back once nothing happened for a while.
                if crate::alloc::kept_bytes() > 0 {
                    crate::alloc::release_free_memory();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // The jobs that follow within the interval, then one trim once they stop.
        loop {
            match rx.recv_timeout(IDLE_BEFORE_TRIM) {
                Ok(job) => job(),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        crate::image::views::forget();
        crate::alloc::release_free_memory();
    }
}

/// Waits up to 30 s for `done`, which the background thread makes true.
#[cfg(test)]
pub(super) fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
