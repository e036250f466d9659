//! The objects behind an image's data handles, looked up off the first read's path.
//!
//! Looking up an image's objects (the process-wide table of objects in use, and the pack
//! index for each) took 0.7 ms of a 6 300-entry image's first read when other images
//! already used the objects and 2.5 ms in a fresh server, while that read (the superblock,
//! a mount's first reads) needs none of them. The background thread looks them up right
//! after; a read that reaches file data first looks them up itself.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::object::{self, Object};
use crate::store::{ObjectId, Store};

/// `objects[i]` is behind `DataHandle(i)`.
pub(super) type Objects = Arc<[Arc<Object>]>;

pub(super) struct Handles {
    objects: OnceLock<Objects>,
    /// What the lookup needs, until it is done.
    pending: Mutex<Option<(Store, Vec<ObjectId>)>>,
}

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handles")
            .field("looked_up", &self.objects.get().map(|o| o.len()))
            .finish()
    }
}

impl Handles {
    /// Looked up now.
    pub fn now(store: &Store, ids: &[ObjectId]) -> Arc<Handles> {
        Arc::new(Handles {
            objects: OnceLock::from(look_up(store, ids)),
            pending: Mutex::new(None),
        })
    }

    /// Looked up by the background thread, or by the first read that needs them.
    pub fn later(store: &Store, ids: Vec<ObjectId>) -> Arc<Handles> {
        let handles = Arc::new(Handles {
            objects: OnceLock::new(),
            pending: Mutex::new(Some((store.clone(), ids))),
        });
        let weak: Weak<Handles> = Arc::downgrade(&handles);
        super::background::later(move || {
            if let Some(handles) = weak.upgrade() {
                handles.get();
            }
        });
        handles
    }

    /// The objects, looked up now if they have not been (a thread that may block).
    pub fn get(&self) -> &Objects {
        if let Some(objects) = self.objects.get() {
            return objects;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((store, ids)) = pending.take() {
            let _ = self.objects.set(look_up(&store, &ids));
        }
        self.objects.get().expect("looked up under the lock")
    }

    /// The objects if they have been looked up: what a read that must not block can use.
    pub fn if_looked_up(&self) -> Option<&Objects> {
        self.objects.get()
    }
}

fn look_up(store: &Store, ids: &[ObjectId]) -> Objects {
    let packs = store.packs();
    let mut opener = object::packed::Opener::new();
    let root: Arc<std::path::Path> = Arc::from(store.root());
    ids.iter()
        .map(|id| {
            let packed = opener.open(packs.find(id));
            object::shared(*id, &root, packed, store.remote_cache())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::background::wait_for;
    use crate::blockdev::{ImageDevice, NO_METADATA};
    use crate::image::CreateOptions;
    use tessera_ext4::Piece;

    /// A store with the demo image "h", and the ids behind its data handles.
    fn demo(dir: &std::path::Path) -> (Store, Vec<ObjectId>) {
        let store = Store::open(dir).unwrap();
        let tree = crate::demo::store_demo_tree(&store).unwrap();
        crate::image::create(&store, "h", &[tree], &CreateOptions::default()).unwrap();
        let record = crate::image::load(&store, "h").unwrap();
        let ids = crate::image::build(&store, &record).unwrap().objects;
        (store, ids)
    }

    #[test]
    fn reads_that_may_not_block_leave_the_lookup_to_one_that_may() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ids) = demo(dir.path());
        let eager = ImageDevice::open(&store, "h").unwrap();
        let mut lazy = ImageDevice::open(&store, "h").unwrap();
        // Not queued: nothing but a read looks these up.
        lazy.objects = Arc::new(Handles {
            objects: OnceLock::new(),
            pending: Mutex::new(Some((store.clone(), ids.clone()))),
        });
        let mut at = 0;
        let data = lazy
            .layout
            .pieces_with(&NO_METADATA, 0, lazy.size())
            .find_map(|p| {
                let here = at;
                at += p.len();
                matches!(p, Piece::Data { .. }).then_some(here)
            })
            .expect("the demo image has file data");

        let (mut want, mut got) = (vec![0u8; 4096], vec![0u8; 4096]);
        eager.read_at(&mut want, data).unwrap();
        assert!(lazy.read_at_resident(&mut got, data).is_none());
        assert!(lazy
            .read_resident_shared(data, 4096, &mut Vec::new())
            .is_none());
        // Metadata needs no objects.
        lazy.read_at_resident(&mut got, 0).unwrap().unwrap();
        assert!(lazy.objects.if_looked_up().is_none());

        lazy.read_at(&mut got, data).unwrap();
        assert_eq!(got, want);
        assert_eq!(
            lazy.objects.if_looked_up().map(|o| o.len()),
            Some(ids.len())
        );
        got.fill(0);
        lazy.read_at_resident(&mut got, data).unwrap().unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn the_background_thread_looks_up_the_objects_every_image_shares() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ids) = demo(dir.path());
        let now = Handles::now(&store, &ids);
        let later = Handles::later(&store, ids.clone());
        wait_for("the lookup", || later.if_looked_up().is_some());
        let (now, later) = (now.get(), later.get());
        assert_eq!(now.len(), ids.len());
        assert!(now.iter().zip(later.iter()).all(|(a, b)| Arc::ptr_eq(a, b)));
    }
}
