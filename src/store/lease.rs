//! Leases: the trees running servers hold, so `gc` never pulls data from under a client.
//!
//! ```text
//! STORE/run/leases/PID-NONCE   one per process holding trees: {"pid": …, "trees": […]}
//! ```
//!
//! The owner holds `flock(LOCK_EX)` on its lease file for as long as it lives, so a file
//! nobody has locked belongs to a dead (killed) process: `gc` removes it and its trees are
//! no longer protected. A lease never outlives its holder, however it ended.
//!
//! A lease's contents are rewritten only while the writer holds the store lock shared, and
//! `gc` reads the leases while holding it exclusively, after listing the images. So `gc`
//! never reads half a lease, and a server that loads an image record (under the shared
//! lock) and then leases its trees cannot lose them to a `gc` that ran between the two.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{ObjectId, Store, StoreError, StoreLock};

/// This process's lease: a count per tree of the holders that need it.
#[derive(Debug)]
pub struct Leases {
    store: Store,
    path: PathBuf,
    /// The locked lease file; the lock is what says we are alive.
    file: File,
    held: Mutex<HashMap<ObjectId, usize>>,
}

/// Trees held until dropped.
#[derive(Debug)]
pub struct LeaseGuard {
    leases: Arc<Leases>,
    trees: Vec<ObjectId>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseFile {
    pid: u32,
    trees: BTreeSet<ObjectId>,
}

fn leases_dir(store: &Store) -> PathBuf {
    store.root().join("run").join("leases")
}

/// `flock` without waiting; `Ok(false)` when someone else holds a conflicting lock.
fn try_flock(file: &File, op: libc::c_int, path: &Path) -> Result<bool, StoreError> {
    // SAFETY: flock on a descriptor we own; the lock lives as long as the File.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(StoreError::io("lock", path, err))
    }
}

impl Leases {
    /// A new, empty lease for this process.
    pub fn create(store: &Store) -> Result<Arc<Leases>, StoreError> {
        let dir = leases_dir(store);
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create directory", &dir, e))?;
        // Created under the store lock: a `gc` cannot see it before it is locked.
        let _lock = store.lock(false)?;
        // A process may hold several (a test, say); create_new refuses a name in use.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let path = dir.join(format!("{}-{nonce:016x}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StoreError::io("create", &path, e))?;
        if !try_flock(&file, libc::LOCK_EX, &path)? {
            return Err(StoreError::io(
                "lock",
                &path,
                io::Error::other("a fresh lease file is locked by someone else"),
            ));
        }
        let leases = Leases {
            store: store.clone(),
            path,
            file,
            held: Mutex::new(HashMap::new()),
        };
        leases.write(&HashMap::new())?;
        Ok(Arc::new(leases))
    }

    /// Holds `trees` until the guard is dropped. The caller holds the store lock (shared)
    /// since before it read whatever named these trees; `_locked` is the proof.
    pub fn hold(
        self: &Arc<Self>,
        trees: &[ObjectId],
        _locked: &StoreLock,
    ) -> Result<LeaseGuard, StoreError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for id in trees {
            let n = held.entry(*id).or_insert(0);
            changed |= *n == 0;
            *n += 1;
        }
        let guard = LeaseGuard {
            leases: self.clone(),
            trees: trees.to_vec(),
        };
        if changed {
            // On failure the guard's drop gives the counts back.
            self.write(&held)?;
        }
        Ok(guard)
    }

    fn write(&self, held: &HashMap<ObjectId, usize>) -> Result<(), StoreError> {
        let body = LeaseFile {
            pid: std::process::id(),
            trees: held.keys().copied().collect(),
        };
        let bytes = serde_json::to_vec(&body).expect("serializable");
        let mut f = &self.file;
        f.set_len(0)
            .and_then(|()| std::os::unix::fs::FileExt::write_all_at(f, &bytes, 0))
            .and_then(|()| f.flush())
            .map_err(|e| StoreError::io("write", &self.path, e))
    }

    fn release(self: &Arc<Self>, trees: &[ObjectId]) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for id in trees {
            if let Some(n) = held.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    held.remove(id);
                    changed = true;
                }
            }
        }
        if !changed {
            return;
        }
        // Shrinking a lease is never urgent (holding too much only delays gc), and waiting
        // here for a running gc would stall the thread that dropped the guard: on
        // contention a helper thread waits instead.
        match self.store.try_lock(false) {
            Ok(Some(_lock)) => {
                if let Err(e) = self.write(&held) {
                    tracing::warn!(error = %e, "cannot shrink the lease");
                }
            }
            Ok(None) => {
                drop(held);
                let this = self.clone();
                std::thread::spawn(move || {
                    let Ok(_lock) = this.store.lock(false) else {
                        return;
                    };
                    // Read under the store lock: a hold since then wrote a newer set.
                    let held = this.held.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = this.write(&held) {
                        tracing::warn!(error = %e, "cannot shrink the lease");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot shrink the lease"),
        }
    }
}

impl Drop for Leases {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.leases.release(&self.trees);
    }
}

impl Store {
    /// Trees held by the leases of running processes. Removes the leases of dead ones.
    /// Call with the store lock held exclusively.
    pub(crate) fn leased_trees(
        &self,
        _exclusive: &StoreLock,
    ) -> Result<BTreeSet<ObjectId>, StoreError> {
        let dir = leases_dir(self);
        let mut trees = BTreeSet::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(trees),
            Err(e) => return Err(StoreError::io("list", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, e))?;
            let path = entry.path();
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("open", &path, e)),
            };
            if try_flock(&file, libc::LOCK_SH, &path)? {
                // Nobody holds it: its process is gone.
                fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, e))?;
                continue;
            }
            let bytes = fs::read(&path).map_err(|e| StoreError::io("read", &path, e))?;
            let lease: LeaseFile = serde_json::from_slice(&bytes).map_err(|e| {
                StoreError::io(
                    "parse lease",
                    &path,
                    io::Error::new(io::ErrorKind::InvalidData, e),
                )
            })?;
            trees.extend(lease.trees);
        }
        Ok(trees)
    }
}
