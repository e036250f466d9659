//! Tree views loaded lately, kept by a server until it goes quiet.
//!
//! Every image of one base tree loads that tree's view when its export is opened (to refuse
//! missing trees) and again on its first read: each load mapped the tree's binary form,
//! checked every record of it ([`TreeView::new`]) and unmapped it, which faulted its pages in
//! again every time: in a profile of a server's first reads of 100 images of one 6 360-entry
//! tree, 9% of the page faults. When a command turns keeping on ([`keep`]), the last `KEEP` (8)
//! views loaded stay here, by store and tree, until the background thread finds the server
//! idle and calls [`forget`]: a settled server maps none of them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::store::ObjectId;
use crate::tree::binary::TreeView;

/// Views kept at most: the base trees of the images being read at once.
const KEEP: usize = 8;

/// Views by store root and tree, most recently used last.
struct Recent {
    keeping: AtomicBool,
    views: Mutex<Vec<(PathBuf, ObjectId, TreeView)>>,
}

static RECENT: Recent = Recent::new();

/// Turns keeping views on or off for the rest of the process; off forgets them.
pub fn keep(on: bool) {
    RECENT.keep(on);
}

/// Drops every kept view (their mappings go once no image being built holds them).
pub fn forget() {
    RECENT.forget();
}

/// The view of tree `id` of the store at `root`, if one is kept.
pub(super) fn get(root: &Path, id: &ObjectId) -> Option<TreeView> {
    RECENT.get(root, id)
}

/// Keeps `view`, just loaded, if keeping is on.
pub(super) fn put(root: &Path, id: &ObjectId, view: &TreeView) {
    RECENT.put(root, id, view)
}

impl Recent {
    const fn new() -> Recent {
        Recent {
            keeping: AtomicBool::new(false),
            views: Mutex::new(Vec::new()),
        }
    }

    fn views(&self) -> MutexGuard<'_, Vec<(PathBuf, ObjectId, TreeView)>> {
        self.views.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keep(&self, on: bool) {
        self.keeping.store(on, Ordering::Relaxed);
        if !on {
            self.forget();
        }
    }

    fn forget(&self) {
        let dropped = std::mem::take(&mut *self.views());
        drop(dropped);
    }

    fn get(&self, root: &Path, id: &ObjectId) -> Option<TreeView> {
        if !self.keeping.load(Ordering::Relaxed) {
            return None;
        }
        let mut views = self.views();
        let at = views.iter().position(|(r, i, _)| i == id && r == root)?;
        let entry = views.remove(at);
        let view = entry.2.clone();
        views.push(entry);
        Some(view)
    }

    fn put(&self, root: &Path, id: &ObjectId, view: &TreeView) {
        if !self.keeping.load(Ordering::Relaxed) {
            return;
        }
        let mut views = self.views();
        views.retain(|(r, i, _)| !(i == id && r == root));
        if views.len() >= KEEP {
            views.remove(0);
        }
        views.push((root.to_owned(), *id, view.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::tree::{Bytes, Entry, Kind, Manifest, Time};

    fn tree_of(store: &Store, name: &str) -> ObjectId {
        let entry = |path: &str| Entry {
            path: Bytes(path.as_bytes().to_vec()),
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            atime: Time(0, 0),
            mtime: Time(0, 0),
            ctime: Time(0, 0),
            crtime: None,
            xattrs: vec![],
            size: None,
            object: None,
            segments: None,
            link: None,
            target: None,
            rdev: None,
            opaque: false,
        };
        crate::image::put_tree(store, &Manifest::new(vec![entry(""), entry(name)])).unwrap()
    }

    #[test]
    fn views_are_kept_by_store_and_tree_most_recent_first_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a")).unwrap();
        let other = dir.path().join("b");
        let ids: Vec<ObjectId> = (0..=KEEP)
            .map(|i| tree_of(&store, &format!("d{i}")))
            .collect();
        let view = |id| crate::image::load_tree_view(&store, id).unwrap();
        let recent = Recent::new();

        recent.put(store.root(), &ids[0], &view(&ids[0]));
        assert!(
            recent.get(store.root(), &ids[0]).is_none(),
            "nothing kept while off"
        );
        recent.keep(true);
        recent.put(store.root(), &ids[0], &view(&ids[0]));
        let kept = recent.get(store.root(), &ids[0]).expect("kept");
        assert_eq!(kept.tree(), &ids[0]);
        assert!(
            recent.get(&other, &ids[0]).is_none(),
            "kept for its own store only"
        );

        // The view used least recently goes first.
        for id in &ids[1..KEEP] {
            recent.put(store.root(), id, &view(id));
        }
        recent.get(store.root(), &ids[0]).unwrap();
        recent.put(store.root(), &ids[KEEP], &view(&ids[KEEP]));
        assert!(recent.get(store.root(), &ids[0]).is_some());
        assert!(
            recent.get(store.root(), &ids[1]).is_none(),
            "the least recent went"
        );

        recent.forget();
        assert!(recent.get(store.root(), &ids[0]).is_none(), "forgotten");
    }
}
