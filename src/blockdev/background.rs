//! One thread for the work of served images that no read should wait for: generating the
//! rest of an image's on-demand metadata, looking up the objects behind its data handles,
//! freeing metadata the budget dropped. A burst of first reads queues this work instead
//! of starting a thread per image, and each first read returns without it.

use std::sync::{mpsc, LazyLock, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// Runs `job` on the background thread, after the jobs queued before it; on the caller's
/// thread if that thread could not be started.
pub(crate) fn later(job: impl FnOnce() + Send + 'static) {
    static QUEUE: LazyLock<Option<Mutex<mpsc::Sender<Job>>>> = LazyLock::new(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("tessera-metadata".into())
            .spawn(move || rx.into_iter().for_each(|job| job()));
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
