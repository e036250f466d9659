//! What the remote cache did, counted in memory and kept across servers in
//! `STORE/remote-stats.json`, which `store stats` reads.
//!
//! Each server adds what it counted since its last flush to the file, every
//! [`FLUSH_EVERY`] and when it stops, holding `STORE/remote-stats.lock` (flock) while it
//! reads, adds and renames a new file into place: servers sharing a store merge their
//! counts, and a reader never sees half a file. A killed server loses at most its last
//! interval.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often a server adds its counts to the store's file.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// Counters of what the cache did since it was opened.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Object reads answered from bytes already here.
    pub hits: AtomicU64,
    /// Object reads that had to fetch.
    pub misses: AtomicU64,
    pub bytes_fetched: AtomicU64,
    /// Fetched ranges that did not match the object's name.
    pub mismatches: AtomicU64,
    /// Objects deleted to stay under `--cache-size`.
    pub evictions: AtomicU64,
    pub bytes_evicted: AtomicU64,
    /// What the store's file already has from this process.
    flushed: Mutex<Counts>,
}

/// The counters as numbers: a snapshot, or the store's totals.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub hits: u64,
    pub misses: u64,
    pub bytes_fetched: u64,
    pub mismatches: u64,
    pub evictions: u64,
    pub bytes_evicted: u64,
}

impl Counts {
    fn zip(self, other: Counts, f: impl Fn(u64, u64) -> u64) -> Counts {
        Counts {
            hits: f(self.hits, other.hits),
            misses: f(self.misses, other.misses),
            bytes_fetched: f(self.bytes_fetched, other.bytes_fetched),
            mismatches: f(self.mismatches, other.mismatches),
            evictions: f(self.evictions, other.evictions),
            bytes_evicted: f(self.bytes_evicted, other.bytes_evicted),
        }
    }
}

fn file_path(root: &Path) -> PathBuf {
    root.join("remote-stats.json")
}

/// The counts every server on the store at `root` has kept so far; `None` if none has.
pub fn load(root: &Path) -> io::Result<Option<Counts>> {
    match fs::read(file_path(root)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl CacheStats {
    pub fn snapshot(&self) -> Counts {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            hits: n(&self.hits),
            misses: n(&self.misses),
            bytes_fetched: n(&self.bytes_fetched),
            mismatches: n(&self.mismatches),
            evictions: n(&self.evictions),
            bytes_evicted: n(&self.bytes_evicted),
        }
    }

    /// Add what was counted since the last flush to the file of the store at `root`.
    pub fn flush(&self, root: &Path) -> io::Result<()> {
        let mut flushed = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.snapshot();
        let delta = now.zip(*flushed, u64::saturating_sub);
        if delta == Counts::default() {
            return Ok(());
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("remote-stats.lock"))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let total = load(root)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the remote cache's statistics file is unreadable; starting it again");
                None
            })
            .unwrap_or_default()
            .zip(delta, u64::saturating_add);
        let path = file_path(root);
        // Under tmp/, so `store gc` removes what a killed flush leaves.
        let tmp = root
            .join("tmp")
            .join(format!("remote-stats.{}", std::process::id()));
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&total).expect("serializable"))?;
        f.sync_data()?;
        fs::rename(&tmp, &path)?;
        *flushed = now;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_servers_add_up_and_a_flush_adds_only_what_is_new() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let (a, b) = (CacheStats::default(), CacheStats::default());
        a.misses.fetch_add(3, Ordering::Relaxed);
        a.bytes_fetched.fetch_add(1000, Ordering::Relaxed);
        a.flush(dir.path()).unwrap();
        b.hits.fetch_add(5, Ordering::Relaxed);
        b.evictions.fetch_add(1, Ordering::Relaxed);
        b.bytes_evicted.fetch_add(400, Ordering::Relaxed);
        b.flush(dir.path()).unwrap();
        a.misses.fetch_add(1, Ordering::Relaxed);
        a.flush(dir.path()).unwrap();
        a.flush(dir.path()).unwrap();
        let want = Counts {
            hits: 5,
            misses: 4,
            bytes_fetched: 1000,
            mismatches: 0,
            evictions: 1,
            bytes_evicted: 400,
        };
        assert_eq!(load(dir.path()).unwrap(), Some(want));
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "remote-stats.json" && n != "remote-stats.lock" && n != "tmp")
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
