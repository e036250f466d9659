//! The content store: file contents, tree manifests and named images on local disk.
//!
//! ```text
//! STORE/
//! ├── lock                  flock(2): shared while writing (import, image create),
//! │                         exclusive while collecting garbage
//! ├── objects/ab/cdef…      file contents, named by the BLAKE3 of their bytes; mode 0444,
//! │                         never modified once named. A sparse file's object holds only its
//! │                         data segments, back to back (the tree entry records the segments).
//! ├── outboard/ab/cdef…     for objects over 256 KiB: the BLAKE3 chaining value of each of
//! │                         their 64 KiB groups, so `serve --verify` checks one group without
//! │                         reading the whole object (format in [`outboard`]); written at
//! │                         import, or by the first verified read of an older object
//! ├── trees/ab/cdef…        tree manifests (JSON, `"format": 1`, see [`crate::tree`]), named
//! │                         by the BLAKE3 of their serialized bytes
//! ├── treecache/ab/cdef…    the binary form of each tree (see [`crate::tree::binary`]),
//! │                         written with the tree, or derived from its manifest when first
//! │                         loaded; disposable, never the name of anything, removed by gc
//! │                         with its tree
//! ├── packs/NAME.pack|idx   small objects moved into one file in the order an image reads
//! │                         them, so a cold image is read from one file in order (see
//! │                         [`pack`]); their loose copies are removed. An import writes
//! │                         its new small objects straight into a pack ([`spool`])
//! ├── images/NAME.json      named images (JSON, `"format": 1`, see [`crate::image`])
//! ├── overlays/NAME/        persistent overlays of writable exports (see `blockdev::overlay`)
//! ├── partial/ab/cdef…      objects being fetched from a remote store, sparse, with a
//! │                         `.chunks` map beside each (see [`remote::cache`]); objects
//! │                         fetched whole carry an xattr naming the remote ([`remote::origin`])
//! ├── remote-stats.json     what `serve --remote` caches did, all servers summed
//! │                         (see [`remote::counters`])
//! ├── run/                  sockets and leases of running servers; `leases/` holds the
//! │                         trees each server process serves, which gc keeps (see [`lease`])
//! └── tmp/                  files being written
//! ```
//!
//! A file is written under `tmp/`, fsynced, renamed to its final name and the directory is
//! fsynced, so a crash never leaves a partial object, tree or image under a real name; at
//! worst it leaves a stale file in `tmp/`, which `tessera store gc` removes. Content with an
//! existing name is not written again, so identical content is stored once.
//!
//! The store is located by `--store DIR`, else `$TESSERA_STORE`, else
//! `$XDG_DATA_HOME/tessera`, else `~/.local/share/tessera` (see [`location`]).

mod atomic;
mod error;
mod id;
mod lease;
pub mod location;
mod lock;
pub mod outboard;
pub mod pack;
pub mod remote;
mod spool;
mod treecache;

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use atomic::Staged;
pub use error::{error_chain, StoreError};
pub use id::{ObjectId, ParseIdError};
pub use lease::{LeaseGuard, Leases};
pub use lock::StoreLock;
pub use outboard::{GroupMismatch, Outboard, OutboardError};
pub use spool::Spool;

/// An opened store directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Check object bytes against their names before serving them (`serve --verify`).
    verify_reads: bool,
    /// Where objects missing here are fetched from (`serve --remote`).
    remote: Option<Arc<remote::cache::RemoteCache>>,
    /// The packs found under `packs/` (see [`pack`]).
    packs: pack::SharedPackList,
}

/// Where the store at `root` keeps `id` in `area`: fanned out by the first two hex digits.
fn content_path_under(root: &Path, area: Area, id: &ObjectId) -> PathBuf {
    let hex = id.to_hex();
    root.join(area.dir()).join(&hex[..2]).join(&hex[2..])
}

/// The directory (`objects` or `trees`) holding one sort of content-addressed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Area {
    Object,
    Tree,
    Outboard,
    TreeCache,
}

impl Area {
    fn dir(self) -> &'static str {
        match self {
            Area::Object => "objects",
            Area::Tree => "trees",
            Area::Outboard => "outboard",
            Area::TreeCache => "treecache",
        }
    }
}

impl Store {
    /// Open the store at `root`, creating its directories if needed.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for sub in ["objects", "outboard", "trees", "treecache", "images", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|e| StoreError::io("create directory", &dir, e))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
            verify_reads: false,
            remote: None,
            packs: Default::default(),
        })
    }

    /// This store, with object bytes checked against their names before devices opened
    /// from it serve them (see `blockdev`).
    pub fn verifying_reads(mut self, on: bool) -> Store {
        self.verify_reads = on;
        self
    }

    /// This store as a cache of `remote`: devices opened from it fetch the objects it
    /// lacks as they are read (see [`remote::cache`]).
    pub fn with_remote(mut self, remote: Arc<remote::Remote>) -> Store {
        let local = Store {
            remote: None,
            ..self.clone()
        };
        self.remote = Some(Arc::new(remote::cache::RemoteCache::new(local, remote)));
        self
    }

    /// The remote this store caches, if any.
    pub fn remote_cache(&self) -> Option<&Arc<remote::cache::RemoteCache>> {
        self.remote.as_ref()
    }

    pub fn verifies_reads(&self) -> bool {
        self.verify_reads
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn content_path(&self, area: Area, id: &ObjectId) -> PathBuf {
        content_path_under(&self.root, area, id)
    }

    pub fn object_path(&self, id: &ObjectId) -> PathBuf {
        Self::object_path_under(&self.root, id)
    }

    /// Where the store at `root` keeps object `id` (what [`Store::object_path`] returns).
    pub fn object_path_under(root: &Path, id: &ObjectId) -> PathBuf {
        content_path_under(root, Area::Object, id)
    }

    pub fn tree_path(&self, id: &ObjectId) -> PathBuf {
        self.content_path(Area::Tree, id)
    }

    fn image_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Whether object `id` is here: loose, or only in a pack (`store gc` removes the loose
    /// copies of packed objects, see [`pack`]).
    pub fn has_object(&self, id: &ObjectId) -> bool {
        self.object_path(id).exists() || self.packs().find(id).is_some()
    }

    /// Whether object `id` is here for good: present and not marked as fetched from a
    /// remote ([`remote::origin`]), which a bounded cache may delete again. An import or
    /// commit that finds a marked object writes it anew (unmarked) instead of naming the
    /// cache's copy, so its image never loses the object to an eviction. Call holding the
    /// store lock (shared): evictions, which hold it exclusively, cannot run in between.
    /// A packed object is kept: objects marked as fetched are never packed.
    pub fn has_kept_object(&self, id: &ObjectId) -> bool {
        let path = self.object_path(id);
        (path.exists() && remote::origin::of(&path).is_none()) || self.packs().find(id).is_some()
    }

    /// The length of object `id`, loose or packed.
    pub fn object_len(&self, id: &ObjectId) -> Result<u64, StoreError> {
        let path = self.object_path(id);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.packs().find(id) {
                Some(p) => Ok(p.len),
                None => Err(StoreError::MissingObject { id: *id, path }),
            },
            Err(e) => Err(StoreError::io("stat", &path, e)),
        }
    }

    /// The bytes of object `id`: its loose file, or else its packed copy, which is checked
    /// against its name first (a damaged pack is an error, never wrong bytes).
    pub fn read_object(&self, id: &ObjectId) -> Result<Vec<u8>, StoreError> {
        let path = self.object_path(id);
        match fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.packs().find(id) {
                Some(p) => p.read_checked(id),
                None => Err(StoreError::MissingObject { id: *id, path }),
            },
            Err(e) => Err(StoreError::io("read object", &path, e)),
        }
    }

    pub fn has_tree(&self, id: &ObjectId) -> bool {
        self.tree_path(id).exists()
    }

    /// The tree whose id is `text` or, for 4 to 63 hex digits, the one tree whose id starts
    /// with them.
    pub fn resolve_tree(&self, text: &str) -> Result<ObjectId, StoreError> {
        let bad = || StoreError::BadTreeId {
            text: text.to_owned(),
        };
        if let Ok(id) = text.parse::<ObjectId>() {
            return Ok(id);
        }
        let is_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if !(4..64).contains(&text.len()) || !text.bytes().all(is_hex) {
            return Err(bad());
        }
        let fan = self.root.join(Area::Tree.dir()).join(&text[..2]);
        let mut found = Vec::new();
        if let Ok(entries) = fs::read_dir(&fan) {
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io("list", &fan, e))?;
                let name = format!("{}{}", &text[..2], entry.file_name().to_string_lossy());
                if name.starts_with(text) {
                    found.extend(name.parse::<ObjectId>().ok());
                }
            }
        }
        match found.as_slice() {
            [id] => Ok(*id),
            [] => Err(StoreError::NoSuchTree {
                prefix: text.to_owned(),
            }),
            _ => Err(StoreError::AmbiguousTree {
                prefix: text.to_owned(),
                count: found.len(),
            }),
        }
    }

    /// Open an object read-only.
    pub fn open_object(&self, id: &ObjectId) -> Result<File, StoreError> {
        let path = self.object_path(id);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingObject { id: *id, path },
            _ => StoreError::io("open object", &path, e),
        })
    }

    /// Store `bytes` as an object; a no-op if it exists.
    pub fn put_object_bytes(&self, bytes: &[u8]) -> Result<ObjectId, StoreError> {
        self.put_object_from(bytes, None)
    }

    /// Store `bytes`, fetched from the remote store `origin`, as an object marked so
    /// ([`remote::origin`]): a bounded cache of that remote may delete it again. A no-op if
    /// it exists.
    pub fn put_fetched_object(&self, bytes: &[u8], origin: &str) -> Result<ObjectId, StoreError> {
        self.put_object_from(bytes, Some(origin))
    }

    fn put_object_from(&self, bytes: &[u8], origin: Option<&str>) -> Result<ObjectId, StoreError> {
        let id = ObjectId::of(bytes);
        let here = match origin {
            Some(_) => self.has_object(&id),
            None => self.has_kept_object(&id),
        };
        if !here {
            atomic::write(self, &self.object_path(&id), 0o444, |f| {
                io::Write::write_all(f, bytes)?;
                if let Some(url) = origin {
                    remote::origin::mark(f, url);
                }
                Ok(())
            })?;
            if bytes.len() as u64 > outboard::OUTBOARD_MIN {
                let outboard = Outboard::compute(bytes).expect("longer than one group");
                self.put_outboard(&id, &outboard)?;
            }
        }
        Ok(id)
    }

    /// Write the object `id` with `write`, which returns the BLAKE3 of what it wrote, under
    /// `tmp/`; [`Store::commit`] names it. If the hash differs from `id` (the source changed
    /// under us), the result is [`StoreError::HashMismatch`] and nothing is left behind.
    /// Objects over [`outboard::OUTBOARD_MIN`] get their outboard staged with them.
    pub fn stage_object(
        &self,
        id: ObjectId,
        write: impl FnOnce(&mut File) -> io::Result<ObjectId>,
    ) -> Result<Staged, StoreError> {
        let mut staged = atomic::stage(self, &self.object_path(&id), 0o444, |f| {
            let actual = write(f)?;
            if actual != id {
                return Err(atomic::Abort::Store(StoreError::HashMismatch {
                    expected: id,
                    actual,
                }));
            }
            Ok(())
        })?;
        self.attach_outboard(id, &mut staged)?;
        Ok(staged)
    }

    /// Durably name a batch of staged objects (two `syncfs` for the whole batch).
    pub fn commit(&self, batch: Vec<Staged>) -> Result<(), StoreError> {
        atomic::commit(self, batch)
    }

    /// Store a serialized tree manifest; a no-op if it exists.
    pub fn put_tree_bytes(&self, bytes: &[u8]) -> Result<ObjectId, StoreError> {
        let id = ObjectId::of(bytes);
        if !self.has_tree(&id) {
            let dest = self.tree_path(&id);
            atomic::write(self, &dest, 0o444, |f| Ok(io::Write::write_all(f, bytes)?))?;
        }
        Ok(id)
    }

    /// The serialized manifest of tree `id`.
    pub fn read_tree_bytes(&self, id: &ObjectId) -> Result<Vec<u8>, StoreError> {
        let path = self.tree_path(id);
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingTree { id: *id },
            _ => StoreError::io("read tree", &path, e),
        })
    }

    pub fn image_path(&self, name: &str) -> PathBuf {
        self.image_dir().join(format!("{name}.json"))
    }

    /// Create or replace the image record `name`.
    pub fn write_image_bytes(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        atomic::write(self, &self.image_path(name), 0o644, |f| {
            Ok(io::Write::write_all(f, bytes)?)
        })
    }

    pub fn read_image_bytes(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.image_path(name);
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingImage {
                name: name.to_owned(),
            },
            _ => StoreError::io("read image", &path, e),
        })
    }

    pub fn remove_image(&self, name: &str) -> Result<(), StoreError> {
        let path = self.image_path(name);
        fs::remove_file(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingImage {
                name: name.to_owned(),
            },
            _ => StoreError::io("remove image", &path, e),
        })?;
        atomic::sync_dir(&self.image_dir())
    }

    /// Names of all images, sorted.
    pub fn list_images(&self) -> Result<Vec<String>, StoreError> {
        names_with_suffix(&self.image_dir(), ".json")
    }

    /// Every content-addressed file in `area`: the ids, and the paths of stray files whose
    /// names are not ids.
    pub(crate) fn list(&self, area: Area) -> Result<(Vec<ObjectId>, Vec<PathBuf>), StoreError> {
        let top = self.root.join(area.dir());
        let mut ids = Vec::new();
        let mut strays = Vec::new();
        let read = |dir: &Path| fs::read_dir(dir).map_err(|e| StoreError::io("list", dir, e));
        for fan in read(&top)? {
            let fan = fan.map_err(|e| StoreError::io("list", &top, e))?;
            let fan_path = fan.path();
            let fan_name = fan.file_name().to_string_lossy().into_owned();
            if !fan_path.is_dir() {
                strays.push(fan_path);
                continue;
            }
            for entry in read(&fan_path)? {
                let entry = entry.map_err(|e| StoreError::io("list", &fan_path, e))?;
                let name = format!("{fan_name}{}", entry.file_name().to_string_lossy());
                match name.parse::<ObjectId>() {
                    Ok(id) if entry.path() == self.content_path(area, &id) => ids.push(id),
                    _ => strays.push(entry.path()),
                }
            }
        }
        ids.sort();
        Ok((ids, strays))
    }
}

/// The names of the files in `dir` that end in `suffix`, without it, sorted; none if `dir`
/// does not exist.
fn names_with_suffix(dir: &Path, suffix: &str) -> Result<Vec<String>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("list", dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list", dir, e))?;
        let file_name = entry.file_name();
        if let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(suffix)) {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}
